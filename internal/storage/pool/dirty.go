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
// (and written to the file) before a write touches the chunk, cleared once the chunk
// has been idle for a while. A process killed between the two writes of a mirrored
// write leaves the pair different in a chunk whose bit is set, so the next Open only
// has to resync those chunks. The file lives in the page cache like the disks' data:
// after the machine itself went down, the pool resyncs everything instead.
const dirtyFile = "pool.dirty"

type dirtyMap struct {
	f       *os.File
	perPair int64           // chunks per pair
	bits    []atomic.Uint64 // the bitmap, as in the file
	touched []atomic.Uint64 // written since the cleaner last looked
	fileMu  sync.Mutex      // orders writes of words to the file
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
	m := &dirtyMap{f: f, perPair: perPair, bits: make([]atomic.Uint64, words), touched: make([]atomic.Uint64, words)}
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
		m.touched[i].Store(0)
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

// writeWord stores word w in the file; fileMu is held.
func (m *dirtyMap) writeWord(w int64) error {
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], m.bits[w].Load())
	if _, err := m.f.WriteAt(b[:], w*8); err != nil {
		return fmt.Errorf("Failed to update the pool's write-intent bitmap: %w", err)
	}
	return nil
}

// mark records that chunks first..last of pair are about to be written. The caller
// holds those chunks' locks (shared).
func (m *dirtyMap) mark(pair int, first, last int64) error {
	for c := first; c <= last; c++ {
		r := int64(pair)*m.perPair + c
		w, b := r/64, uint64(1)<<(r%64)
		if m.touched[w].Load()&b == 0 {
			m.touched[w].Or(b)
		}
		if m.bits[w].Load()&b != 0 {
			continue
		}
		m.bits[w].Or(b)
		m.fileMu.Lock()
		err := m.writeWord(w)
		m.fileMu.Unlock()
		if err != nil {
			return err
		}
	}
	return nil
}

func (m *dirtyMap) close() {
	if m != nil {
		m.f.Close()
	}
}

// markWrite records the chunks a mutation is about to touch. Discards take no mark:
// they are only for space no reader depends on (the volume layer discards only free
// clusters, and discards all free space again at every open), so a crash between the
// two disks' discards leaves a difference nobody can read. Marking them made the open
// of a fresh pool mark every chunk, and a kill in the next seconds cost a full resync.
func (p *Pool) markWrite(runs []run) error {
	if p.dirty == nil {
		return nil
	}
	for _, r := range runs {
		if r.discard {
			continue
		}
		first := (r.doff - p.l.dataOff) / p.chunk
		last := (r.doff + r.n - 1 - p.l.dataOff) / p.chunk
		if err := p.dirty.mark(r.pair, first, last); err != nil {
			return err
		}
	}
	return nil
}

// cleanLoop clears the bits of chunks that saw no write for a whole interval.
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

func (p *Pool) cleanDirty() error {
	m := p.dirty
	for w := range m.bits {
		v := m.bits[w].Load()
		if v == 0 {
			continue
		}
		// Chunks written since the last pass stay marked for another interval.
		idle := v &^ m.touched[w].Swap(0)
		for bit := 0; idle != 0; bit, idle = bit+1, idle>>1 {
			if idle&1 == 0 {
				continue
			}
			r := int64(w)*64 + int64(bit)
			pair, c := int(r/m.perPair), r%m.perPair
			lk := &p.locks[p.lockIndex(pair, p.l.dataOff+c*p.chunk)]
			lk.Lock() // no write to the chunk is in flight: both sides hold the same data
			b := uint64(1) << bit
			if m.touched[w].Load()&b == 0 {
				m.bits[w].And(^b)
				m.fileMu.Lock()
				err := m.writeWord(int64(w))
				m.fileMu.Unlock()
				if err != nil {
					lk.Unlock()
					return err
				}
			}
			lk.Unlock()
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
