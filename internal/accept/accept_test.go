package accept

import (
	"fmt"
	"net"
	"os"
	"syscall"
	"testing"
	"time"
)

// TestBackoff: a closed listener ends the loop at once; other errors pause, doubling
// from 5 ms up to 1 s, and Reset starts over.
func TestBackoff(t *testing.T) {
	var b Backoff
	closed := fmt.Errorf("accept: %w", net.ErrClosed)
	start := time.Now()
	if b.Retry(closed) {
		t.Fatal("Retry after a closed listener")
	}
	if time.Since(start) > 100*time.Millisecond {
		t.Fatal("Retry paused for a closed listener")
	}
	emfile := &net.OpError{Op: "accept", Net: "tcp", Err: os.NewSyscallError("accept4", syscall.EMFILE)}
	var want []time.Duration
	for _, d := range []time.Duration{5, 10, 20} {
		want = append(want, d*time.Millisecond)
	}
	for i, w := range want {
		if !b.Retry(emfile) {
			t.Fatalf("no retry after EMFILE (%d)", i)
		}
		if b.Delay() != w {
			t.Fatalf("pause %d: %v, want %v", i, b.Delay(), w)
		}
	}
	b.delay = 800 * time.Millisecond
	b.Retry(emfile)
	if b.Delay() != time.Second {
		t.Fatalf("pause %v past the cap, want 1s", b.Delay())
	}
	b.Reset()
	b.Retry(emfile)
	if b.Delay() != 5*time.Millisecond {
		t.Fatalf("pause after Reset %v, want 5ms", b.Delay())
	}
}
