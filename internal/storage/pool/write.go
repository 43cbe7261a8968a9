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

// run is the part of a request that lives on one pair: n consecutive bytes on its disks
// (the units of a pair are consecutive on disk), held in b when the run is one piece of
// the caller's buffer and in iovs when it gathers several; a discard has neither.
type run struct {
	pair     int
	doff     int64
	n        int64
	diskUnit int64 // stripe unit on the disk where the run starts (readers spread on it)
	b        []byte
	iovs     [][]byte
	discard  bool
	fromPipe bool // the data is the next n bytes of the pipe whose read end is pipe
	pipe     int
}

// split cuts the request [off, off+n) into one run per pair; b is nil for a discard.
func (p *Pool) split(runs []run, b []byte, off, n int64) []run {
	for done := int64(0); done < n; {
		pair, doff, l, du := p.l.locate(off+done, n-done)
		i := 0
		for i < len(runs) && runs[i].pair != pair {
			i++
		}
		if i == len(runs) || runs[i].doff+runs[i].n != doff {
			runs = append(runs, run{pair: pair, doff: doff, diskUnit: du})
			i = len(runs) - 1
		}
		switch {
		case b == nil:
		case runs[i].b == nil && runs[i].iovs == nil:
			runs[i].b = b[done : done+l]
		case runs[i].iovs == nil:
			runs[i].iovs = [][]byte{runs[i].b, b[done : done+l]}
			runs[i].b = nil
		default:
			runs[i].iovs = append(runs[i].iovs, b[done:done+l])
		}
		runs[i].n += l
		done += l
	}
	return runs
}

// parallelIO is the request size from which pairs and disks are served concurrently.
const parallelIO = 128 << 10

// WriteAt writes b at off to every live disk of the owning pairs. It succeeds when each
// pair's data reached at least one healthy disk; a disk that errors is marked failed.
func (p *Pool) WriteAt(b []byte, off int64) (int, error) {
	if err := p.checkRange("write", off, int64(len(b))); err != nil {
		return 0, err
	}
	var small [4]run
	runs := p.split(small[:0], b, off, int64(len(b)))
	if err := p.mutate(runs, len(b) >= parallelIO); err != nil {
		return 0, fmt.Errorf("Failed to write %d bytes at %d: %w", len(b), off, err)
	}
	return len(b), nil
}

// Discard gives the space of a range back on every live disk; the range then reads as
// zeroes. It is for space no reader depends on (see markWrite): until it returns, the
// two disks of a pair may differ in the range, also after a crash.
func (p *Pool) Discard(off, length int64) error {
	if err := p.checkRange("discard", off, length); err != nil {
		return err
	}
	if length == 0 {
		return nil
	}
	var small [4]run
	runs := p.split(small[:0], nil, off, length)
	for i := range runs {
		runs[i].discard = true
	}
	if err := p.mutate(runs, len(runs) > 1); err != nil {
		return fmt.Errorf("Failed to discard %d bytes at %d: %w", length, off, err)
	}
	return nil
}

// target is one disk a run goes to, and how that went.
type target struct {
	d   *disk
	err error
}

// mutate applies runs (writes or discards) to the live disks of their pairs under the
// chunk locks that order them with the rebuild copy.
func (p *Pool) mutate(runs []run, parallel bool) error {
	var ls lockSet
	for _, r := range runs {
		p.addRange(&ls, r.pair, r.doff, r.n)
	}
	p.rlockSet(&ls)
	defer p.runlockSet(&ls)
	if err := p.markWrite(runs); err != nil {
		return err
	}

	// Targets are read under the locks: a rebuild that starts later sees this write on
	// its source; one that started earlier has the new disk among the targets.
	var small [4][2]target
	targets := small[:0]
	if len(runs) > len(small) {
		targets = make([][2]target, 0, len(runs))
	}
	live := 0
	for _, r := range runs {
		var t [2]target
		if len(p.disks) == 1 {
			t[0].d = p.disks[0].Load()
		} else {
			t[0].d, t[1].d = p.disks[2*r.pair].Load(), p.disks[2*r.pair+1].Load()
		}
		for side := range t {
			if t[side].d != nil && !t[side].d.live() {
				t[side].d = nil
			} else if t[side].d != nil {
				live++
			}
		}
		targets = append(targets, t)
	}
	if !parallel || live < 2 {
		for i := range runs {
			for side := range targets[i] {
				if t := &targets[i][side]; t.d != nil {
					t.err = p.applyRun(t.d, &runs[i])
				}
			}
		}
	} else {
		p.applyParallel(runs, targets)
	}
	var firstErr error
	for i := range runs {
		for _, t := range targets[i] {
			if t.d == nil || t.err == nil {
				continue
			}
			if p.closed.Load() {
				return ErrClosed
			}
			if err := p.diskFailed(t.d, fmt.Sprintf("write: %v", t.err)); err != nil {
				return err
			}
			if firstErr == nil {
				firstErr = fmt.Errorf("disk %q: %w", t.d.path, t.err)
			}
		}
	}
	// Each pair needs its data on at least one disk that is still healthy.
	for i, r := range runs {
		ok := false
		for _, t := range targets[i] {
			if t.d != nil && t.err == nil && t.d.state.Load() == stOK {
				ok = true
			}
		}
		if !ok {
			if firstErr != nil {
				return fmt.Errorf("%w (last error: %v)", pairError(r.pair), firstErr)
			}
			return pairError(r.pair)
		}
	}
	// Both sides have it: the chunks may be unmarked. After a failure they stay marked
	// (until the next Open), whatever the failed disk's recorded state.
	p.endWrite(runs)
	return nil
}

// applyRun writes or discards one run on one disk.
func (p *Pool) applyRun(d *disk, r *run) error {
	switch {
	case r.discard:
		return p.discardDisk(d, r.doff, r.n)
	case r.fromPipe:
		return p.spliceIntoDisk(d, r.pipe, r.doff, r.n)
	case r.iovs != nil:
		return p.writevDisk(d, r.iovs, r.doff)
	default:
		return p.writeDisk(d, r.b, r.doff)
	}
}

// applyParallel applies every run to every target disk concurrently and records the
// errors in targets.
func (p *Pool) applyParallel(runs []run, targets [][2]target) {
	errs := make([]error, 2*len(runs))
	var wg sync.WaitGroup
	for i := range runs {
		for side, t := range targets[i] {
			if t.d == nil {
				continue
			}
			r := runs[i] // a copy, so that runs itself stays on the caller's stack
			wg.Add(1)
			go func() {
				defer wg.Done()
				errs[2*i+side] = p.applyRun(t.d, &r)
			}()
		}
	}
	wg.Wait()
	for i := range runs {
		for side := range targets[i] {
			targets[i][side].err = errs[2*i+side]
		}
	}
}

// Sync makes every completed write durable: it fdatasyncs all live disks in parallel
// and marks a disk whose sync fails as failed.
func (p *Pool) Sync() error {
	if p.closed.Load() {
		return ErrClosed
	}
	ds, errs := p.syncLive()
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

// syncLive fdatasyncs every live disk in parallel and returns them with their errors.
// A sync with no error on a set of disks that did not change meanwhile lets the
// cleaner clear the write-intent marks of the writes that ended before it began.
func (p *Pool) syncLive() ([]*disk, []error) {
	var gen uint64
	if p.dirty != nil {
		gen = p.dirty.syncBegin()
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
		return ds, errs
	}
	var wg sync.WaitGroup
	for i, d := range ds {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = p.syncDisk(d)
		}()
	}
	wg.Wait()
	if p.dirty != nil && p.sameLive(ds, errs) {
		p.dirty.syncDone(gen)
	}
	return ds, errs
}

// sameLive reports whether every sync in errs succeeded and ds are still exactly the
// live disks (no disk joined by Replace while they were being synced).
func (p *Pool) sameLive(ds []*disk, errs []error) bool {
	n := 0
	for i := range p.disks {
		if d := p.disks[i].Load(); d.live() {
			if n == len(ds) || ds[n] != d {
				return false
			}
			n++
		}
	}
	for _, err := range errs {
		if err != nil {
			return false
		}
	}
	return n == len(ds)
}

// pairOK reports whether pair has a healthy disk.
func (p *Pool) pairOK(pair int) bool {
	if len(p.disks) == 1 {
		return p.disks[0].Load().state.Load() == stOK
	}
	return p.disks[2*pair].Load().state.Load() == stOK || p.disks[2*pair+1].Load().state.Load() == stOK
}
