package nbd

import (
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// connWorkers counts the goroutines running a connection's request workers.
func connWorkers() int {
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			return strings.Count(string(buf[:n]), "nbd.(*conn).worker(")
		}
		buf = make([]byte, 2*len(buf))
	}
}

// TestWorkersBoundedAndReleased checks the per-connection request workers: slow
// requests are still served concurrently (up to MaxInFlight, never more), every
// request gets its reply, workers are reused across bursts rather than piling up,
// and none outlives its connection.
func TestWorkersBoundedAndReleased(t *testing.T) {
	const maxInFlight = 8
	ex := newMemExports()
	m := ex.add("disk", "", newMemExport(1<<20))
	var cur, peak atomic.Int32
	m.delay = func(int64) time.Duration {
		n := cur.Add(1)
		for {
			p := peak.Load()
			if n <= p || peak.CompareAndSwap(p, n) {
				break
			}
		}
		time.Sleep(20 * time.Millisecond)
		cur.Add(-1)
		return 0
	}
	s := startServer(t, ex, &Server{MaxInFlight: maxInFlight})
	if n := connWorkers(); n != 0 {
		t.Fatalf("%d workers before any connection", n)
	}
	c := dialRaw(t, "unix", s.sock)
	c.greet(flagFixedNewstyle | flagNoZeroes)
	c.goExport("disk")
	const burst = 64
	for round := range 3 {
		for i := range burst {
			c.request(0, cmdRead, uint64(round*burst+i), uint64(i)*4096, 4096, nil)
		}
		seen := make(map[uint64]bool)
		for range burst {
			errno, cookie := c.simpleReply()
			if errno != 0 {
				t.Fatalf("read %d failed with %d", cookie, errno)
			}
			c.read(4096)
			if seen[cookie] || cookie < uint64(round*burst) || cookie >= uint64((round+1)*burst) {
				t.Fatalf("unexpected or repeated reply cookie %d in round %d", cookie, round)
			}
			seen[cookie] = true
		}
		if n := connWorkers(); n < 1 || n > maxInFlight {
			t.Fatalf("round %d: %d workers, want 1..%d", round, n, maxInFlight)
		}
	}
	if p := peak.Load(); p < 2 || p > maxInFlight {
		t.Errorf("peak concurrent reads %d, want 2..%d (served concurrently, within MaxInFlight)", p, maxInFlight)
	}
	c.request(0, cmdDisc, 0, 0, 0, nil)
	c.expectClosed()
	deadline := time.Now().Add(10 * time.Second)
	for connWorkers() != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("%d workers still running 10 s after the connection closed", connWorkers())
		}
		time.Sleep(10 * time.Millisecond)
	}
}
