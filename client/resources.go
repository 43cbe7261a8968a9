package client

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"time"

	"github.com/coder/websocket"
)

// Whoami returns the user the token belongs to.
func (c *Client) Whoami(ctx context.Context) (User, error) {
	var u User
	return u, c.do(ctx, http.MethodGet, "/v1/whoami", nil, nil, &u)
}

// ListPlans returns every plan.
func (c *Client) ListPlans(ctx context.Context) ([]Plan, error) {
	return listAll[Plan](ctx, c, "/v1/plans", nil)
}

// SetPlan creates or edits a plan.
func (c *Client) SetPlan(ctx context.Context, name string, req PlanRequest) (Plan, error) {
	var out Plan
	return out, c.do(ctx, http.MethodPut, p("/v1/plans/", name), nil, req, &out)
}

// DeletePlan removes a plan no server uses.
func (c *Client) DeletePlan(ctx context.Context, name string) error {
	return c.do(ctx, http.MethodDelete, p("/v1/plans/", name), nil, nil, nil)
}

// ListCustomers returns every customer.
func (c *Client) ListCustomers(ctx context.Context) ([]Customer, error) {
	return listAll[Customer](ctx, c, "/v1/customers", nil)
}

// CreateCustomer adds a customer.
func (c *Client) CreateCustomer(ctx context.Context, req CustomerReq) (Customer, error) {
	var out Customer
	return out, c.do(ctx, http.MethodPost, "/v1/customers", nil, req, &out)
}

// GetCustomer returns a customer by ID or name.
func (c *Client) GetCustomer(ctx context.Context, id string) (Customer, error) {
	var out Customer
	return out, c.do(ctx, http.MethodGet, p("/v1/customers/", id), nil, nil, &out)
}

// UpdateCustomer edits a customer's email or quota.
func (c *Client) UpdateCustomer(ctx context.Context, id string, req CustomerReq) (Customer, error) {
	var out Customer
	return out, c.do(ctx, http.MethodPatch, p("/v1/customers/", id), nil, req, &out)
}

// DeleteCustomer removes a customer with no servers or users.
func (c *Client) DeleteCustomer(ctx context.Context, id string) error {
	return c.do(ctx, http.MethodDelete, p("/v1/customers/", id), nil, nil, nil)
}

// Invoice returns a customer's invoice for month (YYYY-MM).
func (c *Client) Invoice(ctx context.Context, customer, month string) (Invoice, error) {
	var out Invoice
	return out, c.do(ctx, http.MethodGet, p("/v1/customers/", customer, "/invoices/", month), nil, nil, &out)
}

// ListUsers returns every user, or those of one customer.
func (c *Client) ListUsers(ctx context.Context, customer string) ([]User, error) {
	q := url.Values{}
	if customer != "" {
		q.Set("customer", customer)
	}
	return listAll[User](ctx, c, "/v1/users", q)
}

// CreateUser adds a user; the answer carries its token, shown only this once.
func (c *Client) CreateUser(ctx context.Context, req UserRequest) (UserWithToken, error) {
	var out UserWithToken
	return out, c.do(ctx, http.MethodPost, "/v1/users", nil, req, &out)
}

// RotateToken gives a user a new token (the old one stops working).
func (c *Client) RotateToken(ctx context.Context, id string) (UserWithToken, error) {
	var out UserWithToken
	return out, c.do(ctx, http.MethodPost, p("/v1/users/", id, "/token"), nil, nil, &out)
}

// DeleteUser removes a user.
func (c *Client) DeleteUser(ctx context.Context, id string) error {
	return c.do(ctx, http.MethodDelete, p("/v1/users/", id), nil, nil, nil)
}

// ListHosts returns every host.
func (c *Client) ListHosts(ctx context.Context) ([]Host, error) {
	return listAll[Host](ctx, c, "/v1/hosts", nil)
}

// AddHost registers a host agent.
func (c *Client) AddHost(ctx context.Context, req HostRequest) (Host, error) {
	var out Host
	return out, c.do(ctx, http.MethodPost, "/v1/hosts", nil, req, &out)
}

// GetHost returns a host by ID or name.
func (c *Client) GetHost(ctx context.Context, id string) (Host, error) {
	var out Host
	return out, c.do(ctx, http.MethodGet, p("/v1/hosts/", id), nil, nil, &out)
}

// UpdateHost changes a host's state, address or capacity.
func (c *Client) UpdateHost(ctx context.Context, id string, req HostRequest) (Host, error) {
	var out Host
	return out, c.do(ctx, http.MethodPatch, p("/v1/hosts/", id), nil, req, &out)
}

// EvacuateHost puts a host in maintenance and starts moving every running server off it.
func (c *Client) EvacuateHost(ctx context.Context, id string) (Operation, error) {
	var out Operation
	return out, c.do(ctx, http.MethodPost, p("/v1/hosts/", id, "/evacuate"), nil, nil, &out)
}

// DeleteHost unregisters a host with no servers.
func (c *Client) DeleteHost(ctx context.Context, id string) error {
	return c.do(ctx, http.MethodDelete, p("/v1/hosts/", id), nil, nil, nil)
}

// ListStorage returns every storage controller.
func (c *Client) ListStorage(ctx context.Context) ([]Storage, error) {
	return listAll[Storage](ctx, c, "/v1/storage", nil)
}

// AddStorage registers a storage controller.
func (c *Client) AddStorage(ctx context.Context, req StorageReq) (Storage, error) {
	var out Storage
	return out, c.do(ctx, http.MethodPost, "/v1/storage", nil, req, &out)
}

// ListIPPools returns every IP pool.
func (c *Client) ListIPPools(ctx context.Context) ([]IPPool, error) {
	return listAll[IPPool](ctx, c, "/v1/ip-pools", nil)
}

// CreateIPPool adds an IP pool.
func (c *Client) CreateIPPool(ctx context.Context, req IPPoolRequest) (IPPool, error) {
	var out IPPool
	return out, c.do(ctx, http.MethodPost, "/v1/ip-pools", nil, req, &out)
}

// ListLeases returns the leases of a pool.
func (c *Client) ListLeases(ctx context.Context, pool string) ([]IPLease, error) {
	return listAll[IPLease](ctx, c, p("/v1/ip-pools/", pool, "/leases"), nil)
}

// DeleteIPPool removes a pool with no leases.
func (c *Client) DeleteIPPool(ctx context.Context, id string) error {
	return c.do(ctx, http.MethodDelete, p("/v1/ip-pools/", id), nil, nil, nil)
}

// ListImages returns every image.
func (c *Client) ListImages(ctx context.Context) ([]Image, error) {
	return listAll[Image](ctx, c, "/v1/images", nil)
}

// GetImage returns an image by ID or name.
func (c *Client) GetImage(ctx context.Context, id string) (Image, error) {
	var out Image
	return out, c.do(ctx, http.MethodGet, p("/v1/images/", id), nil, nil, &out)
}

// ImportOptions are the optional parts of an image import.
type ImportOptions struct {
	Format  string // "raw" (default) or "qcow2"
	Storage string
	Kernel  string
	Initrd  string
	Cmdline string
}

// ImportImage uploads size bytes of r as the gold master name.
func (c *Client) ImportImage(ctx context.Context, name string, r io.Reader, size int64, o ImportOptions) (Image, error) {
	q := url.Values{"name": {name}}
	for k, v := range map[string]string{"format": o.Format, "storage": o.Storage, "kernel": o.Kernel, "initrd": o.Initrd, "cmdline": o.Cmdline} {
		if v != "" {
			q.Set(k, v)
		}
	}
	var out Image
	return out, c.send(ctx, http.MethodPost, "/v1/images", q, r, "application/octet-stream", size, nil, &out)
}

// DeleteImage removes an image no server was cloned from.
func (c *Client) DeleteImage(ctx context.Context, id string) error {
	return c.do(ctx, http.MethodDelete, p("/v1/images/", id), nil, nil, nil)
}

// ServerFilter narrows ListServers.
type ServerFilter struct {
	Customer string
	Host     string
}

// ListServers returns the servers the caller may see.
func (c *Client) ListServers(ctx context.Context, f ServerFilter) ([]Server, error) {
	q := url.Values{}
	if f.Customer != "" {
		q.Set("customer", f.Customer)
	}
	if f.Host != "" {
		q.Set("host", f.Host)
	}
	return listAll[Server](ctx, c, "/v1/servers", q)
}

// GetServer returns a server by ID or name.
func (c *Client) GetServer(ctx context.Context, id string) (Server, error) {
	var out Server
	return out, c.do(ctx, http.MethodGet, p("/v1/servers/", id), nil, nil, &out)
}

// CreateServer starts provisioning a server; retrying with the same key never makes two.
func (c *Client) CreateServer(ctx context.Context, req CreateServer, idempotencyKey string) (Operation, error) {
	var out Operation
	hdr := http.Header{}
	if idempotencyKey != "" {
		hdr.Set("Idempotency-Key", idempotencyKey)
	}
	body, err := jsonBody(req)
	if err != nil {
		return out, err
	}
	return out, c.send(ctx, http.MethodPost, "/v1/servers", nil, body, "application/json", -1, hdr, &out)
}

// DeleteServer starts deleting a server.
func (c *Client) DeleteServer(ctx context.Context, id string) (Operation, error) {
	var out Operation
	return out, c.do(ctx, http.MethodDelete, p("/v1/servers/", id), nil, nil, &out)
}

// ServerAction starts start, stop, reboot, resize or migrate on a server.
func (c *Client) ServerAction(ctx context.Context, id, action string, req ActionRequest) (Operation, error) {
	var out Operation
	return out, c.do(ctx, http.MethodPost, p("/v1/servers/", id, "/", action), nil, req, &out)
}

// Console returns the recent console output of a server.
func (c *Client) Console(ctx context.Context, id string) ([]byte, error) {
	var out []byte
	return out, c.do(ctx, http.MethodGet, p("/v1/servers/", id, "/console"), nil, nil, &out)
}

// ListOperations returns the operations the caller may see.
func (c *Client) ListOperations(ctx context.Context, unfinished bool) ([]Operation, error) {
	q := url.Values{}
	if unfinished {
		q.Set("unfinished", "true")
	}
	return listAll[Operation](ctx, c, "/v1/operations", q)
}

// GetOperation returns one operation.
func (c *Client) GetOperation(ctx context.Context, id string) (Operation, error) {
	var out Operation
	return out, c.do(ctx, http.MethodGet, p("/v1/operations/", id), nil, nil, &out)
}

// CancelOperation asks a running operation to stop and undo its steps.
func (c *Client) CancelOperation(ctx context.Context, id string) (Operation, error) {
	var out Operation
	return out, c.do(ctx, http.MethodPost, p("/v1/operations/", id, "/cancel"), nil, nil, &out)
}

// WaitOperation polls an operation until it is finished, calling progress on each change.
func (c *Client) WaitOperation(ctx context.Context, id string, every time.Duration, progress func(Operation)) (Operation, error) {
	last := ""
	for {
		op, err := c.GetOperation(ctx, id)
		if err != nil {
			return op, err
		}
		if key := op.State + op.Step + string(rune(op.Progress)); progress != nil && key != last {
			progress(op)
			last = key
		}
		if op.Done() {
			return op, nil
		}
		select {
		case <-ctx.Done():
			return op, ctx.Err()
		case <-time.After(every):
		}
	}
}

// OpenAPI returns the API's OpenAPI 3 document.
func (c *Client) OpenAPI(ctx context.Context) ([]byte, error) {
	var out []byte
	return out, c.do(ctx, http.MethodGet, "/v1/openapi.yaml", nil, nil, &out)
}

// AttachConsole opens the serial console websocket of a server (binary messages both
// ways, the scrollback first). The caller closes it.
func (c *Client) AttachConsole(ctx context.Context, id string) (*websocket.Conn, error) {
	hdr := http.Header{}
	hdr.Set("Authorization", "Bearer "+c.token)
	ws, resp, err := websocket.Dial(ctx, c.base+p("/v1/servers/", id, "/console/ws"), &websocket.DialOptions{HTTPHeader: hdr, HTTPClient: c.http})
	if err != nil {
		if resp != nil && resp.StatusCode >= 400 {
			return nil, &APIError{Status: resp.StatusCode, Code: "http_" + fmt.Sprint(resp.StatusCode), Message: fmt.Sprintf("Failed to attach to the console of %q: HTTP %d", id, resp.StatusCode)}
		}
		return nil, fmt.Errorf("Failed to attach to the console of %q: %w", id, err)
	}
	ws.SetReadLimit(1 << 20)
	return ws, nil
}
