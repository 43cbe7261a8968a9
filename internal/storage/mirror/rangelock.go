package mirror

import "sync"

// rangeLock serialises operations on overlapping byte ranges; disjoint ranges run in
// parallel. It keeps both sides of a mirror applying overlapping writes in one order.
type rangeLock struct {
	mu      sync.Mutex
	cond    *sync.Cond
	active  []lockedRange
	next    uint64 // id of the next range taken
	waiters int    // lock calls waiting for an overlapping range to go
}

type lockedRange struct {
	id       uint64
	off, end int64
}

func newRangeLock() *rangeLock {
	l := &rangeLock{}
	l.cond = sync.NewCond(&l.mu)
	return l
}

// lock waits until no held range overlaps [off, off+n) and takes it; the result is
// what unlock needs.
func (l *rangeLock) lock(off, n int64) uint64 {
	r := lockedRange{off: off, end: off + n}
	l.mu.Lock()
	for l.overlaps(r) {
		l.waiters++
		l.cond.Wait()
		l.waiters--
	}
	l.next++
	r.id = l.next
	l.active = append(l.active, r)
	l.mu.Unlock()
	return r.id
}

func (l *rangeLock) overlaps(r lockedRange) bool {
	for _, a := range l.active {
		if a.off < r.end && r.off < a.end {
			return true
		}
	}
	return false
}

// unlock releases a range taken by lock.
func (l *rangeLock) unlock(id uint64) {
	l.mu.Lock()
	for i, a := range l.active {
		if a.id == id {
			last := len(l.active) - 1
			l.active[i] = l.active[last]
			l.active = l.active[:last]
			break
		}
	}
	wake := l.waiters > 0
	l.mu.Unlock()
	if wake {
		l.cond.Broadcast()
	}
}
