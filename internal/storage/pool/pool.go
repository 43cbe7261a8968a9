// Package pool implements RAID 1+0 over the storage controller's disks as a dev.Device:
// stripe unit i lives on mirror pair i mod P at offset (i / P) * unit past a header
// area, is written to both disks of its pair and read from one healthy disk. A disk
// that errors, shrinks or vanishes is marked failed (persisted in stateDir/pool.json)
// and the pool keeps serving from its mirror; Replace rebuilds a pair onto a new disk
// in the background while I/O continues.
//
// The pool must never read from a disk that was marked failed, never overwrite newer
// data with older during a rebuild, and never initialise a disk that holds data it
// does not recognise.
package pool

import (
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// lockStripes is the number of chunk locks that serialise writers with the rebuild copy.
const lockStripes = 256

// ErrClosed is returned by I/O on a closed pool.
var ErrClosed = errors.New("Pool is closed")

type paddedRWMutex struct {
	sync.RWMutex
	_ [40]byte
}

// Pool is a RAID 1+0 set of disks; it implements dev.Device and dev.Discarder.
type Pool struct {
	dir   string
	opts  Options
	log   *slog.Logger
	l     layout
	uuid  string
	chunk int64 // rebuild copy unit, a multiple of the stripe unit

	disks []atomic.Pointer[disk]
	locks [lockStripes]paddedRWMutex

	closed atomic.Bool
	stop   chan struct{}
	wg     sync.WaitGroup

	bootID string
	lock   *os.File  // flock on stateDir/pool.lock
	dirty  *dirtyMap // write-intent bitmap; nil for a single-disk pool

	mu        sync.Mutex // guards gen, clean, persistence, disk replacement and the rebuild fields
	gen       uint64
	clean     bool // set by Close once every disk is synced
	rbRunning bool
	rbDone    chan struct{}
	rbErr     error
}

// CreateFileDisk creates a sparse file of size bytes to be used as a pool disk.
func CreateFileDisk(path string, size int64) error {
	if size <= 0 {
		return fmt.Errorf("Failed to create disk %q: size %d must be positive", path, size)
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return fmt.Errorf("Failed to create disk %q: %w", path, err)
	}
	if err := f.Truncate(size); err != nil {
		f.Close()
		os.Remove(path)
		return fmt.Errorf("Failed to size disk %q: %w", path, err)
	}
	return f.Close()
}

// Open opens (or on first use initialises) the pool made of disks, keeping its state in
// stateDir. One disk gives no redundancy; 2N disks give N mirror pairs (disks 2k and
// 2k+1 form pair k). Once stateDir/pool.json exists it is the authority on membership.
func Open(stateDir string, disks []string, opts Options) (*Pool, error) {
	if opts.StripeUnit != 0 && !validUnit(opts.StripeUnit) {
		return nil, fmt.Errorf("Invalid stripe unit %d: must be a power of two from 4 KiB to 64 MiB", opts.StripeUnit)
	}
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	n := len(disks)
	if n == 0 {
		return nil, errors.New("A pool needs at least one disk")
	}
	if n > 1 && n%2 != 0 {
		return nil, fmt.Errorf("A pool needs one disk or an even number of disks (mirror pairs), got %d", n)
	}
	paths := make([]string, n)
	seen := map[string]bool{}
	for i, d := range disks {
		abs, err := filepath.Abs(d)
		if err != nil {
			return nil, fmt.Errorf("Invalid disk path %q: %w", d, err)
		}
		if seen[abs] {
			return nil, fmt.Errorf("Disk %q is listed twice", d)
		}
		seen[abs] = true
		paths[i] = abs
	}
	if err := os.MkdirAll(stateDir, 0o700); err != nil {
		return nil, fmt.Errorf("Failed to create pool state directory %q: %w", stateDir, err)
	}
	lock, err := lockStateDir(stateDir)
	if err != nil {
		return nil, err
	}
	p, err := open(stateDir, paths, opts, log)
	if err != nil {
		lock.Close()
		return nil, err
	}
	p.lock = lock
	return p, nil
}

// lockStateDir takes stateDir for this process alone, until the returned file is closed.
func lockStateDir(dir string) (*os.File, error) {
	f, err := os.OpenFile(filepath.Join(dir, "pool.lock"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("Failed to lock pool state in %q: %w", dir, err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, fmt.Errorf("The pool in %q is in use by another process", dir)
		}
		return nil, fmt.Errorf("Failed to lock pool state in %q: %w", dir, err)
	}
	return f, nil
}

func open(stateDir string, paths []string, opts Options, log *slog.Logger) (*Pool, error) {
	n := len(paths)
	st, err := loadState(stateDir)
	if err != nil {
		return nil, err
	}
	if st == nil {
		st, err = initState(paths, opts.StripeUnit, log)
		if err != nil {
			return nil, err
		}
		if err := saveState(stateDir, st); err != nil {
			return nil, err
		}
	} else {
		if len(st.Disks) != n {
			return nil, fmt.Errorf("The pool in %q has %d disks but %d were given (growing or shrinking a pool is not supported)", stateDir, len(st.Disks), n)
		}
		for i, pd := range st.Disks {
			if pd.Path != paths[i] {
				log.Warn("Pool disk differs from the one given; using the pool state (it was replaced)", "index", i, "state", pd.Path, "given", paths[i])
			}
		}
	}
	if opts.StripeUnit != 0 && opts.StripeUnit != st.StripeUnit {
		return nil, fmt.Errorf("The pool was created with stripe unit %d, not %d", st.StripeUnit, opts.StripeUnit)
	}
	opts.StripeUnit = st.StripeUnit
	if opts.HealthInterval <= 0 {
		opts.HealthInterval = time.Second
	}
	pairs := int64(n / 2)
	if n == 1 {
		pairs = 1
	}
	p := &Pool{
		dir:    stateDir,
		opts:   opts,
		log:    log,
		l:      layout{unit: st.StripeUnit, pairs: pairs, unitsPerDisk: st.UnitsPerDisk, dataOff: st.DataOffset},
		uuid:   st.UUID,
		chunk:  max(1<<20, st.StripeUnit),
		disks:  make([]atomic.Pointer[disk], n),
		stop:   make(chan struct{}),
		gen:    st.Generation,
		bootID: readBootID(),
	}
	changed, err := p.openDisks(st)
	if err != nil {
		p.closeDisks()
		return nil, err
	}
	for i := range p.disks {
		if d := p.disks[i].Load(); d.f != nil {
			d.punch = p.probePunch(d)
		}
	}
	var marked []int64
	sameBoot, durable := false, false
	if n > 1 {
		perPair := (p.l.unitsPerDisk*p.l.unit + p.chunk - 1) / p.chunk
		m, mk, complete, err := openDirty(stateDir, pairs, perPair)
		if err != nil {
			p.closeDisks()
			return nil, err
		}
		p.dirty, marked = m, mk
		sameBoot = complete && p.bootID != "" && st.BootID == p.bootID
		durable = complete && st.IntentDurable
	}
	if st.Unclean && (sameBoot || durable) {
		// Only the process died, or the machine went down with the marks durable: the
		// marked chunks are the only ones whose sides may differ. Resync them (and make
		// that durable) before serving anything and before the bitmap is reset.
		copied, err := p.resyncMarked(marked)
		if err != nil {
			p.closeDisks()
			return nil, err
		}
		switch {
		case sameBoot && copied > 0:
			p.log.Info("Resynced the chunks being written when the pool last stopped uncleanly", "chunks", copied)
		case !sameBoot:
			p.log.Warn("Pool was not closed cleanly before the machine restarted; resynced the chunks its durable write-intent bitmap marks", "chunks", copied, "marked", len(marked))
		}
	}
	if p.dirty != nil {
		if err := p.dirty.reset(); err != nil {
			p.closeDisks()
			return nil, err
		}
	}
	if st.Unclean && !sameBoot && !durable && n > 1 {
		// The machine went down with the pool open and no durable bitmap (an older
		// pool.json, or a bitmap missing or of another size): writes that were never
		// flushed may be on one disk of a pair only. Copy each pair's first disk over
		// the second (reading only the first meanwhile), so that reads cannot flip
		// between versions.
		for pair := 0; len(p.disks) > 1 && pair < len(p.disks)/2; pair++ {
			a, b := p.disks[2*pair].Load(), p.disks[2*pair+1].Load()
			if a.state.Load() == stOK && b.state.Load() == stOK {
				b.state.Store(stRebuilding)
				b.rebuildDone = 0
				b.err = "resync after an unclean shutdown of the machine: unflushed writes may differ between the mirrors"
				changed = true
			}
		}
		p.log.Warn("Pool was not closed cleanly before the machine restarted; resyncing the mirrors")
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	// Always persisted: pool.json now says the pool is open (unclean) on this boot.
	if err := p.persistLocked(changed); err != nil {
		p.closeDisks()
		return nil, err
	}
	for i := range p.disks {
		if d := p.disks[i].Load(); d.state.Load() == stRebuilding {
			p.log.Info("Pool disk will be rebuilt", "disk", d.path, "from", d.rebuildDone, "reason", d.errString())
			p.startRebuildLocked()
		}
	}
	p.wg.Add(1)
	go p.healthLoop()
	if p.dirty != nil {
		p.wg.Add(1)
		go p.cleanLoop(max(opts.HealthInterval/10, time.Millisecond))
	}
	return p, nil
}

// openDisks opens every member listed as usable in st; it reports whether any disk
// changed state (could not be opened or shrank). A disk holding another pool's header
// or no header at all is a wrong disk: an error, not a failure.
func (p *Pool) openDisks(st *persisted) (bool, error) {
	changed := false
	for i, pd := range st.Disks {
		d := &disk{index: i, pair: i / 2, path: pd.Path}
		switch pd.State {
		case DiskFailed:
			d.state.Store(stFailed)
			d.err = pd.Error
		case DiskMissing:
			d.state.Store(stMissing)
			d.err = pd.Error
		default:
			od, err := openDisk(pd.Path)
			if errors.Is(err, errDiskBusy) {
				return false, fmt.Errorf("Failed to open disk %q: %w", pd.Path, err)
			}
			if err != nil {
				d.state.Store(stMissing)
				d.err = fmt.Sprintf("cannot open: %v", err)
				changed = true
				p.log.Error("Pool disk is missing", "disk", pd.Path, "index", i, "error", err)
				break
			}
			od.index, od.pair = i, i/2
			d = od
			h, err := d.readHeader()
			if errors.Is(err, errNoHeader) {
				// A blank disk where a member was: the member was lost (and perhaps
				// recreated empty). Serve degraded; Replace brings it back.
				d.close()
				d = &disk{index: i, pair: i / 2, path: pd.Path}
				d.state.Store(stFailed)
				d.err = "the disk is blank (no pool header): it was replaced or wiped"
				changed = true
				p.log.Error("Pool disk is blank", "disk", pd.Path, "index", i)
				break
			}
			if err != nil {
				d.close()
				return false, fmt.Errorf("Disk %q is not disk %d of pool %s: %w", pd.Path, i, st.UUID, err)
			}
			if h.PoolUUID != st.UUID || h.Index != i || h.StripeUnit != st.StripeUnit || h.UnitsPerDisk != st.UnitsPerDisk {
				d.close()
				return false, fmt.Errorf("Disk %q holds disk %d of pool %s, expected disk %d of pool %s", pd.Path, h.Index, h.PoolUUID, i, st.UUID)
			}
			if pd.State == DiskRebuilding {
				d.state.Store(stRebuilding)
				d.rebuildDone = pd.RebuildDone
			}
			if problem := p.diskProblem(d); problem != "" {
				d.state.Store(stFailed)
				d.err = problem
				changed = true
				p.log.Error("Pool disk failed its check", "disk", pd.Path, "error", problem)
			}
		}
		p.disks[i].Store(d)
	}
	// A rebuild can only continue from a healthy mirror.
	for i := range p.disks {
		d := p.disks[i].Load()
		if d.state.Load() == stRebuilding {
			if src := p.partner(d); src == nil || src.state.Load() != stOK {
				d.state.Store(stFailed)
				d.err = "rebuild source is not available"
				changed = true
			}
		}
	}
	// The last copy of a pair is never marked failed on disk: a restart should retry it.
	for i := range p.disks {
		d := p.disks[i].Load()
		if s := d.state.Load(); s == stFailed || s == stMissing {
			if o := p.partner(d); o == nil || o.state.Load() != stOK {
				d.volatile = true
			}
		}
	}
	return changed, nil
}

// initState creates a new pool on fresh disks or, when pool.json is gone, rebuilds the
// state from the disks' headers (a disk with an older generation is stale and failed).
func initState(paths []string, unit int64, log *slog.Logger) (*persisted, error) {
	n := len(paths)
	disks := make([]*disk, n)
	defer func() {
		for _, d := range disks {
			if d != nil {
				d.close()
			}
		}
	}()
	headers := make([]header, n)
	fresh := 0
	for i, path := range paths {
		d, err := openDisk(path)
		if err != nil {
			return nil, fmt.Errorf("Failed to open disk %q: %w", path, err)
		}
		disks[i] = d
		h, err := d.readHeader()
		switch {
		case errors.Is(err, errNoHeader):
			fresh++
		case err != nil:
			return nil, fmt.Errorf("Refusing to use disk %q: %w", path, err)
		default:
			headers[i] = h
		}
	}
	if fresh == n {
		if unit == 0 {
			unit = DefaultStripeUnit
		}
		dataOff := dataOffsetFor(unit)
		upd := int64(-1)
		for _, d := range disks {
			sz, err := d.size()
			if err != nil {
				return nil, fmt.Errorf("Failed to size disk %q: %w", d.path, err)
			}
			units := (sz - dataOff - tailSize) / unit
			if sz < dataOff+unit+tailSize {
				return nil, fmt.Errorf("Disk %q is too small: %d bytes, need at least %d", d.path, sz, dataOff+unit+tailSize)
			}
			if upd < 0 || units < upd {
				upd = units
			}
		}
		st := &persisted{UUID: newUUID(), StripeUnit: unit, UnitsPerDisk: upd, DataOffset: dataOff, Generation: 1}
		for i, d := range disks {
			h := header{PoolUUID: st.UUID, Index: i, Pair: i / 2, Disks: n, StripeUnit: unit, UnitsPerDisk: upd, DataOffset: dataOff, Generation: 1}
			if err := d.writeTail(dataOff+upd*unit, st.UUID); err != nil {
				return nil, err
			}
			if err := d.writeHeader(h, true); err != nil {
				return nil, err
			}
			st.Disks = append(st.Disks, persistedDisk{Index: i, Path: d.path, State: DiskOK})
		}
		log.Info("Created pool", "uuid", st.UUID, "disks", n, "size", int64(max(1, n/2))*upd*unit)
		return st, nil
	}
	// Reassemble from headers.
	var ref header
	for i, h := range headers {
		if h.PoolUUID == "" {
			return nil, fmt.Errorf("Disk %q has no pool header while the other disks belong to a pool", paths[i])
		}
		if ref.PoolUUID == "" {
			ref = h
		}
		if h.PoolUUID != ref.PoolUUID {
			return nil, fmt.Errorf("Disks %q and %q belong to different pools (%s, %s)", paths[0], paths[i], ref.PoolUUID, h.PoolUUID)
		}
		if h.Disks != n || h.StripeUnit != ref.StripeUnit || h.UnitsPerDisk != ref.UnitsPerDisk {
			return nil, fmt.Errorf("Disk %q belongs to a pool of %d disks, %d were given", paths[i], h.Disks, n)
		}
		ref.Generation = max(ref.Generation, h.Generation)
	}
	if unit != 0 && unit != ref.StripeUnit {
		return nil, fmt.Errorf("The pool was created with stripe unit %d, not %d", ref.StripeUnit, unit)
	}
	st := &persisted{UUID: ref.PoolUUID, StripeUnit: ref.StripeUnit, UnitsPerDisk: ref.UnitsPerDisk, DataOffset: ref.DataOffset, Generation: ref.Generation, Disks: make([]persistedDisk, n)}
	for i, h := range headers {
		if st.Disks[h.Index].Path != "" {
			return nil, fmt.Errorf("Disks %q and %q both claim to be disk %d", st.Disks[h.Index].Path, paths[i], h.Index)
		}
		pd := persistedDisk{Index: h.Index, Path: paths[i], State: DiskOK}
		switch {
		case h.Rebuilding:
			pd.State, pd.Error = DiskFailed, "was being rebuilt when the pool state was lost"
		case h.Generation < ref.Generation:
			pd.State, pd.Error = DiskFailed, fmt.Sprintf("stale: header generation %d, pool at %d", h.Generation, ref.Generation)
		}
		st.Disks[h.Index] = pd
	}
	log.Warn("Pool state file missing; reassembled the pool from disk headers", "uuid", st.UUID)
	return st, nil
}

// readBootID returns the kernel's boot ID, "" when it cannot be read.
func readBootID() string {
	b, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

func newUUID() string {
	var b [16]byte
	rand.Read(b[:])
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}

// partner returns the other disk of d's pair, nil for a single-disk pool.
func (p *Pool) partner(d *disk) *disk {
	if len(p.disks) == 1 {
		return nil
	}
	return p.disks[d.index^1].Load()
}

// persistLocked writes pool.json; with bump it also advances the generation and
// stamps it into the headers of the live disks. p.mu is held.
func (p *Pool) persistLocked(bump bool) error {
	if bump {
		p.gen++
	}
	st := &persisted{UUID: p.uuid, StripeUnit: p.l.unit, UnitsPerDisk: p.l.unitsPerDisk, DataOffset: p.l.dataOff, Generation: p.gen, Unclean: !p.clean, BootID: p.bootID,
		IntentDurable: p.dirty != nil}
	for i := range p.disks {
		d := p.disks[i].Load()
		s := d.state.Load()
		d.mu.Lock()
		pd := persistedDisk{Index: i, Path: d.path, State: stateName(s), Error: d.err, RebuildDone: d.rebuildDone}
		d.mu.Unlock()
		if d.volatile {
			pd.State, pd.Error = DiskOK, ""
		}
		if s != stRebuilding {
			pd.RebuildDone = 0
		}
		st.Disks = append(st.Disks, pd)
	}
	if err := saveState(p.dir, st); err != nil {
		p.log.Error("Failed to persist pool state", "error", err)
		return err
	}
	if bump {
		for i := range p.disks {
			d := p.disks[i].Load()
			if !d.live() {
				continue
			}
			h := p.headerFor(d)
			if err := d.writeHeader(h, true); err != nil {
				p.log.Warn("Failed to update disk header", "disk", d.path, "error", err)
			}
		}
	}
	return nil
}

func (p *Pool) headerFor(d *disk) header {
	return header{
		PoolUUID: p.uuid, Index: d.index, Pair: d.pair, Disks: len(p.disks),
		StripeUnit: p.l.unit, UnitsPerDisk: p.l.unitsPerDisk, DataOffset: p.l.dataOff,
		Generation: p.gen, Rebuilding: d.state.Load() == stRebuilding,
	}
}

// diskFailed marks d failed for reason and persists that before returning, so that no
// write acknowledged afterwards can be shadowed by d's stale data after a restart.
func (p *Pool) diskFailed(d *disk, reason string) error {
	if p.closed.Load() {
		return ErrClosed
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.disks[d.index].Load() != d {
		return nil
	}
	s := d.state.Load()
	if s != stOK && s != stRebuilding {
		return nil
	}
	o := p.partner(d)
	last := s == stOK && (o == nil || o.state.Load() != stOK)
	d.state.Store(stFailed)
	d.setErr(reason)
	p.log.Error("Pool disk failed", "disk", d.path, "index", d.index, "pair", d.pair, "error", reason)
	if last {
		// Nothing newer exists anywhere: keep the disk trusted on disk so a restart retries it.
		d.volatile = true
		p.log.Error("Mirror pair has no working disk left; the pool has failed", "pair", d.pair)
		if o != nil && o.state.Load() == stRebuilding {
			o.state.Store(stFailed)
			o.setErr("rebuild source failed")
		}
	}
	return p.persistLocked(true)
}

func pairError(pair int) error {
	return fmt.Errorf("Mirror pair %d has no working disk: %w", pair, errPairFailed)
}

var errPairFailed = errors.New("pool failed")

// Size is the usable size of the pool in bytes.
func (p *Pool) Size() int64 { return p.l.size() }

func (p *Pool) checkRange(op string, off, n int64) error {
	if p.closed.Load() {
		return ErrClosed
	}
	if off < 0 || n < 0 || off > p.l.size()-n {
		return fmt.Errorf("Failed to %s %d bytes at %d: beyond the pool's %d bytes: %w", op, n, off, p.l.size(), io.ErrUnexpectedEOF)
	}
	return nil
}

// ReadAt reads len(b) bytes at off from a healthy disk of the owning pairs, falling
// back to the mirror (and marking the disk failed) when a disk errors.
func (p *Pool) ReadAt(b []byte, off int64) (int, error) {
	if err := p.checkRange("read", off, int64(len(b))); err != nil {
		return 0, err
	}
	if pair, doff, n, du := p.l.locate(off, int64(len(b))); n == int64(len(b)) {
		// The common case: the request lives on one pair.
		if err := p.readPair(pair, b, nil, doff, du); err != nil {
			return 0, fmt.Errorf("Failed to read %d bytes at %d: %w", len(b), off, err)
		}
		return len(b), nil
	}
	var small [4]run
	runs := p.split(small[:0], b, off, int64(len(b)))
	errs := make([]error, len(runs))
	if len(b) >= parallelIO && len(runs) > 1 {
		var wg sync.WaitGroup
		for i, r := range runs {
			wg.Add(1)
			go func() {
				defer wg.Done()
				errs[i] = p.readPair(r.pair, r.b, r.iovs, r.doff, r.diskUnit)
			}()
		}
		wg.Wait()
	} else {
		for i, r := range runs {
			errs[i] = p.readPair(r.pair, r.b, r.iovs, r.doff, r.diskUnit)
		}
	}
	for _, err := range errs {
		if err != nil {
			return 0, fmt.Errorf("Failed to read %d bytes at %d: %w", len(b), off, err)
		}
	}
	return len(b), nil
}

// readPair reads consecutive disk bytes at doff of pair into b (or iovs when not nil)
// from one healthy disk, trying the other one (and failing the first) on error. The
// starting disk alternates with the stripe unit so both disks of a pair serve reads.
func (p *Pool) readPair(pair int, b []byte, iovs [][]byte, doff, du int64) error {
	first := 2*pair + int(du&1)
	if len(p.disks) == 1 {
		first = 0
	}
	var lastErr error
	for try := 0; try < 2 && try < len(p.disks); try++ {
		d := p.disks[first^try].Load()
		if d.state.Load() != stOK {
			continue
		}
		var err error
		if iovs != nil {
			err = p.readvDisk(d, iovs, doff)
		} else {
			err = p.readDisk(d, b, doff)
		}
		if err == nil {
			return nil
		}
		if p.closed.Load() {
			return ErrClosed
		}
		lastErr = fmt.Errorf("disk %q: %w", d.path, err)
		if ferr := p.diskFailed(d, fmt.Sprintf("read at %d: %v", doff, err)); ferr != nil {
			return ferr
		}
	}
	if lastErr != nil {
		return fmt.Errorf("%w (last error: %v)", pairError(pair), lastErr)
	}
	return pairError(pair)
}
