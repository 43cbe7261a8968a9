package controller

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	mrand "math/rand/v2"
	"net"
	"net/netip"
	"slices"
	"sync"
	"syscall"
	"time"

	"github.com/growserver/grow/internal/accept"
	"github.com/growserver/grow/internal/lograte"
	"github.com/growserver/grow/internal/storage/mirror"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// connTracker knows the NBD connections and, from their handshake, the export each
// one opened, so that a deposed primary can close exactly the connections of a volume.
type connTracker struct {
	mu    sync.Mutex
	conns map[*trackedConn]struct{}
}

func newConnTracker() *connTracker { return &connTracker{conns: map[*trackedConn]struct{}{}} }

// closeName closes every connection that opened name, and every connection whose
// export is unknown (TLS hides it): closing one too many only makes a client reconnect.
func (t *connTracker) closeName(name string) {
	t.mu.Lock()
	var victims []*trackedConn
	for c := range t.conns {
		c.mu.Lock()
		n, known := c.name, c.known
		c.mu.Unlock()
		if n == name || !known {
			victims = append(victims, c)
		}
	}
	t.mu.Unlock()
	for _, c := range victims {
		c.abort()
	}
}

// abort closes the connection with a reset, so that the client notices at once even
// if it is only waiting to read.
func (c *trackedConn) abort() {
	if tc, ok := c.Conn.(*net.TCPConn); ok {
		_ = tc.SetLinger(0)
	}
	_ = c.Close()
}

// closeLocalIP closes every connection made to ip (a service address this controller
// just gave up: a connection that reached it in the last moment would otherwise hang,
// its address gone, and QEMU does not time out a hanging reconnect).
func (t *connTracker) closeLocalIP(ip netip.Addr) {
	t.mu.Lock()
	var victims []*trackedConn
	for c := range t.conns {
		if localIP(c.Conn) == ip {
			victims = append(victims, c)
		}
	}
	t.mu.Unlock()
	for _, c := range victims {
		c.abort()
	}
}

func localIP(c net.Conn) netip.Addr {
	if a, ok := c.LocalAddr().(*net.TCPAddr); ok {
		if ip, ok := netip.AddrFromSlice(a.IP); ok {
			return ip.Unmap()
		}
	}
	return netip.Addr{}
}

// trackListener wraps an NBD listener so its connections are tracked; a connection to
// an address allow refuses (a service address not held now) is closed at once.
type trackListener struct {
	net.Listener
	t     *connTracker
	allow func(netip.Addr) bool
	log   *slog.Logger
}

func (l *trackListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		if l.allow != nil && !l.allow(localIP(c)) {
			if l.log != nil {
				l.log.Info("NBD connection to a service address being given up refused", "local", c.LocalAddr().String(), "remote", c.RemoteAddr().String())
			}
			abortConn(c)
			continue
		}
		tc := &trackedConn{Conn: c, t: l.t}
		l.t.mu.Lock()
		l.t.conns[tc] = struct{}{}
		l.t.mu.Unlock()
		return tc, nil
	}
}

// trackedConn sniffs the client's side of the NBD handshake for the export name: the
// client flags (4 bytes), then options "IHAVEOPT" | option u32 | length u32 | data,
// until something else (transmission) or STARTTLS begins.
type trackedConn struct {
	net.Conn
	t       *connTracker
	mu      sync.Mutex
	buf     []byte
	skipped bool
	done    bool
	known   bool
	name    string
	once    sync.Once
}

const (
	nbdOptExportName = 1
	nbdOptStartTLS   = 5
	nbdOptGo         = 7
)

// SyscallConn exposes the socket, so that the NBD server can splice READ replies and
// WRITE payloads on it. Spliced bytes bypass the sniffing, which only looks at the
// handshake, before any splice.
func (c *trackedConn) SyscallConn() (syscall.RawConn, error) {
	sc, ok := c.Conn.(syscall.Conn)
	if !ok {
		return nil, errors.ErrUnsupported
	}
	return sc.SyscallConn()
}

func (c *trackedConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if n > 0 {
		c.sniff(p[:n])
	}
	return n, err
}

func (c *trackedConn) sniff(b []byte) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.done {
		return
	}
	c.buf = append(c.buf, b...)
	if !c.skipped {
		if len(c.buf) < 4 {
			return
		}
		c.buf, c.skipped = c.buf[4:], true
	}
	for len(c.buf) >= 16 {
		if !bytes.Equal(c.buf[:8], []byte("IHAVEOPT")) {
			c.done = true // transmission (or garbage the server will refuse)
			c.buf = nil
			return
		}
		opt := binary.BigEndian.Uint32(c.buf[8:])
		n := int(binary.BigEndian.Uint32(c.buf[12:]))
		if n > 64<<10 {
			c.done, c.buf = true, nil
			return
		}
		if len(c.buf) < 16+n {
			return
		}
		data := c.buf[16 : 16+n]
		switch opt {
		case nbdOptExportName:
			c.name, c.known = string(data), true
		case nbdOptGo:
			if len(data) >= 4 {
				if l := int(binary.BigEndian.Uint32(data)); 4+l <= len(data) {
					c.name, c.known = string(data[4:4+l]), true
				}
			}
		case nbdOptStartTLS:
			c.done, c.known, c.buf = true, false, nil
			return
		}
		c.buf = c.buf[16+n:]
	}
}

func (c *trackedConn) Close() error {
	c.once.Do(func() {
		c.t.mu.Lock()
		delete(c.t.conns, c)
		c.t.mu.Unlock()
	})
	return c.Conn.Close()
}

// The mirror link is authenticated before its hello: the server sends a 32-byte
// nonce, the client answers HMAC-SHA256(server's admin token, nonce).
const challengeLen = 32

func linkMAC(token string, nonce []byte) []byte {
	h := hmac.New(sha256.New, []byte(token))
	h.Write(nonce)
	return h.Sum(nil)
}

// linkChallengeAnswer is the client side of the link authentication.
func linkChallengeAnswer(c net.Conn, token string) error {
	c.SetDeadline(time.Now().Add(5 * time.Second))
	defer c.SetDeadline(time.Time{})
	nonce := make([]byte, challengeLen)
	if _, err := io.ReadFull(c, nonce); err != nil {
		return fmt.Errorf("Failed to read the mirror link challenge: %w", err)
	}
	if _, err := c.Write(linkMAC(token, nonce)); err != nil {
		return fmt.Errorf("Failed to answer the mirror link challenge: %w", err)
	}
	return nil
}

func tlsClient(c net.Conn, cfg *tls.Config) *tls.Conn { return tls.Client(c, cfg) }

// dialAuth opens an authenticated link connection to addr (over TLS with tlsCfg, when
// set) before ctx ends. A connection the partner closes before this side has answered
// the challenge (its bound on pending connections, see maxPendingLinks) is dialled
// again after a short, growing, randomised pause; other errors are returned at once.
func dialAuth(ctx context.Context, addr string, tlsCfg *tls.Config, token string) (net.Conn, error) {
	pause := 10 * time.Millisecond
	for {
		c, err := authConn(ctx, addr, tlsCfg, token)
		if err == nil || !droppedByServer(err) {
			return c, err
		}
		t := time.NewTimer(pause/2 + mrand.N(pause/2))
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, err
		case <-t.C:
		}
		pause = min(2*pause, 500*time.Millisecond)
	}
}

// linkHelloTries is how many times openLink runs the hello on a new connection when
// the partner closed the last one at the hello: its listener may have dropped that
// one just after the answer was sent (see maxPendingLinks), but a wrong token also
// shows up there, so a few tries only.
const linkHelloTries = 3

// openLink opens the mirror link of a volume to the partner at addr: an authenticated
// connection (dialAuth) and the hello.
func openLink(ctx context.Context, addr string, tlsCfg *tls.Config, token, name string, size int64, epoch uint64) (*mirror.Link, error) {
	for try := 1; ; try++ {
		c, err := dialAuth(ctx, addr, tlsCfg, token)
		if err != nil {
			return nil, err
		}
		l, err := mirror.NewLink(ctx, c, name, size, epoch, 10*time.Second)
		if err == nil || try == linkHelloTries || !droppedByServer(err) {
			return l, err
		}
	}
}

// authConn dials addr once and answers the link challenge.
func authConn(ctx context.Context, addr string, tlsCfg *tls.Config, token string) (net.Conn, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("Failed to dial the mirror link %s: %w", addr, err)
	}
	if tlsCfg != nil {
		tc := tlsClient(c, tlsCfg)
		if err := tc.HandshakeContext(ctx); err != nil {
			c.Close()
			return nil, fmt.Errorf("TLS handshake on the mirror link failed: %w", err)
		}
		c = tc
	}
	if err := linkChallengeAnswer(c, token); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

// droppedByServer reports whether err says the other side closed the connection.
func droppedByServer(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE)
}

// maxPendingLinks bounds the link connections not yet authenticated. When a new one
// arrives at the bound, the oldest pending one is dropped rather than the new one: a
// genuine partner answers the challenge within a round trip, so the oldest is the one
// least likely to be genuine: a flood of idle connections pushes out its own older ones,
// and costs the partner a connection only if 64 more arrive during its handshake. One
// whose answer has arrived but is not read yet is not dropped, nor one whose answer
// was read (its client believes it is in); if all are answering, the new one is
// dropped. The partner opens at most half that many links at once (mirrorMgr.linkDials),
// and redials a connection dropped before it answered (dialAuth) and, a few times, one
// dropped while its answer was on the way (openLink), so its links get in also amid a
// flood, or beyond the bound.
const maxPendingLinks = 64

// authListener accepts only link connections that pass TLS (when configured) and the
// token challenge; the checks run per connection so a slow client blocks nobody, and at
// most maxPendingLinks run at once.
type authListener struct {
	net.Listener
	token  string
	tls    *tls.Config
	log    *slog.Logger
	ch     chan net.Conn
	errc   chan error
	once   sync.Once
	done   chan struct{}
	refuse lograte.Limiter // warnings about refused connections

	mu      sync.Mutex
	pending []*pendingLink // oldest first
}

// pendingLink is a link connection whose check is running.
type pendingLink struct {
	c       net.Conn
	dropped bool // pushed out by a newer connection at maxPendingLinks
}

func newAuthListener(l net.Listener, token string, tlsCfg *tls.Config, log *slog.Logger) *authListener {
	a := &authListener{Listener: l, token: token, tls: tlsCfg, log: log, ch: make(chan net.Conn), errc: make(chan error, 1), done: make(chan struct{}),
		refuse: lograte.Limiter{Burst: logBurst}}
	go a.loop()
	return a
}

func (a *authListener) loop() {
	var backoff accept.Backoff
	for {
		c, err := a.Listener.Accept()
		if err != nil {
			select {
			case <-a.done:
			default:
				if n, ok := a.refuse.Allow(time.Now()); ok {
					a.log.Warn("Mirror link accept failed, retrying", "err", err, "suppressed", n)
				}
				if backoff.Retry(err) {
					continue
				}
			}
			a.errc <- err
			return
		}
		backoff.Reset()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		p := &pendingLink{c: c}
		a.mu.Lock()
		if len(a.pending) >= maxPendingLinks {
			// Drop the oldest that is not answering right now (its answer not waiting
			// to be read), or else the new one, which has been sent nothing yet.
			victim := p
			for i, q := range a.pending {
				if !hasUnread(q.c) {
					victim = q
					a.pending = slices.Delete(a.pending, i, i+1)
					break
				}
			}
			// Its check fails at once, unless it has just passed (see serve).
			victim.dropped = true
			victim.c.SetDeadline(time.Now())
		}
		if !p.dropped {
			a.pending = append(a.pending, p)
		}
		a.mu.Unlock()
		go a.serve(p)
	}
}

// hasUnread reports whether c has received bytes not read yet.
func hasUnread(c net.Conn) bool {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return false
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return false
	}
	n := 0
	_ = rc.Control(func(fd uintptr) { n, _ = unix.IoctlGetInt(int(fd), unix.SIOCINQ) })
	return n > 0
}

// serve checks p and hands it to Accept, or logs why it was refused.
func (a *authListener) serve(p *pendingLink) {
	c2, err := a.check(p.c)
	a.mu.Lock()
	dropped := p.dropped
	if !dropped {
		a.pending = slices.DeleteFunc(a.pending, func(q *pendingLink) bool { return q == p })
	}
	if err == nil {
		// Authenticated, even if dropped after its answer was read: it stays.
		p.c.SetDeadline(time.Time{})
	}
	a.mu.Unlock()
	if err != nil {
		if dropped {
			err = fmt.Errorf("dropped: more than %d connections awaiting authentication", maxPendingLinks)
		}
		if n, ok := a.refuse.Allow(time.Now()); ok {
			a.log.Warn("Mirror link connection refused", "remote", p.c.RemoteAddr().String(), "err", err, "suppressed", n)
		}
		if dropped {
			abortConn(p.c)
		} else {
			p.c.Close()
		}
		return
	}
	select {
	case a.ch <- c2:
	case <-a.done:
		c2.Close()
	}
}

// abortConn closes c with a reset: the peer notices at once, and no TIME_WAIT is left here.
func abortConn(c net.Conn) {
	if tc, ok := c.(*net.TCPConn); ok {
		_ = tc.SetLinger(0)
	}
	_ = c.Close()
}

// check runs TLS (when configured) and the challenge on c, within c's deadline.
func (a *authListener) check(c net.Conn) (net.Conn, error) {
	if a.tls != nil {
		tc := tls.Server(c, a.tls)
		if err := tc.Handshake(); err != nil {
			return nil, fmt.Errorf("TLS handshake failed: %w", err)
		}
		c = tc
	}
	nonce := make([]byte, challengeLen)
	if _, err := rand.Read(nonce); err != nil {
		return nil, err
	}
	if _, err := c.Write(nonce); err != nil {
		return nil, err
	}
	mac := make([]byte, sha256.Size)
	if _, err := io.ReadFull(c, mac); err != nil {
		return nil, err
	}
	if !hmac.Equal(mac, linkMAC(a.token, nonce)) {
		return nil, errors.New("wrong token in the mirror link challenge")
	}
	return c, nil
}

func (a *authListener) Accept() (net.Conn, error) {
	select {
	case c := <-a.ch:
		return c, nil
	case err := <-a.errc:
		a.errc <- err
		return nil, err
	}
}

func (a *authListener) Close() error {
	a.once.Do(func() { close(a.done) })
	return a.Listener.Close()
}

// logBurst is how many refused link connections are logged per second.
const logBurst = 5

// checkDev verifies that the service device exists.
func checkDev(dev string) error {
	if _, err := netlink.LinkByName(dev); err != nil {
		return fmt.Errorf("Invalid --service-dev %q: %w", dev, err)
	}
	return nil
}

// devAddr looks up dev and parses p as a netlink address.
func devAddr(dev string, p netip.Prefix) (netlink.Link, *netlink.Addr, error) {
	l, err := netlink.LinkByName(dev)
	if err != nil {
		return nil, nil, fmt.Errorf("Failed to find %q: %w", dev, err)
	}
	a, err := netlink.ParseAddr(p.String())
	if err != nil {
		return nil, nil, fmt.Errorf("Invalid service address %s: %w", p, err)
	}
	return l, a, nil
}

// addrLifetime is the valid lifetime, in seconds, of a service address this
// controller holds; it is renewed several times a second, so the address disappears
// by itself soon after the process dies or hangs (kill -9 leaves no one to remove it).
const addrLifetime = 3

// addAddr adds p to dev, or renews its lifetime if it is there.
func addAddr(dev string, p netip.Prefix) error {
	l, a, err := devAddr(dev, p)
	if err != nil {
		return err
	}
	a.ValidLft, a.PreferedLft = addrLifetime, addrLifetime
	if err := netlink.AddrReplace(l, a); err != nil {
		return fmt.Errorf("Failed to add %s to %s: %w", p, dev, err)
	}
	return nil
}

// delAddr removes p from dev (no error if it is not there).
func delAddr(dev string, p netip.Prefix) error {
	l, a, err := devAddr(dev, p)
	if err != nil {
		return err
	}
	if err := netlink.AddrDel(l, a); err != nil && !errors.Is(err, unix.EADDRNOTAVAIL) && !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.ESRCH) {
		return fmt.Errorf("Failed to remove %s from %s: %w", p, dev, err)
	}
	return nil
}

// announce sends gratuitous ARP (a request and a reply, every 250 ms for 6 s) for ip from dev,
// so that neighbours move their cache entry for the address to this machine at once.
// It stops as soon as held reports the address given up: a late announcement from the
// old holder would lead the segment back to it after the address moved on.
func announce(dev string, ip netip.Addr, held func() bool, log *slog.Logger) {
	// Every 250 ms for 6 s: a neighbour that ignores announcements within its lock
	// time of the last change (1 s by default) still takes a later one.
	for i := 0; i < 24; i++ {
		if i > 0 {
			time.Sleep(250 * time.Millisecond)
		}
		if !held() {
			return
		}
		if err := sendGratuitousARP(dev, ip); err != nil {
			log.Warn("Failed to send gratuitous ARP", "dev", dev, "ip", ip.String(), "try", i, "err", err)
			return
		}
	}
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// sendGratuitousARP sends one ARP request and one ARP reply announcing ip at dev's MAC.
func sendGratuitousARP(dev string, ip netip.Addr) error {
	ifi, err := net.InterfaceByName(dev)
	if err != nil {
		return err
	}
	if len(ifi.HardwareAddr) != 6 || !ip.Is4() {
		return fmt.Errorf("gratuitous ARP needs an Ethernet device and an IPv4 address (%s, %s)", dev, ip)
	}
	fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW, int(htons(unix.ETH_P_ARP)))
	if err != nil {
		return fmt.Errorf("Failed to open a packet socket: %w", err)
	}
	defer unix.Close(fd)
	bcast := [8]byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}
	to := &unix.SockaddrLinklayer{Ifindex: ifi.Index, Protocol: htons(unix.ETH_P_ARP), Halen: 6, Addr: bcast}
	for _, op := range []uint16{1, 2} {
		f := garpFrame(ifi.HardwareAddr, ip.As4(), op)
		if err := unix.Sendto(fd, f, 0, to); err != nil {
			return fmt.Errorf("Failed to send gratuitous ARP: %w", err)
		}
	}
	return nil
}

// garpFrame builds an Ethernet frame with an ARP packet whose sender and target
// protocol address are both ip (RFC 5227 announcement); op 1 request, 2 reply.
func garpFrame(mac net.HardwareAddr, ip [4]byte, op uint16) []byte {
	f := make([]byte, 42)
	for i := 0; i < 6; i++ {
		f[i] = 0xff
	}
	copy(f[6:], mac)
	binary.BigEndian.PutUint16(f[12:], unix.ETH_P_ARP)
	a := f[14:]
	binary.BigEndian.PutUint16(a[0:], 1)      // Ethernet
	binary.BigEndian.PutUint16(a[2:], 0x0800) // IPv4
	a[4], a[5] = 6, 4
	binary.BigEndian.PutUint16(a[6:], op)
	copy(a[8:], mac)
	copy(a[14:], ip[:])
	if op == 2 {
		// A gratuitous reply names the sender as its own target (Linux counts only
		// such replies as gratuitous when deciding to replace a cache entry).
		copy(a[18:], mac)
	}
	copy(a[24:], ip[:])
	return f
}
