package nbd

import (
	"bytes"
	"math/rand/v2"
	"testing"
	"time"
)

// TestStreamedReads checks that large READs whose data is copied are served by the
// connection's reader (Stats.InlineReads), with the right data, in order, while small
// READs and WRITEs in between still go to the workers and are answered.
func TestStreamedReads(t *testing.T) {
	ex := newMemExports()
	m := ex.add("disk", "", newMemExport(8<<20))
	data := make([]byte, 8<<20)
	for i := range data {
		data[i] = byte(rand.Uint32())
	}
	if err := m.WriteAt(data, 0, false); err != nil {
		t.Fatal(err)
	}
	s := startServer(t, ex, nil)
	c := dialRaw(t, "tcp", s.tcp)
	c.greet(flagFixedNewstyle | flagNoZeroes)
	c.goExport("disk")
	const reads = 16
	for i := range reads {
		c.request(0, cmdRead, uint64(i), uint64(i%8)<<20, 1<<20, nil)
	}
	seen := map[uint64]bool{}
	for range reads {
		errno, cookie := c.simpleReply()
		if errno != 0 || cookie >= reads || seen[cookie] {
			t.Fatalf("reply: errno %d cookie %d", errno, cookie)
		}
		seen[cookie] = true
		off := (cookie % 8) << 20
		if got := c.read(1 << 20); !bytes.Equal(got, data[off:off+1<<20]) {
			t.Fatalf("READ %d returned wrong data", cookie)
		}
	}
	// A streamer slowed down (a loaded machine, the race detector) hands READs to the
	// workers; otherwise it serves them all.
	st := s.srv.Stats()
	if st.Streamed == 0 || (st.StreamPauses == 0 && st.Streamed != reads) {
		t.Fatalf("Streamed %d (pauses %d), want %d: large READs were not served by the streamer", st.Streamed, st.StreamPauses, reads)
	}
	// A small WRITE and READ between large ones take the worker path and still work.
	c.request(0, cmdWrite, 100, 4096, 4096, bytes.Repeat([]byte{7}, 4096))
	if errno, cookie := c.simpleReply(); errno != 0 || cookie != 100 {
		t.Fatalf("WRITE: errno %d cookie %d", errno, cookie)
	}
	c.request(0, cmdRead, 101, 4096, 4096, nil)
	c.request(0, cmdRead, 102, 2<<20, 1<<20, nil)
	got := map[uint64][]byte{}
	for range 2 {
		errno, cookie := c.simpleReply()
		if errno != 0 {
			t.Fatalf("request %d failed with %d", cookie, errno)
		}
		switch cookie {
		case 101:
			got[cookie] = c.read(4096)
		case 102:
			got[cookie] = c.read(1 << 20)
		}
	}
	if !bytes.Equal(got[101], bytes.Repeat([]byte{7}, 4096)) || !bytes.Equal(got[102], data[2<<20:3<<20]) {
		t.Fatal("READs after a WRITE returned wrong data")
	}
	if st2 := s.srv.Stats(); st2.Streamed-st.Streamed > 1 || (st2.StreamPauses == 0 && st2.Streamed != reads+1) {
		t.Fatalf("Streamed %d then %d (pauses %d): small requests must go to the workers, the large READ to the streamer", st.Streamed, st2.Streamed, st2.StreamPauses)
	}
}

// TestStreamerPausesWhenSlow checks that READs from a slow export (a disk rather than
// memory) go to the workers, those already queued for the streamer too, and are served
// in parallel: 32 READs taking 20 ms each must not take 32 × 20 ms one after the other.
func TestStreamerPausesWhenSlow(t *testing.T) {
	ex := newMemExports()
	m := ex.add("disk", "", newMemExport(8<<20))
	m.delay = func(int64) time.Duration { return 20 * time.Millisecond }
	s := startServer(t, ex, nil)
	c := dialRaw(t, "tcp", s.tcp)
	c.greet(flagFixedNewstyle | flagNoZeroes)
	c.goExport("disk")
	const reads = 32
	start := time.Now()
	for i := range reads {
		c.request(0, cmdRead, uint64(i), uint64(i)*(64<<10), 64<<10, nil)
	}
	for range reads {
		if errno, cookie := c.simpleReply(); errno != 0 {
			t.Fatalf("READ %d failed with %d", cookie, errno)
		}
		c.read(64 << 10)
	}
	elapsed := time.Since(start)
	st := s.srv.Stats()
	if st.StreamPauses == 0 {
		t.Errorf("StreamPauses 0: a slow streamer did not hand READs to the workers")
	}
	if serial := reads * 20 * time.Millisecond; elapsed > serial/2 {
		t.Errorf("%d slow READs took %v (Streamed %d): served one at a time by the streamer, not in parallel", reads, elapsed, st.Streamed)
	}
}
