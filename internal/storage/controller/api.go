package controller

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/pprof"
	"time"

	"github.com/growserver/grow/internal/storage/adminclient"
	"github.com/growserver/grow/internal/storage/pool"
	"github.com/growserver/grow/internal/storage/volume"
)

// maxJSONBody bounds every JSON request body.
const maxJSONBody = 1 << 20

// routes is the admin API; authtoken.Require wraps all of it, /metrics included.
//
//	GET    /v1/volumes                  list volumes, images and snapshots
//	POST   /v1/volumes                  create {name, size}
//	GET    /v1/volumes/{name}           one volume ("vol@snap" for a snapshot)
//	DELETE /v1/volumes/{name}           delete (409 while clones or snapshots depend on it)
//	POST   /v1/volumes/{name}/resize    {size}
//	POST   /v1/volumes/{name}/clone     {name}: copy-on-write clone of an image or snapshot
//	POST   /v1/volumes/{name}/snapshots {name}: read-only snapshot "vol@name"
//	PUT    /v1/images/{name}?format=    body: raw bytes (Content-Length = size) or a qcow2 file
//	POST   /v1/check                    consistency check of the on-disk state
//	GET    /v1/pool                     pool state, disks, rebuild progress
//	POST   /v1/pool/replace             {old, new}: 202, rebuild runs in the background
//	GET    /v1/stats                    space, cache and NBD counters
//	GET    /metrics                     the same for Prometheus
//
// Errors are {"code","message"} with 400 invalid, 401 unauthorized, 404 not_found,
// 409 exists/in_use/read_only/conflict, 507 no_space, 500 internal.
func (c *Controller) routes() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/volumes", c.handleListVolumes)
	mux.HandleFunc("POST /v1/volumes", c.handleCreateVolume)
	mux.HandleFunc("GET /v1/volumes/{name}", c.handleGetVolume)
	mux.HandleFunc("DELETE /v1/volumes/{name}", c.handleDeleteVolume)
	mux.HandleFunc("POST /v1/volumes/{name}/resize", c.handleResizeVolume)
	mux.HandleFunc("POST /v1/volumes/{name}/clone", c.handleCloneVolume)
	mux.HandleFunc("POST /v1/volumes/{name}/snapshots", c.handleSnapshot)
	mux.HandleFunc("PUT /v1/images/{name}", c.handleImportImage)
	mux.HandleFunc("POST /v1/check", c.handleCheck)
	mux.HandleFunc("GET /v1/pool", c.handlePool)
	mux.HandleFunc("POST /v1/pool/replace", c.handleReplaceDisk)
	mux.HandleFunc("GET /v1/stats", c.handleStats)
	mux.Handle("GET /metrics", c.metrics.handler())
	if c.mir != nil {
		c.mirrorRoutes(mux)
	}
	// Profiling, for operators chasing a slow path; behind the token like everything else.
	mux.HandleFunc("GET /debug/pprof/", pprof.Index)
	mux.HandleFunc("GET /debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("GET /debug/pprof/trace", pprof.Trace)
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusNotFound, adminclient.CodeNotFound, fmt.Sprintf("No such endpoint: %s %s", r.Method, r.URL.Path))
	})
	return mux
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}

func writeError(w http.ResponseWriter, status int, code, msg string) {
	writeJSON(w, status, adminclient.Error{Code: code, Message: msg})
}

// fail answers with the HTTP status and code that match err.
func (c *Controller) fail(w http.ResponseWriter, r *http.Request, err error) {
	status, code := http.StatusInternalServerError, adminclient.CodeInternal
	switch {
	case errors.Is(err, errBadRequest), errors.Is(err, volume.ErrInvalid), errors.Is(err, errShortUpload):
		status, code = http.StatusBadRequest, adminclient.CodeInvalid
	case errors.Is(err, volume.ErrNotFound):
		status, code = http.StatusNotFound, adminclient.CodeNotFound
	case errors.Is(err, volume.ErrExists):
		status, code = http.StatusConflict, adminclient.CodeExists
	case errors.Is(err, volume.ErrInUse):
		status, code = http.StatusConflict, adminclient.CodeInUse
	case errors.Is(err, volume.ErrReadOnly):
		status, code = http.StatusConflict, adminclient.CodeReadOnly
	case errors.Is(err, volume.ErrNoSpace):
		status, code = http.StatusInsufficientStorage, adminclient.CodeNoSpace
	case errors.Is(err, pool.ErrRebuildRunning), errors.Is(err, errConflict):
		status, code = http.StatusConflict, adminclient.CodeConflict
	case errors.Is(err, errNotFound):
		status, code = http.StatusNotFound, adminclient.CodeNotFound
	case errors.Is(err, errUnavailable), errors.Is(err, adminclient.ErrUnreachable):
		status, code = http.StatusServiceUnavailable, adminclient.CodeUnavailable
	default:
		// An answer of the mirror partner keeps its status and code.
		var ae *adminclient.APIError
		if errors.As(err, &ae) && ae.Status >= 400 {
			status, code = ae.Status, ae.Code
		}
	}
	if status >= 500 {
		c.log.Error("Admin request failed", "method", r.Method, "path", r.URL.Path, "err", err)
	} else {
		c.log.Info("Admin request refused", "method", r.Method, "path", r.URL.Path, "code", code, "err", err)
	}
	writeError(w, status, code, err.Error())
}

var (
	errBadRequest = errors.New("bad request")
	errNotFound   = errors.New("not found")
	errConflict   = errors.New("conflict")
)

// decode reads a JSON body into v, refusing unknown fields and trailing data.
func decode(r *http.Request, v any) error {
	dec := json.NewDecoder(io.LimitReader(r.Body, maxJSONBody))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("%w: invalid JSON body: %v", errBadRequest, err)
	}
	if dec.More() {
		return fmt.Errorf("%w: trailing data after the JSON body", errBadRequest)
	}
	return nil
}

func (c *Controller) handleListVolumes(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, c.apiVolumes())
}

func (c *Controller) handleGetVolume(w http.ResponseWriter, r *http.Request) {
	v, err := c.mgr.Get(r.PathValue("name"))
	if err != nil {
		c.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, c.apiVolume(v))
}

func (c *Controller) handleCreateVolume(w http.ResponseWriter, r *http.Request) {
	var req adminclient.CreateVolumeRequest
	if err := decode(r, &req); err != nil {
		c.fail(w, r, err)
		return
	}
	if req.Size <= 0 {
		c.fail(w, r, fmt.Errorf("%w: volume size must be positive, got %d", errBadRequest, req.Size))
		return
	}
	if c.mir != nil {
		c.mirCreate(w, r, req)
		return
	}
	v, err := c.mgr.Create(req.Name, req.Size)
	if err != nil {
		c.fail(w, r, err) // the volume manager names the object and the step
		return
	}
	c.log.Info("Volume created", "name", req.Name, "size", req.Size)
	writeJSON(w, http.StatusCreated, c.apiVolume(v))
}

func (c *Controller) answerVolume(w http.ResponseWriter, r *http.Request, status int, name string) {
	v, err := c.mgr.Get(name)
	if err != nil {
		c.fail(w, r, err)
		return
	}
	writeJSON(w, status, c.apiVolume(v))
}

func (c *Controller) handleDeleteVolume(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("name")
	if c.mir != nil {
		c.mirDelete(w, r, name)
		return
	}
	if err := c.mgr.Delete(name); err != nil {
		c.fail(w, r, err) // the volume manager names the object and the step
		return
	}
	c.log.Info("Volume deleted", "name", name)
	w.WriteHeader(http.StatusNoContent)
}

func (c *Controller) handleResizeVolume(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("name")
	var req adminclient.ResizeVolumeRequest
	if err := decode(r, &req); err != nil {
		c.fail(w, r, err)
		return
	}
	if req.Size <= 0 {
		c.fail(w, r, fmt.Errorf("%w: volume size must be positive, got %d", errBadRequest, req.Size))
		return
	}
	if c.mir != nil {
		c.mirResize(w, r, name, req.Size)
		return
	}
	if err := c.mgr.Resize(name, req.Size); err != nil {
		c.fail(w, r, err) // the volume manager names the object and the step
		return
	}
	c.log.Info("Volume resized", "name", name, "size", req.Size)
	c.answerVolume(w, r, http.StatusOK, name)
}

func (c *Controller) handleCloneVolume(w http.ResponseWriter, r *http.Request) {
	src := r.PathValue("name")
	var req adminclient.CloneVolumeRequest
	if err := decode(r, &req); err != nil {
		c.fail(w, r, err)
		return
	}
	if c.mir != nil {
		c.mirClone(w, r, src, req)
		return
	}
	start := time.Now()
	v, err := c.mgr.Clone(src, req.Name)
	took := time.Since(start)
	if err != nil {
		c.fail(w, r, err) // the volume manager names the object and the step
		return
	}
	c.log.Info("Volume cloned", "source", src, "name", req.Name, "duration", took)
	writeJSON(w, http.StatusCreated, adminclient.CloneResult{Volume: c.apiVolume(v), Duration: took.String(), Nanoseconds: took.Nanoseconds()})
}

func (c *Controller) handleSnapshot(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("name")
	var req adminclient.SnapshotRequest
	if err := decode(r, &req); err != nil {
		c.fail(w, r, err)
		return
	}
	if c.mir != nil {
		c.mirSnapshot(w, r, name, req)
		return
	}
	start := time.Now()
	v, err := c.mgr.Snapshot(name, req.Name)
	took := time.Since(start)
	if err != nil {
		c.fail(w, r, err) // the volume manager names the object and the step
		return
	}
	c.log.Info("Snapshot taken", "volume", name, "snapshot", req.Name, "duration", took)
	writeJSON(w, http.StatusCreated, adminclient.CloneResult{Volume: c.apiVolume(v), Duration: took.String(), Nanoseconds: took.Nanoseconds()})
}

func (c *Controller) handleCheck(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	rep, err := c.mgr.Check()
	if err != nil {
		c.fail(w, r, fmt.Errorf("Failed to check volumes: %w", err))
		return
	}
	out := toAPICheck(rep)
	out.Duration = time.Since(start).String()
	if !out.OK {
		c.log.Warn("Consistency check found problems", "problems", len(out.Problems))
	}
	writeJSON(w, http.StatusOK, out)
}

func (c *Controller) handlePool(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, toAPIPool(c.pool.Status()))
}

func (c *Controller) handleStats(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, c.stats())
}
