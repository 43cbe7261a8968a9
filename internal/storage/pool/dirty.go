package pool

import (
	"cmp"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// dirtyFile holds the write-intent bitmap: one bit per rebuild chunk of each pair, set
// in the file and made durable (fdatasync) before a write touches the chunk, cleared by
// the cleaner once the chunk saw no write for a whole cleaning interval (a tenth of the
// health interval), no write is in flight on its 64-chunk word, and a sync of every
// live disk that began after the word's last write ended has completed (see
// cleanDirty). So the file, as a power loss leaves it, marks every chunk whose two
// copies may differ: the next Open resyncs only those chunks, after a process kill as
// after a machine restart. Chunks written all the time stay marked, so that they need
// not be marked again (a write and an fdatasync of the file) every interval.
const dirtyFile = "pool.dirty"

type dirtyMap struct {
	f       *os.File
	rc      syscall.RawConn
	perPair int64 // chunks per pair
	// bits is the bitmap as the file durably holds it: a bit is set here only after
	// the file has it and was synced, and cleared here before the file loses it,
	// always under fileMu, so a writer that sees its chunk's bit set may write at once.
	bits []atomic.Uint64
	// inflight counts, per word of bits, the mutations between their mark and their end.
	inflight []atomic.Int32
	touched  []atomic.Uint64 // chunks marked since the cleaner's last pass
	// ended holds, per word, the highest count of begun syncs that one of its
	// mutations read when it ended: its chunks are durable on both disks once a sync
	// numbered above that has completed.
	ended   []atomic.Uint64
	started atomic.Uint64 // syncs of every live disk begun (each takes the next number)
	synced  atomic.Uint64 // highest number of such a sync that completed without error
	syncAt  atomic.Int64  // when the last such sync began, in Unix nanoseconds
	fileMu  sync.Mutex

	// Group commit of marks: writers add the words they need to pending and wait until
	// the batch they joined was written and synced by whichever of them leads it.
	cmu        sync.Mutex
	cond       sync.Cond
	pending    []need
	spare      []need
	open       uint64 // number of the batch that pending fills
	done       uint64 // number of the last batch committed (or failed)
	committing bool
	lastErr    error // the last failed commit's error
	// afterSync, when set, runs under fileMu after each commit's fdatasync. Tests only.
	afterSync func()
}

// need is the chunks of one bitmap word that a mutation needs durably marked.
type need struct {
	w    int64
	bits uint64
}

// openDirty opens (creating or resizing) the bitmap file and returns it with the
// chunks it had marked; complete is false when the file did not exist or had another size.
func openDirty(dir string, pairs, perPair int64) (*dirtyMap, []int64, bool, error) {
	words := (pairs*perPair + 63) / 64
	path := filepath.Join(dir, dirtyFile)
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, nil, false, fmt.Errorf("Failed to open the pool's write-intent bitmap: %w", err)
	}
	rc, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return nil, nil, false, fmt.Errorf("Failed to open the pool's write-intent bitmap: %w", err)
	}
	m := &dirtyMap{f: f, rc: rc, perPair: perPair, bits: make([]atomic.Uint64, words), inflight: make([]atomic.Int32, words),
		touched: make([]atomic.Uint64, words), ended: make([]atomic.Uint64, words), open: 1}
	m.cond.L = &m.cmu
	m.syncAt.Store(time.Now().UnixNano())
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, nil, false, fmt.Errorf("Failed to stat the pool's write-intent bitmap: %w", err)
	}
	complete := fi.Size() == words*8
	var marked []int64
	if complete {
		b := make([]byte, words*8)
		if _, err := f.ReadAt(b, 0); err != nil {
			f.Close()
			return nil, nil, false, fmt.Errorf("Failed to read the pool's write-intent bitmap: %w", err)
		}
		for w := int64(0); w < words; w++ {
			v := binary.LittleEndian.Uint64(b[w*8:])
			for bit := int64(0); v != 0; bit, v = bit+1, v>>1 {
				if v&1 != 0 && w*64+bit < pairs*perPair {
					marked = append(marked, w*64+bit)
				}
			}
		}
	}
	return m, marked, complete, nil
}

// reset clears the whole bitmap, on disk too.
func (m *dirtyMap) reset() error {
	for i := range m.bits {
		m.bits[i].Store(0)
	}
	if err := m.f.Truncate(0); err != nil {
		return fmt.Errorf("Failed to reset the pool's write-intent bitmap: %w", err)
	}
	if err := m.f.Truncate(int64(len(m.bits)) * 8); err != nil {
		return fmt.Errorf("Failed to reset the pool's write-intent bitmap: %w", err)
	}
	if err := m.f.Sync(); err != nil {
		return fmt.Errorf("Failed to sync the pool's write-intent bitmap: %w", err)
	}
	return nil
}

// writeWord stores v as word w of the file; fileMu is held.
func (m *dirtyMap) writeWord(w int64, v uint64) error {
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], v)
	if _, err := m.f.WriteAt(b[:], w*8); err != nil {
		return fmt.Errorf("Failed to update the pool's write-intent bitmap: %w", err)
	}
	return nil
}

// span returns the bitmap words holding chunks first..last of pair.
func (m *dirtyMap) span(pair int, first, last int64) (int64, int64) {
	base := int64(pair) * m.perPair
	return (base + first) / 64, (base + last) / 64
}

// begin counts a mutation of chunks first..last of pair as in flight and appends to
// needs the chunks the file does not durably mark yet; commit marks them, end follows
// once the mutation reached both disks.
func (m *dirtyMap) begin(pair int, first, last int64, needs []need) []need {
	w0, w1 := m.span(pair, first, last)
	for w := w0; w <= w1; w++ {
		m.inflight[w].Add(1)
	}
	base := int64(pair) * m.perPair
	for w := w0; w <= w1; w++ {
		lo, hi := max(base+first, w*64), min(base+last, w*64+63)
		want := (^uint64(0) >> (63 - (hi - lo))) << (lo - w*64)
		if m.touched[w].Load()&want != want {
			m.touched[w].Or(want)
		}
		// Seen set after the in-flight count was raised: the cleaner cannot clear
		// it from the file until the count drops (see cleanDirty).
		if m.bits[w].Load()&want != want {
			needs = append(needs, need{w, want})
		}
	}
	return needs
}

// commit returns once the file durably marks every chunk in needs. Concurrent callers
// share one write and fdatasync: the first to find no commit running leads the batch
// of everything pending, the others wait for the batch they joined.
func (m *dirtyMap) commit(needs []need) error {
	m.cmu.Lock()
	m.pending = append(m.pending, needs...)
	my := m.open
	for m.done < my {
		if m.committing {
			m.cond.Wait()
			continue
		}
		// Batch my is still pending (batches commit one at a time, in order): lead it.
		m.committing = true
		batch := m.pending
		m.pending, m.spare = m.spare, nil
		m.open++
		m.cmu.Unlock()
		err := m.writeMarks(batch)
		m.cmu.Lock()
		m.spare = batch[:0]
		m.done = my
		if err != nil {
			m.lastErr = err
		}
		m.committing = false
		m.cond.Broadcast()
	}
	err := m.lastErr
	m.cmu.Unlock()
	// The in-flight count keeps the cleaner off these bits: all set means this batch
	// (or an earlier one) made them durable.
	for _, n := range needs {
		if m.bits[n.w].Load()&n.bits != n.bits {
			return fmt.Errorf("Failed to mark chunks in the pool's write-intent bitmap: %w", err)
		}
	}
	return nil
}

// writeMarks writes the words of batch with their new bits set, fdatasyncs the file
// and only then publishes the bits in memory.
func (m *dirtyMap) writeMarks(batch []need) error {
	slices.SortFunc(batch, func(a, b need) int { return cmp.Compare(a.w, b.w) })
	m.fileMu.Lock()
	defer m.fileMu.Unlock()
	for i := 0; i < len(batch); {
		w, want := batch[i].w, uint64(0)
		for ; i < len(batch) && batch[i].w == w; i++ {
			want |= batch[i].bits
		}
		if v := m.bits[w].Load(); v&want != want {
			if err := m.writeWord(w, v|want); err != nil {
				return err
			}
		}
	}
	var serr error
	if err := m.rc.Control(func(fd uintptr) { serr = unix.Fdatasync(int(fd)) }); err != nil {
		serr = err
	}
	if serr != nil {
		return fmt.Errorf("Failed to sync the pool's write-intent bitmap: %w", serr)
	}
	if m.afterSync != nil {
		// Before the bits are published: a writer that sees them set may write at once.
		m.afterSync()
	}
	for _, n := range batch {
		m.bits[n.w].Or(n.bits)
	}
	return nil
}

// end ends a mutation counted by begin: it records the count of syncs begun so far in
// the words' ended before it lowers their in-flight count.
func (m *dirtyMap) end(pair int, first, last int64) {
	g := m.started.Load()
	w0, w1 := m.span(pair, first, last)
	for w := w0; w <= w1; w++ {
		for e := m.ended[w].Load(); e < g && !m.ended[w].CompareAndSwap(e, g); e = m.ended[w].Load() {
		}
		m.inflight[w].Add(-1)
	}
}

// syncBegin numbers a sync of every live disk that is about to begin.
func (m *dirtyMap) syncBegin() uint64 {
	m.syncAt.Store(time.Now().UnixNano())
	return m.started.Add(1)
}

// syncDone records that sync s completed on every live disk: every mutation that
// ended before it began is durable on both disks of its pair.
func (m *dirtyMap) syncDone(s uint64) {
	for v := m.synced.Load(); v < s && !m.synced.CompareAndSwap(v, s); v = m.synced.Load() {
	}
}

func (m *dirtyMap) close() {
	if m != nil {
		m.f.Close()
	}
}

// chunks returns the chunks of pair a run covers.
func (p *Pool) chunks(r *run) (int64, int64) {
	return (r.doff - p.l.dataOff) / p.chunk, (r.doff + r.n - 1 - p.l.dataOff) / p.chunk
}

// markWrite records the chunks a mutation is about to touch; endWrite follows its success.
// Discards take no mark: they are only for space no reader depends on (the volume
// layer discards only free clusters, and discards all free space again at every open),
// so a crash between the two disks' discards leaves a difference nobody can read.
// Marking them made the open of a fresh pool mark every chunk, and a kill in the next
// seconds cost a full resync.
func (p *Pool) markWrite(runs []run) error {
	if p.dirty == nil {
		return nil
	}
	var small [4]need
	needs := small[:0]
	for i := range runs {
		if !runs[i].discard {
			first, last := p.chunks(&runs[i])
			needs = p.dirty.begin(runs[i].pair, first, last, needs)
		}
	}
	if len(needs) == 0 {
		return nil
	}
	if err := p.dirty.commit(needs); err != nil {
		p.endWrite(runs)
		return err
	}
	return nil
}

// endWrite ends the mutation of runs that markWrite counted.
func (p *Pool) endWrite(runs []run) {
	if p.dirty == nil {
		return
	}
	for i := range runs {
		if !runs[i].discard {
			first, last := p.chunks(&runs[i])
			p.dirty.end(runs[i].pair, first, last)
		}
	}
}

// cleanLoop clears the marks of idle chunks every interval.
func (p *Pool) cleanLoop(interval time.Duration) {
	defer p.wg.Done()
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-p.stop:
			return
		case <-t.C:
			if err := p.cleanDirty(); err != nil && !errors.Is(err, ErrClosed) {
				p.log.Warn("Failed to clean the write-intent bitmap", "error", err)
			}
		}
	}
}

// cleanDirty clears, in memory and then in the file, the marks of chunks not written
// since the last pass, in words with no mutation in flight and whose last mutation
// ended before a completed sync of every live disk began: their data is then durable
// on both disks, so the sides agree there whatever happens to the process or the
// machine now, and the cleared word may reach the disk whenever the kernel writes it.
// When idle marks have waited for such a sync (a client FLUSH) for 30 health
// intervals, the cleaner syncs the disks itself.
func (p *Pool) cleanDirty() error {
	m := p.dirty
	synced := m.synced.Load()
	waiting := false
	for w := range m.bits {
		v := m.bits[w].Load()
		if v == 0 {
			continue
		}
		idle := v &^ m.touched[w].Swap(0)
		if idle == 0 || m.inflight[w].Load() != 0 {
			continue
		}
		if m.ended[w].Load() >= synced {
			waiting = true
			continue
		}
		m.fileMu.Lock()
		v = m.bits[w].Load()
		keep := v &^ idle
		// Cleared before the count is read again: a writer that raised the count after
		// that read sees its bit clear and marks it again (waiting for fileMu); one that
		// raised it before is seen here (or, if it has ended since, in ended), and the
		// word stays as the file has it.
		m.bits[w].Store(keep)
		if m.inflight[w].Load() != 0 || m.ended[w].Load() >= synced {
			m.bits[w].Store(v)
			m.fileMu.Unlock()
			continue
		}
		err := m.writeWord(int64(w), keep)
		if err != nil {
			m.bits[w].Store(v)
		}
		m.fileMu.Unlock()
		if err != nil {
			return err
		}
	}
	if waiting && time.Since(time.Unix(0, m.syncAt.Load())) >= 30*p.opts.HealthInterval {
		if err := p.Sync(); err != nil {
			return fmt.Errorf("Failed to sync the disks for the write-intent bitmap: %w", err)
		}
	}
	return nil
}

// resyncMarked copies each marked chunk from a healthy disk of its pair to the pair's
// other live disk and syncs them, before the pool serves anything and before the
// bitmap that lists the chunks is reset. It returns how many chunks it copied.
func (p *Pool) resyncMarked(marked []int64) (int, error) {
	buf := make([]byte, p.chunk)
	total := p.l.unitsPerDisk * p.l.unit
	copied := 0
	for _, r := range marked {
		pair, c := int(r/p.dirty.perPair), r%p.dirty.perPair
		if pair >= int(p.l.pairs) || c*p.chunk >= total {
			continue
		}
		a, b := p.disks[2*pair].Load(), p.disks[2*pair+1].Load()
		src, dst := a, b
		if a.state.Load() != stOK {
			src, dst = b, a
		}
		if src.state.Load() != stOK || !dst.live() {
			continue // nothing to compare with: the pair has one copy left
		}
		n := min(p.chunk, total-c*p.chunk)
		if err := p.copyChunk(dst, src, buf[:n], p.l.dataOff+c*p.chunk); err != nil {
			p.log.Error("Failed to resync a chunk after an unclean stop", "pair", pair, "chunk", c, "error", err)
			continue
		}
		copied++
	}
	if copied > 0 {
		ds, errs := p.syncLive()
		for i, err := range errs {
			if err != nil {
				return copied, fmt.Errorf("Failed to sync disk %q after resyncing the marked chunks: %w", ds[i].path, err)
			}
		}
	}
	return copied, nil
}
