// Package agentclient is the typed Go client of the host agent's HTTP API, used by the
// control plane, the CLI and by one agent to reach another during a migration. It must
// never hold state beyond the connection settings.
package agentclient

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/growserver/grow/internal/host/hostapi"
)

// Client talks to one host agent.
type Client struct {
	base  string
	token string
	http  *http.Client
}

// New returns a client for the agent at baseURL (e.g. http://10.0.0.1:8444) with a bearer token.
func New(baseURL, token string) (*Client, error) {
	return NewWithHTTPClient(baseURL, token, &http.Client{Timeout: 5 * time.Minute})
}

// NewWithHTTPClient is New with a caller's HTTP client (custom transport, TLS, dialer).
func NewWithHTTPClient(baseURL, token string, hc *http.Client) (*Client, error) {
	u, err := url.Parse(baseURL)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, fmt.Errorf("Invalid agent URL %q: want http(s)://host:port", baseURL)
	}
	if token == "" {
		return nil, fmt.Errorf("No token given for agent %q", baseURL)
	}
	return &Client{base: strings.TrimRight(baseURL, "/"), token: token, http: hc}, nil
}

// NewWithCAPEM is New for an https agent whose certificate a CA in caPEM signed (New
// when caPEM is empty).
func NewWithCAPEM(baseURL, token, caPEM string) (*Client, error) {
	if caPEM == "" {
		return New(baseURL, token)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM([]byte(caPEM)) {
		return nil, fmt.Errorf("No PEM certificate in the CA given for agent %q", baseURL)
	}
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.TLSClientConfig = &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12}
	return NewWithHTTPClient(baseURL, token, &http.Client{Timeout: 5 * time.Minute, Transport: tr})
}

// HTTPClient is the HTTP client the client uses (for websocket dials).
func (c *Client) HTTPClient() *http.Client { return c.http }

// APIError is an error answer of the agent.
type APIError struct {
	Status  int
	Code    string
	Message string
}

func (e *APIError) Error() string {
	return fmt.Sprintf("%s (%s, HTTP %d)", e.Message, e.Code, e.Status)
}

// IsNotFound reports whether err is the agent saying the object does not exist.
func IsNotFound(err error) bool {
	var ae *APIError
	return errors.As(err, &ae) && ae.Code == hostapi.CodeNotFound
}

// IsConflict reports whether err is the agent refusing because of the current state.
func IsConflict(err error) bool {
	var ae *APIError
	return errors.As(err, &ae) && ae.Code == hostapi.CodeConflict
}

// IsUnauthorized reports whether the agent refused the token.
func IsUnauthorized(err error) bool {
	var ae *APIError
	return errors.As(err, &ae) && ae.Status == http.StatusUnauthorized
}

func (c *Client) do(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return fmt.Errorf("Failed to encode request: %w", err)
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, c.base+path, body)
	if err != nil {
		return fmt.Errorf("Failed to build request %s %s: %w", method, path, err)
	}
	req.Header.Set("Authorization", "Bearer "+c.token)
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return fmt.Errorf("Failed to reach host agent: %w", err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return fmt.Errorf("Failed to read agent reply: %w", err)
	}
	if resp.StatusCode >= 300 {
		var e hostapi.Error
		if json.Unmarshal(b, &e) != nil || e.Code == "" {
			e.Code, e.Message = hostapi.CodeInternal, strings.TrimSpace(string(b))
		}
		return &APIError{Status: resp.StatusCode, Code: e.Code, Message: e.Message}
	}
	if out != nil {
		if bp, ok := out.(*[]byte); ok {
			*bp = b
			return nil
		}
		if err := json.Unmarshal(b, out); err != nil {
			return fmt.Errorf("Failed to decode agent reply: %w", err)
		}
	}
	return nil
}

func vmPath(name string, rest string) string { return "/v1/vms/" + url.PathEscape(name) + rest }

// List returns every VM of the host.
func (c *Client) List(ctx context.Context) ([]hostapi.VM, error) {
	var out []hostapi.VM
	return out, c.do(ctx, http.MethodGet, "/v1/vms", nil, &out)
}

// Get returns one VM.
func (c *Client) Get(ctx context.Context, name string) (hostapi.VM, error) {
	var out hostapi.VM
	return out, c.do(ctx, http.MethodGet, vmPath(name, ""), nil, &out)
}

// Define registers a VM without starting it.
func (c *Client) Define(ctx context.Context, spec hostapi.VMSpec) (hostapi.VM, error) {
	var out hostapi.VM
	return out, c.do(ctx, http.MethodPost, "/v1/vms", spec, &out)
}

// Delete removes a VM; force kills it first if it runs.
func (c *Client) Delete(ctx context.Context, name string, force bool) error {
	q := ""
	if force {
		q = "?force=1"
	}
	return c.do(ctx, http.MethodDelete, vmPath(name, q), nil, nil)
}

// Start boots a VM.
func (c *Client) Start(ctx context.Context, name string) error {
	return c.do(ctx, http.MethodPost, vmPath(name, "/start"), nil, nil)
}

// Stop shuts a VM down through ACPI, forcing it off after timeout.
func (c *Client) Stop(ctx context.Context, name string, timeout time.Duration) error {
	return c.do(ctx, http.MethodPost, vmPath(name, "/stop"), hostapi.StopRequest{TimeoutSeconds: int(timeout / time.Second)}, nil)
}

// Reboot resets a VM.
func (c *Client) Reboot(ctx context.Context, name string) error {
	return c.do(ctx, http.MethodPost, vmPath(name, "/reboot"), nil, nil)
}

// Kill ends a VM's QEMU at once.
func (c *Client) Kill(ctx context.Context, name string) error {
	return c.do(ctx, http.MethodPost, vmPath(name, "/kill"), nil, nil)
}

// Resize grows a disk, memory or vCPUs of a running VM.
func (c *Client) Resize(ctx context.Context, name string, req hostapi.ResizeRequest) error {
	return c.do(ctx, http.MethodPost, vmPath(name, "/resize"), req, nil)
}

// Shape sets the rates of every NIC of a VM (bits per second, 0 = unlimited).
func (c *Client) Shape(ctx context.Context, name string, req hostapi.ShapeRequest) error {
	return c.do(ctx, http.MethodPost, vmPath(name, "/shape"), req, nil)
}

// Counters returns a VM's traffic counters.
func (c *Client) Counters(ctx context.Context, name string) (hostapi.Counters, error) {
	var out hostapi.Counters
	return out, c.do(ctx, http.MethodGet, vmPath(name, "/counters"), nil, &out)
}

// ConsoleLog returns the console scrollback of a VM.
func (c *Client) ConsoleLog(ctx context.Context, name string) ([]byte, error) {
	var out []byte
	return out, c.do(ctx, http.MethodGet, vmPath(name, "/console/log"), nil, &out)
}

// ConsoleURL returns the websocket URL of a VM's console.
func (c *Client) ConsoleURL(name string) string {
	u := c.base + vmPath(name, "/console")
	if strings.HasPrefix(u, "https://") {
		return "wss://" + strings.TrimPrefix(u, "https://")
	}
	return "ws://" + strings.TrimPrefix(u, "http://")
}

// Token is the bearer token the client sends.
func (c *Client) Token() string { return c.token }

// Migrate starts a live migration of a VM to another agent and returns its operation.
func (c *Client) Migrate(ctx context.Context, name string, req hostapi.MigrateRequest) (hostapi.Operation, error) {
	var out hostapi.Operation
	return out, c.do(ctx, http.MethodPost, vmPath(name, "/migrate"), req, &out)
}

// Announce makes the agent point the network at its taps for an arriving VM.
func (c *Client) Announce(ctx context.Context, name string) error {
	return c.do(ctx, http.MethodPost, vmPath(name, "/announce"), nil, nil)
}

// PrepareIncoming makes the agent start a VM waiting for a migration; it returns the URI to migrate to.
func (c *Client) PrepareIncoming(ctx context.Context, req hostapi.IncomingRequest) (hostapi.IncomingReply, error) {
	var out hostapi.IncomingReply
	return out, c.do(ctx, http.MethodPost, "/v1/incoming", req, &out)
}

// Operation returns the state of a long-running operation.
func (c *Client) Operation(ctx context.Context, id string) (hostapi.Operation, error) {
	var out hostapi.Operation
	return out, c.do(ctx, http.MethodGet, "/v1/operations/"+url.PathEscape(id), nil, &out)
}

// CancelOperation asks a running operation to stop.
func (c *Client) CancelOperation(ctx context.Context, id string) error {
	return c.do(ctx, http.MethodDelete, "/v1/operations/"+url.PathEscape(id), nil, nil)
}

// Wait polls an operation until it ends and returns its final state; an operation that
// ended other than succeeded is returned with an error.
func (c *Client) Wait(ctx context.Context, id string, every time.Duration) (hostapi.Operation, error) {
	for {
		op, err := c.Operation(ctx, id)
		if err != nil {
			return op, err
		}
		if op.Status != hostapi.OpRunning {
			if op.Status != hostapi.OpSucceeded {
				return op, fmt.Errorf("Operation %s (%s of %q) %s: %s", op.ID, op.Kind, op.VM, op.Status, op.Error)
			}
			return op, nil
		}
		select {
		case <-ctx.Done():
			return op, ctx.Err()
		case <-time.After(every):
		}
	}
}
