package nbd

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// testServer is a Server listening on a unix socket and on loopback TCP.
type testServer struct {
	srv     *Server
	exports *memExports
	sock    string
	tcp     string
	logs    *syncBuffer
}

// syncBuffer collects the server log for assertions.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// startServer starts srv (Exports filled in if nil) and stops it when the test ends.
func startServer(t testing.TB, exports *memExports, srv *Server) *testServer {
	t.Helper()
	if srv == nil {
		srv = &Server{}
	}
	logs := &syncBuffer{}
	srv.Exports = exports
	srv.Logger = slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	dir, err := os.MkdirTemp("", fmt.Sprintf("nbdtest-%d-", os.Getpid()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "nbd.sock")
	ul, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	tl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		ul.Close()
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for _, l := range []net.Listener{ul, tl} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := srv.Serve(l); err != nil && !errors.Is(err, ErrServerClosed) {
				t.Errorf("Serve: %v", err)
			}
		}()
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := srv.Shutdown(ctx); err != nil {
			t.Errorf("Shutdown: %v", err)
		}
		wg.Wait()
		if o, c := exports.opens.Load(), exports.closes.Load(); o != c {
			t.Errorf("exports opened %d times but closed %d times", o, c)
		}
		if t.Failed() {
			t.Logf("server log:\n%s", logs.String())
		}
	})
	return &testServer{srv: srv, exports: exports, sock: sock, tcp: tl.Addr().String(), logs: logs}
}

// startServerWith serves srv (with its own Exports) on a unix socket until the test ends.
func startServerWith(t testing.TB, srv *Server) string {
	return startServerOn(t, srv, "unix")
}

// startServerOn serves srv on a new unix socket or a free loopback TCP port (network
// "unix" or "tcp") until the test ends, and returns the address.
func startServerOn(t testing.TB, srv *Server, network string) string {
	t.Helper()
	dir, err := os.MkdirTemp("", fmt.Sprintf("nbdtest-%d-", os.Getpid()))
	if err != nil {
		t.Fatal(err)
	}
	addr := filepath.Join(dir, "nbd.sock")
	if network == "tcp" {
		addr = "127.0.0.1:0"
	}
	l, err := net.Listen(network, addr)
	if err != nil {
		t.Fatal(err)
	}
	if srv.Logger == nil {
		srv.Logger = slog.New(slog.DiscardHandler)
	}
	done := make(chan struct{})
	go func() {
		srv.Serve(l)
		close(done)
	}()
	t.Cleanup(func() {
		srv.Close()
		<-done
		os.RemoveAll(dir)
	})
	return l.Addr().String()
}

func (s *testServer) unixURI(name string) string {
	return "nbd+unix:///" + name + "?socket=" + s.sock
}

func (s *testServer) tcpURI(name string) string {
	return "nbd://" + s.tcp + "/" + name
}

// needTool fails the test when an interop client is missing; under -short it skips.
func needTool(t testing.TB, names ...string) {
	t.Helper()
	if testing.Short() {
		t.Skip("interop test with external NBD clients skipped in -short mode")
	}
	for _, n := range names {
		if _, err := exec.LookPath(n); err != nil {
			t.Fatalf("%s is required (scripts/install-deps.sh installs it): %v", n, err)
		}
	}
}

// run runs a command with a timeout and returns its combined output, failing the test on error.
func run(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := runErr(name, args...)
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return out
}

func runErr(name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.WaitDelay = 5 * time.Second
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// rawClient is a minimal NBD client for tests that need control over every byte.
type rawClient struct {
	t  testing.TB
	nc net.Conn
}

func dialRaw(t testing.TB, network, addr string) *rawClient {
	t.Helper()
	nc, err := net.DialTimeout(network, addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	nc.SetDeadline(time.Now().Add(30 * time.Second))
	t.Cleanup(func() { nc.Close() })
	return &rawClient{t: t, nc: nc}
}

func (c *rawClient) write(parts ...any) {
	c.t.Helper()
	var b bytes.Buffer
	for _, p := range parts {
		if s, ok := p.(string); ok {
			b.WriteString(s)
			continue
		}
		if err := binary.Write(&b, binary.BigEndian, p); err != nil {
			c.t.Fatal(err)
		}
	}
	if _, err := c.nc.Write(b.Bytes()); err != nil {
		c.t.Fatalf("write: %v", err)
	}
}

func (c *rawClient) read(n int) []byte {
	c.t.Helper()
	b := make([]byte, n)
	if _, err := io.ReadFull(c.nc, b); err != nil {
		c.t.Fatalf("read %d bytes: %v", n, err)
	}
	return b
}

func (c *rawClient) u16() uint16 { return binary.BigEndian.Uint16(c.read(2)) }
func (c *rawClient) u32() uint32 { return binary.BigEndian.Uint32(c.read(4)) }
func (c *rawClient) u64() uint64 { return binary.BigEndian.Uint64(c.read(8)) }

// greet reads the server greeting and sends client flags.
func (c *rawClient) greet(flags uint32) {
	c.t.Helper()
	if m := c.u64(); m != nbdMagic {
		c.t.Fatalf("greeting magic %#x", m)
	}
	if m := c.u64(); m != optMagic {
		c.t.Fatalf("greeting IHAVEOPT %#x", m)
	}
	if f := c.u16(); f != flagFixedNewstyle|flagNoZeroes {
		c.t.Fatalf("handshake flags %#x", f)
	}
	c.write(flags)
}

func (c *rawClient) option(opt uint32, data []byte) {
	c.t.Helper()
	c.write(uint64(optMagic), opt, uint32(len(data)), string(data))
}

// optReply reads one option reply: its type and data.
func (c *rawClient) optReply(opt uint32) (uint32, []byte) {
	c.t.Helper()
	if m := c.u64(); m != optReplyMagic {
		c.t.Fatalf("option reply magic %#x", m)
	}
	if o := c.u32(); o != opt {
		c.t.Fatalf("reply to option %d, want %d", o, opt)
	}
	typ := c.u32()
	n := c.u32()
	return typ, c.read(int(n))
}

// goData builds NBD_OPT_GO/INFO data.
func goData(name string, infos ...uint16) []byte {
	b := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
	b = append(b, name...)
	b = binary.BigEndian.AppendUint16(b, uint16(len(infos)))
	for _, i := range infos {
		b = binary.BigEndian.AppendUint16(b, i)
	}
	return b
}

// metaData builds NBD_OPT_{LIST,SET}_META_CONTEXT data.
func metaData(name string, queries ...string) []byte {
	b := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
	b = append(b, name...)
	b = binary.BigEndian.AppendUint32(b, uint32(len(queries)))
	for _, q := range queries {
		b = binary.BigEndian.AppendUint32(b, uint32(len(q)))
		b = append(b, q...)
	}
	return b
}

// goExport negotiates name with NBD_OPT_GO and returns size and transmission flags.
func (c *rawClient) goExport(name string) (uint64, uint16) {
	c.t.Helper()
	c.option(optGo, goData(name))
	var size uint64
	var flags uint16
	for {
		typ, data := c.optReply(optGo)
		switch typ {
		case repInfo:
			if binary.BigEndian.Uint16(data) == infoExport {
				size = binary.BigEndian.Uint64(data[2:])
				flags = binary.BigEndian.Uint16(data[10:])
			}
		case repAck:
			return size, flags
		default:
			c.t.Fatalf("NBD_OPT_GO reply %#x: %s", typ, data)
		}
	}
}

func (c *rawClient) request(flags, typ uint16, cookie, off uint64, length uint32, payload []byte) {
	c.t.Helper()
	c.write(uint32(requestMagic), flags, typ, cookie, off, length, string(payload))
}

// simpleReply reads a simple reply header: error and cookie.
func (c *rawClient) simpleReply() (uint32, uint64) {
	c.t.Helper()
	if m := c.u32(); m != simpleMagic {
		c.t.Fatalf("simple reply magic %#x", m)
	}
	return c.u32(), c.u64()
}

// chunk is one structured reply chunk.
type chunk struct {
	flags, typ uint16
	cookie     uint64
	data       []byte
}

func (c *rawClient) chunk() chunk {
	c.t.Helper()
	if m := c.u32(); m != structuredMagic {
		c.t.Fatalf("structured reply magic %#x", m)
	}
	var ch chunk
	ch.flags = c.u16()
	ch.typ = c.u16()
	ch.cookie = c.u64()
	ch.data = c.read(int(c.u32()))
	return ch
}

// expectClosed checks that the server closes the connection soon.
func (c *rawClient) expectClosed() {
	c.t.Helper()
	c.nc.SetReadDeadline(time.Now().Add(10 * time.Second))
	_, err := io.Copy(io.Discard, c.nc)
	// A reset is a close too: the server closed with our unread bytes pending.
	if err != nil && !errors.Is(err, syscall.ECONNRESET) {
		c.t.Fatalf("connection not closed by the server: %v", err)
	}
}

// waitFor polls cond until it holds, failing the test after 10 s.
func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
