package mirror

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/growserver/grow/internal/storage/nbd"
)

// Mode is how the replicating export currently treats writes.
type Mode int

// The modes of a Volume.
const (
	// ModeDegraded: writes go to the local export only and mark the bitmap.
	ModeDegraded Mode = iota
	// ModeResyncing: writes go to both sides while dirty regions are copied to the peer.
	ModeResyncing
	// ModeSynced: writes go to both sides and the bitmap is empty.
	ModeSynced
	// ModeFenced: the peer holds a newer epoch; every write is refused.
	ModeFenced
	// ModeHeld: the peer was lost while synced and the controller has not yet been
	// granted the right to write alone; writes and flushes wait (see SetHoldOnPeerLoss).
	ModeHeld
)

var modeNames = [...]string{"degraded", "resyncing", "synced", "fenced", "held"}

// String is the mode's name as shown to operators.
func (m Mode) String() string {
	if m < 0 || int(m) >= len(modeNames) {
		return fmt.Sprintf("mode(%d)", int(m))
	}
	return modeNames[m]
}

// ErrFenced is returned for writes on a side that learned its peer holds a newer epoch.
var ErrFenced = errors.New("volume is fenced: the mirror peer holds a newer epoch")

// Volume is the primary side of one mirrored volume: it wraps the local export and a
// peer and implements the data path of nbd.Export (see Export for one connection's view).
type Volume struct {
	local nbd.Export
	bm    *Bitmap
	locks *rangeLock

	// modeMu is held shared by every data operation and exclusively by mode changes
	// that need no operation in flight (attaching a peer, declaring the pair synced).
	modeMu sync.RWMutex
	mu     sync.Mutex // guards peer, mode, pending
	peer   Peer
	mode   Mode
	// pending holds regions written to the peer since its last successful FLUSH began,
	// cur for new writes and one set per FLUSH in flight: a peer crash can lose them.
	pendingCur      *regionSet
	pendingFlushing []*regionSet
	// Write intent while synced: a region's bit is durable before a write to it is
	// issued, and cleared after a FLUSH on both sides that began after its last write
	// started, so a crash of this side leaves every region it may have changed alone marked.
	intentSeq      uint64
	intentInflight map[uint64]int
	intentLast     map[uint64]uint64
	// intentKeep is how many of the most recently written regions keep their mark
	// after a FLUSH (an activity log, like DRBD's al-extents); see IntentKeep.
	intentKeep int
	// flushedUpTo is the sequence at which the last FLUSH that succeeded on both sides
	// began: regions last written before it hold the same data on both sides.
	flushedUpTo uint64

	// holdOnLoss makes a synced volume that loses its peer wait in ModeHeld for
	// Release instead of going degraded on its own; onHold is told when that happens.
	holdOnLoss bool
	// exclusive: the witness granted this side the volume's epoch alone, so it may write
	// without the peer; a pair that was synced at this epoch is not exclusive.
	exclusive bool
	onHold    func()
	heldCh    chan struct{} // closed when a hold ends

	resyncMu     sync.Mutex
	resyncBytes  atomic.Int64
	resyncDone   atomic.Uint64
	resyncTotal  atomic.Uint64
	peerFailures atomic.Int64
}

// regionSet is a set of region numbers, compared by identity.
type regionSet struct{ m map[uint64]struct{} }

func newRegionSet() *regionSet { return &regionSet{m: map[uint64]struct{}{}} }

// NewVolume wraps local with the dirty-region bitmap bm (which must match local's size).
// The volume starts degraded; Resync attaches a peer and brings the pair in sync.
func NewVolume(local nbd.Export, bm *Bitmap) (*Volume, error) {
	if bm.size != local.Size() {
		return nil, fmt.Errorf("Failed to create mirrored volume: bitmap is for %d bytes, export has %d", bm.size, local.Size())
	}
	return &Volume{local: local, bm: bm, locks: newRangeLock(), mode: ModeDegraded, pendingCur: newRegionSet(),
		intentInflight: map[uint64]int{}, intentLast: map[uint64]uint64{}, intentKeep: IntentKeep}, nil
}

// IntentKeep is how many recently written regions a synced primary keeps marked after
// a FLUSH. A guest that flushes often (every journal commit) writes the same few
// regions again and again; clearing their marks would cost a bitmap fsync before the
// next write to each. The price is at most this many clean regions recopied after a
// crash of the primary (128 MiB with 1 MiB regions).
const IntentKeep = 128

// SetIntentKeep changes how many recently written regions keep their mark after a FLUSH.
func (v *Volume) SetIntentKeep(n int) {
	v.mu.Lock()
	v.intentKeep = max(n, 0)
	v.mu.Unlock()
}

// Mode returns the current mode.
func (v *Volume) Mode() Mode {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.mode
}

// Bitmap returns the volume's dirty-region bitmap.
func (v *Volume) Bitmap() *Bitmap { return v.bm }

// ResyncProgress is how far the current or last resync got.
type ResyncProgress struct {
	// Done and Total count dirty regions of this pass.
	Done  uint64 `json:"done"`
	Total uint64 `json:"total"`
	// Bytes counts bytes copied to the peer by resync since the volume was made.
	Bytes int64 `json:"bytes"`
}

// Progress returns the resync progress.
func (v *Volume) Progress() ResyncProgress {
	return ResyncProgress{Done: v.resyncDone.Load(), Total: v.resyncTotal.Load(), Bytes: v.resyncBytes.Load()}
}

// PeerFailures counts how many times the peer was declared lost.
func (v *Volume) PeerFailures() int64 { return v.peerFailures.Load() }

func (v *Volume) currentPeer() (Peer, Mode) {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.peer, v.mode
}

// absorbPendingLocked moves every pending region into the bitmap; v.mu is held.
func (v *Volume) absorbPendingLocked() error {
	regs := make([]uint64, 0, len(v.pendingCur.m))
	for r := range v.pendingCur.m {
		regs = append(regs, r)
	}
	for _, set := range v.pendingFlushing {
		for r := range set.m {
			regs = append(regs, r)
		}
	}
	if err := v.bm.MarkRegions(regs); err != nil {
		return err
	}
	v.pendingCur = newRegionSet()
	v.pendingFlushing = nil
	return nil
}

func (v *Volume) endIntent(off, n int64) {
	first, last, _ := v.bm.span(off, n)
	v.mu.Lock()
	// The completion time counts: a FLUSH covers only writes completed before it began.
	v.intentSeq++
	for r := first; r <= last; r++ {
		v.intentLast[r] = v.intentSeq
		if v.intentInflight[r]--; v.intentInflight[r] <= 0 {
			delete(v.intentInflight, r)
		}
	}
	v.mu.Unlock()
}

// clearIntent drops the intent marks of regions whose writes all completed before the
// FLUSH that began at sequence upTo and succeeded on both sides, but for the
// intentKeep most recently written ones.
func (v *Volume) clearIntent(upTo uint64) error {
	cleared := false
	v.mu.Lock()
	if v.mode == ModeSynced {
		v.flushedUpTo = max(v.flushedUpTo, upTo)
	}
	if excess := len(v.intentLast) - v.intentKeep; v.mode == ModeSynced && excess > 0 {
		// The least recently written of the clearable regions go; the others stay marked.
		type mark struct{ region, seq uint64 }
		var clearable []mark
		for r, s := range v.intentLast {
			if s <= upTo && v.intentInflight[r] == 0 {
				clearable = append(clearable, mark{r, s})
			}
		}
		slices.SortFunc(clearable, func(a, b mark) int { return cmp.Compare(a.seq, b.seq) })
		for _, c := range clearable[:min(excess, len(clearable))] {
			v.bm.Clear(c.region)
			delete(v.intentLast, c.region)
			cleared = true
		}
	}
	v.mu.Unlock()
	if !cleared {
		return nil
	}
	if err := v.bm.Persist(); err != nil {
		return fmt.Errorf("Failed to clear write intent: %w", err)
	}
	return nil
}

// peerFailed detaches p after err and goes degraded (or fenced on a stale answer); the
// regions the peer may have lost are marked durably before it returns.
func (v *Volume) peerFailed(p Peer, err error) error {
	v.mu.Lock()
	if v.peer == p {
		if v.mode == ModeSynced {
			// Regions of the activity log last written before a FLUSH on both sides hold
			// the same data on both: only what was pending (and what changes from now on)
			// is dirty.
			for r, s := range v.intentLast {
				if s <= v.flushedUpTo && v.intentInflight[r] == 0 {
					v.bm.Clear(r)
					delete(v.intentLast, r)
				}
			}
		}
		v.peer = nil
		v.peerFailures.Add(1)
		var stale *StaleError
		switch {
		case errors.As(err, &stale):
			v.mode = ModeFenced
			v.releaseHeldLocked()
		case v.holdOnLoss && !v.exclusive && (v.mode == ModeSynced || v.mode == ModeResyncing || v.mode == ModeHeld):
			// Writing alone needs a new epoch from the witness: wait for Release.
			v.holdLocked()
		case v.mode != ModeFenced && v.mode != ModeHeld:
			v.mode = ModeDegraded
		}
		p.Close()
	}
	aerr := v.absorbPendingLocked()
	v.mu.Unlock()
	if aerr != nil {
		return aerr
	}
	if err := v.bm.Persist(); err != nil {
		return fmt.Errorf("Failed to record dirty regions after losing the mirror peer: %w", err)
	}
	return nil
}

// enter takes modeMu shared once the volume is not held (the caller releases it) and,
// under one hold of v.mu, reads the peer and mode, records [off, off+n) as pending on
// the peer and, while synced, as write intent in memory; intent tells whether
// endIntent must be called (the intent is not durable yet).
func (v *Volume) enter(off, n int64) (peer Peer, mode Mode, intent bool) {
	first, last, ok := v.bm.span(off, n)
	for {
		v.modeMu.RLock()
		v.mu.Lock()
		if v.mode != ModeHeld {
			break
		}
		ch := v.heldCh
		v.mu.Unlock()
		v.modeMu.RUnlock()
		if ch != nil {
			<-ch
		}
	}
	defer v.mu.Unlock()
	peer, mode = v.peer, v.mode
	if peer == nil || mode == ModeFenced || !ok {
		return peer, mode, false
	}
	for r := first; r <= last; r++ {
		v.pendingCur.m[r] = struct{}{}
	}
	if mode != ModeSynced {
		return peer, mode, false
	}
	v.intentSeq++
	for r := first; r <= last; r++ {
		v.intentInflight[r]++
		v.intentLast[r] = v.intentSeq
	}
	return peer, mode, true
}

// mutate runs one write-like operation on both sides (or locally with the bitmap marked).
// With localFirst the peer is only asked once the local side succeeded. send, if not
// nil, starts the operation on a *Link without a goroutine and returns its wait.
func (v *Volume) mutate(off, n int64, localFirst bool, local func() error, remote func(Peer) error, send func(*Link) func() error) error {
	if n == 0 {
		return local()
	}
	lr := v.locks.lock(off, n)
	defer v.locks.unlock(lr)
	peer, mode, endIntent := v.enter(off, n)
	if mode == ModeFenced {
		v.modeMu.RUnlock()
		return ErrFenced
	}
	if peer == nil {
		defer v.modeMu.RUnlock()
		// Degraded: the region is durably marked before the local disk can see the write.
		if err := v.bm.MarkDurable(off, n); err != nil {
			return fmt.Errorf("Failed to mark dirty region of a degraded mirrored volume: %w", err)
		}
		return local()
	}
	if endIntent {
		// Synced: the intent is durable before either side can see the write.
		if err := v.bm.MarkDurable(off, n); err != nil {
			v.endIntent(off, n)
			v.modeMu.RUnlock()
			return fmt.Errorf("Failed to record write intent: %w", err)
		}
	}
	var lerr, perr error
	if localFirst {
		if lerr = local(); lerr != nil {
			if endIntent {
				v.endIntent(off, n)
			}
			v.modeMu.RUnlock()
			return lerr
		}
		perr = remote(peer)
	} else {
		var wait func() error
		if l, ok := peer.(*Link); ok && send != nil {
			wait = send(l)
		} else {
			perrc := make(chan error, 1)
			go func() { perrc <- remote(peer) }()
			wait = func() error { return <-perrc }
		}
		lerr = local()
		perr = wait()
	}
	if endIntent {
		v.endIntent(off, n)
	}
	v.modeMu.RUnlock()
	for perr != nil {
		if err := v.peerFailed(peer, perr); err != nil {
			return err
		}
		if err := v.bm.MarkDurable(off, n); err != nil {
			return fmt.Errorf("Failed to mark dirty region of a degraded mirrored volume: %w", err)
		}
		// A hold ends in degraded (the write stands, marked), fenced (it must not be
		// acknowledged) or with a peer attached again, which must then get the write
		// too before it is acknowledged (the range lock keeps resync off this range).
		if v.waitUnheld() == ModeFenced {
			return ErrFenced
		}
		var mode Mode
		if peer, mode = v.currentPeer(); peer == nil || mode == ModeFenced {
			if mode == ModeFenced {
				return ErrFenced
			}
			break
		}
		perr = remote(peer)
	}
	return lerr
}

// rlockUnheld takes modeMu shared once the volume is not held; a held volume's
// writers wait outside the lock so that mode changes can proceed.
func (v *Volume) rlockUnheld() {
	for {
		v.waitUnheld()
		v.modeMu.RLock()
		if v.Mode() != ModeHeld {
			return
		}
		v.modeMu.RUnlock()
	}
}

// waitUnheld waits until the volume is not held and returns its mode then.
func (v *Volume) waitUnheld() Mode {
	for {
		v.mu.Lock()
		m, ch := v.mode, v.heldCh
		v.mu.Unlock()
		if m != ModeHeld || ch == nil {
			return m
		}
		<-ch
	}
}

// holdLocked enters ModeHeld; v.mu is held.
func (v *Volume) holdLocked() {
	if v.mode == ModeHeld {
		return
	}
	v.mode = ModeHeld
	v.heldCh = make(chan struct{})
	if v.onHold != nil {
		go v.onHold()
	}
}

// SetExclusive records whether this side holds its epoch alone (granted by the
// witness), which lets it go on degraded when the peer is lost.
func (v *Volume) SetExclusive(exclusive bool) {
	v.mu.Lock()
	v.exclusive = exclusive
	v.mu.Unlock()
}

// HoldIfNotExclusive holds a volume that has no peer attached and no exclusive epoch
// (a primary restarting at an epoch it shares with its peer): writes wait until a
// resync attaches the peer or Release settles it.
func (v *Volume) HoldIfNotExclusive() bool {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.peer == nil && !v.exclusive && v.mode == ModeDegraded {
		v.holdLocked()
	}
	return v.mode == ModeHeld
}

// releaseHeldLocked ends a hold; v.mu is held.
func (v *Volume) releaseHeldLocked() {
	if v.heldCh != nil {
		close(v.heldCh)
		v.heldCh = nil
	}
}

// SetHoldOnPeerLoss makes a synced volume that loses its peer stop completing writes
// and flushes (ModeHeld) until the controller calls Release with the witness's answer;
// onHold (may be nil) is called in its own goroutine when a hold begins.
func (v *Volume) SetHoldOnPeerLoss(onHold func()) {
	v.mu.Lock()
	v.holdOnLoss, v.onHold = true, onHold
	v.mu.Unlock()
}

// Hold detaches the peer of a synced volume and holds writes, as a link failure would
// (used when the peer is declared lost by heartbeat while the volume is idle). It
// reports whether the volume is now held.
func (v *Volume) Hold() (bool, error) {
	peer, mode := v.currentPeer()
	if mode == ModeHeld {
		return true, nil
	}
	if peer == nil {
		return v.HoldIfNotExclusive(), nil
	}
	err := v.peerFailed(peer, fmt.Errorf("mirror peer declared lost: %w", ErrPeerLost))
	return v.Mode() == ModeHeld, err
}

// Release ends a hold: with alone the volume goes on degraded (this side was granted
// a new epoch), otherwise it is fenced and every waiting write fails with ErrFenced.
func (v *Volume) Release(alone bool) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.mode != ModeHeld {
		return
	}
	if alone {
		v.mode = ModeDegraded
		v.exclusive = true
	} else {
		v.mode = ModeFenced
	}
	v.releaseHeldLocked()
}

// Fence refuses every write from now on (this side learned it was deposed), ending any
// hold, and detaches the peer.
func (v *Volume) Fence() {
	v.mu.Lock()
	v.mode = ModeFenced
	v.releaseHeldLocked()
	p := v.peer
	v.mu.Unlock()
	if p != nil {
		_ = v.peerFailed(p, &StaleError{})
	}
}

// Quiesce runs f with no write, trim or flush in flight and none starting, after a
// flush on both sides: the point of the write stream at which a snapshot is taken on
// both controllers. A held or fenced volume is refused.
func (v *Volume) Quiesce(f func() error) error {
	v.modeMu.Lock()
	defer v.modeMu.Unlock()
	v.mu.Lock()
	m, peer := v.mode, v.peer
	v.mu.Unlock()
	if m == ModeHeld || m == ModeFenced {
		return fmt.Errorf("Failed to quiesce mirrored volume: it is %v", m)
	}
	if err := v.local.Flush(); err != nil {
		return fmt.Errorf("Failed to flush before quiescing: %w", err)
	}
	if peer != nil {
		if err := peer.Flush(); err != nil {
			return fmt.Errorf("Failed to flush the mirror peer before quiescing: %w", err)
		}
		if m == ModeSynced {
			// Both sides are flushed with no write in flight: the activity log can go.
			if err := v.clearAllIntent(); err != nil {
				return err
			}
		}
	}
	return f()
}

// clearAllIntent drops every write-intent mark; only when both sides are flushed and
// writes are held (modeMu taken exclusively).
func (v *Volume) clearAllIntent() error {
	v.mu.Lock()
	for r := range v.intentLast {
		v.bm.Clear(r)
	}
	clear(v.intentLast)
	v.mu.Unlock()
	if err := v.bm.Persist(); err != nil {
		return fmt.Errorf("Failed to clear write intent: %w", err)
	}
	return nil
}

// Size is the volume size.
func (v *Volume) Size() int64 { return v.local.Size() }

// ReadOnly reports whether the local export refuses writes.
func (v *Volume) ReadOnly() bool { return v.local.ReadOnly() }

// ReadAt reads from the local side only.
func (v *Volume) ReadAt(p []byte, off int64) error { return v.local.ReadAt(p, off) }

// errNoSplice says the local export cannot put its data into a pipe.
var errNoSplice = errors.New("the local volume cannot splice")

// SpliceRead puts n bytes at off into the pipe whose write end is fd, from the local
// side as ReadAt (nbd.ReadSplicer), when the local export can splice.
func (v *Volume) SpliceRead(fd int, off int64, n int) error {
	rs, ok := v.local.(nbd.ReadSplicer)
	if !ok {
		return errNoSplice
	}
	return rs.SpliceRead(fd, off, n)
}

// WriteAt writes p on both sides (or locally while degraded).
func (v *Volume) WriteAt(p []byte, off int64, fua bool) error {
	return v.mutate(off, int64(len(p)), false,
		func() error { return v.local.WriteAt(p, off, fua) },
		func(pr Peer) error { return pr.WriteAt(p, off, fua) },
		func(l *Link) func() error { return l.startWrite(p, off, fua) })
}

// Trim discards a range on both sides.
func (v *Volume) Trim(off, length int64, fua bool) error {
	return v.mutate(off, length, false,
		func() error { return v.local.Trim(off, length, fua) },
		func(pr Peer) error { return pr.Trim(off, length, fua) }, nil)
}

// WriteZeroes zeroes a range on both sides; a fast zero is tried locally first and
// sent to the peer (as an ordinary zero) only if it succeeded, so a refusal changes
// neither side.
func (v *Volume) WriteZeroes(off, length int64, f nbd.ZeroFlags) error {
	pf := f
	pf.Fast = false
	return v.mutate(off, length, f.Fast,
		func() error { return v.local.WriteZeroes(off, length, f) },
		func(pr Peer) error { return pr.WriteZeroes(off, length, pf.NoHole, pf.FUA) }, nil)
}

// Flush makes every completed write durable on both sides (locally, with the bitmap, while degraded).
func (v *Volume) Flush() error {
	v.rlockUnheld()
	v.mu.Lock()
	peer := v.peer
	if v.mode == ModeFenced {
		v.mu.Unlock()
		v.modeMu.RUnlock()
		return ErrFenced
	}
	if peer == nil {
		err := v.absorbPendingLocked()
		v.mu.Unlock()
		defer v.modeMu.RUnlock()
		if err != nil {
			return err
		}
		if err := v.bm.Persist(); err != nil {
			return err
		}
		return v.local.Flush()
	}
	gen := v.pendingCur
	upTo := v.intentSeq
	v.pendingCur = newRegionSet()
	v.pendingFlushing = append(v.pendingFlushing, gen)
	v.mu.Unlock()

	perrc := make(chan error, 1)
	go func() { perrc <- peer.Flush() }()
	lerr := v.local.Flush()
	if perr := <-perrc; perr != nil {
		err := v.peerFailed(peer, perr)
		v.modeMu.RUnlock()
		if err != nil {
			return err
		}
		if v.waitUnheld() == ModeFenced {
			return ErrFenced
		}
		return lerr
	}
	defer v.modeMu.RUnlock()
	v.mu.Lock()
	for i, s := range v.pendingFlushing {
		if s == gen {
			v.pendingFlushing = append(v.pendingFlushing[:i], v.pendingFlushing[i+1:]...)
			break
		}
	}
	v.mu.Unlock()
	if lerr != nil {
		return lerr
	}
	return v.clearIntent(upTo)
}

// Cache passes the prefetch hint to the local side.
func (v *Volume) Cache(off, length int64) error { return v.local.Cache(off, length) }

// Extents describes the local side's allocation.
func (v *Volume) Extents(off, length int64) ([]nbd.Extent, error) {
	return v.local.Extents(off, length)
}

// Export returns the view of the volume one NBD connection opens; its Close does not
// close the volume.
func (v *Volume) Export() nbd.Export { return connExport{v} }

type connExport struct{ *Volume }

func (connExport) Close() error { return nil }

var _ nbd.Export = connExport{}

// Detach drops the peer (if any) and goes degraded, marking whatever it may lack.
func (v *Volume) Detach() error {
	peer, _ := v.currentPeer()
	if peer == nil {
		return nil
	}
	return v.peerFailed(peer, errors.New("detached"))
}

// ResyncOptions tune Resync.
type ResyncOptions struct {
	// Rate limits copied bytes per second; 0 means unlimited.
	Rate int64
	// RateFunc, if set, is asked for the limit before every region instead of Rate, so
	// an operator can change it while a resync runs.
	RateFunc func() int64
	// PeerDirty lists regions the peer itself marked (writes it applied that this side
	// may lack, e.g. on a deposed primary); they are copied too, so the peer converges.
	PeerDirty []uint64
	// BatchRegions is how many regions are copied between peer FLUSHes (and bitmap
	// updates); 0 means 16. It bounds the work redone after an interruption.
	BatchRegions int
}

// Resync attaches peer and copies every dirty region to it while client writes go to
// both sides; when no region is left the pair is synced and the peer is told so. On
// error or cancellation the peer is detached again and the bitmap keeps every region
// not yet copied and flushed, so a later Resync resumes there. Resync owns peer: it is
// closed whenever it is not left attached.
func (v *Volume) Resync(ctx context.Context, peer Peer, opt ResyncOptions) (err error) {
	defer func() {
		if err != nil && peer != nil {
			if cur, _ := v.currentPeer(); cur != peer {
				peer.Close()
			}
		}
	}()
	if !v.resyncMu.TryLock() {
		return errors.New("Failed to start resync: a resync is already running")
	}
	defer v.resyncMu.Unlock()
	if opt.Rate < 0 || opt.BatchRegions < 0 {
		return fmt.Errorf("Failed to start resync: invalid options %+v", opt)
	}
	if opt.BatchRegions == 0 {
		opt.BatchRegions = 16
	}
	v.modeMu.Lock()
	v.mu.Lock()
	if v.mode == ModeFenced {
		v.mu.Unlock()
		v.modeMu.Unlock()
		return fmt.Errorf("Failed to start resync: %w", ErrFenced)
	}
	if v.peer != nil || peer == nil {
		v.mu.Unlock()
		v.modeMu.Unlock()
		return errors.New("Failed to start resync: a peer is already attached, or none was given")
	}
	err = v.absorbPendingLocked()
	if err == nil {
		err = v.bm.MarkRegions(opt.PeerDirty)
	}
	if err == nil {
		v.peer, v.mode = peer, ModeResyncing
		v.releaseHeldLocked()
	}
	v.mu.Unlock()
	v.modeMu.Unlock()
	if err != nil {
		return fmt.Errorf("Failed to start resync: %w", err)
	}
	if err := v.bm.Persist(); err != nil {
		v.Detach()
		return fmt.Errorf("Failed to start resync: %w", err)
	}
	if err := v.copyDirty(ctx, peer, opt); err != nil {
		if derr := v.detachPeer(peer); derr != nil {
			return errors.Join(err, derr)
		}
		return err
	}
	return nil
}

func (v *Volume) detachPeer(p Peer) error {
	cur, _ := v.currentPeer()
	if cur != p {
		return nil
	}
	return v.peerFailed(p, errors.New("resync stopped"))
}

func (v *Volume) copyDirty(ctx context.Context, peer Peer, opt ResyncOptions) error {
	region := v.bm.RegionSize()
	size := v.Size()
	buf := make([]byte, region)
	due := time.Now()
	var copied int64
	for {
		dirty := v.bm.Dirty()
		v.resyncDone.Store(0)
		v.resyncTotal.Store(uint64(len(dirty)))
		for i := 0; i < len(dirty); i += opt.BatchRegions {
			batch := dirty[i:min(i+opt.BatchRegions, len(dirty))]
			for _, r := range batch {
				if err := ctx.Err(); err != nil {
					return fmt.Errorf("Resync interrupted: %w", err)
				}
				off := int64(r) * region
				n := min(region, size-off)
				if err := v.copyRegion(peer, buf[:n], off); err != nil {
					return err
				}
				copied += n
				v.resyncBytes.Add(n)
				rate := opt.Rate
				if opt.RateFunc != nil {
					rate = opt.RateFunc()
				}
				if rate > 0 {
					// Pace against a schedule that never runs more than a second behind,
					// so a changed rate takes effect at once.
					due = due.Add(time.Duration(float64(n) / float64(rate) * float64(time.Second)))
					if now := time.Now(); due.Before(now.Add(-time.Second)) {
						due = now.Add(-time.Second)
					}
					if d := time.Until(due); d > 0 {
						t := time.NewTimer(d)
						select {
						case <-ctx.Done():
							t.Stop()
							return fmt.Errorf("Resync interrupted: %w", ctx.Err())
						case <-t.C:
						}
					}
				} else {
					due = time.Now()
				}
			}
			// Bits are cleared only once the peer has made the copies durable.
			if err := peer.Flush(); err != nil {
				v.peerFailed(peer, err)
				return fmt.Errorf("Resync failed to flush the peer: %w", err)
			}
			for _, r := range batch {
				v.bm.Clear(r)
			}
			if err := v.bm.Persist(); err != nil {
				return fmt.Errorf("Resync failed to record progress: %w", err)
			}
			v.resyncDone.Add(uint64(len(batch)))
		}
		// Declare the pair synced with no write in flight, if nothing new got dirty.
		v.modeMu.Lock()
		v.mu.Lock()
		if v.peer != peer {
			v.mu.Unlock()
			v.modeMu.Unlock()
			return fmt.Errorf("Resync failed: %w", ErrPeerLost)
		}
		if v.bm.Count() == 0 {
			v.mode = ModeSynced
			v.exclusive = false
			clear(v.intentLast)
			v.mu.Unlock()
			v.modeMu.Unlock()
			if err := peer.ResyncDone(); err != nil {
				v.peerFailed(peer, err)
				return fmt.Errorf("Resync failed to hand over the epoch: %w", err)
			}
			return nil
		}
		v.mu.Unlock()
		v.modeMu.Unlock()
	}
}

// copyRegion copies one region to the peer under the range lock, so a client write to
// it cannot be overtaken by older data.
func (v *Volume) copyRegion(peer Peer, buf []byte, off int64) error {
	lr := v.locks.lock(off, int64(len(buf)))
	defer v.locks.unlock(lr)
	if cur, _ := v.currentPeer(); cur != peer {
		return fmt.Errorf("Resync failed: %w", ErrPeerLost)
	}
	if err := v.local.ReadAt(buf, off); err != nil {
		return fmt.Errorf("Resync failed to read region at %d: %w", off, err)
	}
	if err := peer.WriteAt(buf, off, false); err != nil {
		v.peerFailed(peer, err)
		return fmt.Errorf("Resync failed to write region at %d to the peer: %w", off, err)
	}
	return nil
}

// Status is what the controller reports about one mirrored volume.
type Status struct {
	Mode         Mode           `json:"-"`
	ModeName     string         `json:"mode"`
	DirtyRegions uint64         `json:"dirty_regions"`
	DirtyBytes   int64          `json:"dirty_bytes"`
	RegionSize   int64          `json:"region_size"`
	Resync       ResyncProgress `json:"resync"`
	PeerFailures int64          `json:"peer_failures"`
}

// Status returns the volume's mode, dirty regions and resync progress.
func (v *Volume) Status() Status {
	m := v.Mode()
	n := v.bm.Count()
	return Status{Mode: m, ModeName: m.String(), DirtyRegions: n, DirtyBytes: int64(n) * v.bm.RegionSize(),
		RegionSize: v.bm.RegionSize(), Resync: v.Progress(), PeerFailures: v.PeerFailures()}
}
