// Package client is the Go client of the GrowServer control-plane API (`grow serve`).
// The grow CLI talks to the control plane only through it. It must never reach into
// the control plane's internals or print the bearer token it carries.
package client

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/growserver/grow/internal/api"
	"github.com/growserver/grow/internal/billing"
	"github.com/growserver/grow/internal/jobs"
	"github.com/growserver/grow/internal/store"
)

// DefaultURL is where `grow serve` listens unless told otherwise.
const DefaultURL = "http://127.0.0.1:7470"

// Re-exported API types, so callers need not import the server's packages.
type (
	Plan          = store.Plan
	Customer      = store.Customer
	User          = store.User
	Host          = api.HostView
	Storage       = api.StorageView
	Health        = jobs.Health
	IPPool        = store.IPPool
	IPLease       = store.IPLease
	Image         = store.Image
	Server        = store.Server
	Operation     = store.Operation
	Invoice       = billing.Invoice
	PlanRequest   = api.PlanRequest
	CustomerReq   = api.CustomerRequest
	UserRequest   = api.UserRequest
	UserWithToken = api.UserWithToken
	HostRequest   = api.HostRequest
	StorageReq    = api.StorageRequest
	IPPoolRequest = api.IPPoolRequest
	CreateServer  = jobs.CreateServerRequest
	ActionRequest = jobs.ActionRequest
)

// Client talks to one control plane.
type Client struct {
	base  string
	token string
	http  *http.Client
}

// New returns a client of the control plane at baseURL using token.
func New(baseURL, token string) (*Client, error) {
	u, err := url.Parse(baseURL)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, fmt.Errorf("Invalid API URL %q: want http(s)://host:port", baseURL)
	}
	return &Client{base: strings.TrimRight(baseURL, "/"), token: token, http: &http.Client{Timeout: 30 * time.Minute}}, nil
}

// APIError is an error answer of the API.
type APIError struct {
	Status  int
	Code    string
	Message string
}

func (e *APIError) Error() string { return e.Message }

// CodeOf returns the API error code in err's chain ("" if none).
func CodeOf(err error) string {
	var ae *APIError
	if errors.As(err, &ae) {
		return ae.Code
	}
	return ""
}

// StatusOf returns the HTTP status in err's chain (0 if none).
func StatusOf(err error) int {
	var ae *APIError
	if errors.As(err, &ae) {
		return ae.Status
	}
	return 0
}

func (c *Client) do(ctx context.Context, method, path string, q url.Values, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return fmt.Errorf("Failed to encode request: %w", err)
		}
		body = bytes.NewReader(b)
	}
	return c.send(ctx, method, path, q, body, "application/json", -1, nil, out)
}

func (c *Client) send(ctx context.Context, method, path string, q url.Values, body io.Reader, ctype string, size int64, hdr http.Header, out any) error {
	u := c.base + path
	if len(q) > 0 {
		u += "?" + q.Encode()
	}
	req, err := http.NewRequestWithContext(ctx, method, u, body)
	if err != nil {
		return fmt.Errorf("Failed to build request %s %s: %w", method, path, err)
	}
	if size >= 0 {
		req.ContentLength = size
	}
	if body != nil {
		req.Header.Set("Content-Type", ctype)
	}
	for k, v := range hdr {
		req.Header[k] = v
	}
	req.Header.Set("Authorization", "Bearer "+c.token)
	resp, err := c.http.Do(req)
	if err != nil {
		return fmt.Errorf("Failed to reach the control plane at %s: %w", c.base, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode >= 400 {
		var e api.Error
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
		if json.Unmarshal(b, &e) != nil || e.Code == "" {
			e = api.Error{Code: "http_" + fmt.Sprint(resp.StatusCode), Message: strings.TrimSpace(string(b))}
		}
		return &APIError{Status: resp.StatusCode, Code: e.Code, Message: e.Message}
	}
	switch o := out.(type) {
	case nil:
		_, _ = io.Copy(io.Discard, resp.Body)
		return nil
	case *[]byte:
		b, err := io.ReadAll(resp.Body)
		if err != nil {
			return fmt.Errorf("Failed to read answer of %s %s: %w", method, path, err)
		}
		*o = b
		return nil
	}
	if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
		return fmt.Errorf("Failed to decode answer of %s %s: %w", method, path, err)
	}
	return nil
}

// listAll follows the pages of a list endpoint.
func listAll[T any](ctx context.Context, c *Client, path string, q url.Values) ([]T, error) {
	if q == nil {
		q = url.Values{}
	}
	var all []T
	for {
		var page api.List[T]
		if err := c.do(ctx, http.MethodGet, path, q, nil, &page); err != nil {
			return nil, err
		}
		all = append(all, page.Items...)
		if page.Next == "" {
			return all, nil
		}
		q.Set("after", page.Next)
	}
}

func p(parts ...string) string {
	for i, s := range parts {
		if i%2 == 1 {
			parts[i] = url.PathEscape(s)
		}
	}
	return strings.Join(parts, "")
}

func jsonBody(v any) (io.Reader, error) {
	b, err := json.Marshal(v)
	if err != nil {
		return nil, fmt.Errorf("Failed to encode request: %w", err)
	}
	return bytes.NewReader(b), nil
}
