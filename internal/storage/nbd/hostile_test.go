package nbd

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"io"
	"log/slog"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/growserver/grow/internal/accept/accepttest"
	"github.com/growserver/grow/internal/lograte"
)

// TestHostileClients throws malformed input at the server while a well-behaved
// connection keeps working, and checks that each bad connection is closed with a
// logged reason.
func TestHostileClients(t *testing.T) {
	ex := newMemExports()
	ex.add("disk", "", newMemExport(1<<20))
	s := startServer(t, ex, &Server{HandshakeTimeout: 500 * time.Millisecond})

	good := dialRaw(t, "tcp", s.tcp)
	good.greet(flagFixedNewstyle | flagNoZeroes)
	good.goExport("disk")
	var cookie uint64
	checkGood := func(what string) {
		t.Helper()
		cookie++
		good.request(0, cmdWrite, cookie, 4096, 4, []byte("ping"))
		if e, h := good.simpleReply(); e != 0 || h != cookie {
			t.Fatalf("after %s: good connection write err=%d cookie=%d", what, e, h)
		}
		// And a brand-new connection is served too.
		c := dialRaw(t, "unix", s.sock)
		c.greet(flagFixedNewstyle | flagNoZeroes)
		if size, _ := c.goExport("disk"); size != 1<<20 {
			t.Fatalf("after %s: new connection size %d", what, size)
		}
		c.nc.Close()
	}
	inTransmission := func() *rawClient {
		c := dialRaw(t, "unix", s.sock)
		c.greet(flagFixedNewstyle | flagNoZeroes)
		c.goExport("disk")
		return c
	}
	hdr := func(opt, length uint32) []byte {
		b := binary.BigEndian.AppendUint64(nil, optMagic)
		b = binary.BigEndian.AppendUint32(b, opt)
		return binary.BigEndian.AppendUint32(b, length)
	}
	garbage := make([]byte, 4096)
	rand.Read(garbage)

	cases := []struct {
		name   string
		do     func(c *rawClient)
		reason string
	}{
		{"garbage instead of client flags", func(c *rawClient) {
			c.read(18)
			c.nc.Write(garbage)
		}, "unknown client flags"},
		{"non-fixed newstyle client", func(c *rawClient) {
			c.read(18)
			c.write(uint32(0))
		}, "fixed newstyle"},
		{"truncated client flags", func(c *rawClient) {
			c.read(18)
			c.nc.Write([]byte{0, 0})
			c.nc.(*net.UnixConn).CloseWrite()
		}, "client flags"},
		{"bad option magic", func(c *rawClient) {
			c.greet(flagFixedNewstyle)
			c.nc.Write(garbage[:64])
		}, "bad option magic"},
		{"oversized option", func(c *rawClient) {
			c.greet(flagFixedNewstyle)
			c.nc.Write(hdr(optGo, 1<<31))
		}, "exceeds"},
		{"truncated option data", func(c *rawClient) {
			c.greet(flagFixedNewstyle)
			c.nc.Write(append(hdr(optGo, 100), 1, 2, 3))
			c.nc.(*net.UnixConn).CloseWrite()
		}, "option 7 data"},
		{"silent client", func(c *rawClient) {
			c.greet(flagFixedNewstyle)
		}, "timeout"},
		{"option flood", func(c *rawClient) {
			c.greet(flagFixedNewstyle)
			go func() {
				for range maxOptions + 10 {
					if _, err := c.nc.Write(hdr(optStructuredReply, 0)); err != nil {
						return
					}
				}
			}()
			// Drain the replies so the server is not blocked writing them.
		}, "more than"},
		{"bad request magic", func(c *rawClient) {
			c = inTransmission()
			c.nc.Write(garbage[:28])
			c.expectClosed()
		}, "bad request magic"},
		{"oversized write", func(c *rawClient) {
			c = inTransmission()
			c.request(0, cmdWrite, 1, 0, MaxPayload+1, nil)
			c.expectClosed()
		}, "write payload"},
		{"truncated write payload", func(c *rawClient) {
			c = inTransmission()
			c.request(0, cmdWrite, 1, 0, 1000, []byte("short"))
			c.nc.(*net.UnixConn).CloseWrite()
			c.expectClosed()
		}, "write payload"},
		{"truncated request header", func(c *rawClient) {
			c = inTransmission()
			c.nc.Write([]byte{0x25, 0x60, 0x95})
			c.nc.(*net.UnixConn).CloseWrite()
			c.expectClosed()
		}, "truncated request header"},
	}
	for _, tc := range cases {
		t.Run(strings.ReplaceAll(tc.name, " ", "_"), func(t *testing.T) {
			c := dialRaw(t, "unix", s.sock)
			c.t = t
			tc.do(c)
			c.expectClosed()
			deadline := time.Now().Add(5 * time.Second)
			for !strings.Contains(s.logs.String(), tc.reason) {
				if time.Now().After(deadline) {
					t.Fatalf("no log line with %q", tc.reason)
				}
				time.Sleep(10 * time.Millisecond)
			}
			checkGood(tc.name)
		})
	}

	// Requests past the end get error replies, never a disconnect.
	for i, r := range []struct {
		typ    uint16
		off    uint64
		length uint32
		want   uint32
	}{
		{cmdRead, 1 << 20, 1, errInval},
		{cmdWrite, 1<<20 - 2, 4, errNoSpc},
		{cmdTrim, 1 << 40, 1, errInval},
		{cmdWriteZeroes, 1<<64 - 4096, 8192, errNoSpc},
		{cmdCache, 1<<20 - 1, 2, errInval},
	} {
		var payload []byte
		if r.typ == cmdWrite {
			payload = make([]byte, r.length)
		}
		good.request(0, r.typ, uint64(1000+i), r.off, r.length, payload)
		if e, h := good.simpleReply(); e != r.want || h != uint64(1000+i) {
			t.Errorf("%s past the end: err %d, want %d", cmdName(r.typ), e, r.want)
		}
	}
	checkGood("requests past the end")
}

// countingExport records how many reads run at once.
type countingExport struct {
	*memHandle
	cur, peak atomic.Int64
}

func (e *countingExport) ReadAt(p []byte, off int64) error {
	n := e.cur.Add(1)
	for {
		p := e.peak.Load()
		if n <= p || e.peak.CompareAndSwap(p, n) {
			break
		}
	}
	time.Sleep(2 * time.Millisecond)
	defer e.cur.Add(-1)
	return e.memHandle.ReadAt(p, off)
}

type countingExports struct {
	*memExports
	last *countingExport
	mu   sync.Mutex
}

func (c *countingExports) Open(name string) (Export, error) {
	e, err := c.memExports.Open(name)
	if err != nil {
		return nil, err
	}
	ce := &countingExport{memHandle: e.(*memHandle)}
	c.mu.Lock()
	c.last = ce
	c.mu.Unlock()
	return ce, nil
}

// TestBoundedMemory checks that a client piling up requests without reading
// replies cannot make the server hold more than its per-connection limits.
func TestBoundedMemory(t *testing.T) {
	inner := newMemExports()
	inner.add("big", "", newMemExport(64<<20))
	ex := &countingExports{memExports: inner}
	sock := startServerWith(t, &Server{Exports: ex, MaxInFlight: 16, MaxBufferBytes: 64 << 20})
	c := dialRaw(t, "unix", sock)
	c.greet(flagFixedNewstyle | flagNoZeroes)
	c.goExport("big")
	// 12 reads of 32 MiB: at most 2 may be in memory at once.
	for i := range 12 {
		c.request(0, cmdRead, uint64(i), uint64(i%2)*MaxPayload, MaxPayload, nil)
	}
	for range 12 {
		if e, _ := c.simpleReply(); e != 0 {
			t.Fatalf("big read failed: %d", e)
		}
		io.CopyN(io.Discard, c.nc, MaxPayload)
	}
	ex.mu.Lock()
	ce := ex.last
	ex.mu.Unlock()
	if p := ce.peak.Load(); p > 2 {
		t.Errorf("%d reads of 32 MiB ran at once with a 64 MiB budget", p)
	}
	// 200 small reads: at most MaxInFlight at once.
	ce.peak.Store(0)
	var b bytes.Buffer
	for i := range 200 {
		binary.Write(&b, binary.BigEndian, struct {
			Magic       uint32
			Flags, Typ  uint16
			Cookie, Off uint64
			Length      uint32
		}{requestMagic, 0, cmdRead, uint64(i), uint64(i) * 4096, 4096})
	}
	go c.nc.Write(b.Bytes())
	for range 200 {
		if e, _ := c.simpleReply(); e != 0 {
			t.Fatalf("small read failed: %d", e)
		}
		c.read(4096)
	}
	if p := ce.peak.Load(); p > 16 || p < 2 {
		t.Errorf("peak concurrency %d, want between 2 and MaxInFlight=16", p)
	}
}

// TestErrorLogLimited checks that a failing export cannot flood the log.
func TestErrorLogLimited(t *testing.T) {
	ex := newMemExports()
	m := newMemExport(1 << 20)
	m.failAt = 0
	ex.add("bad", "", m)
	s := startServer(t, ex, nil)
	c := dialRaw(t, "unix", s.sock)
	c.greet(flagFixedNewstyle | flagNoZeroes)
	c.goExport("bad")
	for i := range 500 {
		c.request(0, cmdRead, uint64(i), 0, 512, nil)
	}
	for range 500 {
		if e, _ := c.simpleReply(); e != errIO {
			t.Fatalf("read of a failing export: err %d, want EIO", e)
		}
	}
	if n := strings.Count(s.logs.String(), "NBD request failed"); n < 1 || n > 2*lograte.DefaultBurst {
		t.Errorf("%d error lines logged for 500 failures", n)
	}
}

// TestUnreadReplies checks that a client which stops reading its replies is dropped
// after WriteTimeout instead of holding its buffers for ever.
func TestUnreadReplies(t *testing.T) {
	ex := newMemExports()
	ex.add("disk", "", newMemExport(8<<20))
	s := startServer(t, ex, &Server{WriteTimeout: 300 * time.Millisecond})
	c := dialRaw(t, "tcp", s.tcp)
	c.greet(flagFixedNewstyle | flagNoZeroes)
	c.goExport("disk")
	for i := range 64 {
		c.request(0, cmdRead, uint64(i), 0, 4<<20, nil)
	}
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(s.logs.String(), "did not read its replies") {
		if time.Now().After(deadline) {
			t.Fatal("a client that reads no replies was not dropped")
		}
		time.Sleep(20 * time.Millisecond)
	}
	c.expectClosed()
}

// A client that sends a WRITE's header and then only part of its payload (holding the
// payload's buffer) is dropped after PayloadTimeout; one that keeps writing is not.
func TestStalledPayload(t *testing.T) {
	ex := newMemExports()
	ex.add("disk", "", newMemExport(8<<20))
	s := startServer(t, ex, &Server{PayloadTimeout: 300 * time.Millisecond})
	busy := dialRaw(t, "tcp", s.tcp)
	busy.greet(flagFixedNewstyle | flagNoZeroes)
	busy.goExport("disk")
	c := dialRaw(t, "tcp", s.tcp)
	c.greet(flagFixedNewstyle | flagNoZeroes)
	c.goExport("disk")
	c.request(0, cmdWrite, 1, 0, 1<<20, make([]byte, 1000))
	deadline := time.Now().Add(10 * time.Second)
	for i := uint64(0); !strings.Contains(s.logs.String(), "stopped sending a write's payload"); i++ {
		if time.Now().After(deadline) {
			t.Fatal("a client that stopped sending its payload was not dropped")
		}
		// Meanwhile another client writes and is answered all along.
		busy.request(0, cmdWrite, i, 0, 4096, make([]byte, 4096))
		if errno, cookie := busy.simpleReply(); errno != 0 || cookie != i {
			t.Fatalf("busy client: reply %d for %d", errno, cookie)
		}
		time.Sleep(20 * time.Millisecond)
	}
	c.expectClosed()
	if st := s.srv.Stats(); st.Stalled != 1 {
		t.Fatalf("Stats().Stalled = %d, want 1", st.Stalled)
	}
}

// Connections beyond MaxConns are closed at once; a freed slot is usable again.
func TestMaxConns(t *testing.T) {
	ex := newMemExports()
	ex.add("disk", "", newMemExport(1<<20))
	s := startServer(t, ex, &Server{MaxConns: 2})
	a := dialRaw(t, "unix", s.sock)
	a.greet(flagFixedNewstyle | flagNoZeroes)
	b := dialRaw(t, "tcp", s.tcp)
	b.greet(flagFixedNewstyle | flagNoZeroes)
	over := dialRaw(t, "tcp", s.tcp)
	over.expectClosed()
	if st := s.srv.Stats(); st.Refused != 1 {
		t.Fatalf("Stats().Refused = %d, want 1", st.Refused)
	}
	if !strings.Contains(s.logs.String(), "NBD connection refused") {
		t.Fatal("no warning about the refused connection")
	}
	a.nc.Close()
	deadline := time.Now().Add(10 * time.Second)
	for {
		c := dialRaw(t, "unix", s.sock)
		c.nc.SetReadDeadline(time.Now().Add(time.Second))
		var m [8]byte
		if _, err := io.ReadFull(c.nc, m[:]); err == nil && binary.BigEndian.Uint64(m[:]) == nbdMagic {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("no connection accepted after one of MaxConns closed")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestServerWideMemory: requests of all connections together hold at most
// MaxTotalBufferBytes of payload memory; a request that does not fit waits (its
// connection reads nothing more) while requests without payload go on elsewhere, and
// runs once memory is released; Shutdown stops a reader that is waiting.
func TestServerWideMemory(t *testing.T) {
	ex := newMemExports()
	m := newMemExport(64 << 20)
	for i := range m.data {
		m.data[i] = byte(i / 4096)
	}
	gate := make(chan struct{})
	m.delay = func(off int64) time.Duration {
		if off == 0 {
			<-gate // READs at 0 wait to be let through, holding their 32 MiB
		}
		return 0
	}
	ex.add("disk", "", m)
	s := startServer(t, ex, &Server{MaxTotalBufferBytes: 48 << 20})
	t.Cleanup(func() { close(gate) }) // before the server's cleanup: let held READs finish
	open := func() *rawClient {
		c := dialRaw(t, "unix", s.sock)
		c.greet(flagFixedNewstyle | flagNoZeroes)
		c.goExport("disk")
		return c
	}
	expectRead := func(c *rawClient, cookie uint64, off int64) {
		t.Helper()
		c.nc.SetReadDeadline(time.Now().Add(10 * time.Second))
		if e, ck := c.simpleReply(); e != 0 || ck != cookie {
			t.Fatalf("reply error %d cookie %d, want 0 and %d", e, ck, cookie)
		}
		if !bytes.Equal(c.read(MaxPayload), m.content(off, MaxPayload)) {
			t.Fatalf("READ %d returned wrong data", cookie)
		}
	}
	held := func() bool {
		if s.srv.memory().TryAcquire(17 << 20) { // fits only while a READ's 32 MiB are free
			s.srv.memory().Release(17 << 20)
			return false
		}
		return true
	}
	a, b, other := open(), open(), open()
	a.request(0, cmdRead, 1, 0, MaxPayload, nil)
	waitFor(t, "the first READ to hold its memory", held)
	b.request(0, cmdRead, 2, 32<<20, MaxPayload, nil)
	waitFor(t, "the second READ to wait for memory", func() bool { return s.srv.Stats().MemoryWaits == 1 })
	other.request(0, cmdFlush, 3, 0, 0, nil)
	if e, ck := other.simpleReply(); e != 0 || ck != 3 {
		t.Fatalf("FLUSH on another connection: error %d cookie %d", e, ck)
	}
	b.nc.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	if _, err := b.nc.Read(make([]byte, 1)); err == nil {
		t.Fatal("a READ beyond MaxTotalBufferBytes was answered while the memory was held")
	}
	gate <- struct{}{}
	expectRead(a, 1, 0)
	expectRead(b, 2, 32<<20)

	// Shutdown while a READ waits for memory: the waiting one is not started, the
	// connection closes once the running one is answered.
	a.request(0, cmdRead, 4, 0, MaxPayload, nil)
	waitFor(t, "the third READ to hold its memory", held)
	b.request(0, cmdRead, 5, 32<<20, MaxPayload, nil)
	waitFor(t, "the fourth READ to wait for memory", func() bool { return s.srv.Stats().MemoryWaits == 2 })
	done := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		done <- s.srv.Shutdown(ctx)
	}()
	b.nc.SetReadDeadline(time.Now().Add(10 * time.Second))
	if n, err := b.nc.Read(make([]byte, 1)); err == nil {
		t.Fatalf("a READ waiting for memory got %d reply bytes after Shutdown", n)
	}
	gate <- struct{}{}
	expectRead(a, 4, 0)
	if err := <-done; err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
}

// TestAcceptErrorsPass: the server keeps accepting after Accept fails (here EMFILE, as
// when the process is out of file descriptors) instead of stopping for good.
func TestAcceptErrorsPass(t *testing.T) {
	ex := newMemExports()
	ex.add("disk", "", newMemExport(1<<20))
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	flaky := accepttest.Flaky(l, 3)
	srv := &Server{Exports: ex, Logger: slog.New(slog.DiscardHandler)}
	done := make(chan error, 1)
	go func() { done <- srv.Serve(flaky) }()
	defer func() {
		srv.Close()
		if err := <-done; !errors.Is(err, ErrServerClosed) {
			t.Errorf("Serve: %v, want ErrServerClosed", err)
		}
	}()
	c := dialRaw(t, "tcp", l.Addr().String())
	c.greet(flagFixedNewstyle | flagNoZeroes)
	if size, _ := c.goExport("disk"); size != 1<<20 {
		t.Fatalf("export size %d", size)
	}
	if n := flaky.Failed(); n != 3 {
		t.Fatalf("%d accept errors, want 3", n)
	}
}
