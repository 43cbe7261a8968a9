// Package accepttest provides a listener whose Accept fails, for tests of accept loops.
package accepttest

import (
	"net"
	"os"
	"sync/atomic"
	"syscall"
)

// Flaky wraps l so that its first n Accept calls fail as when the process is out of
// file descriptors (EMFILE); later calls accept from l.
func Flaky(l net.Listener, n int) *Listener {
	f := &Listener{Listener: l}
	f.left.Store(int64(n))
	return f
}

// Listener is a net.Listener that fails a number of Accept calls first.
type Listener struct {
	net.Listener
	left   atomic.Int64
	failed atomic.Int64
}

// Accept fails while failures are left, then accepts from the wrapped listener.
func (f *Listener) Accept() (net.Conn, error) {
	if f.left.Add(-1) >= 0 {
		f.failed.Add(1)
		return nil, &net.OpError{Op: "accept", Net: f.Addr().Network(), Addr: f.Addr(), Err: os.NewSyscallError("accept4", syscall.EMFILE)}
	}
	return f.Listener.Accept()
}

// Failed returns how many Accept calls failed so far.
func (f *Listener) Failed() int64 { return f.failed.Load() }
