// Package adminclient is the typed Go client of a storage controller's admin API
// (`grow storaged`): volumes, images, snapshots, checks, pool and disk replacement, stats.
// The CLI and the control plane use it; it must never reach into the controller's
// internals or log the bearer token it carries.
package adminclient

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"time"
)

// DefaultURL is where a controller's admin API listens unless told otherwise.
const DefaultURL = "http://127.0.0.1:7480"

// Client talks to one storage controller's admin API.
type Client struct {
	base    *url.URL
	token   string
	http    *http.Client
	headers http.Header
}

// New returns a client of the controller at baseURL (for example http://127.0.0.1:7480) using token.
func New(baseURL, token string) (*Client, error) {
	if baseURL == "" {
		baseURL = DefaultURL
	}
	u, err := url.Parse(baseURL)
	if err != nil {
		return nil, fmt.Errorf("Invalid controller URL %q: %w", baseURL, err)
	}
	if u.Scheme != "http" && u.Scheme != "https" {
		return nil, fmt.Errorf("Invalid controller URL %q: the scheme must be http or https", baseURL)
	}
	if u.Host == "" {
		return nil, fmt.Errorf("Invalid controller URL %q: no host", baseURL)
	}
	return &Client{base: u, token: token, http: &http.Client{Transport: newTransport()}}, nil
}

// DialTimeout bounds connecting to a controller. Controllers sit on the operator's own
// network, where a connection takes milliseconds: a controller that is powered off or
// behind a dropping firewall is reported unreachable after this rather than after the
// system's 30 s, so that the control plane turns to its mirror partner in time.
var DialTimeout = 5 * time.Second

// newTransport returns the HTTP transport of a client: Go's defaults with DialTimeout.
func newTransport() *http.Transport {
	tr := http.DefaultTransport.(*http.Transport).Clone()
	d := &net.Dialer{Timeout: DialTimeout, KeepAlive: 30 * time.Second}
	tr.DialContext = d.DialContext
	return tr
}

// WithHTTPClient replaces the HTTP client (for TLS settings or timeouts) and returns c.
func (c *Client) WithHTTPClient(h *http.Client) *Client {
	c.http = h
	return c
}

// WithCACert makes the client trust the PEM certificates in caFile for an https controller URL.
func (c *Client) WithCACert(caFile string) (*Client, error) {
	pem, err := os.ReadFile(caFile)
	if err != nil {
		return nil, fmt.Errorf("Failed to read CA certificate %q: %w", caFile, err)
	}
	if _, err := c.WithCAPEM(pem); err != nil {
		return nil, fmt.Errorf("%w in %q", err, caFile)
	}
	return c, nil
}

// WithCAPEM makes the client trust the PEM certificates in pem for an https controller URL.
func (c *Client) WithCAPEM(pem []byte) (*Client, error) {
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(pem) {
		return nil, errors.New("No PEM certificate found")
	}
	tr := newTransport()
	tr.TLSClientConfig = &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12}
	c.http = &http.Client{Transport: tr}
	return c, nil
}

// ErrUnreachable wraps transport errors: the controller did not answer at all.
var ErrUnreachable = errors.New("controller unreachable")

// APIError is an error answer from the controller.
type APIError struct {
	// Status is the HTTP status code.
	Status  int
	Code    string
	Message string
}

func (e *APIError) Error() string {
	if e.Message == "" {
		return fmt.Sprintf("controller answered %d %s", e.Status, e.Code)
	}
	return e.Message
}

// IsCode reports whether err is an APIError with the given code.
func IsCode(err error, code string) bool {
	var ae *APIError
	return errors.As(err, &ae) && ae.Code == code
}

// IsNotFound reports whether err says the named object does not exist.
func IsNotFound(err error) bool { return IsCode(err, CodeNotFound) }

// StatusOf returns the HTTP status of an APIError in err's chain, or 0.
func StatusOf(err error) int {
	var ae *APIError
	if errors.As(err, &ae) {
		return ae.Status
	}
	return 0
}

// endpoint builds the URL of an API path whose segments are already escaped.
func (c *Client) endpoint(escapedPath string, q url.Values) string {
	u := *c.base
	u.RawPath = strings.TrimSuffix(u.EscapedPath(), "/") + escapedPath
	if p, err := url.PathUnescape(u.RawPath); err == nil {
		u.Path = p
	}
	u.RawQuery = q.Encode()
	return u.String()
}

// do sends a request and decodes a JSON answer into out (if non-nil).
func (c *Client) do(ctx context.Context, method, path string, q url.Values, in any, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return fmt.Errorf("Failed to encode request: %w", err)
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, c.endpoint(path, q), body)
	if err != nil {
		return fmt.Errorf("Failed to build request: %w", err)
	}
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	return c.send(req, out)
}

func (c *Client) send(req *http.Request, out any) error {
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	req.Header.Set("Accept", "application/json")
	for k, v := range c.headers {
		req.Header[k] = v
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return fmt.Errorf("Failed to reach storage controller: %w: %w", ErrUnreachable, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode >= 300 {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
		ae := &APIError{Status: resp.StatusCode}
		var e Error
		if json.Unmarshal(b, &e) == nil && e.Code != "" {
			ae.Code, ae.Message = e.Code, e.Message
		} else {
			ae.Code = http.StatusText(resp.StatusCode)
			ae.Message = fmt.Sprintf("controller answered %s: %s", resp.Status, strings.TrimSpace(string(b)))
		}
		return ae
	}
	if out == nil {
		_, _ = io.Copy(io.Discard, resp.Body)
		return nil
	}
	if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
		return fmt.Errorf("Failed to decode controller answer: %w", err)
	}
	return nil
}

// ListVolumes returns every volume, image and snapshot.
func (c *Client) ListVolumes(ctx context.Context) ([]Volume, error) {
	var v []Volume
	if err := c.do(ctx, http.MethodGet, "/v1/volumes", nil, nil, &v); err != nil {
		return nil, err
	}
	return v, nil
}

// GetVolume returns one volume.
func (c *Client) GetVolume(ctx context.Context, name string) (*Volume, error) {
	var v Volume
	if err := c.do(ctx, http.MethodGet, "/v1/volumes/"+url.PathEscape(name), nil, nil, &v); err != nil {
		return nil, err
	}
	return &v, nil
}

// CreateVolume creates an empty thin volume of size bytes.
func (c *Client) CreateVolume(ctx context.Context, name string, size int64) (*Volume, error) {
	var v Volume
	if err := c.do(ctx, http.MethodPost, "/v1/volumes", nil, CreateVolumeRequest{Name: name, Size: size}, &v); err != nil {
		return nil, err
	}
	return &v, nil
}

// DeleteVolume deletes a volume, image or snapshot; one with clones is refused.
func (c *Client) DeleteVolume(ctx context.Context, name string) error {
	return c.do(ctx, http.MethodDelete, "/v1/volumes/"+url.PathEscape(name), nil, nil, nil)
}

// ResizeVolume changes a volume's virtual size.
func (c *Client) ResizeVolume(ctx context.Context, name string, size int64) (*Volume, error) {
	var v Volume
	if err := c.do(ctx, http.MethodPost, "/v1/volumes/"+url.PathEscape(name)+"/resize", nil, ResizeVolumeRequest{Size: size}, &v); err != nil {
		return nil, err
	}
	return &v, nil
}

// CloneVolume creates dst as a copy-on-write clone of the image or snapshot src.
func (c *Client) CloneVolume(ctx context.Context, src, dst string) (*CloneResult, error) {
	var r CloneResult
	if err := c.do(ctx, http.MethodPost, "/v1/volumes/"+url.PathEscape(src)+"/clone", nil, CloneVolumeRequest{Name: dst}, &r); err != nil {
		return nil, err
	}
	return &r, nil
}

// Snapshot freezes the current content of volume as the read-only snapshot "volume@snap".
func (c *Client) Snapshot(ctx context.Context, volume, snap string) (*CloneResult, error) {
	var r CloneResult
	if err := c.do(ctx, http.MethodPost, "/v1/volumes/"+url.PathEscape(volume)+"/snapshots", nil, SnapshotRequest{Name: snap}, &r); err != nil {
		return nil, err
	}
	return &r, nil
}

// Image formats ImportImage accepts.
const (
	FormatRaw   = "raw"
	FormatQcow2 = "qcow2"
)

// DetectFormat looks at the first bytes of an image and says "qcow2" or "raw".
func DetectFormat(head []byte) string {
	if len(head) >= 4 && string(head[:4]) == "QFI\xfb" {
		return FormatQcow2
	}
	return FormatRaw
}

// ImportImage uploads size bytes of r as the new read-only image name. format is
// "raw" (streamed into the volume) or "qcow2" (converted by the controller).
// progress, if set, is called with the bytes sent so far. A failed import leaves no image.
func (c *Client) ImportImage(ctx context.Context, name string, r io.Reader, size int64, format string, progress func(int64)) (*Volume, error) {
	if format == "" {
		format = FormatRaw
	}
	body := r
	if progress != nil {
		body = &progressReader{r: r, fn: progress}
	}
	return c.putImage(ctx, name, url.Values{"format": {format}}, body, size)
}

// ImportImageSegments uploads the image name of size bytes as a segmented upload
// (FormatSegments) of bodyLen bytes read from body: only its data travels.
func (c *Client) ImportImageSegments(ctx context.Context, name string, size int64, body io.Reader, bodyLen int64) (*Volume, error) {
	q := url.Values{"format": {FormatSegments}, "size": {strconv.FormatInt(size, 10)}}
	return c.putImage(ctx, name, q, body, bodyLen)
}

// putImage sends length bytes of body as the upload of image name with query q.
func (c *Client) putImage(ctx context.Context, name string, q url.Values, body io.Reader, length int64) (*Volume, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodPut, c.endpoint("/v1/images/"+url.PathEscape(name), q), io.NopCloser(body))
	if err != nil {
		return nil, fmt.Errorf("Failed to build request: %w", err)
	}
	req.ContentLength = length
	req.Header.Set("Content-Type", "application/octet-stream")
	var v Volume
	if err := c.send(req, &v); err != nil {
		return nil, err
	}
	return &v, nil
}

type progressReader struct {
	r  io.Reader
	n  int64
	fn func(int64)
}

func (p *progressReader) Read(b []byte) (int, error) {
	n, err := p.r.Read(b)
	p.n += int64(n)
	if n > 0 {
		p.fn(p.n)
	}
	return n, err
}

// Check runs a consistency check of the controller's on-disk state.
func (c *Client) Check(ctx context.Context) (*CheckReport, error) {
	var r CheckReport
	if err := c.do(ctx, http.MethodPost, "/v1/check", nil, nil, &r); err != nil {
		return nil, err
	}
	return &r, nil
}

// Pool returns the pool's state and its disks.
func (c *Client) Pool(ctx context.Context) (*PoolStatus, error) {
	var s PoolStatus
	if err := c.do(ctx, http.MethodGet, "/v1/pool", nil, nil, &s); err != nil {
		return nil, err
	}
	return &s, nil
}

// ReplaceDisk starts rebuilding the mirror of disk old onto disk new in the background;
// poll Pool for progress or call WaitRebuild.
func (c *Client) ReplaceDisk(ctx context.Context, old, new string) (*PoolStatus, error) {
	var s PoolStatus
	if err := c.do(ctx, http.MethodPost, "/v1/pool/replace", nil, ReplaceDiskRequest{Old: old, New: new}, &s); err != nil {
		return nil, err
	}
	return &s, nil
}

// WaitRebuild polls the pool every interval until no disk is rebuilding, calling progress
// with the bytes done and to do. It returns the final status.
func (c *Client) WaitRebuild(ctx context.Context, interval time.Duration, progress func(done, total int64)) (*PoolStatus, error) {
	if interval <= 0 {
		interval = 200 * time.Millisecond
	}
	for {
		s, err := c.Pool(ctx)
		if err != nil {
			return nil, err
		}
		var done, total int64
		rebuilding := false
		for _, d := range s.Disks {
			if d.State == "rebuilding" {
				rebuilding = true
			}
			done += d.RebuildDone
			total += d.RebuildTotal
		}
		if progress != nil {
			progress(done, total)
		}
		if !rebuilding && s.State != "rebuilding" {
			return s, nil
		}
		select {
		case <-ctx.Done():
			return s, ctx.Err()
		case <-time.After(interval):
		}
	}
}

// Stats returns the controller's space, cache and I/O counters.
func (c *Client) Stats(ctx context.Context) (*Stats, error) {
	var s Stats
	if err := c.do(ctx, http.MethodGet, "/v1/stats", nil, nil, &s); err != nil {
		return nil, err
	}
	return &s, nil
}
