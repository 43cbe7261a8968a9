package nbd

import (
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestUnixSendBuffer checks that a unix socket connection gets a send buffer big
// enough for a 1 MiB read reply in one write (as far as net.core.wmem_max allows),
// and that a TCP connection keeps the kernel's autotuning.
func TestUnixSendBuffer(t *testing.T) {
	ex := newMemExports()
	ex.add("disk", "", newMemExport(1<<20))
	s := startServer(t, ex, nil)
	limit := unixSendBuffer
	if b, err := os.ReadFile("/proc/sys/net/core/wmem_max"); err == nil {
		if n, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil {
			limit = min(limit, n)
		}
	}
	for _, tc := range []struct {
		network, addr string
		want          func(int) bool
	}{
		{"unix", s.sock, func(n int) bool { return n >= limit }},
		{"tcp", s.tcp, func(n int) bool { return n < 2*unixSendBuffer }},
	} {
		c := dialRaw(t, tc.network, tc.addr)
		c.greet(flagFixedNewstyle | flagNoZeroes)
		var n int
		deadline := time.Now().Add(5 * time.Second)
		for {
			n = serverSendBuffer(t, s.srv)
			if n > 0 || time.Now().After(deadline) {
				break
			}
			time.Sleep(10 * time.Millisecond)
		}
		if !tc.want(n) {
			t.Errorf("%s connection: server send buffer %d bytes (wmem_max %d)", tc.network, n, limit)
		}
		c.nc.Close()
		for time.Now().Before(deadline) && serverSendBuffer(t, s.srv) != 0 {
			time.Sleep(10 * time.Millisecond)
		}
	}
}

// serverSendBuffer returns SO_SNDBUF of the server's one connection (0 if none).
func serverSendBuffer(t *testing.T, srv *Server) int {
	t.Helper()
	srv.mu.Lock()
	defer srv.mu.Unlock()
	for c := range srv.conns {
		sc, ok := c.nc.(syscall.Conn)
		if !ok {
			t.Fatalf("connection %T has no file descriptor", c.nc)
		}
		raw, err := sc.SyscallConn()
		if err != nil {
			t.Fatal(err)
		}
		var n int
		var serr error
		if err := raw.Control(func(fd uintptr) { n, serr = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_SNDBUF) }); err != nil {
			t.Fatal(err)
		}
		if serr != nil {
			t.Fatal(serr)
		}
		return n
	}
	return 0
}
