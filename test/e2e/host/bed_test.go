// Package host_test checks `grow hostd` end to end: real agents in network
// namespaces, real QEMU guests booting from NBD disks, real taps, rules and shaping.
// These tests need root, QEMU and the test guest (`make guest`); they are skipped with -short.
package host_test

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

// subnet is the guest network of a bed: hosts are .1, .2, ...; the client is .100.
const subnet = "10.77.0."

// bed is a set of hosts in network namespaces, their bridges joined by veths, plus a
// client namespace on the same network, each host running `grow hostd`.
type bed struct {
	t      *testing.T
	id     string
	dir    string
	hosts  []*agentHost
	client string // netns of the client
}

// agentHost is one hypervisor host of the bed.
type agentHost struct {
	bed    *bed
	idx    int
	ns     string
	ip     string
	data   string
	url    string
	token  string
	cmd    *exec.Cmd
	waited chan struct{}
	api    *agentclient.Client
}

func need(t *testing.T) {
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

func randHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// newBed builds n hosts and a client; everything is torn down when the test ends.
func newBed(t *testing.T, n int) *bed {
	need(t)
	b := &bed{t: t, id: randHex(3), dir: t.TempDir()}
	t.Cleanup(b.teardown)
	mkns := func(name string) {
		sh(t, "ip", "netns", "add", name)
		sh(t, "ip", "-n", name, "link", "set", "lo", "up")
	}
	for i := 0; i < n; i++ {
		ns := fmt.Sprintf("gh%s-%d", b.id, i)
		mkns(ns)
		h := &agentHost{bed: b, idx: i, ns: ns, ip: subnet + strconv.Itoa(i+1), data: filepath.Join(b.dir, fmt.Sprintf("host%d", i))}
		b.hosts = append(b.hosts, h)
		sh(t, "ip", "-n", ns, "link", "add", "br0", "type", "bridge")
		sh(t, "ip", "-n", ns, "link", "set", "br0", "up")
		sh(t, "ip", "-n", ns, "addr", "add", h.ip+"/24", "dev", "br0")
		if i > 0 { // join this host's bridge to host 0's
			b.link(b.hosts[0].ns, ns, "br0", fmt.Sprintf("h%d", i))
		}
	}
	b.client = fmt.Sprintf("gh%s-c", b.id)
	mkns(b.client)
	b.link(b.hosts[0].ns, b.client, "", "c")
	sh(t, "ip", "-n", b.client, "addr", "add", subnet+"100/24", "dev", "eth0")
	for _, h := range b.hosts {
		h.start(t)
	}
	return b
}

// link joins netns a's br0 to netns z by a veth; in z the end is enslaved to bridge
// (or, with bridge "", named eth0 and left for an address).
func (b *bed) link(a, z, bridge, tag string) {
	t := b.t
	va, vz := "gv"+b.id+tag+"a", "gv"+b.id+tag+"z"
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

// start runs grow hostd in the host's namespace (only the network is entered, so
// the agent sees the host's cgroups) and waits for its API.
func (h *agentHost) start(t *testing.T) {
	t.Helper()
	logf, err := os.OpenFile(filepath.Join(h.bed.dir, fmt.Sprintf("hostd%d.log", h.idx)), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("nsenter", "--net=/run/netns/"+h.ns, testbed.GrowBinary(t), "hostd",
		"--data", h.data, "--api", h.ip+":0", "--bridge", "br0", "--cgroup-parent", "grow-e2e-"+h.bed.id)
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
		h.url = "http://" + addr
	case <-h.waited:
		t.Fatalf("hostd on %s exited: %s", h.ns, h.log())
	case <-time.After(20 * time.Second):
		t.Fatalf("hostd on %s did not start: %s", h.ns, h.log())
	}
	tok, err := os.ReadFile(filepath.Join(h.data, "admin.token"))
	if err != nil {
		t.Fatal(err)
	}
	h.token = strings.TrimSpace(string(tok))
	hc := &http.Client{Transport: &http.Transport{DialContext: nsDialer(h.ns), DisableKeepAlives: false}, Timeout: 2 * time.Minute}
	if h.api, err = agentclient.NewWithHTTPClient(h.url, h.token, hc); err != nil {
		t.Fatal(err)
	}
}

// stop ends the agent (SIGTERM, then SIGKILL); its VMs keep running.
func (h *agentHost) stop(sig syscall.Signal) {
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

func (h *agentHost) log() string {
	b, _ := os.ReadFile(filepath.Join(h.bed.dir, fmt.Sprintf("hostd%d.log", h.idx)))
	if len(b) > 4000 {
		b = b[len(b)-4000:]
	}
	return string(b)
}

func (b *bed) teardown() {
	for _, h := range b.hosts {
		if b.t.Failed() {
			b.t.Logf("hostd %d log:\n%s", h.idx, h.log())
		}
		h.stop(syscall.SIGTERM)
	}
	// Every QEMU the bed's agents started has its sockets under the bed's directory.
	for _, pid := range qemuPIDsUnder(b.dir) {
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
	deadline := time.Now().Add(5 * time.Second)
	for len(qemuPIDsUnder(b.dir)) > 0 && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	for _, h := range b.hosts {
		_ = exec.Command("ip", "netns", "del", h.ns).Run()
	}
	_ = exec.Command("ip", "netns", "del", b.client).Run()
	for _, c := range []string{"cpu", "memory"} {
		p := filepath.Join("/sys/fs/cgroup", c, "grow-e2e-"+b.id)
		entries, _ := os.ReadDir(p)
		for _, e := range entries {
			if e.IsDir() {
				_ = os.Remove(filepath.Join(p, e.Name()))
			}
		}
		_ = os.Remove(p)
	}
}

// qemuPIDsUnder lists live processes whose command line mentions dir.
func qemuPIDsUnder(dir string) []int {
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

// nsDialer dials from inside network namespace ns.
func nsDialer(ns string) func(ctx context.Context, network, addr string) (net.Conn, error) {
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

// inNS runs a command in a namespace and returns its output.
func inNS(ns string, timeout time.Duration, name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	out, err := exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", ns, name}, args...)...).CombinedOutput()
	return string(out), err
}

// guestVM is a test guest: its NBD disks and its spec.
type guestVM struct {
	spec     hostapi.VMSpec
	ip       string
	dataFile string // the writer's disk image ("" if none)
}

var macN = struct {
	sync.Mutex
	n int
}{}

// newGuest prepares a guest named name with address subnet+ipLast: a root disk copied
// from the gold master and, with a data disk, a blank 16 MiB disk for the writer.
func newGuest(t *testing.T, name string, ipLast int, dataDisk bool, run ...string) *guestVM {
	t.Helper()
	dir := t.TempDir()
	guestDir := testbed.GuestDir(t)
	macN.Lock()
	macN.n++
	mac := fmt.Sprintf("52:54:00:%02x:%02x:%02x", ipLast, macN.n&0xff, os.Getpid()&0xff)
	macN.Unlock()
	ip := subnet + strconv.Itoa(ipLast)
	root := testbed.StartQemuNBD(t, testbed.CopyGuestImage(t, dir))
	g := &guestVM{ip: ip}
	disks := []hostapi.Disk{{ID: "root", Socket: root.Socket, Export: "", ReconnectDelay: 5}}
	if dataDisk {
		g.dataFile = testbed.BlankImage(t, filepath.Join(dir, "data.raw"), 16<<20)
		d := testbed.StartQemuNBD(t, g.dataFile)
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
	g.spec = hostapi.VMSpec{
		Name: name, VCPUs: 1, MemoryMiB: 256,
		Disks: disks,
		NICs:  []hostapi.NIC{{MAC: mac, IPv4: []string{ip}}},
		Seed:  &hostapi.Seed{MetaData: meta, UserData: user, NetworkConfig: netcfg},
		Boot: &hostapi.DirectBoot{Kernel: filepath.Join(guestDir, "vmlinux"), Initrd: filepath.Join(guestDir, "initrd.img"),
			Append: "console=ttyS0 no_timer_check"},
	}
	return g
}

// attachConsole follows a VM's console over the agent's websocket API.
func attachConsole(t *testing.T, h *agentHost, name string) *testbed.Console {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	hdr := http.Header{}
	hdr.Set("Authorization", "Bearer "+h.token)
	ws, _, err := websocket.Dial(ctx, h.api.ConsoleURL(name), &websocket.DialOptions{HTTPHeader: hdr, HTTPClient: h.api.HTTPClient()})
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

// probe asks the guest's responder (TCP 7777) from the client namespace.
func (b *bed) probe(ip string, timeout time.Duration) (hostname string, counter, seq uint64, err error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	c, err := nsDialer(b.client)(ctx, "tcp", ip+":7777")
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

// waitState polls a VM until it reaches state.
func waitState(t *testing.T, h *agentHost, name, state string, timeout time.Duration) hostapi.VM {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		vm, err := h.api.Get(context.Background(), name)
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

// waitReady waits for a complete GROW-READY line after offset from (the console may
// deliver a line in pieces, so the line end is part of the match).
func waitReady(c *testbed.Console, from int, timeout time.Duration) (testbed.Ready, error) {
	m, _, err := c.WaitFrom(from, readyLineRe, timeout)
	if err != nil {
		return testbed.Ready{}, err
	}
	return testbed.ParseReady(m[1]), nil
}

// waitProbe retries probe until the responder answers.
func (b *bed) waitProbe(t *testing.T, ip string, timeout time.Duration) (hostname string, counter, seq uint64) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		h, c, s, err := b.probe(ip, 3*time.Second)
		if err == nil {
			return h, c, s
		}
		if time.Now().After(deadline) {
			t.Fatalf("responder at %s did not answer within %s: %v", ip, timeout, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// inNSStdin runs a command with stdin in a namespace.
func inNSStdin(ns, stdin string, name string, args ...string) (string, error) {
	cmd := exec.Command("ip", append([]string{"netns", "exec", ns, name}, args...)...)
	cmd.Stdin = strings.NewReader(stdin)
	out, err := cmd.CombinedOutput()
	return string(out), err
}
