package mirror

import "sync"

// rangeLock serialises operations on overlapping byte ranges; disjoint ranges run in
// parallel. It keeps both sides of a mirror applying overlapping writes in one order.
type rangeLock struct {
	mu     sync.Mutex
	cond   *sync.Cond
	active map[*lockedRange]struct{}
}

type lockedRange struct{ off, end int64 }

func newRangeLock() *rangeLock {
	l := &rangeLock{active: map[*lockedRange]struct{}{}}
	l.cond = sync.NewCond(&l.mu)
	return l
}

// lock waits until no held range overlaps [off, off+n) and takes it.
func (l *rangeLock) lock(off, n int64) *lockedRange {
	r := &lockedRange{off, off + n}
	l.mu.Lock()
	for l.overlaps(r) {
		l.cond.Wait()
	}
	l.active[r] = struct{}{}
	l.mu.Unlock()
	return r
}

func (l *rangeLock) overlaps(r *lockedRange) bool {
	for a := range l.active {
		if a.off < r.end && r.off < a.end {
			return true
		}
	}
	return false
}

// unlock releases a range taken by lock.
func (l *rangeLock) unlock(r *lockedRange) {
	l.mu.Lock()
	delete(l.active, r)
	l.mu.Unlock()
	l.cond.Broadcast()
}
