package controller

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/growserver/grow/internal/storage/adminclient"
	"github.com/growserver/grow/internal/storage/mirror"
	"github.com/growserver/grow/internal/storage/nbd"
)

// stateFile is DATA/mirror/NAME.json: one side's durable mirror state of a volume.
type stateFile struct {
	Home  string `json:"home"`
	Role  string `json:"role"`
	Epoch uint64 `json:"epoch"`
}

func parseRole(s string) (mirror.Role, bool) {
	for r := mirror.RoleSecondary; r <= mirror.RoleFrozenSplit; r++ {
		if r.String() == s {
			return r, true
		}
	}
	return 0, false
}

func isPrimary(r mirror.Role) bool {
	return r == mirror.RolePrimarySynced || r == mirror.RolePrimaryDegraded
}

// mvol is one mirrored volume on this controller. Its role and epoch live in the
// Target (whose lock the link server also uses); vol is the replicating export while
// this side is primary.
//
// mu serialises the volume's state changes, which may wait for the witness or the
// partner (a second or so); readers that must never wait for that (the admin API,
// the partner's heartbeat, NBD opens and requests) load vol without it. Lock order:
// mu before mirrorMgr.mu, never the reverse.
type mvol struct {
	m    *mirrorMgr
	name string
	home string

	exp    *export // the long-lived local handle shared by target and vol
	bm     *mirror.Bitmap
	target *mirror.Target
	fileMu sync.Mutex

	mu           sync.Mutex
	vol          atomic.Pointer[mirror.Volume] // set under mu
	resyncing    bool
	resyncCancel context.CancelFunc
	linkFailedAt time.Time
	// settleUntil: after a coordinated change (hand-over, resolve) the partner's state
	// as polled before it may be old; the role rules ignore it until then.
	settleUntil time.Time
	// lastLinkBytes and linkActiveAt track writes arriving over the link: a partner
	// that is writing to this side is alive, whatever the heartbeat says.
	lastLinkBytes int64
	linkActive    atomic.Int64 // unix nanoseconds
	opens         atomic.Int64
	// unpaired: the volume had no mirror state at load (made before this controller was
	// paired); it is adopted if the partner turns out to have no copy (adoptIfOnly).
	unpaired bool
}

// openVol opens the mirror state of name (creating its files when create is set).
func (m *mirrorMgr) openVol(name, home string, st mirror.State, create bool) (*mvol, error) {
	h, err := m.c.mgr.Open(name)
	if err != nil {
		return nil, fmt.Errorf("Failed to open volume %q for mirroring: %w", name, err)
	}
	exp := &export{h: h, io: &m.c.linkIO}
	if create {
		_ = os.Remove(m.bitmapPath(name))
	}
	bm, err := mirror.OpenBitmap(m.bitmapPath(name), h.Size(), mirror.DefaultRegionSize)
	if err != nil {
		exp.Close()
		return nil, fmt.Errorf("Failed to open the dirty-region bitmap of %q: %w", name, err)
	}
	v := &mvol{m: m, name: name, home: home, exp: exp, bm: bm}
	v.target = mirror.NewTarget(exp, st)
	v.target.Persist = v.persistFromLink
	if create {
		if err := v.writeState(st); err != nil {
			v.close()
			return nil, err
		}
	}
	if isPrimary(st.Role) {
		if err := v.makeVolume(st); err != nil {
			v.close()
			return nil, err
		}
	}
	m.mu.Lock()
	m.vols[name] = v
	m.mu.Unlock()
	return v, nil
}

func (v *mvol) writeState(st mirror.State) error {
	v.fileMu.Lock()
	defer v.fileMu.Unlock()
	if err := writeJSONFile(v.m.statePath(v.name), stateFile{Home: v.home, Role: st.Role.String(), Epoch: st.Epoch}); err != nil {
		return fmt.Errorf("Failed to persist mirror state of %q: %w", v.name, err)
	}
	return nil
}

// setState makes st durable, then effective.
func (v *mvol) setState(st mirror.State) error {
	if err := v.writeState(st); err != nil {
		return err
	}
	old := v.target.State()
	v.target.SetState(st)
	if old != st {
		v.m.c.log.Info("Mirror state changed", "volume", v.name, "from", old.Role.String(), "from_epoch", old.Epoch, "to", st.Role.String(), "epoch", st.Epoch)
	}
	return nil
}

// persistFromLink is the target's hook: a resync from the partner finished, this side
// holds every write of the new epoch, and its own dirty marks were copied over.
func (v *mvol) persistFromLink(st mirror.State) error {
	if err := v.writeState(st); err != nil {
		return err
	}
	for _, r := range v.bm.Dirty() {
		v.bm.Clear(r)
	}
	if err := v.bm.Persist(); err != nil {
		return fmt.Errorf("Failed to clear the dirty regions of %q after resync: %w", v.name, err)
	}
	v.m.c.log.Info("Resync from the partner complete", "volume", v.name, "epoch", st.Epoch)
	v.linkActive.Store(time.Now().UnixNano()) // no v.mu here: the link holds the target's lock
	v.m.kick()
	return nil
}

// makeVolume creates the replicating export for a primary role; v.mu may be held.
func (v *mvol) makeVolume(st mirror.State) error {
	vol, err := mirror.NewVolume(v.exp, v.bm)
	if err != nil {
		return err
	}
	vol.SetHoldOnPeerLoss(v.m.kick)
	vol.SetExclusive(st.Role == mirror.RolePrimaryDegraded)
	vol.HoldIfNotExclusive()
	v.vol.Store(vol)
	return nil
}

// dropVolume fences and forgets the replicating export (this side is no longer
// primary) and closes its NBD connections so that clients reconnect elsewhere; v.mu is held.
func (v *mvol) dropVolume() {
	if v.resyncCancel != nil {
		v.resyncCancel()
	}
	if vol := v.vol.Load(); vol != nil {
		vol.Fence()
		v.m.retiredResync.Add(vol.Progress().Bytes)
		v.vol.Store(nil)
	}
	v.m.conns.closeName(v.name)
}

func (v *mvol) resyncBytes() int64 {
	if vol := v.vol.Load(); vol != nil {
		return vol.Progress().Bytes
	}
	return 0
}

// close releases the volume's handle and bitmap (controller shutdown or volume deletion).
func (v *mvol) close() {
	v.mu.Lock()
	if v.resyncCancel != nil {
		v.resyncCancel()
	}
	vol := v.vol.Load()
	v.mu.Unlock()
	if vol != nil {
		// Fencing records what the partner may lack in the bitmap and never waits for it.
		vol.Fence()
	}
	_ = v.exp.Flush()
	_ = v.bm.Close()
	_ = v.exp.Close()
}

type serveKind int

const (
	serveNo serveKind = iota
	serveYes
	serveHeld
)

// serveState says whether this side serves the volume (primary and writable), holds
// it (primary waiting for the witness), or not.
func (v *mvol) serveState() serveKind {
	vol := v.vol.Load()
	if vol == nil {
		return serveNo
	}
	switch vol.Mode() {
	case mirror.ModeFenced:
		return serveNo
	case mirror.ModeHeld:
		return serveHeld
	}
	return serveYes
}

// reconcile applies the rules of one heartbeat to the volume.
func (v *mvol) reconcile(pv peerView) {
	m := v.m
	v.mu.Lock()
	defer v.mu.Unlock()
	st := v.target.State()
	var ps adminclient.PeerVolume
	known := false
	if pv.up && pv.info != nil {
		ps, known = pv.info.Volumes[v.name]
	}
	var pr mirror.Role
	if known {
		var ok bool
		if pr, ok = parseRole(ps.Role); !ok {
			known = false
		}
	}
	// Rules that depend on the partner's state (not on a state polled before a
	// coordinated change both sides made).
	if known && !pv.infoAt.Before(v.settleUntil) {
		next, act := mirror.Step(st, mirror.Event{Kind: mirror.EvPeerSeen, PeerRole: pr, PeerEpoch: ps.Epoch})
		if next != st {
			if err := v.setState(next); err != nil {
				m.c.log.Error("Failed to record mirror state", "volume", v.name, "err", err)
				return
			}
			if act.Kind == mirror.ActReportSplit {
				m.c.log.Error("Mirror split: both sides wrote alone; the volume is frozen until `grow storage volume resolve`", "volume", v.name, "epoch", next.Epoch, "partner_epoch", ps.Epoch)
			}
			if !isPrimary(next.Role) {
				v.dropVolume()
			}
			st = next
		}
	}
	switch {
	case isPrimary(st.Role):
		vol := v.vol.Load()
		if vol == nil {
			if err := v.makeVolume(st); err != nil {
				m.c.log.Error("Failed to open replicating export", "volume", v.name, "err", err)
				return
			}
			vol = v.vol.Load()
		}
		mode := vol.Mode()
		if mode == mirror.ModeFenced {
			// The link told us the partner holds a newer epoch.
			if err := v.setState(mirror.State{Role: mirror.RoleStale, Epoch: st.Epoch}); err == nil {
				v.dropVolume()
			}
			return
		}
		if mode == mirror.ModeSynced && st.Role == mirror.RolePrimaryDegraded {
			if err := v.setState(mirror.State{Role: mirror.RolePrimarySynced, Epoch: st.Epoch}); err != nil {
				m.c.log.Error("Failed to record mirror state", "volume", v.name, "err", err)
			}
			return
		}
		if !pv.up {
			if v.resyncing && v.resyncCancel != nil {
				v.resyncCancel()
			}
			if mode == mirror.ModeSynced || mode == mirror.ModeResyncing {
				if _, err := vol.Hold(); err != nil {
					m.c.log.Error("Failed to hold volume after losing the partner", "volume", v.name, "err", err)
				}
				mode = vol.Mode()
			}
		}
		if mode == mirror.ModeHeld {
			if !pv.up && !pv.dead && pv.lostFor < m.peerTimeout && m.neverSeenPeer() {
				// Just started: the partner's first answer decides, not a new epoch
				// (unless its process is known dead, or it stays silent a peer timeout).
				return
			}
			linkBroken := !v.linkFailedAt.IsZero() && time.Since(v.linkFailedAt) < 3*time.Second
			if pv.up && !linkBroken {
				if known && v.canResyncTo(pr, ps.Epoch, st.Epoch) && !v.resyncing {
					v.startResync(st.Epoch, pr == mirror.RoleStale)
				}
				return
			}
			if pv.up && !(known && pr == mirror.RoleSecondary && ps.Epoch == st.Epoch) {
				return
			}
			// Partner lost (or its link is broken): writing alone needs epoch+1.
			granted, ok := m.elect(v.name, m.cfg.Name, st.Epoch+1)
			next, _ := mirror.Step(mirror.State{Role: mirror.RoleElecting, Epoch: st.Epoch},
				mirror.Event{Kind: mirror.EvWitness, Granted: granted, Unreachable: !ok, Epoch: st.Epoch + 1})
			switch next.Role {
			case mirror.RolePrimaryDegraded:
				if err := v.setState(next); err != nil {
					m.c.log.Error("Failed to record mirror state", "volume", v.name, "err", err)
					return
				}
				vol.Release(true)
				m.c.log.Warn("Partner lost: volume goes on alone (degraded)", "volume", v.name, "epoch", next.Epoch)
			case mirror.RoleStale:
				if err := v.setState(next); err != nil {
					return
				}
				vol.Release(false)
				v.dropVolume()
				m.c.log.Warn("Partner took the volume over: this side is stale", "volume", v.name)
			}
			return
		}
		if pv.up && known && !v.resyncing && (mode == mirror.ModeDegraded) && v.canResyncTo(pr, ps.Epoch, st.Epoch) {
			v.startResync(st.Epoch, pr == mirror.RoleStale)
		}

	case v.unpaired && st == (mirror.State{Role: mirror.RoleStale}):
		v.adoptIfOnly(pv, known)

	case st.Role == mirror.RoleSecondary:
		if v.secondaryWaits(pv) {
			return
		}
		// Last check before deposing the primary: does it answer right now?
		if m.peerAnswers() {
			return
		}
		// The primary has been silent for longer than it may go on without fencing itself.
		granted, ok := m.elect(v.name, m.cfg.Name, st.Epoch+1)
		if !ok {
			return
		}
		if !granted {
			if err := v.setState(mirror.State{Role: mirror.RoleStale, Epoch: st.Epoch}); err == nil {
				m.c.log.Warn("Partner lost but the witness refused the takeover: this side is stale", "volume", v.name)
			}
			return
		}
		next := mirror.State{Role: mirror.RolePrimaryDegraded, Epoch: st.Epoch + 1}
		if err := v.setState(next); err != nil {
			m.c.log.Error("Failed to record mirror state", "volume", v.name, "err", err)
			return
		}
		if err := v.makeVolume(next); err != nil {
			m.c.log.Error("Failed to open replicating export", "volume", v.name, "err", err)
			return
		}
		m.c.log.Warn("Partner lost: took the volume over (degraded)", "volume", v.name, "epoch", next.Epoch)
	}
}

// secondaryWaits notes writes arriving over the link and reports whether the secondary
// leaves the primary in place: the partner is up, or has been silent (and its link
// idle) for less than the time its primary may go on before fencing itself (shorter
// if its process is known dead); v.mu is held.
func (v *mvol) secondaryWaits(pv peerView) bool {
	if n := v.target.BytesWritten.Load(); n != v.lastLinkBytes {
		v.lastLinkBytes = n
		v.linkActive.Store(time.Now().UnixNano())
	}
	delay := v.m.takeover
	if pv.dead {
		delay = deadAfter
	}
	return pv.up || pv.lostFor < delay || time.Since(time.Unix(0, v.linkActive.Load())) < delay
}

// idle reports whether reconcile(pv) would change nothing for the volume, checked
// without waiting for its lock: the partner's entry asks for no step, and this side is
// a synced or resyncing primary with the partner up, a secondary that leaves the
// primary in place, or a stale or split side. It does all that reconcile does for such
// a volume (noting link activity), so a pass runs reconcile only for the others.
func (v *mvol) idle(pv peerView) bool {
	if !v.mu.TryLock() {
		return false
	}
	defer v.mu.Unlock()
	st := v.target.State()
	if pv.up && pv.info != nil {
		if ps, known := pv.info.Volumes[v.name]; known {
			pr, ok := parseRole(ps.Role)
			if !ok {
				return false
			}
			if !pv.infoAt.Before(v.settleUntil) {
				if next, _ := mirror.Step(st, mirror.Event{Kind: mirror.EvPeerSeen, PeerRole: pr, PeerEpoch: ps.Epoch}); next != st {
					return false
				}
			}
		} else if isPrimary(st.Role) {
			return false
		}
	}
	switch {
	case isPrimary(st.Role):
		vol := v.vol.Load()
		if !pv.up || vol == nil {
			return false
		}
		switch vol.Mode() {
		case mirror.ModeSynced:
			return st.Role == mirror.RolePrimarySynced
		case mirror.ModeResyncing:
			return true
		}
		return false
	case v.unpaired && st == (mirror.State{Role: mirror.RoleStale}):
		return false
	case st.Role == mirror.RoleSecondary:
		return v.secondaryWaits(pv)
	}
	return true
}

// canResyncTo reports whether the partner in role pr at epoch pe may receive this
// side's data at epoch e: a secondary at e, or a stale side at an older epoch.
func (v *mvol) canResyncTo(pr mirror.Role, pe, e uint64) bool {
	return (pr == mirror.RoleSecondary && pe == e) || (pr == mirror.RoleStale && pe < e)
}

// startResync attaches the partner to the replicating export in the background; v.mu is held.
func (v *mvol) startResync(epoch uint64, peerStale bool) {
	m := v.m
	ctx, cancel := context.WithCancel(m.ctx)
	v.resyncing, v.resyncCancel = true, cancel
	vol := v.vol.Load()
	size := v.exp.Size()
	go func() {
		defer func() {
			cancel()
			v.mu.Lock()
			v.resyncing, v.resyncCancel = false, nil
			v.mu.Unlock()
			m.kick()
		}()
		var peerDirty []uint64
		if peerStale {
			dctx, dcancel := context.WithTimeout(ctx, 30*time.Second)
			d, err := m.fwd.DirtyRegions(dctx, v.name)
			dcancel()
			if err != nil {
				m.c.log.Warn("Failed to fetch the partner's dirty regions", "volume", v.name, "err", err)
				return
			}
			if d.RegionSize != v.bm.RegionSize() {
				m.c.log.Error("Partner uses another bitmap region size", "volume", v.name, "theirs", d.RegionSize, "ours", v.bm.RegionSize())
				return
			}
			peerDirty = d.Regions
		}
		link, err := m.dialLink(ctx, v.name, size, epoch)
		if err != nil {
			v.mu.Lock()
			v.linkFailedAt = time.Now()
			v.mu.Unlock()
			m.c.log.Warn("Failed to open the mirror link", "volume", v.name, "err", err)
			return
		}
		start := time.Now()
		dirty := vol.Bitmap().Count() + uint64(len(peerDirty))
		err = vol.Resync(ctx, link, mirror.ResyncOptions{RateFunc: m.rate.Load, PeerDirty: peerDirty})
		if err != nil {
			var stale *mirror.StaleError
			if !errors.As(err, &stale) && ctx.Err() == nil {
				v.mu.Lock()
				v.linkFailedAt = time.Now()
				v.mu.Unlock()
			}
			m.c.log.Warn("Resync stopped", "volume", v.name, "err", err)
			return
		}
		m.c.log.Info("Volume synced with the partner", "volume", v.name, "epoch", epoch, "regions", dirty, "duration", time.Since(start).Round(time.Millisecond))
	}()
}

// dialLink opens an authenticated mirror link to the partner for one volume.
func (m *mirrorMgr) dialLink(ctx context.Context, name string, size int64, epoch uint64) (*mirror.Link, error) {
	m.mu.Lock()
	info := m.info
	m.mu.Unlock()
	if info == nil || info.LinkAddress == "" {
		return nil, errors.New("the partner's mirror link address is not known yet")
	}
	dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	var cfg *tls.Config
	if m.linkTLS != nil {
		cfg = m.clientTLS()
		if cfg.ServerName == "" {
			// A verified link checks the partner's certificate against the address dialled.
			cfg.ServerName, _, _ = net.SplitHostPort(info.LinkAddress)
		}
	}
	select {
	case m.linkDials <- struct{}{}:
	case <-dctx.Done():
		return nil, fmt.Errorf("Failed to dial the mirror link %s: %w", info.LinkAddress, dctx.Err())
	}
	defer func() { <-m.linkDials }()
	return openLink(dctx, info.LinkAddress, cfg, m.peerTok, name, size, epoch)
}

func (m *mirrorMgr) lookupTarget(name string) (*mirror.Target, bool) {
	v := m.get(name)
	if v == nil {
		return nil, false
	}
	return v.target, true
}

func (m *mirrorMgr) drainedNow() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.drained
}

// apiMirror is the volume's mirror object in the admin API.
func (v *mvol) apiMirror(pv peerView) adminclient.VolumeMirror {
	st := v.target.State()
	m := v.m
	out := adminclient.VolumeMirror{Role: "secondary", Epoch: st.Epoch, Home: v.home, DirtyBytes: int64(v.bm.Count()) * v.bm.RegionSize()}
	out.Resync.Rate = m.rate.Load()
	vol := v.vol.Load()
	var ps adminclient.PeerVolume
	known := false
	if pv.up && pv.info != nil {
		ps, known = pv.info.Volumes[v.name]
	}
	switch {
	case isPrimary(st.Role) && vol != nil:
		out.Role, out.Primary = "primary", m.cfg.Name
		switch vol.Mode() {
		case mirror.ModeSynced:
			out.State = adminclient.MirrorSynced
			// Its marks are write intent (the activity log), not data the partner lacks.
			out.DirtyBytes = 0
		case mirror.ModeResyncing:
			out.State = adminclient.MirrorResyncing
			p := vol.Progress()
			rs := vol.Bitmap().RegionSize()
			out.Resync.Done, out.Resync.Total = int64(p.Done)*rs, int64(p.Total)*rs
		case mirror.ModeHeld:
			out.State = adminclient.MirrorFrozen
		case mirror.ModeFenced:
			out.State = adminclient.MirrorStale
		default:
			out.State = adminclient.MirrorDegraded
		}
	case st.Role == mirror.RoleFrozenSplit:
		out.State = adminclient.MirrorSplit
	case st.Role == mirror.RoleStale:
		out.State = adminclient.MirrorStale
		if known && ps.Mode == mirror.ModeResyncing.String() {
			out.State = adminclient.MirrorResyncing
		}
		if known && isPrimaryName(ps.Role) {
			out.Primary = pv.name
		}
	default:
		out.State = adminclient.MirrorDegraded
		if known && isPrimaryName(ps.Role) {
			out.Primary = pv.name
			switch ps.Mode {
			case mirror.ModeSynced.String():
				if ps.Epoch == st.Epoch {
					out.State = adminclient.MirrorSynced
				}
			case mirror.ModeResyncing.String():
				out.State = adminclient.MirrorResyncing
			}
		}
	}
	if m.fencedNow() && out.Role == "primary" {
		// Fenced: it serves nobody and has given its addresses up.
		out.Role, out.State, out.Primary = "secondary", adminclient.MirrorFrozen, ""
	}
	return out
}

func isPrimaryName(r string) bool {
	return r == mirror.RolePrimarySynced.String() || r == mirror.RolePrimaryDegraded.String()
}

func (m *mirrorMgr) fencedNow() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.fenced
}

// peerVolume is what the partner learns about the volume from GET /v1/mirror.
func (v *mvol) peerVolume() adminclient.PeerVolume {
	st := v.target.State()
	p := adminclient.PeerVolume{Role: st.Role.String(), Epoch: st.Epoch, Home: v.home}
	if vol := v.vol.Load(); vol != nil {
		p.Mode = vol.Mode().String()
	}
	return p
}

// open is exports.Open for a mirrored volume: only its current primary serves it.
func (m *mirrorMgr) open(name string) (nbd.Export, bool, error) {
	v := m.get(name)
	if v == nil {
		return nil, false, nil
	}
	vol := v.vol.Load()
	if vol == nil || vol.Mode() == mirror.ModeFenced || m.fencedNow() {
		m.c.log.Info("NBD open refused: not the volume's primary here", "volume", name)
		return nil, true, fmt.Errorf("%w: volume %q is not served by this controller now (it is the mirror secondary, or stale)", nbd.ErrUnknownExport, name)
	}
	m.c.io.connections.Add(1)
	m.c.io.open.Add(1)
	v.opens.Add(1)
	return &mirExport{v: v, vol: vol, inner: vol.Export(), io: &m.c.io}, true, nil
}

// mirExport is one NBD connection's view of a mirrored volume on its primary. Once the
// primary is deposed, every request closes the connection (so QEMU reconnects to the
// new primary) instead of answering with an error the guest would see.
type mirExport struct {
	v      *mvol
	vol    *mirror.Volume
	inner  nbd.Export
	io     *ioCounters
	closed atomic.Bool
}

var errDeposed = errors.New("this controller is no longer the volume's primary")

func (x *mirExport) deposed() bool {
	return x.v.vol.Load() != x.vol || x.vol.Mode() == mirror.ModeFenced
}

// check turns a fenced result into a closed connection.
func (x *mirExport) check(err error) error {
	if err == nil {
		return nil
	}
	if errors.Is(err, mirror.ErrFenced) || x.deposed() {
		x.v.m.conns.closeName(x.v.name)
		return fmt.Errorf("%w: %w", errDeposed, err)
	}
	x.io.errors.Add(1)
	return err
}

func (x *mirExport) gate() error {
	if x.deposed() {
		x.v.m.conns.closeName(x.v.name)
		return errDeposed
	}
	return nil
}

func (x *mirExport) Size() int64    { return x.inner.Size() }
func (x *mirExport) ReadOnly() bool { return false }

func (x *mirExport) ReadAt(p []byte, off int64) error {
	if err := x.gate(); err != nil {
		return err
	}
	x.io.readOps.Add(1)
	x.io.readBytes.Add(int64(len(p)))
	return x.check(x.inner.ReadAt(p, off))
}

// SpliceRead is ReadAt into a pipe (nbd.ReadSplicer), from the primary's own volume
// as ReadAt; on an error the server retries with ReadAt, which counts and maps it.
func (x *mirExport) SpliceRead(fd int, off int64, n int) error {
	if err := x.gate(); err != nil {
		return err
	}
	if err := x.vol.SpliceRead(fd, off, n); err != nil {
		return err
	}
	x.io.readOps.Add(1)
	x.io.readBytes.Add(int64(n))
	return nil
}

func (x *mirExport) WriteAt(p []byte, off int64, fua bool) error {
	if err := x.gate(); err != nil {
		return err
	}
	x.io.writeOps.Add(1)
	x.io.writeBytes.Add(int64(len(p)))
	return x.check(x.inner.WriteAt(p, off, fua))
}

func (x *mirExport) Flush() error {
	if err := x.gate(); err != nil {
		return err
	}
	x.io.flushOps.Add(1)
	return x.check(x.inner.Flush())
}

func (x *mirExport) Trim(off, length int64, fua bool) error {
	if err := x.gate(); err != nil {
		return err
	}
	x.io.trimOps.Add(1)
	return x.check(x.inner.Trim(off, length, fua))
}

func (x *mirExport) WriteZeroes(off, length int64, f nbd.ZeroFlags) error {
	if err := x.gate(); err != nil {
		return err
	}
	x.io.zeroOps.Add(1)
	return x.check(x.inner.WriteZeroes(off, length, f))
}

func (x *mirExport) Cache(off, length int64) error {
	x.io.cacheOps.Add(1)
	return x.check(x.inner.Cache(off, length))
}

func (x *mirExport) Extents(off, length int64) ([]nbd.Extent, error) {
	if err := x.gate(); err != nil {
		return nil, err
	}
	e, err := x.inner.Extents(off, length)
	return e, x.check(err)
}

func (x *mirExport) Close() error {
	if x.closed.CompareAndSwap(false, true) {
		x.io.open.Add(-1)
		x.v.opens.Add(-1)
	}
	return nil
}

// removeVol tears down the mirror state of a volume about to be deleted (refused while
// NBD clients have it open) and deletes its files.
func (m *mirrorMgr) removeVol(name string) error {
	v := m.get(name)
	if v == nil {
		return nil
	}
	if n := v.opens.Load(); n > 0 {
		return fmt.Errorf("Failed to delete %q: %d NBD connection(s) have it open: %w", name, n, errConflict)
	}
	m.mu.Lock()
	delete(m.vols, name)
	m.mu.Unlock()
	v.mu.Lock()
	if v.vol.Load() != nil {
		v.dropVolume()
	}
	v.mu.Unlock()
	v.close()
	_ = os.Remove(m.bitmapPath(name))
	if err := os.Remove(m.statePath(name)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("Failed to remove mirror state of %q: %w", name, err)
	}
	return nil
}

// reopenVol re-reads a volume's mirror state after an undone deletion.
func (m *mirrorMgr) reopenVol(name, home string, st mirror.State) {
	if _, err := m.openVol(name, home, st, true); err != nil {
		m.c.log.Error("Failed to restore mirror state", "volume", name, "err", err)
	}
}
