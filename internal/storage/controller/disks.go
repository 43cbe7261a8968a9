package controller

import (
	"errors"
	"fmt"
	"net/http"
	"os"

	"github.com/growserver/grow/internal/storage/adminclient"
	"github.com/growserver/grow/internal/storage/pool"
)

// handleReplaceDisk swaps a pool disk for a new one and starts the rebuild in the
// background; the answer (202) is the pool status, which clients poll for progress.
// A new path that does not exist yet is created as a sparse file as large as the
// largest surviving disk.
func (c *Controller) handleReplaceDisk(w http.ResponseWriter, r *http.Request) {
	var req adminclient.ReplaceDiskRequest
	if err := decode(r, &req); err != nil {
		c.fail(w, r, err)
		return
	}
	if req.Old == "" || req.New == "" {
		c.fail(w, r, fmt.Errorf("%w: both the old and the new disk path are needed", errBadRequest))
		return
	}
	c.opMu.Lock()
	defer c.opMu.Unlock()
	st := c.pool.Status()
	found := false
	for _, d := range st.Disks {
		if d.Path == req.Old {
			found = true
		}
		if d.Path == req.New {
			c.fail(w, r, fmt.Errorf("%w: %q is already a disk of the pool", errConflict, req.New))
			return
		}
		if d.State == pool.DiskRebuilding {
			c.fail(w, r, fmt.Errorf("%w: disk %q is still rebuilding", pool.ErrRebuildRunning, d.Path))
			return
		}
	}
	if !found {
		c.fail(w, r, fmt.Errorf("%w: %q is not a disk of the pool", errNotFound, req.Old))
		return
	}
	created := false
	if _, err := os.Stat(req.New); errors.Is(err, os.ErrNotExist) {
		size := c.diskSize(st, req.Old)
		if size <= 0 {
			c.fail(w, r, fmt.Errorf("%w: cannot tell the size for new disk %q; create it first", errBadRequest, req.New))
			return
		}
		if err := pool.CreateFileDisk(req.New, size); err != nil {
			c.fail(w, r, err)
			return
		}
		created = true
	} else if err != nil {
		c.fail(w, r, fmt.Errorf("Failed to inspect new disk %q: %w", req.New, err))
		return
	}
	if err := c.pool.Replace(req.Old, req.New); err != nil {
		if created {
			_ = os.Remove(req.New)
		}
		c.fail(w, r, fmt.Errorf("Failed to replace disk %q with %q: %w", req.Old, req.New, err))
		return
	}
	c.log.Info("Disk replacement started", "old", req.Old, "new", req.New)
	writeJSON(w, http.StatusAccepted, toAPIPool(c.pool.Status()))
}

// diskSize guesses the size a replacement disk needs: the largest other disk of the pool.
func (c *Controller) diskSize(st pool.Status, old string) int64 {
	var size int64
	for _, d := range st.Disks {
		if d.Path == old {
			continue
		}
		if fi, err := os.Stat(d.Path); err == nil && fi.Mode().IsRegular() && fi.Size() > size {
			size = fi.Size()
		}
	}
	if size == 0 {
		size = c.cfg.PoolSize
	}
	return size
}

func toAPIPool(s pool.Status) adminclient.PoolStatus {
	out := adminclient.PoolStatus{State: s.State, Size: s.Size, Disks: make([]adminclient.Disk, 0, len(s.Disks))}
	for _, d := range s.Disks {
		out.Disks = append(out.Disks, adminclient.Disk{
			Index: d.Index, Path: d.Path, Pair: d.Pair, State: d.State, Error: d.Error,
			RebuildDone: d.RebuildDone, RebuildTotal: d.RebuildTotal,
		})
	}
	return out
}
