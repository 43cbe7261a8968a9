package pool

import (
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"
)

// dirtyFile holds the write-intent bitmap: one bit per rebuild chunk of each pair, set
// (and written to the file) before a write touches the chunk, cleared by the cleaner
// once the chunk saw no write for a whole cleaning interval (a tenth of the health
// interval) and no write is in flight on its 64-chunk word. A process killed between
// the two writes of a mirrored write leaves the pair different in a chunk whose bit
// is set, so the next Open only resyncs those chunks: the writes in flight at the
// kill and those of the last one or two intervals. Chunks written all the time stay
// marked, so that they need not be marked again (a write to the file) every interval.
// The file lives in the page cache like the disks' data: after the machine itself
// went down, the pool resyncs everything instead.
const dirtyFile = "pool.dirty"

type dirtyMap struct {
	f       *os.File
	perPair int64 // chunks per pair
	// bits is the bitmap as the file holds it: a bit is set here only after the file
	// has it and cleared here before the file loses it, always under fileMu, so a
	// writer that sees its chunk's bit set may write at once.
	bits []atomic.Uint64
	// inflight counts, per word of bits, the mutations between their mark and their end.
	inflight []atomic.Int32
	touched  []atomic.Uint64 // chunks marked since the cleaner's last pass
	fileMu   sync.Mutex
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
	m := &dirtyMap{f: f, perPair: perPair, bits: make([]atomic.Uint64, words), inflight: make([]atomic.Int32, words), touched: make([]atomic.Uint64, words)}
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

// mark counts a mutation of chunks first..last of pair as in flight and returns once
// the file marks them; end follows once the mutation reached both disks.
func (m *dirtyMap) mark(pair int, first, last int64) error {
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
		if m.bits[w].Load()&want == want {
			continue
		}
		m.fileMu.Lock()
		v := m.bits[w].Load()
		var err error
		if v&want != want {
			if err = m.writeWord(w, v|want); err == nil {
				m.bits[w].Store(v | want)
			}
		}
		m.fileMu.Unlock()
		if err != nil {
			return err
		}
	}
	return nil
}

// end ends a mutation counted by mark.
func (m *dirtyMap) end(pair int, first, last int64) {
	w0, w1 := m.span(pair, first, last)
	for w := w0; w <= w1; w++ {
		m.inflight[w].Add(-1)
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
	for i := range runs {
		if runs[i].discard {
			continue
		}
		first, last := p.chunks(&runs[i])
		if err := p.dirty.mark(runs[i].pair, first, last); err != nil {
			p.endWrite(runs[:i+1])
			return err
		}
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
			if err := p.cleanDirty(); err != nil {
				p.log.Warn("Failed to clean the write-intent bitmap", "error", err)
			}
		}
	}
}

// cleanDirty clears, in memory and then in the file, the marks of chunks not written
// since the last pass in words with no mutation in flight: their writes reached both
// disks (the page cache of both), so the sides agree there whatever happens to the
// process now.
func (p *Pool) cleanDirty() error {
	m := p.dirty
	for w := range m.bits {
		v := m.bits[w].Load()
		if v == 0 {
			continue
		}
		idle := v &^ m.touched[w].Swap(0)
		if idle == 0 || m.inflight[w].Load() != 0 {
			continue
		}
		m.fileMu.Lock()
		v = m.bits[w].Load()
		keep := v &^ idle
		// Cleared before the count is read again: a writer that raised the count after
		// that read sees its bit clear and marks it again (waiting for fileMu); one that
		// raised it before is seen here, and the word stays as the file has it.
		m.bits[w].Store(keep)
		if m.inflight[w].Load() != 0 {
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
	return nil
}

// resyncMarked copies each marked chunk from a healthy disk of its pair to the pair's
// other live disk, before the pool serves anything.
func (p *Pool) resyncMarked(marked []int64) error {
	buf := make([]byte, p.chunk)
	total := p.l.unitsPerDisk * p.l.unit
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
		}
	}
	if len(marked) > 0 {
		p.log.Info("Resynced the chunks being written when the pool last stopped uncleanly", "chunks", len(marked))
	}
	return nil
}
