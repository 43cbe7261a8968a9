// Package hostbed builds what the host agent's end-to-end tests and the migration
// benchmark run on: hosts in network namespaces joined by a guest network, each running
// `grow hostd`, a client namespace, and test guests on NBD disks. Everything it makes
// is removed when the test ends; it must never touch anything outside the namespaces,
// temporary directories and processes it created.
package hostbed

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/vishvananda/netns"

	"github.com/growserver/grow/guest/seed"
	"github.com/growserver/grow/internal/host/agentclient"
	"github.com/growserver/grow/internal/host/hostapi"
	"github.com/growserver/grow/test/testbed"
)

// Subnet is the guest network of a bed: hosts are .1, .2, ...; the client is .100.
const Subnet = "10.77.0."

// Bed is a set of hosts in network namespaces, their bridges joined by veths, plus a
// client namespace on the same network, each host running `grow hostd`.
type Bed struct {
	t      testing.TB
	ID     string
	Dir    string
	Hosts  []*Host
	Client string // netns of the client
}

// Host is one hypervisor host of the bed.
type Host struct {
	bed    *Bed
	Idx    int
	NS     string // network namespace
	IP     string // address on the guest network (API and migration stream)
	Data   string // the agent's --data
	URL    string
	Token  string
	cmd    *exec.Cmd
	waited chan struct{}
	API    *agentclient.Client
}

func Need(t testing.TB) {
	t.Helper()
	if testing.Short() {
		t.Skip("end-to-end test: needs root, QEMU and the test guest")
	}
	if os.Geteuid() != 0 {
		t.Fatal("the host agent end-to-end tests need root (network namespaces, taps, cgroups)")
	}
}

func sh(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v: %s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

func RandHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// New builds n hosts and a client; everything is torn down when the test ends.
func New(t testing.TB, n int) *Bed {
	Need(t)
	b := &Bed{t: t, ID: RandHex(3), Dir: t.TempDir()}
	t.Cleanup(b.teardown)
	mkns := func(name string) {
		sh(t, "ip", "netns", "add", name)
		sh(t, "ip", "-n", name, "link", "set", "lo", "up")
	}
	for i := 0; i < n; i++ {
		ns := fmt.Sprintf("gh%s-%d", b.ID, i)
		mkns(ns)
		h := &Host{bed: b, Idx: i, NS: ns, IP: Subnet + strconv.Itoa(i+1), Data: filepath.Join(b.Dir, fmt.Sprintf("host%d", i))}
		b.Hosts = append(b.Hosts, h)
		sh(t, "ip", "-n", ns, "link", "add", "br0", "type", "bridge")
		sh(t, "ip", "-n", ns, "link", "set", "br0", "up")
		sh(t, "ip", "-n", ns, "addr", "add", h.IP+"/24", "dev", "br0")
		if i > 0 { // join this host's bridge to host 0's
			b.link(b.Hosts[0].NS, ns, "br0", fmt.Sprintf("h%d", i))
		}
	}
	b.Client = fmt.Sprintf("gh%s-c", b.ID)
	mkns(b.Client)
	b.link(b.Hosts[0].NS, b.Client, "", "c")
	sh(t, "ip", "-n", b.Client, "addr", "add", Subnet+"100/24", "dev", "eth0")
	for _, h := range b.Hosts {
		h.Start(t)
	}
	return b
}

// link joins netns a's br0 to netns z by a veth; in z the end is enslaved to bridge
// (or, with bridge "", named eth0 and left for an address).
func (b *Bed) link(a, z, bridge, tag string) {
	t := b.t
	va, vz := "gv"+b.ID+tag+"a", "gv"+b.ID+tag+"z"
	sh(t, "ip", "link", "add", va, "type", "veth", "peer", "name", vz)
	sh(t, "ip", "link", "set", va, "netns", a)
	sh(t, "ip", "link", "set", vz, "netns", z)
	sh(t, "ip", "-n", a, "link", "set", va, "master", "br0", "up")
	if bridge != "" {
		sh(t, "ip", "-n", z, "link", "set", vz, "master", bridge, "up")
	} else {
		sh(t, "ip", "-n", z, "link", "set", vz, "name", "eth0")
		sh(t, "ip", "-n", z, "link", "set", "eth0", "up")
	}
}

// Start runs grow hostd in the host's namespace (only the network is entered, so
// the agent sees the host's cgroups) and waits for its API.
func (h *Host) Start(t testing.TB) {
	t.Helper()
	logf, err := os.OpenFile(filepath.Join(h.bed.Dir, fmt.Sprintf("hostd%d.log", h.Idx)), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	args := []string{"--net=/run/netns/" + h.NS, testbed.GrowBinary(t), "hostd",
		"--data", h.Data, "--api", h.IP + ":0", "--bridge", "br0", "--cgroup-parent", "grow-e2e-" + h.bed.ID}
	if q := os.Getenv("GROW_QEMU"); q != "" { // another QEMU build to test with
		args = append(args, "--qemu", q)
	}
	cmd := exec.Command("nsenter", args...)
	cmd.Stderr = logf
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("Failed to start hostd: %v", err)
	}
	logf.Close()
	h.cmd, h.waited = cmd, make(chan struct{})
	go func() { _ = cmd.Wait(); close(h.waited) }()
	lines := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			if a, ok := strings.CutPrefix(sc.Text(), "listening on "); ok {
				lines <- a
			}
		}
		_, _ = io.Copy(io.Discard, stdout)
	}()
	select {
	case addr := <-lines:
		h.URL = "http://" + addr
	case <-h.waited:
		t.Fatalf("hostd on %s exited: %s", h.NS, h.Log())
	case <-time.After(20 * time.Second):
		t.Fatalf("hostd on %s did not start: %s", h.NS, h.Log())
	}
	tok, err := os.ReadFile(filepath.Join(h.Data, "admin.token"))
	if err != nil {
		t.Fatal(err)
	}
	h.Token = strings.TrimSpace(string(tok))
	hc := &http.Client{Transport: &http.Transport{DialContext: NSDialer(h.NS), DisableKeepAlives: false}, Timeout: 2 * time.Minute}
	if h.API, err = agentclient.NewWithHTTPClient(h.URL, h.Token, hc); err != nil {
		t.Fatal(err)
	}
}

// PID is the process id of the running agent (0 when stopped).
func (h *Host) PID() int {
	if h.cmd == nil || h.cmd.Process == nil {
		return 0
	}
	return h.cmd.Process.Pid
}

// Stop ends the agent (SIGTERM, then SIGKILL); its VMs keep running.
func (h *Host) Stop(sig syscall.Signal) {
	if h.cmd == nil {
		return
	}
	_ = h.cmd.Process.Signal(sig)
	select {
	case <-h.waited:
	case <-time.After(10 * time.Second):
		_ = h.cmd.Process.Kill()
		<-h.waited
	}
	h.cmd = nil
}

func (h *Host) Log() string {
	b, _ := os.ReadFile(filepath.Join(h.bed.Dir, fmt.Sprintf("hostd%d.log", h.Idx)))
	if len(b) > 4000 {
		b = b[len(b)-4000:]
	}
	return string(b)
}

func (b *Bed) teardown() {
	for _, h := range b.Hosts {
		if b.t.Failed() {
			b.t.Logf("hostd %d log:\n%s", h.Idx, h.Log())
		}
		h.Stop(syscall.SIGTERM)
	}
	// Every QEMU the bed's agents started has its sockets under the bed's directory.
	for _, pid := range QEMUPIDsUnder(b.Dir) {
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
	deadline := time.Now().Add(5 * time.Second)
	for len(QEMUPIDsUnder(b.Dir)) > 0 && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	for _, h := range b.Hosts {
		_ = exec.Command("ip", "netns", "del", h.NS).Run()
	}
	_ = exec.Command("ip", "netns", "del", b.Client).Run()
	// Cgroups of VMs with limits: QEMU is gone, but an orphaned QEMU stays a zombie
	// until PID 1 reaps it, and until then its cgroup cannot be removed.
	deadline = time.Now().Add(15 * time.Second)
	for _, c := range []string{"cpu", "memory"} {
		p := filepath.Join("/sys/fs/cgroup", c, "grow-e2e-"+b.ID)
		for {
			entries, _ := os.ReadDir(p)
			for _, e := range entries {
				if e.IsDir() {
					_ = os.Remove(filepath.Join(p, e.Name()))
				}
			}
			err := os.Remove(p)
			if err == nil || os.IsNotExist(err) || time.Now().After(deadline) {
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
}

// QEMUPIDsUnder lists live processes whose command line mentions dir.
func QEMUPIDsUnder(dir string) []int {
	var pids []int
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil || !strings.Contains(string(b), dir) || !strings.HasPrefix(string(b), "qemu-system") {
			continue
		}
		if st, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat")); err == nil {
			if i := strings.LastIndexByte(string(st), ')'); i > 0 && i+2 < len(st) && st[i+2] == 'Z' {
				continue
			}
		}
		pids = append(pids, pid)
	}
	return pids
}

// NSDialer dials from inside network namespace ns.
func NSDialer(ns string) func(ctx context.Context, network, addr string) (net.Conn, error) {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			return nil, err
		}
		defer orig.Close()
		target, err := netns.GetFromName(ns)
		if err != nil {
			runtime.UnlockOSThread()
			return nil, err
		}
		defer target.Close()
		if err := netns.Set(target); err != nil {
			runtime.UnlockOSThread()
			return nil, err
		}
		var d net.Dialer
		c, err := d.DialContext(ctx, network, addr)
		if netns.Set(orig) == nil {
			runtime.UnlockOSThread() // else the thread dies with the goroutine
		}
		return c, err
	}
}

// InNS runs a command in a namespace and returns its output.
func InNS(ns string, timeout time.Duration, name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	out, err := exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", ns, name}, args...)...).CombinedOutput()
	return string(out), err
}

// Guest is a test guest: its NBD disks and its spec.
type Guest struct {
	Spec     hostapi.VMSpec
	IP       string
	DataFile string // the writer's disk image ("" if none)
}

var macN = struct {
	sync.Mutex
	n int
}{}

// NewGuest prepares a guest named name with address Subnet+ipLast: a root disk copied
// from the gold master and, with a data disk, a blank 16 MiB disk for the writer.
func NewGuest(t testing.TB, name string, ipLast int, dataDisk bool, run ...string) *Guest {
	t.Helper()
	dir := t.TempDir()
	guestDir := testbed.GuestDir(t)
	macN.Lock()
	macN.n++
	mac := fmt.Sprintf("52:54:00:%02x:%02x:%02x", ipLast, macN.n&0xff, os.Getpid()&0xff)
	macN.Unlock()
	ip := Subnet + strconv.Itoa(ipLast)
	root := testbed.StartQemuNBD(t, testbed.CopyGuestImage(t, dir))
	g := &Guest{IP: ip}
	disks := []hostapi.Disk{{ID: "root", Socket: root.Socket, Export: "", ReconnectDelay: 5}}
	if dataDisk {
		g.DataFile = testbed.BlankImage(t, filepath.Join(dir, "data.raw"), 16<<20)
		d := testbed.StartQemuNBD(t, g.DataFile)
		disks = append(disks, hostapi.Disk{ID: "data", Socket: d.Socket, Export: "", ReconnectDelay: 5})
	}
	s := testbed.Seed{
		Meta:    seed.MetaData{InstanceID: name + "-iid", LocalHostname: name + "-host"},
		Network: testbed.StaticNetwork(mac, []string{ip + "/24"}, ""),
		User:    testbed.Workloads(run...),
	}
	meta, user, netcfg, err := s.Files()
	if err != nil {
		t.Fatal(err)
	}
	g.Spec = hostapi.VMSpec{
		Name: name, VCPUs: 1, MemoryMiB: 256,
		Disks: disks,
		NICs:  []hostapi.NIC{{MAC: mac, IPv4: []string{ip}}},
		Seed:  &hostapi.Seed{MetaData: meta, UserData: user, NetworkConfig: netcfg},
		Boot: &hostapi.DirectBoot{Kernel: filepath.Join(guestDir, "vmlinux"), Initrd: filepath.Join(guestDir, "initrd.img"),
			Append: "console=ttyS0 no_timer_check"},
	}
	return g
}

// AttachConsole follows a VM's console over the agent's websocket API.
func AttachConsole(t testing.TB, h *Host, name string) *testbed.Console {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	hdr := http.Header{}
	hdr.Set("Authorization", "Bearer "+h.Token)
	ws, _, err := websocket.Dial(ctx, h.API.ConsoleURL(name), &websocket.DialOptions{HTTPHeader: hdr, HTTPClient: h.API.HTTPClient()})
	if err != nil {
		cancel()
		t.Fatalf("Failed to attach to the console of %s: %v", name, err)
	}
	conn := websocket.NetConn(ctx, ws, websocket.MessageBinary)
	c := testbed.NewConsole()
	c.In = conn
	go c.Copy(conn)
	t.Cleanup(func() { cancel(); conn.Close() })
	return c
}

var respRe = regexp.MustCompile(`GROW-RESP hostname=(\S+) counter=(\d+) seq=(\d+)`)

// Probe asks the guest's responder (TCP 7777) from the client namespace.
func (b *Bed) Probe(ip string, timeout time.Duration) (hostname string, counter, seq uint64, err error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	c, err := NSDialer(b.Client)(ctx, "tcp", ip+":7777")
	if err != nil {
		return "", 0, 0, err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(timeout))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return "", 0, 0, err
	}
	m := respRe.FindStringSubmatch(line)
	if m == nil {
		return "", 0, 0, fmt.Errorf("unexpected responder answer %q", line)
	}
	counter, _ = strconv.ParseUint(m[2], 10, 64)
	seq, _ = strconv.ParseUint(m[3], 10, 64)
	return m[1], counter, seq, nil
}

// WaitState polls a VM until it reaches state.
func WaitState(t testing.TB, h *Host, name, state string, timeout time.Duration) hostapi.VM {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		vm, err := h.API.Get(context.Background(), name)
		if err == nil && vm.State == state {
			return vm
		}
		if time.Now().After(deadline) {
			t.Fatalf("VM %s did not reach %s within %s (now %+v, err %v)", name, state, timeout, vm.State, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

var readyLineRe = regexp.MustCompile(`GROW-READY ([^\r\n]*)\r?\n`)

// WaitReady waits for a complete GROW-READY line after offset from (the console may
// deliver a line in pieces, so the line end is part of the match).
func WaitReady(c *testbed.Console, from int, timeout time.Duration) (testbed.Ready, error) {
	m, _, err := c.WaitFrom(from, readyLineRe, timeout)
	if err != nil {
		return testbed.Ready{}, err
	}
	return testbed.ParseReady(m[1]), nil
}

// WaitProbe retries probe until the responder answers.
func (b *Bed) WaitProbe(t testing.TB, ip string, timeout time.Duration) (hostname string, counter, seq uint64) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		h, c, s, err := b.Probe(ip, 3*time.Second)
		if err == nil {
			return h, c, s
		}
		if time.Now().After(deadline) {
			t.Fatalf("responder at %s did not answer within %s: %v", ip, timeout, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// InNSStdin runs a command with stdin in a namespace.
func InNSStdin(ns, stdin string, name string, args ...string) (string, error) {
	cmd := exec.Command("ip", append([]string{"netns", "exec", ns, name}, args...)...)
	cmd.Stdin = strings.NewReader(stdin)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// NSListen listens on TCP inside network namespace ns.
func NSListen(ns, addr string) (net.Listener, error) {
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		return nil, err
	}
	defer orig.Close()
	target, err := netns.GetFromName(ns)
	if err != nil {
		runtime.UnlockOSThread()
		return nil, err
	}
	defer target.Close()
	if err := netns.Set(target); err != nil {
		runtime.UnlockOSThread()
		return nil, err
	}
	l, err := net.Listen("tcp", addr)
	if netns.Set(orig) == nil {
		runtime.UnlockOSThread()
	}
	return l, err
}
