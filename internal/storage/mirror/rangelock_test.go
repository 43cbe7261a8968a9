package mirror

import (
	"testing"
	"time"
)

func TestRangeLockSerialisesOverlapsOnly(t *testing.T) {
	l := newRangeLock()
	a := l.lock(0, 4096)
	b := l.lock(4096, 4096) // disjoint: must not wait
	got := make(chan uint64)
	go func() { got <- l.lock(4000, 200) }() // overlaps both
	select {
	case <-got:
		t.Fatal("an overlapping range was taken while both neighbours were held")
	case <-time.After(50 * time.Millisecond):
	}
	l.unlock(a)
	select {
	case <-got:
		t.Fatal("an overlapping range was taken while the range after it was still held")
	case <-time.After(50 * time.Millisecond):
	}
	l.unlock(b)
	select {
	case c := <-got:
		l.unlock(c)
	case <-time.After(5 * time.Second):
		t.Fatal("a waiting range was not granted after every overlapping one was released")
	}
	if len(l.active) != 0 || l.waiters != 0 {
		t.Fatalf("after all unlocks: %d ranges held, %d waiters", len(l.active), l.waiters)
	}
}
