package pool

import (
	"fmt"
	"sync"
)

// lockSet is a set of chunk-lock stripes taken by one write, as a bitmap so that each
// stripe is taken once and in order.
type lockSet [lockStripes / 64]uint64

func (p *Pool) lockIndex(pair int, doff int64) int {
	c := uint64((doff-p.l.dataOff)/p.chunk)*0x9E3779B97F4A7C15 + uint64(pair)*0xBF58476D1CE4E5B9
	return int(c >> 56 % lockStripes)
}

// addRange adds the stripes covering [doff, doff+n) of pair.
func (p *Pool) addRange(ls *lockSet, pair int, doff, n int64) {
	first := (doff - p.l.dataOff) / p.chunk
	last := (doff + n - 1 - p.l.dataOff) / p.chunk
	if last-first >= lockStripes {
		for i := range ls {
			ls[i] = ^uint64(0)
		}
		return
	}
	for c := first; c <= last; c++ {
		i := p.lockIndex(pair, p.l.dataOff+c*p.chunk)
		ls[i/64] |= 1 << (i % 64)
	}
}

func (p *Pool) rlockSet(ls *lockSet) {
	for w, bits := range ls {
		for b := 0; bits != 0; b, bits = b+1, bits>>1 {
			if bits&1 != 0 {
				p.locks[w*64+b].RLock()
			}
		}
	}
}

func (p *Pool) runlockSet(ls *lockSet) {
	for w, bits := range ls {
		for b := 0; bits != 0; b, bits = b+1, bits>>1 {
			if bits&1 != 0 {
				p.locks[w*64+b].RUnlock()
			}
		}
	}
}

// piece is the part of a request that lives on one pair at one disk offset.
type piece struct {
	pair int
	doff int64
	b    []byte // data to write; nil for a discard
	n    int64
}

// parallelWrite is the request size from which the disks are written concurrently.
const parallelWrite = 128 << 10

// WriteAt writes b at off to every live disk of the owning pairs. It succeeds when each
// pair's data reached at least one healthy disk; a disk that errors is marked failed.
func (p *Pool) WriteAt(b []byte, off int64) (int, error) {
	if err := p.checkRange("write", off, int64(len(b))); err != nil {
		return 0, err
	}
	var small [4]piece
	pieces := small[:0]
	for done := int64(0); done < int64(len(b)); {
		pair, doff, n, _ := p.l.locate(off+done, int64(len(b))-done)
		pieces = append(pieces, piece{pair: pair, doff: doff, b: b[done : done+n], n: n})
		done += n
	}
	if err := p.mutate(pieces, len(b) >= parallelWrite); err != nil {
		return 0, fmt.Errorf("Failed to write %d bytes at %d: %w", len(b), off, err)
	}
	return len(b), nil
}

// Discard gives the space of a range back on every live disk; the range then reads as zeroes.
func (p *Pool) Discard(off, length int64) error {
	if err := p.checkRange("discard", off, length); err != nil {
		return err
	}
	if length == 0 {
		return nil
	}
	// The part of a range that falls on one pair is contiguous on its disks.
	start := make([]int64, p.l.pairs)
	end := make([]int64, p.l.pairs)
	for i := range start {
		start[i] = -1
	}
	for done := int64(0); done < length; {
		pair, doff, n, _ := p.l.locate(off+done, length-done)
		if start[pair] < 0 {
			start[pair] = doff
		}
		end[pair] = doff + n
		done += n
	}
	var pieces []piece
	for pair := range start {
		if start[pair] >= 0 {
			pieces = append(pieces, piece{pair: pair, doff: start[pair], n: end[pair] - start[pair]})
		}
	}
	if err := p.mutate(pieces, len(pieces) > 1); err != nil {
		return fmt.Errorf("Failed to discard %d bytes at %d: %w", length, off, err)
	}
	return nil
}

// mutate applies pieces (writes, or discards when piece.b is nil) to the live disks of
// their pairs under the chunk locks that order them with the rebuild copy.
func (p *Pool) mutate(pieces []piece, parallel bool) error {
	var ls lockSet
	for _, pc := range pieces {
		p.addRange(&ls, pc.pair, pc.doff, pc.n)
	}
	p.rlockSet(&ls)
	defer p.runlockSet(&ls)

	// Targets are read under the locks: a rebuild that starts later sees this write on
	// its source; one that started earlier has the new disk among the targets.
	var targets [][2]*disk
	if len(p.disks) == 1 {
		targets = [][2]*disk{{p.disks[0].Load(), nil}}
	} else {
		targets = make([][2]*disk, p.l.pairs)
		for _, pc := range pieces {
			targets[pc.pair] = [2]*disk{p.disks[2*pc.pair].Load(), p.disks[2*pc.pair+1].Load()}
		}
	}
	apply := func(d *disk, pc piece) error {
		if pc.b == nil {
			return p.discardDisk(d, pc.doff, pc.n)
		}
		return p.writeDisk(d, pc.b, pc.doff)
	}
	var errs [2][]error // per pair side, per pair
	for side := range errs {
		errs[side] = make([]error, len(targets))
	}
	if !parallel {
		for _, pc := range pieces {
			for side, d := range targets[pc.pair] {
				if d == nil || !d.live() || errs[side][pc.pair] != nil {
					continue
				}
				errs[side][pc.pair] = apply(d, pc)
			}
		}
	} else {
		var wg sync.WaitGroup
		for pair, t := range targets {
			for side, d := range t {
				if d == nil || !d.live() {
					continue
				}
				wg.Add(1)
				go func() {
					defer wg.Done()
					for _, pc := range pieces {
						if pc.pair != pair {
							continue
						}
						if err := apply(d, pc); err != nil {
							errs[side][pair] = err
							return
						}
					}
				}()
			}
		}
		wg.Wait()
	}
	var firstErr error
	for pair, t := range targets {
		for side, d := range t {
			if d == nil || errs[side][pair] == nil {
				continue
			}
			if p.closed.Load() {
				return ErrClosed
			}
			if err := p.diskFailed(d, fmt.Sprintf("write: %v", errs[side][pair])); err != nil {
				return err
			}
			if firstErr == nil {
				firstErr = fmt.Errorf("disk %q: %w", d.path, errs[side][pair])
			}
		}
	}
	// Each pair needs its data on at least one disk that is still healthy.
	for pair, t := range targets {
		if t[0] == nil && t[1] == nil {
			continue
		}
		ok := false
		for side, d := range t {
			if d != nil && errs[side][pair] == nil && d.state.Load() == stOK {
				ok = true
			}
		}
		if !ok {
			if firstErr != nil {
				return fmt.Errorf("%w (last error: %v)", pairError(pair), firstErr)
			}
			return pairError(pair)
		}
	}
	return nil
}

// Sync makes every completed write durable: it fdatasyncs all live disks in parallel
// and marks a disk whose sync fails as failed.
func (p *Pool) Sync() error {
	if p.closed.Load() {
		return ErrClosed
	}
	ds := make([]*disk, 0, len(p.disks))
	for i := range p.disks {
		if d := p.disks[i].Load(); d.live() {
			ds = append(ds, d)
		}
	}
	errs := make([]error, len(ds))
	if len(ds) == 1 {
		errs[0] = p.syncDisk(ds[0])
	} else {
		var wg sync.WaitGroup
		for i, d := range ds {
			wg.Add(1)
			go func() {
				defer wg.Done()
				errs[i] = p.syncDisk(d)
			}()
		}
		wg.Wait()
	}
	for i, err := range errs {
		if err == nil {
			continue
		}
		if p.closed.Load() {
			return ErrClosed
		}
		if ferr := p.diskFailed(ds[i], fmt.Sprintf("sync: %v", err)); ferr != nil {
			return fmt.Errorf("Failed to sync pool: %w", ferr)
		}
	}
	for pair := 0; pair < int(p.l.pairs); pair++ {
		if !p.pairOK(pair) {
			return fmt.Errorf("Failed to sync pool: %w", pairError(pair))
		}
	}
	return nil
}

// pairOK reports whether pair has a healthy disk.
func (p *Pool) pairOK(pair int) bool {
	if len(p.disks) == 1 {
		return p.disks[0].Load().state.Load() == stOK
	}
	return p.disks[2*pair].Load().state.Load() == stOK || p.disks[2*pair+1].Load().state.Load() == stOK
}
