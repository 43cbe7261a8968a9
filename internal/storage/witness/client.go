package witness

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"time"
)

// Client asks a witness for grants.
type Client struct {
	base  string
	token string
	http  *http.Client
}

// NewClient returns a client of the witness at baseURL (http://IP:PORT) using token.
func NewClient(baseURL, token string) (*Client, error) {
	u, err := url.Parse(baseURL)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, fmt.Errorf("Invalid witness URL %q: want http://HOST:PORT", baseURL)
	}
	return &Client{base: strings.TrimSuffix(baseURL, "/"), token: token, http: &http.Client{Timeout: 2 * time.Second}}, nil
}

// Grant asks for epoch of key for holder. An error means the witness could not be
// reached or failed; the caller must then neither assume granted nor refused.
func (c *Client) Grant(ctx context.Context, key, holder string, epoch uint64) (GrantAnswer, error) {
	var ans GrantAnswer
	err := c.do(ctx, http.MethodPost, "/v1/grant", GrantRequest{Key: key, Holder: holder, Epoch: epoch}, &ans)
	return ans, err
}

// Get returns the witness's record of key.
func (c *Client) Get(ctx context.Context, key string) (Record, error) {
	var rec Record
	err := c.do(ctx, http.MethodGet, "/v1/records/"+url.PathEscape(key), nil, &rec)
	return rec, err
}

// Health checks that the witness answers.
func (c *Client) Health(ctx context.Context) error {
	return c.do(ctx, http.MethodGet, "/v1/health", nil, nil)
}

func (c *Client) do(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return fmt.Errorf("Failed to encode witness request: %w", err)
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, c.base+path, body)
	if err != nil {
		return fmt.Errorf("Failed to build witness request: %w", err)
	}
	req.Header.Set("Authorization", "Bearer "+c.token)
	resp, err := c.http.Do(req)
	if err != nil {
		return fmt.Errorf("Failed to reach the witness: %w", err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("Witness answered %s: %s", resp.Status, strings.TrimSpace(string(b)))
	}
	if out != nil {
		if err := json.Unmarshal(b, out); err != nil {
			return fmt.Errorf("Failed to decode witness answer: %w", err)
		}
	}
	return nil
}
