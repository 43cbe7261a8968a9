package testbed

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netns"
)

// The bed's address plan. Every address lives inside namespaces the bed creates.
const (
	GuestPrefix   = "10.77.0."    // guest network /24 (L2 across all hosts)
	GuestPrefix6  = "fd77::"      // guest network /64
	ClientIP      = "10.77.0.254" // the probe namespace on the guest network
	StoragePrefix = "10.99.0."    // storage and migration network /24
	namePrefix    = "growtb-"
)

// Options configures a test bed.
type Options struct {
	Hosts int // hypervisor hosts (network namespaces), at least 1
}

// Bed is a set of hosts in network namespaces:
//
//	host namespaces  br0 (guest bridge) -- veth --+                 +-- veth -- client (10.77.0.254)
//	                 st0 (10.99.0.1N)   -- veth --|-- switch ns: ---|
//	storage namespaces st0 (10.99.0.2+i) - veth --+   gnet, snet    +
//
// The switch namespace joins every host's guest bridge at L2 (bridge gnet), so a VM
// keeps its IP address when it moves between hosts, and joins the hosts' and storage
// controllers' storage interfaces (bridge snet), which also carries migration streams.
type Bed struct {
	ID      string // namespace name prefix, unique per process and bed
	Switch  string // switch namespace
	Client  string // client namespace on the guest network (probes)
	Hosts   []*Host
	t       testing.TB
	mu      sync.Mutex
	storage int
	nss     []string
	cgroups []string // cgroup parents given to hostd
}

// Host is one hypervisor host: a network namespace with its guest bridge.
type Host struct {
	Bed       *Bed
	Index     int
	Netns     string
	Bridge    string // guest bridge inside Netns ("br0")
	StorageIP string // address on the storage network
	taps      int
}

var bedSeq atomic.Int64

// New builds a bed of opts.Hosts hosts and registers its teardown (processes killed,
// namespaces deleted) even if the test fails. Leftovers of crashed earlier runs are
// removed first. It needs root.
func New(t testing.TB, opts Options) *Bed {
	t.Helper()
	if testing.Short() {
		t.Skip("the namespace test bed needs root, QEMU and time: skipped with -short")
	}
	if os.Geteuid() != 0 {
		t.Fatal("the namespace test bed needs root (run the tests as root, or with -short to skip them)")
	}
	if opts.Hosts < 1 {
		opts.Hosts = 1
	}
	if opts.Hosts > 9 {
		t.Fatalf("at most 9 hosts, not %d", opts.Hosts)
	}
	CleanStale()
	b := &Bed{ID: fmt.Sprintf("%s%d-%d", namePrefix, os.Getpid(), bedSeq.Add(1)), t: t}
	b.Switch = b.ID + "-sw"
	b.Client = b.ID + "-cl"
	t.Cleanup(b.teardown)
	if err := b.build(opts); err != nil {
		t.Fatalf("Failed to build the test bed: %v", err)
	}
	return b
}

func (b *Bed) build(opts Options) error {
	if err := b.addNetns(b.Switch); err != nil {
		return err
	}
	for _, cmd := range [][]string{
		{"link", "add", "gnet", "type", "bridge"},
		{"link", "add", "snet", "type", "bridge"},
		{"link", "set", "gnet", "up"},
		{"link", "set", "snet", "up"},
		{"link", "set", "lo", "up"},
	} {
		if err := b.ip(b.Switch, cmd...); err != nil {
			return err
		}
	}
	// The client namespace: a probe address on the guest network.
	if err := b.addNetns(b.Client); err != nil {
		return err
	}
	if err := b.plug(b.Client, "eth0", "gnet", "cl"); err != nil {
		return err
	}
	if err := b.ip(b.Client, "addr", "add", ClientIP+"/24", "dev", "eth0"); err != nil {
		return err
	}
	if err := b.ip(b.Client, "addr", "add", GuestPrefix6+"fe/64", "dev", "eth0", "nodad"); err != nil {
		return err
	}
	for i := 0; i < opts.Hosts; i++ {
		h := &Host{Bed: b, Index: i, Netns: fmt.Sprintf("%s-h%d", b.ID, i), Bridge: "br0",
			StorageIP: fmt.Sprintf("%s%d", StoragePrefix, 11+i)}
		if err := b.addNetns(h.Netns); err != nil {
			return err
		}
		if err := b.ip(h.Netns, "link", "add", "br0", "type", "bridge"); err != nil {
			return err
		}
		if err := b.ip(h.Netns, "link", "set", "br0", "up"); err != nil {
			return err
		}
		// Guest uplink: br0 <-> switch gnet, at L2 only.
		if err := b.plug(h.Netns, "gup", "gnet", fmt.Sprintf("g%d", i)); err != nil {
			return err
		}
		if err := b.ip(h.Netns, "link", "set", "gup", "master", "br0"); err != nil {
			return err
		}
		// Storage and migration network.
		if err := b.plug(h.Netns, "st0", "snet", fmt.Sprintf("s%d", i)); err != nil {
			return err
		}
		if err := b.ip(h.Netns, "addr", "add", h.StorageIP+"/24", "dev", "st0"); err != nil {
			return err
		}
		b.Hosts = append(b.Hosts, h)
	}
	return nil
}

// plug creates a veth pair with end name inside ns and end peer in the switch
// namespace on bridge br, and brings both up.
func (b *Bed) plug(ns, name, br, peer string) error {
	if err := b.ip("", "link", "add", name, "netns", ns, "type", "veth", "peer", "name", peer, "netns", b.Switch); err != nil {
		return err
	}
	for _, c := range []struct{ ns, dev string }{{ns, name}, {b.Switch, peer}} {
		if err := b.ip(c.ns, "link", "set", c.dev, "up"); err != nil {
			return err
		}
	}
	if err := b.ip(b.Switch, "link", "set", peer, "master", br); err != nil {
		return err
	}
	return b.ip(ns, "link", "set", "lo", "up")
}

func (b *Bed) addNetns(name string) error {
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		return fmt.Errorf("Failed to create network namespace %s: %w: %s", name, err, bytes.TrimSpace(out))
	}
	b.mu.Lock()
	b.nss = append(b.nss, name)
	b.mu.Unlock()
	// IPv6 duplicate address detection would delay every static address by a second.
	_ = runIn(name, "sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0")
	return nil
}

// ip runs `ip ARGS` inside ns ("" = the test's own namespace, only to create veths into bed namespaces).
func (b *Bed) ip(ns string, args ...string) error {
	if ns != "" {
		args = append([]string{"-n", ns}, args...)
	}
	out, err := exec.Command("ip", args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("ip %s: %w: %s", strings.Join(args, " "), err, bytes.TrimSpace(out))
	}
	return nil
}

func runIn(ns string, name string, args ...string) error {
	argv := append([]string{"netns", "exec", ns, name}, args...)
	out, err := exec.Command("ip", argv...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s in %s: %w: %s", name, strings.Join(args, " "), ns, err, bytes.TrimSpace(out))
	}
	return nil
}

// GuestIP returns the i-th guest address in CIDR form (10.77.0.10+i/24).
func GuestIP(i int) string { return fmt.Sprintf("%s%d/24", GuestPrefix, 10+i) }

// GuestIP6 returns the i-th guest IPv6 address in CIDR form.
func GuestIP6(i int) string { return fmt.Sprintf("%s%x/64", GuestPrefix6, 0x10+i) }

// GuestMAC returns a locally administered MAC address for guest i.
func GuestMAC(i int) string { return fmt.Sprintf("52:54:00:77:%02x:%02x", (i>>8)&0xff, i&0xff) }

// Command returns a command that runs inside the host's namespace, in its own process group.
func (h *Host) Command(name string, args ...string) *exec.Cmd {
	return NetnsCommand(h.Netns, name, args...)
}

// Exec runs a command inside the host's namespace and returns its combined output.
func (h *Host) Exec(name string, args ...string) (string, error) {
	out, err := h.Command(name, args...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s %s on host %d: %w: %s", name, strings.Join(args, " "), h.Index, err, bytes.TrimSpace(out))
	}
	return string(out), nil
}

// NetnsCommand returns a command that runs inside the named namespace, in its own process group.
func NetnsCommand(ns, name string, args ...string) *exec.Cmd {
	cmd := exec.Command("ip", append([]string{"netns", "exec", ns, name}, args...)...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	return cmd
}

// NetworkOnlyCommand returns a command that enters only the named network namespace
// (nsenter --net), in its own process group. Unlike NetnsCommand it keeps the machine's
// mounts, /sys included, so the process sees and uses the real cgroup hierarchy.
func NetworkOnlyCommand(ns, name string, args ...string) *exec.Cmd {
	cmd := exec.Command("nsenter", append([]string{"--net=/run/netns/" + ns, name}, args...)...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	return cmd
}

// AddTap creates a tap device on the host's guest bridge for a bare VM and returns its name.
func (h *Host) AddTap() (string, error) {
	h.Bed.mu.Lock()
	name := fmt.Sprintf("tap%d", h.taps)
	h.taps++
	h.Bed.mu.Unlock()
	for _, args := range [][]string{
		{"tuntap", "add", "dev", name, "mode", "tap"},
		{"link", "set", name, "master", h.Bridge},
		{"link", "set", name, "up"},
	} {
		if err := h.Bed.ip(h.Netns, args...); err != nil {
			return "", err
		}
	}
	return name, nil
}

// DialContext dials addr from inside the namespace ns (a socket belongs to the
// namespace it was created in), so that the test process can reach daemons in the bed.
func DialContext(ctx context.Context, ns, network, addr string) (net.Conn, error) {
	var c net.Conn
	err := inNetns(ns, func() (err error) {
		var d net.Dialer
		c, err = d.DialContext(ctx, network, addr)
		return err
	})
	return c, err
}

// Listen listens on TCP addr inside the namespace ns, for a peer in the bed to connect to
// the test process.
func Listen(ns, addr string) (net.Listener, error) {
	var l net.Listener
	err := inNetns(ns, func() (err error) {
		l, err = net.Listen("tcp", addr)
		return err
	})
	return l, err
}

// inNetns runs fn on a thread of its own switched into the namespace ns; sockets fn
// creates belong to ns and keep working from any thread afterwards.
func inNetns(ns string, fn func() error) error {
	ch := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			ch <- fmt.Errorf("Failed to get the current namespace: %w", err)
			return
		}
		defer orig.Close()
		target, err := netns.GetFromName(ns)
		if err != nil {
			runtime.UnlockOSThread()
			ch <- fmt.Errorf("Failed to open namespace %s: %w", ns, err)
			return
		}
		defer target.Close()
		if err := netns.Set(target); err != nil {
			runtime.UnlockOSThread()
			ch <- fmt.Errorf("Failed to enter namespace %s: %w", ns, err)
			return
		}
		ferr := fn()
		if err := netns.Set(orig); err != nil {
			// This thread is stuck in the wrong namespace: let it die with the goroutine.
			ch <- ferr
			return
		}
		runtime.UnlockOSThread()
		ch <- ferr
	}()
	return <-ch
}

// Forward listens on 127.0.0.1 (an ephemeral port) in the test's namespace and
// forwards every connection to addr inside namespace ns, until the test ends. It
// returns the local address.
func Forward(t testing.TB, ns, addr string) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("Failed to listen for a forwarder: %v", err)
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	conns := map[net.Conn]bool{}
	track := func(c net.Conn, add bool) {
		mu.Lock()
		defer mu.Unlock()
		if add {
			conns[c] = true
		} else {
			delete(conns, c)
		}
	}
	t.Cleanup(func() {
		l.Close()
		mu.Lock()
		for c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				r, err := DialContext(ctx, ns, "tcp", addr)
				cancel()
				if err != nil {
					c.Close()
					return
				}
				track(c, true)
				track(r, true)
				done := make(chan struct{}, 2)
				pipe := func(dst, src net.Conn) {
					_, _ = io.Copy(dst, src)
					if tc, ok := dst.(*net.TCPConn); ok {
						_ = tc.CloseWrite()
					}
					done <- struct{}{}
				}
				go pipe(r, c)
				go pipe(c, r)
				<-done
				<-done
				c.Close()
				r.Close()
				track(c, false)
				track(r, false)
			}()
		}
	}()
	return l.Addr().String()
}

// WaitListening waits until addr accepts TCP connections inside namespace ns.
func WaitListening(ns, addr string, timeout time.Duration, exited <-chan struct{}) error {
	deadline := time.Now().Add(timeout)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		c, err := DialContext(ctx, ns, "tcp", addr)
		cancel()
		if err == nil {
			c.Close()
			return nil
		}
		select {
		case <-exited:
			return errors.New("the process exited")
		default:
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("nothing listens on %s in %s after %s: %w", addr, ns, timeout, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// teardown kills every process in the bed's namespaces and deletes them.
func (b *Bed) teardown() {
	b.mu.Lock()
	nss := append([]string(nil), b.nss...)
	b.mu.Unlock()
	for i := len(nss) - 1; i >= 0; i-- {
		if err := removeNetns(nss[i]); err != nil {
			b.t.Errorf("Failed to remove namespace %s: %v", nss[i], err)
		}
	}
	b.mu.Lock()
	cgs := append([]string(nil), b.cgroups...)
	b.mu.Unlock()
	for _, cg := range cgs {
		removeCgroups(cg)
	}
}

// removeNetns kills the processes still inside ns, then deletes it (its links go with it).
func removeNetns(ns string) error {
	killNetnsProcesses(ns)
	out, err := exec.Command("ip", "netns", "del", ns).CombinedOutput()
	if err != nil && !strings.Contains(string(out), "No such file") {
		return fmt.Errorf("ip netns del %s: %w: %s", ns, err, bytes.TrimSpace(out))
	}
	return nil
}

// killNetnsProcesses kills every process inside ns and waits (up to 2.5 s) until none is left.
func killNetnsProcesses(ns string) {
	for attempt := 0; attempt < 50; attempt++ {
		out, err := exec.Command("ip", "netns", "pids", ns).Output()
		if err != nil {
			break
		}
		pids := strings.Fields(string(out))
		if len(pids) == 0 {
			break
		}
		for _, p := range pids {
			if pid, err := strconv.Atoi(p); err == nil {
				_ = syscall.Kill(pid, syscall.SIGKILL)
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Namespaces lists the bed's namespaces.
func (b *Bed) Namespaces() []string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return append([]string(nil), b.nss...)
}

// CleanStale removes namespaces (and their processes) left by test processes that
// no longer exist, and the bed's temporary directories older than six hours.
func CleanStale() {
	out, err := exec.Command("ip", "netns", "list").Output()
	if err != nil {
		return
	}
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		if len(f) == 0 || !strings.HasPrefix(f[0], namePrefix) {
			continue
		}
		pidStr, _, _ := strings.Cut(strings.TrimPrefix(f[0], namePrefix), "-")
		pid, err := strconv.Atoi(pidStr)
		if err != nil || pid <= 0 {
			continue
		}
		if err := syscall.Kill(pid, 0); err == nil || errors.Is(err, syscall.EPERM) {
			continue // its owner is alive
		}
		_ = removeNetns(f[0])
	}
	// Temporary directories of crashed runs (VM sockets and logs, daemon data): by
	// age, since their owner is not recorded; no test lives for hours.
	for _, pat := range []string{"gvm-*", "gnbd-*", "gtb-*"} {
		dirs, _ := filepath.Glob(filepath.Join(os.TempDir(), pat))
		for _, d := range dirs {
			if st, err := os.Lstat(d); err == nil && st.IsDir() && time.Since(st.ModTime()) > 6*time.Hour {
				_ = os.RemoveAll(d)
			}
		}
	}
}
