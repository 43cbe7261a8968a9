package controller

import (
	"net"
	"syscall"
	"testing"

	"github.com/growserver/grow/internal/storage/nbd"
)

// Mirrored volumes splice their large READ replies like lone ones.
var _ nbd.ReadSplicer = (*mirExport)(nil)

// TestTrackedConnExposesSocket checks that an NBD connection on a service address
// offers the NBD server its socket, so that READ replies and WRITE payloads are spliced
// there as on the controller's own address.
func TestTrackedConnExposesSocket(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	client, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	c, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var tc net.Conn = &trackedConn{Conn: c, t: newConnTracker()}
	sc, ok := tc.(syscall.Conn)
	if !ok {
		t.Fatal("trackedConn does not offer its socket")
	}
	fdOf := func(sc syscall.Conn) uintptr {
		rc, err := sc.SyscallConn()
		if err != nil {
			t.Fatal(err)
		}
		var fd uintptr
		if err := rc.Control(func(f uintptr) { fd = f }); err != nil {
			t.Fatal(err)
		}
		return fd
	}
	if got, want := fdOf(sc), fdOf(c.(syscall.Conn)); got != want {
		t.Fatalf("trackedConn's socket is fd %d, the connection's %d", got, want)
	}
}
