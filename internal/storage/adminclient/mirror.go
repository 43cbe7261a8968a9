package adminclient

import (
	"context"
	"net/http"
	"net/url"
)

// WithHeader returns a copy of c that sends header k: v with every request (used by
// a controller to mark requests it forwards to its mirror partner).
func (c *Client) WithHeader(k, v string) *Client {
	n := *c
	n.headers = http.Header{}
	for hk, hv := range c.headers {
		n.headers[hk] = append([]string(nil), hv...)
	}
	n.headers.Set(k, v)
	return &n
}

// MirrorStatus returns the mirrored pair as the controller sees it.
func (c *Client) MirrorStatus(ctx context.Context) (*MirrorStatus, error) {
	var s MirrorStatus
	if err := c.do(ctx, http.MethodGet, "/v1/mirror", nil, nil, &s); err != nil {
		return nil, err
	}
	return &s, nil
}

// MirrorHeartbeat is MirrorStatus for the partner's heartbeat: given the VolumesGen of
// the caller's last answer, a controller whose volumes did not change since leaves
// them out and sets VolumesSame (one that predates this sends them all).
func (c *Client) MirrorHeartbeat(ctx context.Context, volumesGen string) (*MirrorStatus, error) {
	var q url.Values
	if volumesGen != "" {
		q = url.Values{"volumes_since": {volumesGen}}
	}
	var s MirrorStatus
	if err := c.do(ctx, http.MethodGet, "/v1/mirror", q, nil, &s); err != nil {
		return nil, err
	}
	return &s, nil
}

// DirtyRegions returns the regions the controller marked for a volume.
func (c *Client) DirtyRegions(ctx context.Context, name string) (*DirtyRegions, error) {
	var d DirtyRegions
	if err := c.do(ctx, http.MethodGet, "/v1/mirror/volumes/"+url.PathEscape(name)+"/dirty", nil, nil, &d); err != nil {
		return nil, err
	}
	return &d, nil
}

// Drain moves every primary off the controller name (one step; repeat until Done).
func (c *Client) Drain(ctx context.Context, name string) (*MoveResult, error) {
	var r MoveResult
	if err := c.do(ctx, http.MethodPost, "/v1/mirror/controllers/"+url.PathEscape(name)+"/drain", nil, nil, &r); err != nil {
		return nil, err
	}
	return &r, nil
}

// Resume gives the controller name its home volumes back once they are resynced
// (one step; repeat until Done).
func (c *Client) Resume(ctx context.Context, name string) (*MoveResult, error) {
	var r MoveResult
	if err := c.do(ctx, http.MethodPost, "/v1/mirror/controllers/"+url.PathEscape(name)+"/resume", nil, nil, &r); err != nil {
		return nil, err
	}
	return &r, nil
}

// SetResyncRate sets the resync rate limit in bytes per second on both controllers (0: unlimited).
func (c *Client) SetResyncRate(ctx context.Context, rate int64) error {
	return c.do(ctx, http.MethodPost, "/v1/mirror/rate", nil, RateRequest{Rate: rate}, nil)
}

// Resolve settles a split volume by keeping the data of controller keep.
func (c *Client) Resolve(ctx context.Context, name, keep string) (*Volume, error) {
	var v Volume
	if err := c.do(ctx, http.MethodPost, "/v1/volumes/"+url.PathEscape(name)+"/resolve", nil, ResolveRequest{Keep: keep}, &v); err != nil {
		return nil, err
	}
	return &v, nil
}

// MirrorStateRequest is the body of POST /v1/mirror/volumes/{name}/state, which one
// controller of a pair sends the other to hand a volume over or resolve a split.
type MirrorStateRequest struct {
	// Role is the mirror role name to take (secondary, primary-synced, primary-degraded, stale).
	Role  string `json:"role"`
	Epoch uint64 `json:"epoch"`
	// Snapshot, if set, names a snapshot of the volume to take first (keeps data a resolve discards).
	Snapshot string `json:"snapshot,omitempty"`
}

// SetMirrorState makes the controller take a mirror role for a volume (pair-internal).
func (c *Client) SetMirrorState(ctx context.Context, name string, req MirrorStateRequest) error {
	return c.do(ctx, http.MethodPost, "/v1/mirror/volumes/"+url.PathEscape(name)+"/state", nil, req, nil)
}

// MirrorKick makes the controller re-check the pair at once (pair-internal).
func (c *Client) MirrorKick(ctx context.Context) error {
	return c.do(ctx, http.MethodPost, "/v1/mirror/kick", nil, nil, nil)
}

// MirrorUndrain clears the controller's drained mark (pair-internal, part of resume).
func (c *Client) MirrorUndrain(ctx context.Context) error {
	return c.do(ctx, http.MethodPost, "/v1/mirror/undrain", nil, nil, nil)
}

// AdoptMeta tells the partner that every metadata change made alone up to epoch has
// been replayed to it (pair-internal).
func (c *Client) AdoptMeta(ctx context.Context, epoch uint64) error {
	return c.do(ctx, http.MethodPost, "/v1/mirror/meta", nil, MetaAdoptRequest{Epoch: epoch}, nil)
}
