package controller

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netns"

	"github.com/growserver/grow/internal/authtoken"
	"github.com/growserver/grow/internal/storage/adminclient"
	"github.com/growserver/grow/internal/storage/witness"
)

// runTestWitness serves a witness ("DIR ADDR") until SIGTERM; used inside a namespace.
func runTestWitness(arg string) int {
	dir, addr, _ := strings.Cut(arg, " ")
	tok, err := authtoken.LoadOrCreate(filepath.Join(dir, "admin.token"))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	st, err := witness.Open(dir)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	l, err := net.Listen("tcp", addr)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	srv := &http.Server{Handler: witness.Handler(st, tok)}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM)
	defer stop()
	go func() { <-ctx.Done(); srv.Close() }()
	_ = srv.Serve(l)
	return 0
}

func run(t *testing.T, args ...string) string {
	t.Helper()
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil {
		t.Fatalf("%v: %v\n%s", args, err, out)
	}
	return string(out)
}

// nsClient is an HTTP client whose connections are made inside namespace ns.
func nsClient(ns string) *http.Client {
	dial := func(ctx context.Context, network, addr string) (net.Conn, error) {
		type res struct {
			c   net.Conn
			err error
		}
		ch := make(chan res, 1)
		go func() {
			// The thread stays locked and is discarded when this goroutine ends.
			runtime.LockOSThread()
			h, err := netns.GetFromName(ns)
			if err != nil {
				ch <- res{nil, err}
				return
			}
			defer h.Close()
			if err := netns.Set(h); err != nil {
				ch <- res{nil, err}
				return
			}
			var d net.Dialer
			c, err := d.DialContext(ctx, network, addr)
			ch <- res{c, err}
		}()
		r := <-ch
		return r.c, r.err
	}
	return &http.Client{Transport: &http.Transport{DialContext: dial, DisableKeepAlives: true}, Timeout: 10 * time.Second}
}

func hasAddr(t *testing.T, ns, ip string) bool {
	t.Helper()
	return strings.Contains(run(t, "ip", "-n", ns, "-4", "addr", "show", "dev", "eth0"), " "+ip+"/")
}

// The service address follows the volume's primary: a kill -9 moves it to the
// partner (announced by gratuitous ARP, the dead side's copy lapses by itself), a
// client on the segment reconnects to the same address and finds its data, the
// returning controller does not take it back, and resume does.
// segment is a test bed: namespaces h (bridge, witness, clients), a and b (one
// controller each) on one L2 segment 10.77.0.0/24.
type segment struct {
	nsH, nsA, nsB string
	a, b          *node
	ips           map[string]string
}

func newSegment(t *testing.T, tag string) *segment {
	t.Helper()
	pre := fmt.Sprintf("g%s%d", tag, os.Getpid()%100000)
	nsH, nsA, nsB := pre+"-h", pre+"-a", pre+"-b"
	t.Cleanup(func() {
		for _, ns := range []string{nsA, nsB, nsH} {
			_ = exec.Command("ip", "netns", "del", ns).Run()
		}
	})
	for _, ns := range []string{nsH, nsA, nsB} {
		run(t, "ip", "netns", "add", ns)
		run(t, "ip", "-n", ns, "link", "set", "lo", "up")
	}
	run(t, "ip", "-n", nsH, "link", "add", "br0", "type", "bridge")
	run(t, "ip", "-n", nsH, "addr", "add", "10.77.0.100/24", "dev", "br0")
	run(t, "ip", "-n", nsH, "addr", "add", "10.77.0.200/24", "dev", "br0") // the witness's own address
	run(t, "ip", "-n", nsH, "link", "set", "br0", "up")
	ips := map[string]string{nsA: "10.77.0.1", nsB: "10.77.0.2"}
	for i, ns := range []string{nsA, nsB} {
		v := fmt.Sprintf("v%d%s", i, pre)
		run(t, "ip", "link", "add", v, "netns", nsH, "type", "veth", "peer", "name", "eth0", "netns", ns)
		run(t, "ip", "-n", nsH, "link", "set", v, "master", "br0", "up")
		run(t, "ip", "-n", ns, "addr", "add", ips[ns]+"/24", "dev", "eth0")
		run(t, "ip", "-n", ns, "link", "set", "eth0", "up")
	}

	// The witness runs on the segment too.
	wdir := t.TempDir()
	if err := os.WriteFile(filepath.Join(wdir, "admin.token"), []byte("wtok\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	wcmd := exec.Command("ip", "netns", "exec", nsH, os.Args[0], "-test.run=^$")
	wcmd.Env = append(os.Environ(), "GROW_TEST_WITNESS="+wdir+" 10.77.0.200:7400")
	if err := wcmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = wcmd.Process.Kill(); _ = wcmd.Wait() })

	a, b, _ := testPair(t)
	svc := map[*node]string{a: "10.77.0.11", b: "10.77.0.12"}
	for _, n := range []*node{a, b} {
		ns := map[*node]string{a: nsA, b: nsB}[n]
		ip := ips[ns]
		n.netns = ns
		n.cfg.APIAddr, n.cfg.NBDAddr = ip+":7480", "0.0.0.0:10809"
		n.cfg.Mirror.Listen = ip + ":7481"
		n.cfg.Mirror.Witness, n.cfg.Mirror.WitnessTokenFile = "http://10.77.0.200:7400", filepath.Join(wdir, "admin.token")
		n.cfg.Mirror.ServiceAddress, n.cfg.Mirror.ServiceDev = svc[n]+"/24", "eth0"
		n.cl, _ = adminclient.New("http://"+n.cfg.APIAddr, n.token)
		n.cl = n.cl.WithHTTPClient(nsClient(nsH))
	}
	a.cfg.Mirror.Peer, b.cfg.Mirror.Peer = "http://"+b.cfg.APIAddr, "http://"+a.cfg.APIAddr
	a.start()
	b.start()
	pairUp(t, a, b)
	return &segment{nsH: nsH, nsA: nsA, nsB: nsB, a: a, b: b, ips: ips}
}

// qio runs qemu-io in the client namespace against addr and returns the error.
func (sg *segment) qio(addr, vol string, cmds ...string) (string, error) {
	args := []string{"netns", "exec", sg.nsH, "qemu-io", "-f", "raw"}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	args = append(args, "nbd://"+addr+"/"+vol)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	t0 := time.Now()
	out, err := exec.CommandContext(ctx, "ip", args...).CombinedOutput()
	if d := time.Since(t0); d > 5*time.Second {
		fmt.Fprintf(os.Stderr, "qemu-io %s %v took %v\n", addr, cmds, d)
	}
	if err == nil && (strings.Contains(string(out), "failed") || strings.Contains(string(out), "error")) {
		err = fmt.Errorf("qemu-io reported a failure")
	}
	return string(out), err
}

func TestMirrorServiceAddressMoves(t *testing.T) {
	needQemuIO(t)
	if os.Geteuid() != 0 {
		t.Skip("needs root for network namespaces")
	}
	sg := newSegment(t, "m")
	a, b, nsH, nsA, nsB := sg.a, sg.b, sg.nsH, sg.nsA, sg.nsB
	ctx := context.Background()

	name := ""
	for i := 0; name == ""; i++ {
		if n := fmt.Sprintf("s%d", i); homeOf(n, a.name, b.name) == a.name {
			name = n
		}
	}
	if _, err := b.cl.CreateVolume(ctx, name, 32<<20); err != nil {
		t.Fatal(err)
	}
	v := a.waitState(t, name, "primary", adminclient.MirrorSynced, 10*time.Second)
	if v.NBDAddress != "10.77.0.11:10809" {
		t.Fatalf("nbd_address %s, want the home's service address", v.NBDAddress)
	}
	waitFor(t, 5*time.Second, "a to hold its address", func() (bool, string) {
		return hasAddr(t, nsA, "10.77.0.11") && hasAddr(t, nsB, "10.77.0.12") && !hasAddr(t, nsB, "10.77.0.11"), ""
	})
	qio := func(cmds ...string) {
		t.Helper()
		args := []string{"netns", "exec", nsH, "qemu-io", "-f", "raw"}
		for _, c := range cmds {
			args = append(args, "-c", c)
		}
		args = append(args, "nbd://10.77.0.11:10809/"+name)
		out, err := exec.Command("ip", args...).CombinedOutput()
		if err != nil || strings.Contains(string(out), "failed") || strings.Contains(string(out), "error") {
			t.Fatalf("qemu-io %v: %v\n%s", cmds, err, out)
		}
	}
	qio("write -P 0x5a 0 1M", "flush")

	a.kill()
	b.waitState(t, name, "primary", adminclient.MirrorDegraded, 15*time.Second)
	waitFor(t, 8*time.Second, "the address to move to b and lapse on a", func() (bool, string) {
		return hasAddr(t, nsB, "10.77.0.11") && !hasAddr(t, nsA, "10.77.0.11"), ""
	})
	macB := strings.Fields(run(t, "ip", "netns", "exec", nsB, "cat", "/sys/class/net/eth0/address"))[0]
	waitFor(t, 5*time.Second, "the segment to learn b's MAC for the address", func() (bool, string) {
		out := run(t, "ip", "-n", nsH, "neigh", "show", "10.77.0.11")
		return strings.Contains(out, macB), out
	})
	qio("read -P 0x5a 0 1M", "write -P 0x6b 2M 64k", "flush")

	a.start()
	a.waitState(t, name, "secondary", adminclient.MirrorSynced, 20*time.Second)
	time.Sleep(time.Second)
	if hasAddr(t, nsA, "10.77.0.11") {
		t.Fatal("the returned controller took its address back before resume")
	}
	res, err := a.cl.Resume(ctx, a.name)
	for err == nil && !res.Done {
		time.Sleep(200 * time.Millisecond)
		res, err = a.cl.Resume(ctx, a.name)
	}
	if err != nil {
		t.Fatal(err)
	}
	a.waitState(t, name, "primary", adminclient.MirrorSynced, 10*time.Second)
	waitFor(t, 5*time.Second, "the address to return to a", func() (bool, string) {
		return hasAddr(t, nsA, "10.77.0.11") && !hasAddr(t, nsB, "10.77.0.11"), ""
	})
	qio("read -P 0x5a 0 1M", "read -P 0x6b 2M 64k")
}

// A partition between the controllers (each still reaches the witness and the
// clients): the primary keeps the volume (the witness grants it the next epoch), the
// secondary's takeover is refused, so clients writing to either controller see at
// most one side accept; after the link heals the secondary is resynced. Then the
// primary loses the witness too: it freezes and gives its address up, the partner
// takes over, and clients follow the address.
func TestMirrorPartition(t *testing.T) {
	needQemuIO(t)
	if os.Geteuid() != 0 {
		t.Skip("needs root for network namespaces")
	}
	sg := newSegment(t, "p")
	a, b := sg.a, sg.b
	ctx := context.Background()
	name := ""
	for i := 0; name == ""; i++ {
		if n := fmt.Sprintf("p%d", i); homeOf(n, a.name, b.name) == a.name {
			name = n
		}
	}
	if _, err := a.cl.CreateVolume(ctx, name, 32<<20); err != nil {
		t.Fatal(err)
	}
	a.waitState(t, name, "primary", adminclient.MirrorSynced, 10*time.Second)
	b.waitState(t, name, "secondary", adminclient.MirrorSynced, 10*time.Second)
	if out, err := sg.qio("10.77.0.11:10809", name, "write -P 0x01 0 1M", "flush"); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	cut := func(ns, dst string, on bool) {
		op := "add"
		if !on {
			op = "del"
		}
		run(t, "ip", "-n", ns, "route", op, "blackhole", dst+"/32")
	}
	cut(sg.nsA, "10.77.0.2", true)
	cut(sg.nsB, "10.77.0.1", true)
	start := time.Now()
	// Clients keep writing to the service address and try the secondary directly.
	if out, err := sg.qio("10.77.0.11:10809", name, "write -P 0x02 1M 1M", "flush"); err != nil {
		t.Fatalf("the primary refused writes during the partition: %v\n%s", err, out)
	}
	t.Logf("write across the partition took %v", time.Since(start))
	time.Sleep(4 * time.Second) // past the secondary's takeover delay
	for i := 0; i < 3; i++ {
		if out, err := sg.qio("10.77.0.2:10809", name, "write -P 0x0f 8M 64k"); err == nil {
			t.Fatalf("the cut-off secondary accepted a write:\n%s", out)
		}
		if out, err := sg.qio("10.77.0.11:10809", name, fmt.Sprintf("write -P 0x%02x %dM 64k", 0x10+i, 2+i), "flush"); err != nil {
			t.Fatalf("the primary refused writes during the partition: %v\n%s", err, out)
		}
	}
	av := a.waitState(t, name, "primary", adminclient.MirrorDegraded, 5*time.Second)
	bv := b.waitState(t, name, "secondary", adminclient.MirrorStale, 5*time.Second)
	if av.Mirror.Epoch <= bv.Mirror.Epoch {
		t.Fatalf("epochs after the partition: primary %d, secondary %d", av.Mirror.Epoch, bv.Mirror.Epoch)
	}
	cut(sg.nsA, "10.77.0.2", false)
	cut(sg.nsB, "10.77.0.1", false)
	a.waitState(t, name, "primary", adminclient.MirrorSynced, 15*time.Second)
	b.waitState(t, name, "secondary", adminclient.MirrorSynced, 10*time.Second)

	// Now a loses both its partner and the witness: it must freeze and drop the address.
	cut(sg.nsA, "10.77.0.2", true)
	cut(sg.nsA, "10.77.0.200", true)
	cut(sg.nsB, "10.77.0.1", true)
	b.waitState(t, name, "primary", adminclient.MirrorDegraded, 15*time.Second)
	waitFor(t, 8*time.Second, "the address to be on b only", func() (bool, string) {
		return hasAddr(t, sg.nsB, "10.77.0.11") && !hasAddr(t, sg.nsA, "10.77.0.11"), ""
	})
	if out, err := sg.qio("10.77.0.11:10809", name, "read -P 0x01 0 1M", "read -P 0x02 1M 1M", "read -P 0x12 4M 64k", "write -P 0x33 9M 64k", "flush"); err != nil {
		t.Fatalf("after the takeover: %v\n%s", err, out)
	}
	if out, err := sg.qio("10.77.0.1:10809", name, "write -P 0x0e 8M 64k"); err == nil {
		t.Fatalf("the fenced old primary accepted a write:\n%s", out)
	}
	cut(sg.nsA, "10.77.0.2", false)
	cut(sg.nsA, "10.77.0.200", false)
	cut(sg.nsB, "10.77.0.1", false)
	b.waitState(t, name, "primary", adminclient.MirrorSynced, 15*time.Second)
	a.waitState(t, name, "secondary", adminclient.MirrorSynced, 10*time.Second)
	a.stop()
	b.stop()
	sameBytes(t, name, readVolume(t, a.cfg.DataDir, name), readVolume(t, b.cfg.DataDir, name))
}

// Drain and resume move the address back and forth within seconds; a client on the
// segment must reach the current holder each time (the neighbours follow the
// gratuitous ARP of the new holder, never a late one of the old).
func TestMirrorAddressFollowsQuickMoves(t *testing.T) {
	needQemuIO(t)
	if os.Geteuid() != 0 {
		t.Skip("needs root for network namespaces")
	}
	sg := newSegment(t, "q")
	a, b := sg.a, sg.b
	ctx := context.Background()
	name := ""
	for i := 0; name == ""; i++ {
		if n := fmt.Sprintf("q%d", i); homeOf(n, a.name, b.name) == a.name {
			name = n
		}
	}
	if _, err := a.cl.CreateVolume(ctx, name, 16<<20); err != nil {
		t.Fatal(err)
	}
	a.waitState(t, name, "primary", adminclient.MirrorSynced, 10*time.Second)
	step := func(what string, call func() (*adminclient.MoveResult, error), holder, other string) {
		t.Helper()
		res, err := call()
		for err == nil && !res.Done {
			time.Sleep(100 * time.Millisecond)
			res, err = call()
		}
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		start := time.Now()
		if out, err := sg.qio("10.77.0.11:10809", name, "write -P 0x42 0 64k", "flush"); err != nil {
			t.Fatalf("after %s: %v\n%s", what, err, out)
		}
		t.Logf("after %s: reached the volume in %v", what, time.Since(start))
		if !hasAddr(t, holder, "10.77.0.11") || hasAddr(t, other, "10.77.0.11") {
			t.Fatalf("after %s the address is not on the right side only", what)
		}
	}
	for round := 0; round < 3; round++ {
		step("drain", func() (*adminclient.MoveResult, error) { return a.cl.Drain(ctx, a.name) }, sg.nsB, sg.nsA)
		step("resume", func() (*adminclient.MoveResult, error) { return a.cl.Resume(ctx, a.name) }, sg.nsA, sg.nsB)
	}
}
