package nbd

import (
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/growserver/grow/internal/storage/dev"
)

// ReadSplicer may be implemented by an Export whose data can be put into a pipe without
// copying it through user space. On connections without TLS, READs of at least
// spliceMin bytes are then sent from the pipe to the socket with splice(2), so that the
// server copies none of their data.
//
// SpliceRead appends exactly the n bytes at off to the pipe whose write end is fd (the
// pipe is non-blocking and has room for them) or returns an error; after an error the
// server drops the pipe and serves the read with ReadAt, which reports real failures.
// The pipe may reference the export's storage rather than hold a copy, so a write
// that is concurrent with the READ (issued before its reply was received) may show in it.
type ReadSplicer interface {
	SpliceRead(fd int, off int64, n int) error
}

// WriteSplicer may be implemented by an Export that can take a WRITE's data from a
// pipe without copying it through user space. On connections without TLS, the payloads
// of WRITEs of spliceMin to pipeSize bytes are then moved from the socket into a pipe
// with splice(2) and handed to SpliceWrite.
//
// SpliceWrite writes the n bytes held in the pipe whose read end is fd (non-blocking) at
// off, with fua as WriteAt, taking them from the pipe. When it fails with all n bytes
// still in the pipe, the server reads them out and calls WriteAt, which reports real
// failures; when it took some, the request fails with its error.
type WriteSplicer interface {
	SpliceWrite(fd int, off int64, n int, fua bool) error
}

const (
	// spliceMin is the smallest READ sent with splice; smaller ones cost less as one copy.
	spliceMin = 128 << 10
	// pipeSize is the capacity asked for each pipe: the largest spliced READ.
	pipeSize = 1 << 20
	// maxPipes bounds the pipes open in the whole server (two descriptors each).
	maxPipes = 256
	// maxIdlePipes bounds the empty pipes kept for reuse.
	maxIdlePipes = 64
)

// pipe is one pipe used to splice READ replies; both ends are non-blocking.
type pipe struct {
	r, w int
}

// pipes is the server-wide set of pipes; a READ that finds none free is copied.
var pipes struct {
	mu     sync.Mutex
	idle   []*pipe
	open   int
	limit  int         // pipes that may be open: maxPipes, less once the kernel refused one
	broken atomic.Bool // not even one pipe can be made big enough: splicing is off
}

// getPipe returns an empty pipe of pipeSize bytes, or nil when none can be had.
func getPipe() *pipe {
	if pipes.broken.Load() {
		return nil
	}
	pipes.mu.Lock()
	if n := len(pipes.idle); n > 0 {
		p := pipes.idle[n-1]
		pipes.idle = pipes.idle[:n-1]
		pipes.mu.Unlock()
		return p
	}
	if pipes.limit == 0 {
		pipes.limit = maxPipes
	}
	if pipes.open >= pipes.limit {
		pipes.mu.Unlock()
		return nil
	}
	pipes.open++
	pipes.mu.Unlock()
	var fds [2]int
	if err := unix.Pipe2(fds[:], unix.O_NONBLOCK|unix.O_CLOEXEC); err != nil {
		releasePipeSlot()
		return nil
	}
	p := &pipe{r: fds[0], w: fds[1]}
	if err := growPipe(p.w); err != nil {
		// Over /proc/sys/fs/pipe-max-size, or over the per-user quota of pipe pages
		// (fs/pipe-user-pages-soft) for a process without CAP_SYS_RESOURCE: make do
		// with the pipes already open, or without splicing if there are none.
		unix.Close(p.r)
		unix.Close(p.w)
		pipes.mu.Lock()
		pipes.open--
		pipes.limit = max(pipes.open, 1)
		if pipes.open == 0 {
			pipes.broken.Store(true)
		}
		pipes.mu.Unlock()
		return nil
	}
	return p
}

// growPipe makes the pipe hold pipeSize bytes (a variable for tests).
var growPipe = func(fd int) error {
	sz, err := unix.FcntlInt(uintptr(fd), unix.F_SETPIPE_SZ, pipeSize)
	if err == nil && sz < pipeSize {
		err = unix.ENOMEM
	}
	return err
}

func releasePipeSlot() {
	pipes.mu.Lock()
	pipes.open--
	pipes.mu.Unlock()
}

// close closes both ends of the pipe and gives up its slot.
func (p *pipe) close() {
	unix.Close(p.r)
	unix.Close(p.w)
	releasePipeSlot()
}

// buffered returns the number of bytes in the pipe.
func (p *pipe) buffered() (int, error) {
	return unix.IoctlGetInt(p.r, unix.TIOCINQ) // FIONREAD
}

// put gives the pipe back for reuse if it is empty, and closes it otherwise.
func (p *pipe) put() {
	if n, err := p.buffered(); err != nil || n != 0 {
		p.close()
		return
	}
	pipes.mu.Lock()
	if len(pipes.idle) < maxIdlePipes {
		pipes.idle = append(pipes.idle, p)
		pipes.mu.Unlock()
		return
	}
	pipes.mu.Unlock()
	p.close()
}

// initSplice enables spliced READ replies and WRITE payloads when the connection has no
// TLS, is a socket and the export implements ReadSplicer or WriteSplicer.
func (c *conn) initSplice() {
	if c.tls {
		return
	}
	rs, _ := c.export.(ReadSplicer)
	ws, _ := c.export.(WriteSplicer)
	if rs == nil && ws == nil {
		return
	}
	sc, ok := c.raw.(syscall.Conn)
	if !ok {
		return
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return
	}
	if loopbackTCP(c.raw) && !spliceLoopback {
		// Over loopback TCP a spliced reply is no cheaper: the receiver copies the data
		// out of page-cache pages sent as 4 KiB fragments, which costs it more than the
		// server's one copy into the socket saves (bench/storage.sh, 1 MiB reads: about
		// 300 µs of the client's CPU per MiB spliced against 250 copied by a worker, and
		// 170-200 copied by the streamer, see streaming.go). Unix sockets and real
		// networks keep it.
		rs = nil
	}
	c.splicer, c.wsplicer, c.rawc = rs, ws, rc
}

// spliceLoopback splices READ replies over loopback TCP too (for tests of splicing).
var spliceLoopback bool

// loopbackTCP reports whether nc is a TCP connection from a loopback address.
func loopbackTCP(nc net.Conn) bool {
	a, ok := nc.RemoteAddr().(*net.TCPAddr)
	return ok && a.IP.IsLoopback()
}

// readPayload reads r's WRITE payload into a pipe when the export can take it from
// one, else (or when the pipe cannot hold it) into r.buf.
func (c *conn) readPayload(r *request) error {
	n := int(r.length)
	done := 0
	if c.wsplicer != nil && n >= spliceMin && n <= pipeSize && !spliceWriteOff && !c.blocking {
		if p := getPipe(); p != nil {
			var err error
			done, err = c.spliceIn(p, n)
			if err == nil && done == n {
				r.pipe = p
				c.expectSpliced(true)
				return nil
			}
			if err == nil {
				// The pipe is full (its slots hold small pieces): copy what it holds
				// and read the rest.
				r.buf = getBuf(n)
				err = dev.ReadPipe(p.r, (*r.buf)[:done])
			}
			p.put()
			if err != nil {
				return err
			}
		}
	}
	if r.buf == nil {
		r.buf = getBuf(n)
	}
	c.expectSpliced(false)
	_, err := io.ReadFull(c.br, (*r.buf)[done:])
	return err
}

// spliceWriteOff turns spliced WRITE payloads off (for tests of the copy path).
var spliceWriteOff bool

// spliceIn moves the next n bytes of the connection into the empty pipe p: the bytes
// the reader already buffered by copy, the rest with splice(2) from the socket. It
// returns how many bytes p holds; fewer than n without an error means p is full.
func (c *conn) spliceIn(p *pipe, n int) (int, error) {
	done := 0
	if k := min(c.br.Buffered(), n); k > 0 {
		b, _ := c.br.Peek(k)
		for done < k {
			w, err := unix.Write(p.w, b[done:])
			if err == unix.EINTR {
				continue
			}
			if err == unix.EAGAIN || (err == nil && w == 0) {
				break
			}
			if err != nil {
				c.br.Discard(done)
				return done, fmt.Errorf("Failed to write payload into a pipe: %w", err)
			}
			done += w
		}
		c.br.Discard(done)
		if done < k {
			return done, nil
		}
	}
	full := false
	var serr error
	err := c.rawc.Read(func(fd uintptr) bool {
		for done < n {
			k, err := unix.Splice(int(fd), nil, p.w, nil, n-done, unix.SPLICE_F_MOVE|unix.SPLICE_F_NONBLOCK)
			switch {
			case err == unix.EINTR:
				continue
			case err == unix.EAGAIN:
				// The socket is empty (wait for it) or the pipe is full.
				if q, qerr := unix.IoctlGetInt(int(fd), unix.SIOCINQ); qerr == nil && q > 0 {
					full = true
					return true
				}
				return false
			case err != nil:
				serr = err
				return true
			case k == 0:
				serr = io.ErrUnexpectedEOF
				return true
			}
			done += int(k)
		}
		return true
	})
	if err == nil {
		err = serr
	}
	if err != nil || full {
		return done, err
	}
	return done, nil
}

// writeSpliced serves a WRITE whose payload is in r.pipe.
func (c *conn) writeSpliced(r *request, off int64, fua bool) uint32 {
	err := c.wsplicer.SpliceWrite(r.pipe.r, off, int(r.length), fua)
	if err == nil {
		return 0
	}
	if n, ierr := r.pipe.buffered(); ierr != nil || n != int(r.length) {
		return c.fail(r, err)
	}
	// Nothing was taken from the pipe: write the data from a buffer.
	r.buf = getBuf(int(r.length))
	if err := dev.ReadPipe(r.pipe.r, *r.buf); err != nil {
		return c.fail(r, err)
	}
	if err := c.export.WriteAt(*r.buf, off, fua); err != nil {
		return c.fail(r, err)
	}
	return 0
}

// spliceRead tries to put r's data into a pipe; it reports whether r.pipe now holds
// all of it. On false the caller reads the data into a buffer.
func (c *conn) spliceRead(r *request) bool {
	if c.splicer == nil || r.length < spliceMin || r.length > pipeSize || r.off%4096 != 0 {
		return false
	}
	p := getPipe()
	if p == nil {
		return false
	}
	err := c.splicer.SpliceRead(p.w, int64(r.off), int(r.length))
	if err == nil {
		// The writer relies on the pipe holding exactly the reply's data.
		if n, ierr := p.buffered(); ierr != nil || n != int(r.length) {
			err = errors.New("pipe does not hold the data")
		}
	}
	if err != nil {
		p.put()
		return false
	}
	r.pipe = p
	return true
}

// spliceOut sends the buffered replies, then the n bytes in p, to the socket.
func (c *conn) spliceOut(p *pipe, n int) {
	c.flush()
	if c.writeErr != nil {
		return
	}
	c.srv.stats.writes.Add(1)
	c.nc.SetWriteDeadline(time.Now().Add(c.srv.writeTimeout()))
	var serr error
	err := c.rawc.Write(func(fd uintptr) bool {
		for n > 0 {
			k, err := unix.Splice(p.r, nil, int(fd), nil, n, unix.SPLICE_F_MOVE|unix.SPLICE_F_NONBLOCK)
			switch {
			case err == unix.EINTR:
				continue
			case err == unix.EAGAIN:
				return false // the socket is full (the pipe holds n bytes): wait
			case err != nil:
				serr = err
				return true
			case k == 0:
				serr = io.ErrUnexpectedEOF
				return true
			}
			n -= int(k)
		}
		return true
	})
	if err == nil {
		err = serr
	}
	if err != nil {
		c.writeFailed(err)
	}
}

// capReader reads from r at most max bytes per Read when max > 0.
type capReader struct {
	r   io.Reader
	max int
}

func (c *capReader) Read(p []byte) (int, error) {
	if c.max > 0 && len(p) > c.max {
		p = p[:c.max]
	}
	return c.r.Read(p)
}

// headerFill is how much the reader takes from the socket while it expects a spliced
// WRITE's header: the header and the start of a payload, so that little of the payload
// lands in the reader's buffer and must be copied into the pipe.
const headerFill = 4096

// expectSpliced caps the reader's next fill after a spliced WRITE (another one probably
// follows) and lifts the cap once a request that is not spliced is read.
func (c *conn) expectSpliced(spliced bool) {
	if c.fill == nil || c.tls {
		return
	}
	if spliced {
		c.fill.max = headerFill
	} else {
		c.fill.max = 0
	}
}
