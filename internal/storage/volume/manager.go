package volume

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/growserver/grow/internal/storage/dev"
)

// Manager owns every volume, image and snapshot on one device and its metadata directory.
//
// Lock order: ckptMu, mu, objects' io (by name), a busy stripe, tab, syncMu, relMu, jmu, amu.
// A checkpoint takes only ckptMu and, briefly, syncMu: it never pauses I/O.
type Manager struct {
	dir  string
	dev  dev.Device
	disc dev.Discarder
	// splice is the device as a Splicer, nil when it cannot splice.
	splice dev.Splicer
	// pipeIn is the device as a pipeWriter, nil when it cannot take data from a pipe.
	pipeIn pipeWriter
	opts   Options
	lock   *os.File

	ckptMu sync.Mutex // one checkpoint or check at a time
	mu     sync.Mutex // admin operations; the set of objects and layers
	st     *state

	// Allocator of physical clusters.
	amu     sync.Mutex
	total   uint64
	alloc   allocator // reusable clusters (their freeing record is durable)
	used    int64     // clusters that are not free (mapped, being written or pending free)
	pending int64     // clusters whose freeing record is not durable yet

	// Metadata records not yet written to the journal file.
	jmu         sync.Mutex
	jbuf        []byte
	pendingNext []uint64 // clusters freed by the records in jbuf

	// The journal file; guarded by syncMu.
	syncMu      sync.Mutex
	jf          *os.File
	jgen        uint64
	jsize       atomic.Int64
	syncStarted atomic.Uint64
	syncDone    atomic.Uint64
	dirty       atomic.Bool
	// relMu is held shared while a sync releases the clusters it freed, exclusively
	// by whoever must see every release finished.
	relMu sync.RWMutex

	closed atomic.Bool
	stop   chan struct{}
	kick   chan struct{}
	wg     sync.WaitGroup
}

const (
	checkpointName = "checkpoint"
	lockName       = "lock"
	kickBytes      = 1 << 20
)

func journalName(gen uint64) string { return fmt.Sprintf("journal.%016x", gen) }

// Open replays the checkpoint and journal in metaDir, creating them on first use.
func Open(metaDir string, d dev.Device, opts Options) (*Manager, error) {
	if d.Size() < ClusterSize {
		return nil, fmt.Errorf("Failed to open volumes in %q: device of %d bytes is smaller than one cluster: %w", metaDir, d.Size(), ErrInvalid)
	}
	if err := os.MkdirAll(metaDir, 0o700); err != nil {
		return nil, fmt.Errorf("Failed to create metadata directory %q: %w", metaDir, err)
	}
	lf, err := os.OpenFile(filepath.Join(metaDir, lockName), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("Failed to open lock file in %q: %w", metaDir, err)
	}
	if err := unix.Flock(int(lf.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		lf.Close()
		return nil, fmt.Errorf("Failed to lock metadata directory %q (is another storage controller using it?): %w", metaDir, err)
	}
	m := &Manager{
		dir:   metaDir,
		dev:   d,
		opts:  opts.withDefaults(),
		lock:  lf,
		total: uint64(d.Size() / ClusterSize),
		stop:  make(chan struct{}),
		kick:  make(chan struct{}, 1),
	}
	m.disc, _ = d.(dev.Discarder)
	m.splice, _ = d.(dev.Splicer)
	m.pipeIn, _ = d.(pipeWriter)
	if err := m.load(); err != nil {
		lf.Close()
		return nil, err
	}
	// An import that never finished leaves nothing behind.
	for _, o := range m.st.objects {
		if o.importing {
			m.opts.Logger.Warn("Dropping an image import that did not finish", "image", o.name)
			if err := m.commit(&record{typ: recDelete, name: o.name}); err != nil {
				m.jf.Close()
				lf.Close()
				return nil, fmt.Errorf("Failed to drop unfinished import %q: %w", o.name, err)
			}
		}
	}
	if err := m.sync(); err != nil {
		m.jf.Close()
		lf.Close()
		return nil, err
	}
	m.wg.Add(1)
	go m.background()
	return m, nil
}

// load reads the checkpoint and replays the journals, then builds the allocator.
func (m *Manager) load() error {
	st, gen, err := readCheckpoint(m.dir)
	if errors.Is(err, fs.ErrNotExist) {
		if jl, _ := filepath.Glob(filepath.Join(m.dir, "journal.*")); len(jl) > 0 {
			return fmt.Errorf("Failed to open volumes in %q: journals exist but the checkpoint is missing: %w", m.dir, ErrCorrupt)
		}
		st, gen = newState(), 1
		if err := writeFileSync(m.dir, checkpointName, encodeCheckpoint(st, gen)); err != nil {
			return err
		}
	} else if err != nil {
		return fmt.Errorf("Failed to open volumes in %q: %w", m.dir, err)
	}
	last := gen
	for g := gen; ; g++ {
		path := filepath.Join(m.dir, journalName(g))
		b, err := os.ReadFile(path)
		if errors.Is(err, fs.ErrNotExist) {
			break
		}
		if err != nil {
			return fmt.Errorf("Failed to read journal %q: %w", path, err)
		}
		_, nextErr := os.Stat(filepath.Join(m.dir, journalName(g+1)))
		if newest := errors.Is(nextErr, fs.ErrNotExist); newest && len(b) <= journalHeader && allZeroOrShort(b) {
			// A crash while starting this journal left it without a complete header:
			// it holds no records. Start it again.
			if err := os.Truncate(path, 0); err != nil {
				return fmt.Errorf("Failed to reset journal %q: %w", path, err)
			}
			m.opts.Logger.Warn("Reset a volume journal whose header was never completed", "journal", path)
			last = g
			break
		}
		jg, scan, err := scanJournal(b)
		if err != nil || jg != g {
			return fmt.Errorf("Failed to read journal %q: bad header: %w", path, ErrCorrupt)
		}
		if scan.tail != "" {
			if _, err := os.Stat(filepath.Join(m.dir, journalName(g+1))); err == nil || !scan.torn {
				return fmt.Errorf("Failed to replay journal %q: %s (durable records may follow; refusing to drop them): %w", path, scan.tail, ErrCorrupt)
			}
			// A torn tail of the newest journal is an interrupted append: drop it.
			if err := os.Truncate(path, scan.good); err != nil {
				return fmt.Errorf("Failed to truncate torn journal %q: %w", path, err)
			}
			m.opts.Logger.Warn("Dropped the torn tail of the volume journal", "journal", path, "reason", scan.tail, "kept_bytes", scan.good)
		}
		for i := range scan.records {
			if err := st.apply(&scan.records[i], func(uint64) {}); err != nil {
				return fmt.Errorf("Failed to replay journal %q record %d: %w", path, i, err)
			}
		}
		last = g
	}
	if err := st.checkChains(); err != nil {
		return fmt.Errorf("Failed to open volumes in %q: %w", m.dir, err)
	}
	m.st = st
	if err := m.buildAllocator(); err != nil {
		return fmt.Errorf("Failed to open volumes in %q: %w", m.dir, err)
	}
	path := filepath.Join(m.dir, journalName(last))
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return fmt.Errorf("Failed to open journal %q: %w", path, err)
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return fmt.Errorf("Failed to stat journal %q: %w", path, err)
	}
	size := fi.Size()
	if size == 0 {
		if _, err := f.WriteAt(encodeJournalHeader(last), 0); err != nil {
			f.Close()
			return fmt.Errorf("Failed to write journal header %q: %w", path, err)
		}
		if err := f.Sync(); err != nil {
			f.Close()
			return fmt.Errorf("Failed to sync journal %q: %w", path, err)
		}
		if err := syncDir(m.dir); err != nil {
			f.Close()
			return err
		}
		size = journalHeader
	}
	m.jf, m.jgen = f, last
	m.jsize.Store(size)
	return nil
}

// allZeroOrShort tells whether b (at most a journal header long) is not a complete
// valid header: shorter than one, or all zeroes.
func allZeroOrShort(b []byte) bool {
	if len(b) < journalHeader {
		return true
	}
	_, err := decodeJournalHeader(b)
	return err != nil && allZero(b)
}

// buildAllocator derives the free clusters as the complement of every mapped cluster.
func (m *Manager) buildAllocator() error {
	used := newBitmap(m.total)
	var n uint64
	var bad error
	for _, l := range m.st.layers {
		l.tab.each(func(vc, e uint64) {
			if !isPhys(e) || bad != nil {
				return
			}
			p := e - entPhys
			if p >= m.total {
				bad = fmt.Errorf("layer %d maps cluster %d beyond the device (%d clusters): %w", l.id, p, m.total, ErrCorrupt)
				return
			}
			if used.has(p) {
				bad = fmt.Errorf("physical cluster %d is mapped twice: %w", p, ErrCorrupt)
				return
			}
			used.set(p)
			n++
		})
	}
	if bad != nil {
		return bad
	}
	m.alloc = newAllocator(m.total, used)
	m.used = int64(n)
	m.discardFree()
	return nil
}

// bitmap is a set of physical clusters.
type bitmap []uint64

func newBitmap(n uint64) bitmap    { return make(bitmap, (n+63)/64) }
func (b bitmap) has(p uint64) bool { return b[p/64]&(1<<(p%64)) != 0 }
func (b bitmap) set(p uint64)      { b[p/64] |= 1 << (p % 64) }

// discardFree gives every free cluster back to the device at open. Afterwards they
// read as zeroes, so a first partial write into one need not write the rest of it
// (allocations that a crash left unrecorded may have put data there).
func (m *Manager) discardFree() {
	if m.disc == nil {
		return
	}
	// In bounded pieces so that no single device call is huge.
	const piece = 1 << 30 / ClusterSize
	m.alloc.freeRuns(func(start, n uint64) {
		for done := uint64(0); done < n; done += piece {
			k := min(piece, n-done)
			if m.disc.Discard(int64(start+done)*ClusterSize, int64(k)*ClusterSize) == nil {
				m.alloc.markZero(start+done, k)
			}
		}
	})
}

// discardRuns discards the clusters of list in contiguous runs and returns it with
// knownZero set on every cluster whose discard succeeded.
func (m *Manager) discardRuns(list []uint64) []uint64 {
	if m.disc == nil || len(list) == 0 {
		return list
	}
	s := append([]uint64(nil), list...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	out := list[:0]
	for i := 0; i < len(s); {
		j := i + 1
		for j < len(s) && s[j] == s[j-1]+1 {
			j++
		}
		flag := uint64(0)
		if m.disc.Discard(int64(s[i])*ClusterSize, int64(j-i)*ClusterSize) == nil {
			flag = knownZero
		}
		for _, p := range s[i:j] {
			out = append(out, p|flag)
		}
		i = j
	}
	return out
}

func readCheckpoint(dir string) (*state, uint64, error) {
	b, err := os.ReadFile(filepath.Join(dir, checkpointName))
	if err != nil {
		return nil, 0, err
	}
	return decodeCheckpoint(b)
}

// writeFileSync writes name in dir crash-safely: temporary file, fsync, rename, fsync dir.
func writeFileSync(dir, name string, b []byte) error {
	tmp := filepath.Join(dir, name+".tmp")
	f, err := os.OpenFile(tmp, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return fmt.Errorf("Failed to create %q: %w", tmp, err)
	}
	if _, err := f.Write(b); err != nil {
		f.Close()
		return fmt.Errorf("Failed to write %q: %w", tmp, err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("Failed to sync %q: %w", tmp, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("Failed to close %q: %w", tmp, err)
	}
	if err := os.Rename(tmp, filepath.Join(dir, name)); err != nil {
		return fmt.Errorf("Failed to rename %q: %w", tmp, err)
	}
	return syncDir(dir)
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("Failed to open directory %q: %w", dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("Failed to sync directory %q: %w", dir, err)
	}
	return nil
}

// Close makes all metadata durable, writes a checkpoint and releases the directory.
// Handles still open fail with ErrClosed afterwards.
func (m *Manager) Close() error {
	if m.closed.Swap(true) {
		return nil
	}
	close(m.stop)
	m.wg.Wait()
	err := m.sync()
	if err == nil && !m.opts.NoCheckpointOnClose {
		err = m.checkpoint()
	}
	m.syncMu.Lock()
	if cerr := m.jf.Close(); err == nil && cerr != nil {
		err = fmt.Errorf("Failed to close journal: %w", cerr)
	}
	m.syncMu.Unlock()
	m.lock.Close()
	return err
}

func (m *Manager) background() {
	defer m.wg.Done()
	// Without a sync interval the loop still serves kicks (a large journal buffer).
	var tick <-chan time.Time
	if m.opts.SyncInterval > 0 {
		t := time.NewTicker(m.opts.SyncInterval)
		defer t.Stop()
		tick = t.C
	}
	for {
		select {
		case <-m.stop:
			return
		case <-tick:
		case <-m.kick:
		}
		// Only buffered metadata is made durable here. Data that plain writes left in
		// the device's cache needs no sync until a FLUSH or FUA asks (m.dirty stays
		// set for it); syncing it every interval would write back, mid-stream, pages
		// that are being overwritten.
		m.jmu.Lock()
		idle := len(m.jbuf) == 0
		m.jmu.Unlock()
		if !idle {
			if err := m.sync(); err != nil {
				m.opts.Logger.Error("Background sync of volume metadata failed", "err", err)
				continue
			}
		}
		if m.jsize.Load() > m.opts.JournalLimit {
			if err := m.checkpoint(); err != nil {
				m.opts.Logger.Error("Volume journal compaction failed", "err", err)
			}
		}
	}
}

// log appends a record to the journal buffer. The caller holds the lock that orders
// changes of what the record touches (mu for objects, the object's tab for mappings).
func (m *Manager) log(r *record, freed ...uint64) {
	m.jmu.Lock()
	m.jbuf = frameRecord(m.jbuf, r)
	if len(freed) > 0 {
		m.pendingNext = append(m.pendingNext, freed...)
		m.amu.Lock()
		m.pending += int64(len(freed))
		m.amu.Unlock()
	}
	big := len(m.jbuf) >= kickBytes
	m.jmu.Unlock()
	if big {
		m.wake()
	}
}

// commit applies an admin record to the state and logs it. Caller holds mu (and the
// io locks the record needs).
func (m *Manager) commit(r *record) error {
	var freed []uint64
	if err := m.st.apply(r, func(p uint64) { freed = append(freed, p) }); err != nil {
		return err
	}
	m.log(r, freed...)
	return nil
}

// sync makes every write and record that completed before the call durable: the device
// first, then the journal. Concurrent callers share one sync when they can.
func (m *Manager) sync() error {
	start := m.syncStarted.Load()
	m.syncMu.Lock()
	if m.syncDone.Load() > start {
		m.syncMu.Unlock()
		return nil
	}
	freed, err := m.syncHeld()
	m.unlockSyncAndRelease(freed)
	if m.jsize.Load() > m.opts.JournalLimit {
		m.wake() // compaction runs in the background, never in an I/O path
	}
	return err
}

// wake asks the background loop to sync and, if the journal is too big, compact it.
func (m *Manager) wake() {
	select {
	case m.kick <- struct{}{}:
	default:
	}
}

// unlockSyncAndRelease gives up syncMu, then returns the clusters a sync made free
// (discarding them can take a while; other syncs need not wait for it).
func (m *Manager) unlockSyncAndRelease(freed []uint64) {
	m.relMu.RLock()
	m.syncMu.Unlock()
	m.release(freed)
	m.relMu.RUnlock()
}

// syncHeld is sync with syncMu held; it returns the clusters whose freeing records it
// made durable, for the caller to release.
func (m *Manager) syncHeld() ([]uint64, error) {
	id := m.syncStarted.Add(1)
	dirty := m.dirty.Swap(false)
	m.jmu.Lock()
	buf, freed := m.jbuf, m.pendingNext
	m.jbuf, m.pendingNext = nil, nil
	m.jmu.Unlock()
	if !dirty && len(buf) == 0 && len(freed) == 0 {
		// Nothing was written since the last sync began.
		m.syncDone.Store(id)
		return nil, nil
	}
	requeue := func() {
		m.jmu.Lock()
		m.jbuf = append(buf, m.jbuf...)
		m.pendingNext = append(freed, m.pendingNext...)
		m.jmu.Unlock()
		m.dirty.Store(true)
	}
	if err := m.dev.Sync(); err != nil {
		requeue()
		return nil, fmt.Errorf("Failed to sync the data device: %w", err)
	}
	if len(buf) > 0 {
		off := m.jsize.Load()
		_, err := m.jf.WriteAt(buf, off)
		if err == nil {
			err = unix.Fdatasync(int(m.jf.Fd()))
		}
		if err != nil {
			_ = m.jf.Truncate(off)
			requeue()
			return nil, fmt.Errorf("Failed to write the volume journal: %w", err)
		}
		m.jsize.Store(off + int64(len(buf)))
	}
	m.syncDone.Store(id)
	return freed, nil
}

// release returns clusters whose freeing record is now durable to the allocator,
// discarding them on the device first.
func (m *Manager) release(freed []uint64) {
	if len(freed) == 0 {
		return
	}
	n := int64(len(freed))
	// A failed discard only leaves old data in a free cluster, never exposed: such a
	// cluster is not marked knownZero, so its first write fills it completely.
	freed = m.discardRuns(freed)
	m.amu.Lock()
	for _, p := range freed {
		m.alloc.put(p&^knownZero, p&knownZero != 0)
	}
	m.used -= n
	m.pending -= n
	m.amu.Unlock()
}

// knownZero marks a freed cluster that was discarded and reads as zeroes.
const knownZero = 1 << 63

// allocate hands out a physical cluster that no layer maps and whose freeing is
// durable, for virtual cluster vc of layer (goal: see allocator.get); zero reports that
// the cluster is known to read as zeroes.
func (m *Manager) allocate(layer, vc, goal uint64) (p uint64, zero bool, err error) {
	for attempt := 0; ; attempt++ {
		m.amu.Lock()
		if p, zero, ok := m.alloc.get(layer, vc, goal); ok {
			m.used++
			m.amu.Unlock()
			return p, zero, nil
		}
		pending := m.pending
		m.amu.Unlock()
		if pending == 0 || attempt > 0 {
			return 0, false, fmt.Errorf("Failed to allocate a cluster (%d clusters, all in use): %w", m.total, ErrNoSpace)
		}
		// Clusters are waiting for their freeing record to be durable: make it so, and
		// wait for syncs of other goroutines to finish releasing theirs.
		if err := m.sync(); err != nil {
			return 0, false, err
		}
		m.relMu.Lock()
		m.relMu.Unlock()
	}
}

// unalloc returns a cluster that alloc handed out but no record ever mapped; a failed
// write may have left data in it, so it is not known to be zero.
func (m *Manager) unalloc(p uint64) {
	m.amu.Lock()
	m.alloc.put(p, false)
	m.used--
	m.amu.Unlock()
}

// Checkpoint compacts the journal: it writes the whole state as a new checkpoint and
// starts a new journal. It is crash-safe at every step.
func (m *Manager) Checkpoint() error {
	if m.closed.Load() {
		return fmt.Errorf("Failed to checkpoint: %w", ErrClosed)
	}
	return m.checkpoint()
}

func (m *Manager) checkpoint() error {
	m.ckptMu.Lock()
	defer m.ckptMu.Unlock()
	// Close the current journal at a sync point; later records go to the next one.
	// I/O never pauses: the new checkpoint is rebuilt from the files, not from the
	// live state.
	m.syncMu.Lock()
	freed, err := m.syncHeld()
	closed := m.jgen
	if err == nil {
		err = m.switchJournal(closed + 1)
	}
	m.unlockSyncAndRelease(freed)
	if err != nil {
		return fmt.Errorf("Failed to checkpoint volume metadata: %w", err)
	}
	st, err := replayDir(m.dir, closed)
	if err != nil {
		return fmt.Errorf("Failed to checkpoint volume metadata: %w", err)
	}
	// Until the new checkpoint is in place, the old one plus every journal from its
	// generation on still replays to the same state.
	if err := writeFileSync(m.dir, checkpointName, encodeCheckpoint(st, closed+1)); err != nil {
		return fmt.Errorf("Failed to checkpoint volume metadata: %w", err)
	}
	old, _ := filepath.Glob(filepath.Join(m.dir, "journal.*"))
	for _, p := range old {
		var g uint64
		if _, err := fmt.Sscanf(filepath.Base(p), "journal.%x", &g); err == nil && g <= closed {
			os.Remove(p)
		}
	}
	return nil
}

// replayDir rebuilds the state from the checkpoint and the complete journals up to
// generation last; any damage is an error.
func replayDir(dir string, last uint64) (*state, error) {
	st, gen, err := readCheckpoint(dir)
	if err != nil {
		return nil, fmt.Errorf("Failed to read checkpoint in %q: %w", dir, err)
	}
	for g := gen; g <= last; g++ {
		path := filepath.Join(dir, journalName(g))
		b, err := os.ReadFile(path)
		if err != nil {
			return nil, fmt.Errorf("Failed to read journal %q: %w", path, err)
		}
		jg, scan, err := scanJournal(b)
		if err != nil || jg != g {
			return nil, fmt.Errorf("Failed to read journal %q: bad header: %w", path, ErrCorrupt)
		}
		if scan.tail != "" {
			return nil, fmt.Errorf("Failed to replay journal %q: %s: %w", path, scan.tail, ErrCorrupt)
		}
		for i := range scan.records {
			if err := st.apply(&scan.records[i], func(uint64) {}); err != nil {
				return nil, fmt.Errorf("Failed to replay journal %q record %d: %w", path, i, err)
			}
		}
	}
	if err := st.checkChains(); err != nil {
		return nil, err
	}
	return st, nil
}

// switchJournal starts journal gen; the caller holds syncMu and has just synced.
func (m *Manager) switchJournal(gen uint64) error {
	path := filepath.Join(m.dir, journalName(gen))
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return fmt.Errorf("Failed to create journal %q: %w", path, err)
	}
	if _, err := f.Write(encodeJournalHeader(gen)); err == nil {
		err = f.Sync()
	}
	if err == nil {
		err = syncDir(m.dir)
	}
	if err != nil {
		f.Close()
		os.Remove(path)
		return fmt.Errorf("Failed to start journal %q: %w", path, err)
	}
	m.jf.Close()
	m.jf, m.jgen = f, gen
	m.jsize.Store(journalHeader)
	return nil
}

// mergeHook, when set by a test, runs while a snapshot merge holds its locks.
var mergeHook func()

// lockAll stops I/O on every object; caller holds mu.
func (m *Manager) lockAll() func() {
	names := make([]string, 0, len(m.st.objects))
	for n := range m.st.objects {
		names = append(names, n)
	}
	return m.lockNames(names)
}

// lockReaders stops I/O on every object whose layer chain goes through l; caller
// holds mu.
func (m *Manager) lockReaders(l *layer) func() {
	var names []string
	for n, o := range m.st.objects {
		for c := o.layer; c != nil; c = c.parent {
			if c == l {
				names = append(names, n)
				break
			}
		}
	}
	return m.lockNames(names)
}

// lockNames stops I/O on the named objects, in name order (the lock order).
func (m *Manager) lockNames(names []string) func() {
	sort.Strings(names)
	objs := make([]*object, len(names))
	for i, n := range names {
		objs[i] = m.st.objects[n]
		objs[i].io.Lock()
	}
	return func() {
		for _, o := range objs {
			o.io.Unlock()
		}
	}
}

func (m *Manager) checkOpen(op string) error {
	if m.closed.Load() {
		return fmt.Errorf("Failed to %s: %w", op, ErrClosed)
	}
	return nil
}

// Create makes a new, empty, writable thin volume.
func (m *Manager) Create(name string, size int64) (Info, error) {
	if err := m.checkOpen("create volume"); err != nil {
		return Info{}, err
	}
	if err := validName(name); err != nil {
		return Info{}, fmt.Errorf("Failed to create volume: %w", err)
	}
	if err := validSize(size); err != nil {
		return Info{}, fmt.Errorf("Failed to create volume %q: %w", name, err)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.st.objects[name] != nil {
		return Info{}, fmt.Errorf("Failed to create volume %q: %w", name, ErrExists)
	}
	r := &record{typ: recCreate, name: name, kind: kVolume, size: size, created: time.Now().UnixNano(), layer: m.st.nextLayer}
	if err := m.commit(r); err != nil {
		return Info{}, fmt.Errorf("Failed to create volume %q: %w", name, err)
	}
	if err := m.sync(); err != nil {
		return Info{}, fmt.Errorf("Failed to create volume %q: %w", name, err)
	}
	return m.st.objects[name].info(), nil
}

// Clone makes a writable volume dst over the image or snapshot src in O(1).
func (m *Manager) Clone(src, dst string) (Info, error) {
	if err := m.checkOpen("clone"); err != nil {
		return Info{}, err
	}
	if err := validName(dst); err != nil {
		return Info{}, fmt.Errorf("Failed to clone %q: %w", src, err)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	s := m.st.objects[src]
	if s == nil || s.importing {
		return Info{}, fmt.Errorf("Failed to clone %q: %w", src, ErrNotFound)
	}
	if !canParent(s.layer) {
		return Info{}, fmt.Errorf("Failed to clone %q: only images and snapshots can be cloned (snapshot the volume first): %w", src, ErrInvalid)
	}
	if m.st.objects[dst] != nil {
		return Info{}, fmt.Errorf("Failed to clone %q to %q: %w", src, dst, ErrExists)
	}
	r := &record{typ: recCreate, name: dst, kind: kVolume, size: s.size.Load(), created: time.Now().UnixNano(), layer: m.st.nextLayer, parent: s.layer.id}
	if err := m.commit(r); err != nil {
		return Info{}, fmt.Errorf("Failed to clone %q to %q: %w", src, dst, err)
	}
	if err := m.sync(); err != nil {
		return Info{}, fmt.Errorf("Failed to clone %q to %q: %w", src, dst, err)
	}
	return m.st.objects[dst].info(), nil
}

// Snapshot freezes volume name as the read-only snapshot "name@snap" in O(1); the
// volume continues on a new empty layer.
func (m *Manager) Snapshot(name, snap string) (Info, error) {
	if err := m.checkOpen("snapshot"); err != nil {
		return Info{}, err
	}
	if err := validName(snap); err != nil {
		return Info{}, fmt.Errorf("Failed to snapshot %q: %w", name, err)
	}
	full := name + "@" + snap
	m.mu.Lock()
	defer m.mu.Unlock()
	v := m.st.objects[name]
	if v == nil {
		return Info{}, fmt.Errorf("Failed to snapshot %q: %w", name, ErrNotFound)
	}
	if v.kind != KindVolume {
		return Info{}, fmt.Errorf("Failed to snapshot %q: only volumes can be snapshotted (it is a %s): %w", name, v.kind, ErrInvalid)
	}
	if m.st.objects[full] != nil {
		return Info{}, fmt.Errorf("Failed to snapshot %q as %q: %w", name, full, ErrExists)
	}
	v.io.Lock()
	err := m.commit(&record{typ: recSnapshot, name: name, name2: full, created: time.Now().UnixNano(), layer: m.st.nextLayer})
	v.io.Unlock()
	if err != nil {
		return Info{}, fmt.Errorf("Failed to snapshot %q: %w", name, err)
	}
	if err := m.sync(); err != nil {
		return Info{}, fmt.Errorf("Failed to snapshot %q: %w", name, err)
	}
	return m.st.objects[full].info(), nil
}

// Resize grows a volume; shrinking is refused with ErrInvalid.
func (m *Manager) Resize(name string, size int64) error {
	if err := m.checkOpen("resize"); err != nil {
		return err
	}
	if err := validSize(size); err != nil {
		return fmt.Errorf("Failed to resize %q: %w", name, err)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	o := m.st.objects[name]
	if o == nil || o.importing {
		return fmt.Errorf("Failed to resize %q: %w", name, ErrNotFound)
	}
	if o.kind != KindVolume {
		return fmt.Errorf("Failed to resize %q: a %s is read-only: %w", name, o.kind, ErrInvalid)
	}
	cur := o.size.Load()
	if size < cur {
		return fmt.Errorf("Failed to resize %q: shrinking from %d to %d bytes is not supported: %w", name, cur, size, ErrInvalid)
	}
	if size == cur {
		return nil
	}
	o.io.Lock()
	err := m.commit(&record{typ: recResize, name: name, size: size})
	o.io.Unlock()
	if err != nil {
		return fmt.Errorf("Failed to resize %q: %w", name, err)
	}
	if err := m.sync(); err != nil {
		return fmt.Errorf("Failed to resize %q: %w", name, err)
	}
	return nil
}

// Delete removes a volume, image or snapshot that nothing depends on and nobody has
// open. Deleting a snapshot that only its own volume stacks on folds the snapshot's
// clusters into the next layer (metadata only).
func (m *Manager) Delete(name string) error {
	if err := m.checkOpen("delete"); err != nil {
		return err
	}
	if err := validAnyName(name); err != nil {
		return fmt.Errorf("Failed to delete: %w", err)
	}
	m.mu.Lock()
	err := m.deleteLocked(name, false)
	m.mu.Unlock()
	if err != nil {
		return err
	}
	// Outside mu: releasing a big volume's clusters (discards) must not hold up other
	// operations.
	if err := m.sync(); err != nil {
		return fmt.Errorf("Failed to delete %q: %w", name, err)
	}
	return nil
}

// deleteLocked removes the object from the state and logs it; the caller holds mu and
// syncs afterwards.
func (m *Manager) deleteLocked(name string, importing bool) error {
	o := m.st.objects[name]
	if o == nil || o.importing != importing {
		return fmt.Errorf("Failed to delete %q: %w", name, ErrNotFound)
	}
	if o.opens > 0 {
		return fmt.Errorf("Failed to delete %q: it is open (%d handles): %w", name, o.opens, ErrInUse)
	}
	r := &record{typ: recDelete, name: name}
	switch o.kind {
	case KindVolume:
		var snaps []string
		for n := range m.st.objects {
			if strings.HasPrefix(n, name+"@") {
				snaps = append(snaps, n)
			}
		}
		if len(snaps) > 0 {
			sort.Strings(snaps)
			return fmt.Errorf("Failed to delete %q: it has snapshots %s (delete them first): %w", name, strings.Join(snaps, ", "), ErrInUse)
		}
	case KindImage:
		if n := o.layer.children; n > 0 {
			return fmt.Errorf("Failed to delete image %q: %d clone(s) depend on it: %w", name, n, ErrInUse)
		}
	case KindSnapshot:
		if n := o.layer.children; n > 0 {
			vol, _, _ := strings.Cut(name, "@")
			cvol := ""
			if c := m.st.childOf(o.layer); c != nil && c.owner != nil {
				cvol, _, _ = strings.Cut(c.owner.name, "@")
			}
			if n > 1 || cvol != vol {
				return fmt.Errorf("Failed to delete snapshot %q: %d clone(s) or later layers depend on it: %w", name, n, ErrInUse)
			}
			r.typ = recMerge
		}
	}
	var err error
	if r.typ == recMerge {
		// The merge rewrites the child's table and unlinks the snapshot's layer: I/O
		// stops on the objects that read through that layer, and only on them.
		unlock := m.lockReaders(o.layer)
		if mergeHook != nil {
			mergeHook()
		}
		err = m.commit(r)
		unlock()
	} else {
		err = m.commit(r)
	}
	if err != nil {
		return fmt.Errorf("Failed to delete %q: %w", name, err)
	}
	return nil
}

// Get describes one volume, image or snapshot.
func (m *Manager) Get(name string) (Info, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	o := m.st.objects[name]
	if o == nil || o.importing {
		return Info{}, fmt.Errorf("Failed to find %q: %w", name, ErrNotFound)
	}
	return m.infoLocked(o), nil
}

// infoLocked reads an object's allocation under its tab lock (a writable top changes).
func (m *Manager) infoLocked(o *object) Info {
	o.tab.RLock()
	defer o.tab.RUnlock()
	return o.info()
}

// List describes every volume, image and snapshot, sorted by name; imports in
// progress are not listed.
func (m *Manager) List() []Info {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]Info, 0, len(m.st.objects))
	for _, o := range m.st.objects {
		if !o.importing {
			out = append(out, m.infoLocked(o))
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// Stats reports the device's cluster accounting.
func (m *Manager) Stats() Stats {
	m.amu.Lock()
	used, pending := m.used, m.pending
	m.amu.Unlock()
	m.jmu.Lock()
	jb := int64(len(m.jbuf))
	m.jmu.Unlock()
	total := int64(m.total)
	return Stats{
		ClusterSize:         ClusterSize,
		ClustersTotal:       total,
		ClustersUsed:        used - pending,
		ClustersFree:        total - used,
		ClustersPendingFree: pending,
		BytesTotal:          total * ClusterSize,
		BytesUsed:           (used - pending) * ClusterSize,
		BytesFree:           (total - used) * ClusterSize,
		JournalBytes:        m.jsize.Load() + jb,
	}
}

// Open opens a volume, image or snapshot for I/O.
func (m *Manager) Open(name string) (*Handle, error) {
	if err := m.checkOpen("open volume"); err != nil {
		return nil, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	o := m.st.objects[name]
	if o == nil || o.importing {
		return nil, fmt.Errorf("Failed to open %q: %w", name, ErrNotFound)
	}
	o.opens++
	return &Handle{m: m, o: o}, nil
}
