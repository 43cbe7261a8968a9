package controller

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/growserver/grow/internal/revert"
	"github.com/growserver/grow/internal/storage/adminclient"
	"github.com/growserver/grow/internal/storage/mirror"
	"github.com/growserver/grow/internal/storage/volume"
)

// mirrorRoutes are the pair's endpoints (registered only on a mirrored controller):
//
//	GET  /v1/mirror                          the pair as this controller sees it (also the heartbeat:
//	                                         ?volumes_since=GEN leaves out unchanged volume states)
//	POST /v1/mirror/rate                     {rate}: resync rate limit, on both controllers
//	POST /v1/mirror/controllers/{name}/drain   move every primary off {name} (one step; repeat until done)
//	POST /v1/mirror/controllers/{name}/resume  give {name} its home volumes back once resynced
//	POST /v1/volumes/{name}/resolve          {keep}: settle a split volume
//	GET  /v1/mirror/volumes/{name}/dirty     pair-internal: this side's dirty regions
//	POST /v1/mirror/volumes/{name}/state     pair-internal: take a role (hand-over, resolve)
//	POST /v1/mirror/meta                     pair-internal: the partner's changes made alone were replayed
//	POST /v1/mirror/kick, /v1/mirror/undrain pair-internal
func (c *Controller) mirrorRoutes(mux *http.ServeMux) {
	mux.HandleFunc("GET /v1/mirror", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, c.mir.status(r.URL.Query().Get("volumes_since")))
	})
	mux.HandleFunc("POST /v1/mirror/rate", c.handleMirrorRate)
	mux.HandleFunc("POST /v1/mirror/controllers/{name}/drain", c.handleDrain)
	mux.HandleFunc("POST /v1/mirror/controllers/{name}/resume", c.handleResume)
	mux.HandleFunc("POST /v1/volumes/{name}/resolve", c.handleResolve)
	mux.HandleFunc("GET /v1/mirror/volumes/{name}/dirty", c.handleDirty)
	mux.HandleFunc("POST /v1/mirror/volumes/{name}/state", c.handleMirrorState)
	mux.HandleFunc("POST /v1/mirror/meta", c.handleMetaAdopt)
	mux.HandleFunc("POST /v1/mirror/kick", func(w http.ResponseWriter, r *http.Request) {
		c.mir.kick()
		w.WriteHeader(http.StatusNoContent)
	})
	mux.HandleFunc("POST /v1/mirror/undrain", func(w http.ResponseWriter, r *http.Request) {
		if err := c.mir.setDrained(false); err != nil {
			c.fail(w, r, err)
			return
		}
		w.WriteHeader(http.StatusNoContent)
	})
}

func forwarded(r *http.Request) bool { return r.Header.Get(hdrForwarded) != "" }

// pairTimeout bounds an admin request that waits for the partner, so that a
// partner cut off in the middle of it cannot hold it forever.
const pairTimeout = 2 * time.Minute

func withPairTimeout(r *http.Request) (*http.Request, context.CancelFunc) {
	ctx, cancel := context.WithTimeout(r.Context(), pairTimeout)
	return r.WithContext(ctx), cancel
}

func (m *mirrorMgr) setDrained(d bool) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.drained == d {
		return nil
	}
	if err := writeJSONFile(filepath.Join(m.dir, "controller.json"), ctrlFile{Drained: d}); err != nil {
		return fmt.Errorf("Failed to record the drained mark: %w", err)
	}
	m.drained = d
	return nil
}

func (c *Controller) handleMirrorRate(w http.ResponseWriter, r *http.Request) {
	r, cancel := withPairTimeout(r)
	defer cancel()
	var req adminclient.RateRequest
	if err := decode(r, &req); err != nil {
		c.fail(w, r, err)
		return
	}
	if req.Rate < 0 {
		c.fail(w, r, fmt.Errorf("%w: the resync rate must not be negative", errBadRequest))
		return
	}
	c.mir.rate.Store(req.Rate)
	c.log.Info("Resync rate set", "bytes_per_second", req.Rate)
	if !forwarded(r) {
		if err := c.mir.fwd.SetResyncRate(r.Context(), req.Rate); err != nil {
			c.fail(w, r, fmt.Errorf("Set the rate here but not on the mirror partner: %w", err))
			return
		}
	}
	w.WriteHeader(http.StatusNoContent)
}

func (c *Controller) handleDirty(w http.ResponseWriter, r *http.Request) {
	v := c.mir.get(r.PathValue("name"))
	if v == nil {
		c.fail(w, r, fmt.Errorf("No mirrored volume %q: %w", r.PathValue("name"), errNotFound))
		return
	}
	regs := v.bm.Dirty()
	if regs == nil {
		regs = []uint64{}
	}
	writeJSON(w, http.StatusOK, adminclient.DirtyRegions{RegionSize: v.bm.RegionSize(), Regions: regs})
}

func (c *Controller) handleMirrorState(w http.ResponseWriter, r *http.Request) {
	var req adminclient.MirrorStateRequest
	if err := decode(r, &req); err != nil {
		c.fail(w, r, err)
		return
	}
	if err := c.mir.applyState(r.PathValue("name"), req); err != nil {
		c.fail(w, r, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

// applyState makes this side take a role for a volume (hand-over or resolve).
func (m *mirrorMgr) applyState(name string, req adminclient.MirrorStateRequest) error {
	v := m.get(name)
	if v == nil {
		return fmt.Errorf("No mirrored volume %q: %w", name, errNotFound)
	}
	role, ok := parseRole(req.Role)
	if !ok || role == mirror.RoleElecting || req.Epoch == 0 {
		return fmt.Errorf("%w: invalid mirror state %q at epoch %d", errBadRequest, req.Role, req.Epoch)
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	if req.Snapshot != "" {
		if _, err := m.c.mgr.Snapshot(name, req.Snapshot); err != nil {
			return fmt.Errorf("Failed to keep the discarded side as a snapshot: %w", err)
		}
	}
	st := mirror.State{Role: role, Epoch: req.Epoch}
	if err := v.setState(st); err != nil {
		return err
	}
	v.settleUntil = time.Now().Add(time.Second)
	if isPrimary(role) {
		if v.vol.Load() != nil {
			v.dropVolume()
		}
		if err := v.makeVolume(st); err != nil {
			return err
		}
	} else if v.vol.Load() != nil {
		v.dropVolume()
	}
	m.kick()
	return nil
}

// handover moves the primary of a synced volume from this controller to the partner:
// with writes quiesced and flushed on both sides, the witness grants epoch+1 to the
// partner, the partner becomes primary and this side secondary at that epoch.
func (m *mirrorMgr) handover(v *mvol, pv peerView) error {
	vol := v.vol.Load()
	st := v.target.State()
	if vol == nil || !isPrimary(st.Role) {
		return nil
	}
	if vol.Mode() != mirror.ModeSynced {
		return fmt.Errorf("volume %q is %v, not synced", v.name, vol.Mode())
	}
	next := st.Epoch + 1
	err := vol.Quiesce(func() error {
		if m.wit != nil {
			granted, ok := m.elect(v.name, pv.name, next)
			if !ok {
				return errors.New("the witness is unreachable")
			}
			if !granted {
				return fmt.Errorf("the witness refused epoch %d", next)
			}
		}
		var err error
		for i := 0; i < 3; i++ {
			ctx, cancel := context.WithTimeout(m.ctx, 5*time.Second)
			err = m.fwd.SetMirrorState(ctx, v.name, adminclient.MirrorStateRequest{Role: mirror.RolePrimarySynced.String(), Epoch: next})
			cancel()
			if err == nil {
				break
			}
		}
		if err != nil {
			return fmt.Errorf("the partner did not take the volume: %w", err)
		}
		v.mu.Lock()
		v.settleUntil = time.Now().Add(time.Second)
		v.mu.Unlock()
		if err := v.setState(mirror.State{Role: mirror.RoleSecondary, Epoch: next}); err != nil {
			return err
		}
		// Fenced before any write waiting for the quiesce can run: none may land
		// here (now the secondary) without reaching the new primary.
		vol.Fence()
		return nil
	})
	if err != nil {
		return fmt.Errorf("Failed to hand %q over: %w", v.name, err)
	}
	v.mu.Lock()
	if v.vol.Load() == vol {
		v.dropVolume()
	}
	v.mu.Unlock()
	m.c.log.Info("Volume handed over to the partner", "volume", v.name, "partner", pv.name, "epoch", next)
	return nil
}

// moveHome hands every volume this controller serves (of home, or of any home when
// home is "") over to the partner, and reports what moved and what waits for a resync.
func (m *mirrorMgr) moveHome(home string, pv peerView) adminclient.MoveResult {
	res := adminclient.MoveResult{Moved: []string{}, Waiting: []string{}}
	m.mu.Lock()
	vols := make([]*mvol, 0, len(m.vols))
	for _, v := range m.vols {
		if home == "" || v.home == home {
			vols = append(vols, v)
		}
	}
	m.mu.Unlock()
	sort.Slice(vols, func(i, j int) bool { return vols[i].name < vols[j].name })
	var errs []error
	for _, v := range vols {
		vol := v.vol.Load()
		if vol == nil {
			continue
		}
		if vol.Mode() != mirror.ModeSynced {
			res.Waiting = append(res.Waiting, v.name)
			vm := v.apiMirror(pv)
			res.Resync.Done += vm.Resync.Done
			res.Resync.Total += vm.Resync.Total
			continue
		}
		if err := m.handover(v, pv); err != nil {
			errs = append(errs, err)
			res.Waiting = append(res.Waiting, v.name)
			continue
		}
		res.Moved = append(res.Moved, v.name)
	}
	res.Resync.Rate = m.rate.Load()
	m.reconcile()
	ctx, cancel := context.WithTimeout(m.ctx, 5*time.Second)
	_ = m.fwd.MirrorKick(ctx)
	cancel()
	res.Done = len(res.Waiting) == 0
	if err := errors.Join(errs...); err != nil {
		res.Message = err.Error()
	}
	return res
}

func (c *Controller) handleDrain(w http.ResponseWriter, r *http.Request) {
	r, cancel := withPairTimeout(r)
	defer cancel()
	m := c.mir
	name := r.PathValue("name")
	pv, err := m.requirePeer()
	if err != nil {
		c.fail(w, r, err)
		return
	}
	switch name {
	case m.cfg.Name:
	case pv.name:
		res, err := m.peer.Drain(r.Context(), name)
		if err != nil {
			c.fail(w, r, err)
			return
		}
		writeJSON(w, http.StatusOK, res)
		return
	default:
		c.fail(w, r, fmt.Errorf("No controller %q in this pair (%s, %s): %w", name, m.cfg.Name, pv.name, errNotFound))
		return
	}
	if err := m.setDrained(true); err != nil {
		c.fail(w, r, err)
		return
	}
	res := m.moveHome("", pv)
	if res.Done {
		res.Message = fmt.Sprintf("%s serves no volume now and can be stopped", name)
	}
	writeJSON(w, http.StatusOK, res)
}

func (c *Controller) handleResume(w http.ResponseWriter, r *http.Request) {
	r, cancel := withPairTimeout(r)
	defer cancel()
	m := c.mir
	name := r.PathValue("name")
	pv, err := m.requirePeer()
	if err != nil {
		c.fail(w, r, err)
		return
	}
	switch name {
	case m.cfg.Name:
		// The partner holds this controller's volumes: it moves them back.
		if err := m.setDrained(false); err != nil {
			c.fail(w, r, err)
			return
		}
		res, err := m.fwd.Resume(r.Context(), name)
		if err != nil {
			c.fail(w, r, err)
			return
		}
		writeJSON(w, http.StatusOK, res)
		return
	case pv.name:
	default:
		c.fail(w, r, fmt.Errorf("No controller %q in this pair (%s, %s): %w", name, m.cfg.Name, pv.name, errNotFound))
		return
	}
	if !forwarded(r) {
		if err := m.fwd.MirrorUndrain(r.Context()); err != nil {
			c.fail(w, r, err)
			return
		}
	}
	res := m.moveHome(name, pv)
	if res.Done {
		res.Message = fmt.Sprintf("%s serves its home volumes again", name)
	} else if res.Message == "" {
		res.Message = fmt.Sprintf("waiting for %d volume(s) to finish resync", len(res.Waiting))
	}
	writeJSON(w, http.StatusOK, res)
}

func (c *Controller) handleResolve(w http.ResponseWriter, r *http.Request) {
	r, cancel := withPairTimeout(r)
	defer cancel()
	m := c.mir
	name := r.PathValue("name")
	var req adminclient.ResolveRequest
	if err := decode(r, &req); err != nil {
		c.fail(w, r, err)
		return
	}
	pv, err := m.requirePeer()
	if err != nil {
		c.fail(w, r, err)
		return
	}
	v := m.get(name)
	if v == nil {
		c.fail(w, r, fmt.Errorf("No mirrored volume %q: %w", name, errNotFound))
		return
	}
	if req.Keep != m.cfg.Name && req.Keep != pv.name {
		c.fail(w, r, fmt.Errorf("%w: --keep must name %s or %s", errBadRequest, m.cfg.Name, pv.name))
		return
	}
	local := v.target.State()
	fresh, err := m.peer.MirrorStatus(r.Context())
	if err != nil {
		c.fail(w, r, fmt.Errorf("%w: Failed to ask the partner for its state: %w", errUnavailable, err))
		return
	}
	ps, ok := fresh.Volumes[name]
	if !ok || local.Role != mirror.RoleFrozenSplit || ps.Role != mirror.RoleFrozenSplit.String() {
		c.fail(w, r, fmt.Errorf("Volume %q is not split (here %s, on %s %s): %w", name, local.Role, pv.name, ps.Role, errConflict))
		return
	}
	epoch := max(local.Epoch, ps.Epoch) + 1
	if m.wit != nil {
		granted, ok := m.elect(name, req.Keep, epoch)
		if !ok || !granted {
			c.fail(w, r, fmt.Errorf("The witness did not grant epoch %d to %s; try again: %w", epoch, req.Keep, errUnavailable))
			return
		}
	}
	snap := "split-" + strconv.FormatInt(time.Now().Unix(), 10)
	keep := adminclient.MirrorStateRequest{Role: mirror.RolePrimaryDegraded.String(), Epoch: epoch}
	if req.Keep == m.cfg.Name {
		err = m.fwd.SetMirrorState(r.Context(), name, adminclient.MirrorStateRequest{Role: mirror.RoleStale.String(), Epoch: ps.Epoch, Snapshot: snap})
		if err == nil {
			err = m.applyState(name, keep)
		}
	} else {
		err = m.applyState(name, adminclient.MirrorStateRequest{Role: mirror.RoleStale.String(), Epoch: local.Epoch, Snapshot: snap})
		if err == nil {
			err = m.fwd.SetMirrorState(r.Context(), name, keep)
		}
	}
	if err != nil {
		c.fail(w, r, fmt.Errorf("Failed to resolve %q: %w", name, err))
		return
	}
	c.log.Warn("Split resolved by the operator", "volume", name, "keep", req.Keep, "epoch", epoch, "discarded_side_snapshot", name+"@"+snap)
	c.answerVolume(w, r, http.StatusOK, name)
}

// ---- metadata operations on a mirrored pair ----

// mirCreate creates a volume on both controllers.
func (c *Controller) mirCreate(w http.ResponseWriter, r *http.Request, req adminclient.CreateVolumeRequest) {
	c.mirNewVolume(w, r, metaOp{Op: metaCreate, Name: req.Name, Size: req.Size},
		func() (volume.Info, error) { return c.mgr.Create(req.Name, req.Size) },
		func(cl *adminclient.Client) error {
			_, err := cl.CreateVolume(r.Context(), req.Name, req.Size)
			return err
		},
		func(info volume.Info, _ time.Duration) { writeJSON(w, http.StatusCreated, c.apiVolume(info)) })
}

// mirClone clones an image or snapshot into a new volume on both controllers.
func (c *Controller) mirClone(w http.ResponseWriter, r *http.Request, src string, req adminclient.CloneVolumeRequest) {
	c.mirNewVolume(w, r, metaOp{Op: metaClone, Name: req.Name, Source: src},
		func() (volume.Info, error) { return c.mgr.Clone(src, req.Name) },
		func(cl *adminclient.Client) error { _, err := cl.CloneVolume(r.Context(), src, req.Name); return err },
		func(info volume.Info, took time.Duration) {
			writeJSON(w, http.StatusCreated, adminclient.CloneResult{Volume: c.apiVolume(info), Duration: took.String(), Nanoseconds: took.Nanoseconds()})
		})
}

// mirNewVolume makes a new mirrored volume here (with build) and, unless the request was
// forwarded by the partner, on the partner too (with forward), undoing the local
// step if the partner refuses. Both sides start in sync at epoch 1. With the partner
// unreachable the volume is made here alone (mirror_alone.go).
func (c *Controller) mirNewVolume(w http.ResponseWriter, r *http.Request, op metaOp, build func() (volume.Info, error),
	forward func(*adminclient.Client) error, answer func(volume.Info, time.Duration)) {
	r, cancel := withPairTimeout(r)
	defer cancel()
	m := c.mir
	name := op.Name
	var home, primary string
	st := mirror.State{}
	var pv peerView
	var alone bool
	var err error
	if !forwarded(r) {
		pv, alone, err = m.peerOrAlone()
	}
	switch {
	case forwarded(r):
		home, primary = r.Header.Get(hdrHome), r.Header.Get(hdrPrimary)
		if home == "" || primary == "" {
			c.fail(w, r, fmt.Errorf("%w: a forwarded request needs the home and primary headers", errBadRequest))
			return
		}
		st = initialState(primary == m.cfg.Name)
		if e, err := strconv.ParseUint(r.Header.Get(hdrEpoch), 10, 64); err == nil && e > 0 {
			st.Epoch = e
		}
		if r.Header.Get(hdrInitial) == "stale" {
			st = mirror.State{Role: mirror.RoleStale}
		}
	case err != nil:
		c.fail(w, r, err)
		return
	}
	if !forwarded(r) {
		// Only originated operations are serialised here: a forwarded one waiting for
		// this lock while our own waits for the partner's would stall both.
		m.metaMu.Lock()
		defer m.metaMu.Unlock()
		if err := m.beforeChange(r.Context(), alone, op); err != nil {
			c.fail(w, r, err)
			return
		}
		home = homeOf(name, m.cfg.Name, m.peerNameNow())
		primary = m.placePrimary(home, pv)
		st = initialState(primary == m.cfg.Name)
		if !alone {
			st.Epoch = m.firstEpoch(r.Context(), name)
		}
		if alone {
			epoch, err := m.electNewVolume(r.Context(), name)
			if err != nil {
				c.fail(w, r, err)
				return
			}
			primary, st = m.cfg.Name, aloneState(epoch)
		}
	}
	rv := revert.New()
	defer rv.Fail()
	start := time.Now()
	info, err := build()
	took := time.Since(start)
	if err != nil {
		c.fail(w, r, err)
		return
	}
	rv.Add(func() { _ = c.mgr.Delete(name) })
	if _, err := m.openVol(name, home, st, true); err != nil {
		c.fail(w, r, err)
		return
	}
	rv.Add(func() { _ = m.removeVol(name) })
	if alone {
		c.log.Warn("Mirrored volume made alone: the partner receives it when it returns", "name", name, "home", home, "epoch", st.Epoch, "duration", took)
	} else if !forwarded(r) {
		if err := forward(m.fwd.WithHeader(hdrHome, home).WithHeader(hdrPrimary, primary).WithHeader(hdrEpoch, strconv.FormatUint(st.Epoch, 10))); err != nil {
			c.fail(w, r, fmt.Errorf("Failed to make volume %q on the mirror partner %s: %w", name, pv.name, err))
			return
		}
		c.log.Info("Mirrored volume made", "name", name, "home", home, "primary", primary, "duration", took)
	}
	rv.Success()
	m.kick()
	answer(info, took)
}

// firstEpoch is a new volume's epoch: 1, or one above what the witness remembers of an
// earlier volume of the same name, so that a takeover's epoch+1 can be granted.
func (m *mirrorMgr) firstEpoch(ctx context.Context, name string) uint64 {
	if m.wit == nil {
		return 1
	}
	wctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	rec, err := m.wit.Get(wctx, name)
	if err != nil {
		m.c.log.Warn("Witness unreachable at volume creation: epoch 1 (a volume of the same name deleted earlier may block its takeover)", "volume", name, "err", err)
		return 1
	}
	return rec.Epoch + 1
}

// initialState is a new volume's state: both sides are empty (or the same clone) and so in sync.
func initialState(primary bool) mirror.State {
	if primary {
		return mirror.State{Role: mirror.RolePrimarySynced, Epoch: 1}
	}
	return mirror.State{Role: mirror.RoleSecondary, Epoch: 1}
}

// mirDelete deletes a volume, image or snapshot on both controllers: the partner
// first (a refusal there changes nothing here), then here.
func (c *Controller) mirDelete(w http.ResponseWriter, r *http.Request, name string) {
	r, cancel := withPairTimeout(r)
	defer cancel()
	m := c.mir
	if !forwarded(r) {
		pv, alone, err := m.peerOrAlone()
		if err != nil {
			c.fail(w, r, err)
			return
		}
		m.metaMu.Lock()
		defer m.metaMu.Unlock()
		info, err := c.mgr.Get(name)
		if err != nil {
			c.fail(w, r, err)
			return
		}
		v := m.get(name)
		if v != nil && v.opens.Load() > 0 {
			c.fail(w, r, fmt.Errorf("Failed to delete %q: NBD clients have it open: %w", name, volume.ErrInUse))
			return
		}
		if alone && (v == nil || info.Kind != volume.KindVolume || v.vol.Load() == nil) {
			// Images and snapshots exist on both sides and go together; a volume whose
			// primary is the partner may still be in use there.
			c.fail(w, r, fmt.Errorf("%w: the mirror partner %s is unreachable and %q is not a volume this controller serves; it can be deleted once the partner returns", errUnavailable, m.cfg.Peer, name))
			return
		}
		if err := m.beforeChange(r.Context(), alone, metaOp{Op: metaDelete, Name: name}); err != nil {
			c.fail(w, r, err)
			return
		}
		if !alone {
			if err := m.fwd.DeleteVolume(r.Context(), name); err != nil && !adminclient.IsNotFound(err) {
				c.fail(w, r, fmt.Errorf("Failed to delete %q on the mirror partner %s: %w", name, pv.name, err))
				return
			}
		}
	}
	v := m.get(name)
	var home string
	var st mirror.State
	if v != nil {
		home, st = v.home, v.target.State()
		if err := m.removeVol(name); err != nil {
			c.fail(w, r, err)
			return
		}
	}
	if err := c.mgr.Delete(name); err != nil {
		if v != nil {
			m.reopenVol(name, home, st)
		}
		c.fail(w, r, err)
		return
	}
	c.log.Info("Volume deleted", "name", name, "forwarded", forwarded(r))
	w.WriteHeader(http.StatusNoContent)
}

// proxy passes a request this controller cannot serve as primary to the partner,
// unmarked, so the partner acts as its originator.
func (c *Controller) proxyToPrimary(w http.ResponseWriter, r *http.Request, name string, call func(ctx context.Context) error) {
	if err := call(r.Context()); err != nil {
		c.fail(w, r, err)
		return
	}
	c.answerVolume(w, r, http.StatusOK, name)
}

// mirResize grows a volume on both controllers with its writes quiesced.
func (c *Controller) mirResize(w http.ResponseWriter, r *http.Request, name string, size int64) {
	r, cancel := withPairTimeout(r)
	defer cancel()
	m := c.mir
	v := m.get(name)
	if forwarded(r) {
		if err := c.mgr.Resize(name, size); err != nil {
			c.fail(w, r, err)
			return
		}
		if v != nil {
			if err := v.resized(); err != nil {
				c.fail(w, r, err)
				return
			}
		}
		c.answerVolume(w, r, http.StatusOK, name)
		return
	}
	_, alone, err := m.peerOrAlone()
	if err != nil {
		c.fail(w, r, err)
		return
	}
	if alone {
		c.mirResizeAlone(w, r, v, name, size)
		return
	}
	if v == nil {
		// Not a mirrored volume (an image or snapshot): the volume manager refuses it.
		if err := c.mgr.Resize(name, size); err != nil {
			c.fail(w, r, err)
			return
		}
		c.answerVolume(w, r, http.StatusOK, name)
		return
	}
	vol := v.vol.Load()
	if vol == nil {
		c.proxyToPrimary(w, r, name, func(ctx context.Context) error { _, err := m.peer.ResizeVolume(ctx, name, size); return err })
		return
	}
	if !waitSynced(r.Context(), m, vol, syncWait) {
		c.fail(w, r, fmt.Errorf("Failed to resize %q: it is %v, not synced with its partner; try again after the resync: %w", name, vol.Mode(), errConflict))
		return
	}
	m.metaMu.Lock()
	defer m.metaMu.Unlock()
	if err := m.replayAlone(r.Context()); err != nil {
		c.fail(w, r, err)
		return
	}
	err = vol.Quiesce(func() error {
		if _, err := m.fwd.ResizeVolume(r.Context(), name, size); err != nil {
			return fmt.Errorf("Failed to resize %q on the mirror partner: %w", name, err)
		}
		if err := c.mgr.Resize(name, size); err != nil {
			c.log.Error("Resized on the partner but not here: the pair differs in size until fixed", "volume", name, "err", err)
			return err
		}
		return nil
	})
	if err != nil {
		c.fail(w, r, err)
		return
	}
	if err := v.resized(); err != nil {
		c.fail(w, r, err)
		return
	}
	c.log.Info("Mirrored volume resized", "name", name, "size", size)
	c.answerVolume(w, r, http.StatusOK, name)
}

// syncWait is how long a resize waits for a volume to be synced: a new volume's link is
// set up within a heartbeat or two, and a short resync takes a few seconds.
const syncWait = 10 * time.Second

// waitSynced waits up to d for vol to be synced with the partner (it is at once after
// its link is up, for a volume just made) and reports whether it is.
func waitSynced(ctx context.Context, m *mirrorMgr, vol *mirror.Volume, d time.Duration) bool {
	deadline := time.Now().Add(d)
	for vol.Mode() != mirror.ModeSynced {
		if time.Now().After(deadline) {
			return false
		}
		m.kick()
		select {
		case <-ctx.Done():
			return false
		case <-time.After(50 * time.Millisecond):
		}
	}
	return true
}

// resized re-creates the bitmap (and replicating export) for the volume's new size,
// keeping its marks (a volume only grows); NBD clients reconnect and see the new size.
func (v *mvol) resized() error {
	v.mu.Lock()
	defer v.mu.Unlock()
	st := v.target.State()
	wasPrimary := v.vol.Load() != nil
	if wasPrimary {
		v.dropVolume()
	}
	dirty := v.bm.Dirty()
	_ = v.bm.Close()
	_ = os.Remove(v.m.bitmapPath(v.name) + ".new")
	bm, err := mirror.OpenBitmap(v.m.bitmapPath(v.name)+".new", v.exp.Size(), mirror.DefaultRegionSize)
	if err != nil {
		return fmt.Errorf("Failed to create the bitmap of %q: %w", v.name, err)
	}
	if err := bm.MarkRegions(dirty); err == nil && len(dirty) > 0 {
		err = bm.Persist()
	}
	_ = bm.Close()
	if err != nil {
		return fmt.Errorf("Failed to carry the dirty regions of %q over to its new size: %w", v.name, err)
	}
	if err := renameSync(v.m.bitmapPath(v.name)+".new", v.m.bitmapPath(v.name)); err != nil {
		return err
	}
	if v.bm, err = mirror.OpenBitmap(v.m.bitmapPath(v.name), v.exp.Size(), mirror.DefaultRegionSize); err != nil {
		return fmt.Errorf("Failed to open the bitmap of %q: %w", v.name, err)
	}
	if wasPrimary || isPrimary(st.Role) {
		if err := v.makeVolume(st); err != nil {
			return err
		}
	}
	v.m.kick()
	return nil
}

// mirResizeAlone grows a volume this side serves while the partner is away; the resize
// is journaled and replayed to the partner when it returns (mirror_alone.go).
func (c *Controller) mirResizeAlone(w http.ResponseWriter, r *http.Request, v *mvol, name string, size int64) {
	m := c.mir
	if v == nil || v.vol.Load() == nil {
		c.fail(w, r, fmt.Errorf("%w: the mirror partner %s is unreachable and %q is not a volume this controller serves; it can be resized once the partner returns", errUnavailable, m.cfg.Peer, name))
		return
	}
	m.metaMu.Lock()
	defer m.metaMu.Unlock()
	if err := m.recordAlone(metaOp{Op: metaResize, Name: name, Size: size}); err != nil {
		c.fail(w, r, err)
		return
	}
	if err := c.mgr.Resize(name, size); err != nil {
		c.fail(w, r, err)
		return
	}
	if err := v.resized(); err != nil {
		c.fail(w, r, err)
		return
	}
	c.log.Warn("Mirrored volume resized alone: the partner follows when it returns", "name", name, "size", size)
	c.answerVolume(w, r, http.StatusOK, name)
}

// mirSnapshot snapshots a volume on both controllers at the same point of its write stream.
func (c *Controller) mirSnapshot(w http.ResponseWriter, r *http.Request, name string, req adminclient.SnapshotRequest) {
	r, cancel := withPairTimeout(r)
	defer cancel()
	m := c.mir
	v := m.get(name)
	snapshot := func() (volume.Info, time.Duration, error) {
		start := time.Now()
		info, err := c.mgr.Snapshot(name, req.Name)
		return info, time.Since(start), err
	}
	answer := func(info volume.Info, took time.Duration) {
		writeJSON(w, http.StatusCreated, adminclient.CloneResult{Volume: c.apiVolume(info), Duration: took.String(), Nanoseconds: took.Nanoseconds()})
	}
	if forwarded(r) || v == nil {
		if !forwarded(r) {
			if _, err := m.requirePeer(); err != nil {
				c.fail(w, r, err)
				return
			}
		}
		info, took, err := snapshot()
		if err != nil {
			c.fail(w, r, err)
			return
		}
		answer(info, took)
		return
	}
	if _, err := m.requirePeer(); err != nil {
		c.fail(w, r, err)
		return
	}
	vol := v.vol.Load()
	if vol == nil {
		res, err := m.peer.Snapshot(r.Context(), name, req.Name)
		if err != nil {
			c.fail(w, r, err)
			return
		}
		writeJSON(w, http.StatusCreated, res)
		return
	}
	m.metaMu.Lock()
	defer m.metaMu.Unlock()
	var info volume.Info
	var took time.Duration
	err := vol.Quiesce(func() error {
		var err error
		if info, took, err = snapshot(); err != nil {
			return err
		}
		if _, err := m.fwd.Snapshot(r.Context(), name, req.Name); err != nil {
			if derr := c.mgr.Delete(name + "@" + req.Name); derr != nil {
				c.log.Error("Failed to undo the local snapshot", "snapshot", name+"@"+req.Name, "err", derr)
			}
			return fmt.Errorf("Failed to snapshot %q on the mirror partner: %w", name, err)
		}
		return nil
	})
	if err != nil {
		c.fail(w, r, err)
		return
	}
	c.log.Info("Mirrored snapshot taken", "volume", name, "snapshot", req.Name)
	answer(info, took)
}

// pushImage copies a freshly imported image to the partner (which imports it too): only
// its data, as a segmented upload; a partner that does not know that format gets the
// whole image raw.
func (m *mirrorMgr) pushImage(ctx context.Context, name string) error {
	h, err := m.c.mgr.Open(name)
	if err != nil {
		return fmt.Errorf("Failed to open image %q to copy it to the partner: %w", name, err)
	}
	defer h.Close()
	size := h.Size()
	src := readerAtFunc(func(p []byte, off int64) (int, error) {
		n := min(int64(len(p)), size-off)
		if n <= 0 {
			return 0, io.EOF
		}
		if err := h.ReadAt(p[:n], off); err != nil {
			return 0, err
		}
		return int(n), nil
	})
	ranges, err := dataRanges(h, size)
	if err != nil {
		return fmt.Errorf("Failed to map image %q to copy it to the partner: %w", name, err)
	}
	segs := make([]adminclient.Segment, len(ranges))
	for i, r := range ranges {
		segs[i] = adminclient.Segment{Off: r[0], Len: r[1]}
	}
	pr, pw := io.Pipe()
	written := make(chan struct{})
	go func() {
		defer close(written)
		pw.CloseWithError(adminclient.WriteSegments(pw, src, segs))
	}()
	_, err = m.fwd.ImportImageSegments(ctx, name, size, pr, adminclient.SegmentsLength(segs))
	pr.Close() // ends the writer if the partner stopped reading early
	<-written
	if adminclient.StatusOf(err) == http.StatusBadRequest && strings.Contains(err.Error(), "unknown image format") {
		_, err = m.fwd.ImportImage(ctx, name, io.NewSectionReader(src, 0, size), size, adminclient.FormatRaw, nil)
	}
	if err != nil {
		return fmt.Errorf("Failed to copy image %q to the mirror partner: %w", name, err)
	}
	return nil
}

// dataRanges lists the runs of h's first size bytes that hold data (neither holes nor
// zeroes), as offset and length, merged where they touch.
func dataRanges(h *volume.Handle, size int64) ([][2]int64, error) {
	exts, err := h.Extents(0, size)
	if err != nil {
		return nil, err
	}
	var out [][2]int64
	var off int64
	for _, e := range exts {
		if !e.Hole && !e.Zero {
			if n := len(out); n > 0 && out[n-1][0]+out[n-1][1] == off {
				out[n-1][1] += e.Length
			} else {
				out = append(out, [2]int64{off, e.Length})
			}
		}
		off += e.Length
	}
	return out, nil
}

type readerAtFunc func(p []byte, off int64) (int, error)

func (f readerAtFunc) ReadAt(p []byte, off int64) (int, error) { return f(p, off) }

// decorate adds the mirror object and the NBD address to a volume in the API.
func (c *Controller) decorate(a *adminclient.Volume) {
	m := c.mir
	if m == nil {
		return
	}
	pv := m.view()
	v := m.get(a.Name)
	if v == nil {
		a.NBDAddress = c.advertisedNBD()
		return
	}
	vm := v.apiMirror(pv)
	a.Mirror = &vm
	a.NBDAddress = m.nbdAddrFor(v.home, vm.Primary, pv)
}

// nbdAddrFor is where clients open a volume of home: the home's service address when
// there is one (it follows the primary), else the current primary's NBD address.
func (m *mirrorMgr) nbdAddrFor(home, primary string, pv peerView) string {
	if p, ok := m.addrOf(home); ok && m.nbdPort > 0 {
		return net.JoinHostPort(p.Addr().String(), strconv.Itoa(m.nbdPort))
	}
	if primary == "" {
		primary = home
	}
	if primary != m.cfg.Name && pv.info != nil && primary == pv.name {
		return pv.info.NBDAddress
	}
	return m.c.advertisedNBD()
}
