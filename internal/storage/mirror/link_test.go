package mirror

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"log/slog"
	"net"
	"testing"
	"time"

	"github.com/growserver/grow/internal/accept/accepttest"
)

// linkServerConn serves a link connection to a memory export of size bytes and returns
// the client side after the hello.
func linkServerConn(t *testing.T, size int) (net.Conn, *memExport) {
	t.Helper()
	ex := &memExport{data: make([]byte, size)}
	target := NewTarget(ex, State{RoleSecondary, 1})
	srv := &LinkServer{Lookup: func(string) (*Target, bool) { return target, true }}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write(helloBytes("vol", int64(size), 1)); err != nil {
		t.Fatal(err)
	}
	var wb [welcomeLen]byte
	if _, err := io.ReadFull(c, wb[:]); err != nil {
		t.Fatal(err)
	}
	if st := binary.BigEndian.Uint32(wb[4:]); st != statusOK {
		t.Fatalf("hello refused with status %d", st)
	}
	return c, ex
}

// readReplies reads n replies and returns their statuses by cookie.
func readReplies(t *testing.T, c net.Conn, n int) map[uint64]uint32 {
	t.Helper()
	got := map[uint64]uint32{}
	for i := 0; i < n; i++ {
		var b [replyLen]byte
		if _, err := io.ReadFull(c, b[:]); err != nil {
			t.Fatalf("reply %d of %d: %v", i+1, n, err)
		}
		if binary.BigEndian.Uint32(b[0:]) != replyMagic {
			t.Fatal("bad reply magic")
		}
		cookie := binary.BigEndian.Uint64(b[8:])
		if _, dup := got[cookie]; dup {
			t.Fatalf("two replies for request %d", cookie)
		}
		got[cookie] = binary.BigEndian.Uint32(b[4:])
	}
	return got
}

// TestLinkServerLoneWriteAnswered: the reply to a write that the server applies itself
// goes out although no further request follows it.
func TestLinkServerLoneWriteAnswered(t *testing.T) {
	c, ex := linkServerConn(t, 1<<20)
	p := pattern(3, 4096)
	if _, err := c.Write(requestBytes(opWrite, 0, 7, 8192, 4096, 1, p)); err != nil {
		t.Fatal(err)
	}
	if got := readReplies(t, c, 1); got[7] != statusOK {
		t.Fatalf("replies %v, want request 7 ok", got)
	}
	if !bytes.Equal(ex.data[8192:8192+4096], p) {
		t.Fatal("write not applied")
	}
}

// TestLinkServerPipelined sends many writes of every size class (small, one above the
// reused buffer, FUA), a stale one and a FLUSH in one stream: each gets exactly one
// reply with the right status and every accepted write lands.
func TestLinkServerPipelined(t *testing.T) {
	const size = 16 << 20
	c, ex := linkServerConn(t, size)
	want := make([]byte, size)
	var stream []byte
	statuses := map[uint64]uint32{}
	cookie := uint64(0)
	add := func(op, flags uint16, off int64, n int, epoch uint64, st uint32) {
		cookie++
		var p []byte
		if op == opWrite {
			p = pattern(int(cookie), n)
			if st == statusOK {
				copy(want[off:], p)
			}
		}
		stream = append(stream, requestBytes(op, flags, cookie, off, uint32(n), epoch, p)...)
		statuses[cookie] = st
	}
	for i := 0; i < 200; i++ {
		add(opWrite, 0, int64(i)*4096, 4096, 1, statusOK)
	}
	add(opWrite, flagFUA, 1<<20, 64<<10, 1, statusOK)
	add(opWrite, 0, 2<<20, inlineKeep+4096, 1, statusOK)
	add(opWrite, 0, 12<<20, 4096, 0, statusStale)
	add(opWrite, 0, size-4096, 8192, 1, statusInvalid)
	add(opFlush, 0, 0, 0, 1, statusOK)
	for i := 0; i < 50; i++ {
		add(opWrite, 0, 10<<20+int64(i)*65536, 65536, 1, statusOK)
	}
	go c.Write(stream)
	got := readReplies(t, c, len(statuses))
	for k, st := range statuses {
		if got[k] != st {
			t.Fatalf("request %d: status %d, want %d", k, got[k], st)
		}
	}
	if !bytes.Equal(ex.data, want) {
		t.Fatal("the export does not hold the accepted writes")
	}
}

// silentPeer is a link server that welcomes one link and answers only its first
// answered requests, then reads on without replying (a peer that hangs).
func silentPeer(t *testing.T, answered int) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		var h [26]byte
		if _, err := io.ReadFull(c, h[:]); err != nil {
			return
		}
		if _, err := io.CopyN(io.Discard, c, int64(binary.BigEndian.Uint16(h[24:]))); err != nil {
			return
		}
		var w [welcomeLen]byte
		binary.BigEndian.PutUint32(w[0:], welcomeMagic)
		binary.BigEndian.PutUint32(w[8:], uint32(RoleSecondary))
		binary.BigEndian.PutUint64(w[16:], 1)
		if _, err := c.Write(w[:]); err != nil {
			return
		}
		for {
			var r [requestLen]byte
			if _, err := io.ReadFull(c, r[:]); err != nil {
				return
			}
			if binary.BigEndian.Uint16(r[4:]) == opWrite {
				if _, err := io.CopyN(io.Discard, c, int64(binary.BigEndian.Uint32(r[24:]))); err != nil {
					return
				}
			}
			if answered == 0 {
				continue
			}
			answered--
			var p [replyLen]byte
			binary.BigEndian.PutUint32(p[0:], replyMagic)
			copy(p[8:], r[8:16])
			if _, err := c.Write(p[:]); err != nil {
				return
			}
		}
	}()
	return ln.Addr().String()
}

// TestLinkWatchdog: the watchdog is armed only while requests are in flight (an idle
// link has no timer running), and a request the peer never answers kills the link
// after the timeout, also when it comes after an idle time.
func TestLinkWatchdog(t *testing.T) {
	const timeout = 200 * time.Millisecond
	l, err := DialLink(context.Background(), silentPeer(t, 1), "vol", 1<<20, 1, timeout)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if err := l.WriteAt(make([]byte, 4096), 0, false); err != nil {
		t.Fatalf("answered write: %v", err)
	}
	time.Sleep(2 * timeout)
	l.mu.Lock()
	watching := l.watching
	l.mu.Unlock()
	if watching {
		t.Fatal("the watchdog is still armed on an idle link")
	}
	start := time.Now()
	err = l.Flush()
	took := time.Since(start)
	if !errors.Is(err, ErrPeerLost) {
		t.Fatalf("unanswered flush: %v, want ErrPeerLost", err)
	}
	if took < timeout || took > timeout+time.Second {
		t.Fatalf("unanswered flush failed after %v, want about %v", took, timeout)
	}
}

// TestLinkServerAcceptErrorsPass: the link server keeps accepting after Accept fails
// (EMFILE) and answers a hello on the next connection.
func TestLinkServerAcceptErrorsPass(t *testing.T) {
	target := NewTarget(&memExport{data: make([]byte, 1<<20)}, State{RoleSecondary, 1})
	srv := &LinkServer{Lookup: func(string) (*Target, bool) { return target, true }, Logger: slog.New(slog.DiscardHandler)}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	flaky := accepttest.Flaky(ln, 3)
	served := make(chan error, 1)
	go func() { served <- srv.Serve(flaky) }()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write(helloBytes("vol", 1<<20, 1)); err != nil {
		t.Fatal(err)
	}
	var wb [welcomeLen]byte
	if _, err := io.ReadFull(c, wb[:]); err != nil {
		t.Fatalf("no welcome after accept errors: %v", err)
	}
	if n := flaky.Failed(); n != 3 {
		t.Fatalf("%d accept errors, want 3", n)
	}
	srv.Close()
	if err := <-served; err != nil {
		t.Fatalf("Serve after Close: %v", err)
	}
}
