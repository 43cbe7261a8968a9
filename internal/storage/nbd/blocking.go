package nbd

import (
	"errors"
	"io"
	"net"
	"os"
	"runtime"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// A stream of large WRITEs over a unix socket is read by the connection's reader in
// blocking mode: the socket made blocking, the reader locked to its OS thread and the
// payloads copied with read(2) rather than spliced, so that the client's writes wake
// that one thread directly, as they wake nbdkit's per-connection threads. Through Go's
// netpoller, one thread waits for every socket and is woken, synchronously, by every
// client, which draws the clients onto one CPU while the other sits idle: 1 MiB WRITEs
// reached 0.76-0.92x nbdkit with 10-15 % of the machine idle, against 0.9-1.08x and none
// idle in blocking mode (bench/storage.sh, hand-run A/Bs, session 8). A thread blocked
// in read(2) keeps its P until sysmon takes it back, so GOMAXPROCS is doubled while any
// reader is in blocking mode.
//
// Everything else stays with the netpoller, where it does better: 4 KiB requests lost
// a fifth of their rate with a blocking reader, and TCP gains nothing. The reader goes
// back after blockingLeaveAfter other requests or when the client has sent nothing for
// blockingIdle (SO_RCVTIMEO), so an idle connection holds no thread.
const (
	// blockingWriteMin is the smallest WRITE that counts toward blocking mode.
	blockingWriteMin = spliceMin
	// blockingAfter is how many such WRITEs in a row switch the reader to blocking mode.
	blockingAfter = 8
	// blockingLeaveAfter is how many other requests in a row switch it back.
	blockingLeaveAfter = 32
)

// blockingIdle is how long a read may wait in blocking mode before the reader goes back
// to the netpoller (a variable for tests).
var blockingIdle = 50 * time.Millisecond

// blockingOff turns blocking mode off (for tests and A/B runs of the netpoller path).
var blockingOff bool

// initBlocking prepares blocking mode for a unix socket without TLS.
func (c *conn) initBlocking() {
	if c.tls || blockingOff {
		return
	}
	uc, ok := c.raw.(*net.UnixConn)
	if !ok {
		return
	}
	rc, err := uc.SyscallConn()
	if err != nil {
		return
	}
	c.mu.Lock() // interruptReads may look from another goroutine
	c.blockRC = rc
	c.mu.Unlock()
}

// adaptBlocking switches the reader in or out of blocking mode after request header h.
func (c *conn) adaptBlocking(h *requestHeader) {
	if c.blockRC == nil || c.blockingFailed {
		return
	}
	if h.typ == cmdWrite && h.length >= blockingWriteMin {
		c.otherReqs = 0
		if !c.blocking {
			c.largeWrites++
			if c.largeWrites >= blockingAfter {
				c.enterBlocking()
			}
		}
		return
	}
	c.largeWrites = 0
	if c.blocking {
		c.otherReqs++
		if c.otherReqs >= blockingLeaveAfter {
			c.leaveBlocking()
		}
	}
}

// enterBlocking puts the reader in blocking mode; on failure it stays as it is.
func (c *conn) enterBlocking() {
	if c.isStopping() {
		return
	}
	runtime.LockOSThread()
	var err error
	cerr := c.blockRC.Control(func(fd uintptr) {
		// A blocked write ignores Go's deadlines: the kernel's timeout ends it, and
		// the deadline the writer set then reports it.
		tv := unix.NsecToTimeval(int64(c.srv.writeTimeout()))
		if err = unix.SetsockoptTimeval(int(fd), unix.SOL_SOCKET, unix.SO_SNDTIMEO, &tv); err != nil {
			return
		}
		tv = unix.NsecToTimeval(int64(blockingIdle))
		if err = unix.SetsockoptTimeval(int(fd), unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
			return
		}
		err = unix.SetNonblock(int(fd), false)
	})
	if err == nil {
		err = cerr
	}
	if err != nil {
		runtime.UnlockOSThread()
		c.blockingFailed = true // never again on this connection
		c.log.Debug("NBD reader stays with the netpoller", "err", err)
		return
	}
	c.blocking = true
	c.fill.r = (*blockingReader)(c)
	c.srv.stats.blockingModes.Add(1)
	addBlockingReaders(1)
}

// leaveBlocking puts the reader back on the netpoller.
func (c *conn) leaveBlocking() {
	if !c.blocking {
		return
	}
	c.blockRC.Control(func(fd uintptr) { unix.SetNonblock(int(fd), true) })
	c.blocking = false
	c.fill.r = c.nc
	runtime.UnlockOSThread()
	addBlockingReaders(-1)
}

// interruptReads wakes a reader blocked in read(2), which ignores deadlines and Close:
// shutdown(2) of the reading side (of both with all).
func (c *conn) interruptReads(all bool) {
	c.mu.Lock()
	rc := c.blockRC
	c.mu.Unlock()
	if rc == nil {
		return
	}
	how := unix.SHUT_RD
	if all {
		how = unix.SHUT_RDWR
	}
	rc.Control(func(fd uintptr) { unix.Shutdown(int(fd), how) })
}

// blockingReader is the connection read with read(2) in blocking mode.
type blockingReader conn

func (b *blockingReader) Read(p []byte) (int, error) {
	c := (*conn)(b)
	if len(p) == 0 {
		return 0, nil
	}
	var n int
	var err error
	cerr := c.blockRC.Read(func(fd uintptr) bool {
		for {
			n, err = unix.Read(int(fd), p)
			if err != unix.EINTR {
				return true
			}
		}
	})
	switch {
	case cerr != nil:
		return 0, cerr // closed, or past the read deadline set to stop
	case errors.Is(err, unix.EAGAIN):
		// Nothing for blockingIdle: wait with the netpoller instead.
		c.leaveBlocking()
		return c.nc.Read(p)
	case err != nil:
		return 0, os.NewSyscallError("read", err)
	case n == 0:
		return 0, io.EOF
	}
	return n, nil
}

// blockingReaders counts readers in blocking mode in the process; baseProcs is
// GOMAXPROCS before the first.
var blockingReaders struct {
	mu        sync.Mutex
	n         int
	baseProcs int
}

// addBlockingReaders counts readers entering (+1) or leaving (-1) blocking mode.
// GOMAXPROCS is doubled while there is any: changing it stops the world, so it changes
// only when the first reader enters and when the last one leaves.
func addBlockingReaders(delta int) {
	b := &blockingReaders
	b.mu.Lock()
	defer b.mu.Unlock()
	switch {
	case b.n == 0 && delta > 0:
		b.baseProcs = runtime.GOMAXPROCS(2 * runtime.GOMAXPROCS(0))
	case b.n+delta == 0 && delta < 0:
		runtime.GOMAXPROCS(b.baseProcs)
	}
	b.n += delta
}
