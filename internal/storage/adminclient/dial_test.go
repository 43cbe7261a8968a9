package adminclient

import (
	"context"
	"errors"
	"net"
	"strconv"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// blackhole returns the address of a listening socket whose accept queue is full, so
// that a further connection attempt is never answered (its SYNs are dropped), as with
// a controller that is powered off or behind a dropping firewall.
func blackhole(t *testing.T) string {
	t.Helper()
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	if err := unix.Listen(fd, 0); err != nil {
		t.Fatal(err)
	}
	sa, err := unix.Getsockname(fd)
	if err != nil {
		t.Fatal(err)
	}
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(sa.(*unix.SockaddrInet4).Port))
	// Fill the accept queue (never accepted); the first connection that hangs proves it full.
	for i := 0; i < 8; i++ {
		c, err := net.DialTimeout("tcp", addr, 200*time.Millisecond)
		if err != nil {
			return addr
		}
		t.Cleanup(func() { c.Close() })
	}
	t.Skip("the kernel keeps accepting connections past a full accept queue here")
	return ""
}

// A controller that never answers the connection is reported unreachable after
// DialTimeout, not after the system's 30 s, and not after the caller's own deadline.
func TestUnansweredControllerIsUnreachableSoon(t *testing.T) {
	addr := blackhole(t)
	old := DialTimeout
	DialTimeout = 500 * time.Millisecond
	defer func() { DialTimeout = old }()
	c, err := New("http://"+addr, "tok")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	t0 := time.Now()
	_, err = c.ListVolumes(ctx)
	took := time.Since(t0)
	if !errors.Is(err, ErrUnreachable) {
		t.Fatalf("ListVolumes: %v, want ErrUnreachable", err)
	}
	if took < 400*time.Millisecond || took > 5*time.Second {
		t.Fatalf("reported unreachable after %v, want about %v", took, DialTimeout)
	}
}
