package controller

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	mathrand "math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime/pprof"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/growserver/grow/internal/storage/adminclient"
	"github.com/growserver/grow/internal/storage/pool"
	"github.com/growserver/grow/internal/storage/volume"
	"github.com/growserver/grow/internal/storage/witness"
)

// The mirror tests run each controller as a real process (this test binary re-executed
// with GROW_TEST_CONTROLLER set to its JSON config), so that kill -9 is a real crash.
func TestMain(m *testing.M) {
	if cfg := os.Getenv("GROW_TEST_CONTROLLER"); cfg != "" {
		os.Exit(runTestController(cfg))
	}
	if w := os.Getenv("GROW_TEST_WITNESS"); w != "" {
		os.Exit(runTestWitness(w))
	}
	os.Exit(m.Run())
}

func runTestController(js string) int {
	var cfg Config
	if err := json.Unmarshal([]byte(js), &cfg); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	cfg.Logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	c, err := Open(cfg)
	if err != nil {
		fmt.Fprintln(os.Stderr, "open:", err)
		return 1
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if path := os.Getenv("GROW_TEST_CPUPROFILE"); path != "" {
		profileOnSignal(path + "." + cfg.Mirror.Name)
	}
	if err := c.Serve(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "serve:", err)
		return 1
	}
	return 0
}

// profileOnSignal writes a CPU profile to path between SIGUSR1 and SIGUSR2.
func profileOnSignal(path string) {
	ch := make(chan os.Signal, 2)
	signal.Notify(ch, syscall.SIGUSR1, syscall.SIGUSR2)
	go func() {
		var f *os.File
		for sig := range ch {
			switch {
			case sig == syscall.SIGUSR1 && f == nil:
				var err error
				if f, err = os.Create(path); err == nil {
					_ = pprof.StartCPUProfile(f)
				}
			case sig == syscall.SIGUSR2 && f != nil:
				pprof.StopCPUProfile()
				f.Close()
				f = nil
			}
		}
	}()
}

// handedOut remembers the addresses freeAddr gave, which the kernel may offer again
// once their probe listener is closed (before the controller binds them).
var handedOut sync.Map

// freeAddr returns a loopback address for a controller to listen on later. Its port is
// below the kernel's ephemeral range, so that no outgoing connection (a controller
// dialing its partner, a qemu-io) can take it in the meantime, as one once took a port
// probed with ":0" before ctrl-b could bind it.
func freeAddr(t *testing.T) string {
	t.Helper()
	lo := 32768
	if b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range"); err == nil {
		if f := strings.Fields(string(b)); len(f) == 2 {
			if n, err := strconv.Atoi(f[0]); err == nil {
				lo = n
			}
		}
	}
	base := max(1024, lo-16384)
	for range 1000 {
		port := base
		if lo > base {
			port += mathrand.IntN(lo - base)
		}
		addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
		l, err := net.Listen("tcp", addr)
		if err != nil {
			continue
		}
		l.Close()
		if _, dup := handedOut.LoadOrStore(addr, true); !dup {
			return addr
		}
	}
	t.Fatal("no free port below the ephemeral range")
	return ""
}

// node is one controller process of a test pair.
type node struct {
	t       *testing.T
	name    string
	netns   string // run inside this network namespace ("" for none)
	cfg     Config
	token   string
	cmd     *exec.Cmd
	log     *bytes.Buffer
	logMu   *sync.Mutex
	cl      *adminclient.Client
	stopped chan struct{}
}

type lockedWriter struct {
	mu *sync.Mutex
	b  *bytes.Buffer
}

func (w lockedWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.Write(p)
}

// testPair makes two controllers A and B (not yet started) and a witness.
func testPair(t *testing.T) (*node, *node, *witness.Store) {
	t.Helper()
	wdir := t.TempDir()
	ws, err := witness.Open(wdir)
	if err != nil {
		t.Fatal(err)
	}
	wsrv := httptest.NewServer(witness.Handler(ws, "witness-token"))
	t.Cleanup(wsrv.Close)
	wtok := filepath.Join(wdir, "token")
	if err := os.WriteFile(wtok, []byte("witness-token\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	mk := func(name string) *node {
		dir := t.TempDir()
		tok := "token-of-" + name
		if err := os.WriteFile(filepath.Join(dir, "admin.token"), []byte(tok+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		n := &node{t: t, name: name, token: tok, log: &bytes.Buffer{}, logMu: &sync.Mutex{}}
		n.cfg = Config{DataDir: filepath.Join(dir, "data"), NBDAddr: freeAddr(t), APIAddr: freeAddr(t), NBDSocket: "none",
			PoolSize: 256 << 20, CacheSize: 8 << 20,
			Mirror: MirrorConfig{Name: name, Listen: freeAddr(t), Witness: wsrv.URL, WitnessTokenFile: wtok}}
		if err := os.MkdirAll(n.cfg.DataDir, 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(n.cfg.DataDir, "admin.token"), []byte(tok+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		n.cl, _ = adminclient.New("http://"+n.cfg.APIAddr, tok)
		return n
	}
	a, b := mk("ctrl-a"), mk("ctrl-b")
	for _, p := range [][2]*node{{a, b}, {b, a}} {
		me, peer := p[0], p[1]
		me.cfg.Mirror.Peer = "http://" + peer.cfg.APIAddr
		me.cfg.Mirror.PeerTokenFile = filepath.Join(peer.cfg.DataDir, "admin.token")
	}
	t.Cleanup(func() {
		for _, n := range []*node{a, b} {
			if t.Failed() && n.cmd != nil && os.Getenv("GROW_TEST_DUMP") != "" {
				_ = n.cmd.Process.Signal(syscall.SIGQUIT) // goroutine dump into the log
				time.Sleep(time.Second)
			}
			n.kill()
		}
		if t.Failed() {
			for _, n := range []*node{a, b} {
				n.logMu.Lock()
				t.Logf("log of %s:\n%s", n.name, n.log.String())
				n.logMu.Unlock()
			}
		}
	})
	return a, b, ws
}

// startedPair is testPair with both controllers running and seeing each other.
func startedPair(t *testing.T) (*node, *node, *witness.Store) {
	t.Helper()
	a, b, ws := testPair(t)
	a.start()
	b.start()
	pairUp(t, a, b)
	return a, b, ws
}

// importImage imports img as the raw image name through controller c.
func importImage(t *testing.T, c *node, name string, img []byte) {
	t.Helper()
	if _, err := c.cl.ImportImage(context.Background(), name, bytes.NewReader(img), int64(len(img)), adminclient.FormatRaw, nil); err != nil {
		t.Fatal(err)
	}
}

// syncedVolume creates a volume through c and waits until it is synced on both sides;
// it returns the primary, the secondary and the primary's view of the volume.
func syncedVolume(t *testing.T, c, a, b *node, name string, size int64) (*node, *node, *adminclient.Volume) {
	t.Helper()
	if _, err := c.cl.CreateVolume(context.Background(), name, size); err != nil {
		t.Fatal(err)
	}
	p, s := primaryAndSecondary(t, a, b, name)
	pv := p.waitState(t, name, "primary", adminclient.MirrorSynced, 10*time.Second)
	s.waitState(t, name, "secondary", adminclient.MirrorSynced, 10*time.Second)
	return p, s, pv
}

func (n *node) start() {
	n.t.Helper()
	js, err := json.Marshal(n.cfg)
	if err != nil {
		n.t.Fatal(err)
	}
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	if n.netns != "" {
		cmd = exec.Command("ip", "netns", "exec", n.netns, os.Args[0], "-test.run=^$")
	}
	cmd.Env = append(os.Environ(), "GROW_TEST_CONTROLLER="+string(js))
	w := lockedWriter{n.logMu, n.log}
	fmt.Fprintf(w, "---- start %s\n", time.Now().Format(time.RFC3339Nano))
	cmd.Stdout, cmd.Stderr = w, w
	if err := cmd.Start(); err != nil {
		n.t.Fatal(err)
	}
	n.cmd = cmd
	n.stopped = make(chan struct{})
	stopped := n.stopped
	go func() { cmd.Wait(); close(stopped) }()
	deadline := time.Now().Add(20 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		var err error
		if n.cfg.Mirror.Peer == "" {
			_, err = n.cl.Stats(ctx) // not paired (yet)
		} else {
			_, err = n.cl.MirrorStatus(ctx)
		}
		cancel()
		if err == nil {
			return
		}
		select {
		case <-stopped:
			n.t.Fatalf("%s exited at start:\n%s", n.name, n.logText())
		default:
		}
		if time.Now().After(deadline) {
			n.t.Fatalf("%s did not start: %v", n.name, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (n *node) logText() string {
	n.logMu.Lock()
	defer n.logMu.Unlock()
	return n.log.String()
}

// kill is kill -9.
func (n *node) kill() {
	if n.cmd == nil {
		return
	}
	_ = n.cmd.Process.Kill()
	<-n.stopped
	n.cmd = nil
}

// stop is SIGTERM and a clean exit.
func (n *node) stop() {
	if n.cmd == nil {
		return
	}
	_ = n.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-n.stopped:
	case <-time.After(40 * time.Second):
		n.t.Errorf("%s did not stop on SIGTERM", n.name)
		n.kill()
	}
	n.cmd = nil
}

// waitFor polls cond until it holds or the timeout passes.
func waitFor(t *testing.T, timeout time.Duration, what string, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	last := ""
	for {
		ok, s := cond()
		if ok {
			return
		}
		last = s
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s (last: %s)", what, last)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// metrics returns the controller's Prometheus text.
func (n *node) metrics(t *testing.T) string {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, "http://"+n.cfg.APIAddr+"/metrics", nil)
	req.Header.Set("Authorization", "Bearer "+n.token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}

func (n *node) volume(name string) *adminclient.Volume {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	v, err := n.cl.GetVolume(ctx, name)
	if err != nil {
		return nil
	}
	return v
}

// waitState waits until the volume has the given mirror role and state on n.
func (n *node) waitState(t *testing.T, vol, role, state string, timeout time.Duration) *adminclient.Volume {
	t.Helper()
	var got *adminclient.Volume
	waitFor(t, timeout, fmt.Sprintf("%s on %s to be %s/%s", vol, n.name, role, state), func() (bool, string) {
		got = n.volume(vol)
		if got == nil || got.Mirror == nil {
			return false, "no volume"
		}
		return got.Mirror.Role == role && got.Mirror.State == state, fmt.Sprintf("%+v", *got.Mirror)
	})
	return got
}

func pairUp(t *testing.T, a, b *node) {
	t.Helper()
	for _, n := range []*node{a, b} {
		waitFor(t, 15*time.Second, n.name+" to see its partner", func() (bool, string) {
			s, err := n.cl.MirrorStatus(context.Background())
			if err != nil {
				return false, err.Error()
			}
			return s.PartnerReachable, fmt.Sprintf("%+v", s)
		})
	}
}

// qemuIOAt runs qemu-io commands on an NBD export and returns its output and error.
func qemuIOAt(addr, export string, cmds ...string) (string, error) {
	args := []string{"-f", "raw"}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	args = append(args, fmt.Sprintf("nbd://%s/%s", addr, export))
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, "qemu-io", args...).CombinedOutput()
	if err == nil && (strings.Contains(string(out), "failed") || strings.Contains(string(out), "error") || strings.Contains(string(out), "Pattern verification")) {
		err = fmt.Errorf("qemu-io reported a failure")
	}
	return string(out), err
}

func needQemuIO(t *testing.T) {
	t.Helper()
	if testing.Short() {
		t.Skip("mirror pair tests run real controller processes and qemu-io")
	}
	if _, err := exec.LookPath("qemu-io"); err != nil {
		t.Fatalf("qemu-io is needed: %v", err)
	}
}

// readVolume reads a volume's whole content from a stopped controller's data directory.
func readVolume(t *testing.T, dataDir, name string) []byte {
	t.Helper()
	p, err := pool.Open(dataDir, []string{filepath.Join(dataDir, "disk0.img")}, pool.Options{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatalf("open pool of %s: %v", dataDir, err)
	}
	defer p.Close()
	mgr, err := volume.Open(filepath.Join(dataDir, "meta"), p, volume.Options{})
	if err != nil {
		t.Fatalf("open volumes of %s: %v", dataDir, err)
	}
	defer mgr.Close()
	h, err := mgr.Open(name)
	if err != nil {
		t.Fatalf("open %s in %s: %v", name, dataDir, err)
	}
	defer h.Close()
	buf := make([]byte, h.Size())
	if err := h.ReadAt(buf, 0); err != nil {
		t.Fatal(err)
	}
	return buf
}

func primaryAndSecondary(t *testing.T, a, b *node, vol string) (*node, *node) {
	t.Helper()
	v := a.volume(vol)
	if v == nil || v.Mirror == nil {
		t.Fatalf("no mirror state of %s on %s", vol, a.name)
	}
	if v.Mirror.Primary == a.name {
		return a, b
	}
	return b, a
}

func sameBytes(t *testing.T, what string, x, y []byte) {
	t.Helper()
	if len(x) != len(y) {
		t.Fatalf("%s: sizes differ %d %d", what, len(x), len(y))
	}
	const blk = 4096
	for off := 0; off < len(x); off += blk {
		if !bytes.Equal(x[off:off+blk], y[off:off+blk]) {
			t.Fatalf("%s: block at %d differs", what, off)
		}
	}
}

// Two controllers form a pair: a volume created on either appears on both, writes
// through NBD on the primary land on both sides, the secondary refuses NBD clients,
// snapshot and delete apply on both sides.
func TestMirrorPairReplicates(t *testing.T) {
	needQemuIO(t)
	a, b, _ := startedPair(t)
	ctx := context.Background()

	for i, n := range []*node{a, b, a, b} {
		name := fmt.Sprintf("vol%d", i)
		if _, err := n.cl.CreateVolume(ctx, name, 32<<20); err != nil {
			t.Fatalf("create %s on %s: %v", name, n.name, err)
		}
	}
	homes := map[string]int{}
	for i := 0; i < 4; i++ {
		name := fmt.Sprintf("vol%d", i)
		for _, n := range []*node{a, b} {
			if v := n.volume(name); v == nil || v.Mirror == nil {
				t.Fatalf("%s missing or without mirror state on %s", name, n.name)
			}
		}
		v := a.volume(name)
		homes[v.Mirror.Home]++
		prim, sec := a, b
		if v.Mirror.Home == b.name {
			prim, sec = b, a
		}
		pv := prim.waitState(t, name, "primary", adminclient.MirrorSynced, 10*time.Second)
		sec.waitState(t, name, "secondary", adminclient.MirrorSynced, 10*time.Second)
		if pv.NBDAddress != prim.cfg.NBDAddr || pv.Mirror.Epoch != 1 {
			t.Fatalf("%s: nbd_address %s epoch %d, want %s epoch 1", name, pv.NBDAddress, pv.Mirror.Epoch, prim.cfg.NBDAddr)
		}
		if sv := sec.volume(name); sv.NBDAddress != prim.cfg.NBDAddr {
			t.Fatalf("%s: the secondary points clients at %s, want %s", name, sv.NBDAddress, prim.cfg.NBDAddr)
		}
		pat := fmt.Sprintf("0x%02x", 0x10+i)
		if out, err := qemuIOAt(pv.NBDAddress, name, "write -P "+pat+" 0 1M", "write -P 0x77 5M 64k", "write -z 7M 1M", "flush"); err != nil {
			t.Fatalf("write %s: %v\n%s", name, err, out)
		}
		if out, err := qemuIOAt(sec.cfg.NBDAddr, name, "read 0 4k"); err == nil {
			t.Fatalf("the secondary %s served %s to an NBD client:\n%s", sec.name, name, out)
		}
	}
	if len(homes) != 2 {
		t.Fatalf("all volumes have the same home: %v", homes)
	}
	// A snapshot asked of either side is taken on both; a delete too.
	if _, err := b.cl.Snapshot(ctx, "vol0", "s1"); err != nil {
		t.Fatal(err)
	}
	if _, err := a.cl.Snapshot(ctx, "vol1", "s1"); err != nil {
		t.Fatal(err)
	}
	for _, n := range []*node{a, b} {
		for _, s := range []string{"vol0@s1", "vol1@s1"} {
			if n.volume(s) == nil {
				t.Fatalf("%s missing on %s", s, n.name)
			}
		}
	}
	if err := b.cl.DeleteVolume(ctx, "vol3"); err != nil {
		t.Fatal(err)
	}
	if a.volume("vol3") != nil || b.volume("vol3") != nil {
		t.Fatal("vol3 survived its deletion on one side")
	}
	if _, err := a.cl.CreateVolume(ctx, "vol3", 32<<20); err != nil {
		t.Fatalf("re-create after delete: %v", err)
	}
	// Both sides hold the same bytes, read from their disks after a clean stop.
	a.stop()
	b.stop()
	for _, name := range []string{"vol0", "vol1", "vol2", "vol0@s1"} {
		sameBytes(t, name, readVolume(t, a.cfg.DataDir, name), readVolume(t, b.cfg.DataDir, name))
	}
	got := readVolume(t, a.cfg.DataDir, "vol2")
	if got[0] != 0x12 || got[5<<20] != 0x77 || got[7<<20] != 0 {
		t.Fatalf("vol2 does not hold what was written: %x %x %x", got[0], got[5<<20], got[7<<20])
	}
}

// kill -9 of the primary: the secondary takes the volume over within a few seconds,
// writes continue there, nothing acknowledged is lost; the killed controller comes
// back stale, is resynced with only the regions written meanwhile, and both sides
// end identical. Then the same for the other controller.
func TestMirrorFailoverOnKillAndResync(t *testing.T) {
	needQemuIO(t)
	a, b, ws := startedPair(t)
	ctx := context.Background()
	p, s, _ := syncedVolume(t, a, a, b, "v", 64<<20)
	if out, err := qemuIOAt(p.cfg.NBDAddr, "v", "write -P 0x11 0 8M", "write -P 0x12 40M 1M", "flush"); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	for round, pair := range [][2]*node{{p, s}, {s, p}} {
		victim, survivor := pair[0], pair[1]
		killed := time.Now()
		victim.kill()
		sv := survivor.waitState(t, "v", "primary", adminclient.MirrorDegraded, 15*time.Second)
		took := time.Since(killed)
		t.Logf("round %d: %s took over after %v at epoch %d", round, survivor.name, took, sv.Mirror.Epoch)
		if took > 6*time.Second {
			t.Errorf("takeover took %v", took)
		}
		if rec := ws.Get("v"); rec.Holder != survivor.name || rec.Epoch != sv.Mirror.Epoch {
			t.Fatalf("witness holds %+v, want %s at %d", rec, survivor.name, sv.Mirror.Epoch)
		}
		// Acknowledged data is all there, and writes go on (3 regions touched).
		pat := fmt.Sprintf("0x%02x", 0x21+round)
		if out, err := qemuIOAt(sv.NBDAddress, "v", "read -P 0x11 0 8M", "read -P 0x12 40M 1M", "write -P "+pat+" 20M 64k", "write -P "+pat+" 30M 4k", "write -P "+pat+" 31M 512", "flush"); err != nil {
			t.Fatalf("on the new primary: %v\n%s", err, out)
		}
		before, err := survivor.cl.Stats(ctx)
		if err != nil {
			t.Fatal(err)
		}
		sv = survivor.volume("v")
		if sv.Mirror.DirtyBytes != 3<<20 {
			t.Errorf("dirty bytes %d after writing 3 regions alone", sv.Mirror.DirtyBytes)
		}
		victim.start()
		survivor.waitState(t, "v", "primary", adminclient.MirrorSynced, 20*time.Second)
		victim.waitState(t, "v", "secondary", adminclient.MirrorSynced, 10*time.Second)
		after, err := survivor.cl.Stats(ctx)
		if err != nil {
			t.Fatal(err)
		}
		copied := after.MirrorResyncBytes - before.MirrorResyncBytes
		t.Logf("round %d: resync copied %d bytes", round, copied)
		// The 3 regions written alone, and at most the regions the killed primary had
		// written before (its activity log: 8 at 0, 1 at 40M, 3 of the previous round).
		if copied < 3<<20 || copied > 15<<20 {
			t.Errorf("resync copied %d bytes for 3 changed regions of a 64 MiB volume (and at most 12 recently written)", copied)
		}
		// The returning side does not serve the volume.
		if out, err := qemuIOAt(victim.cfg.NBDAddr, "v", "read 0 4k"); err == nil {
			t.Fatalf("the returned %s serves the volume:\n%s", victim.name, out)
		}
		m := survivor.metrics(t)
		var got float64
		for _, line := range strings.Split(m, "\n") {
			if v, ok := strings.CutPrefix(line, "grow_mirror_resync_bytes_total "); ok {
				fmt.Sscan(v, &got)
			}
		}
		if int64(got) != after.MirrorResyncBytes || !strings.Contains(m, `grow_mirror_volumes{role="primary",state="synced"} 1`) {
			t.Fatalf("metrics lack the mirror counters (resync bytes %v, want %d):\n%s", got, after.MirrorResyncBytes, m)
		}
	}
	a.stop()
	b.stop()
	sameBytes(t, "v", readVolume(t, a.cfg.DataDir, "v"), readVolume(t, b.cfg.DataDir, "v"))
}

// kill -9 of the secondary while a client writes: the primary holds writes until the
// witness grants it the volume alone, then every write completes without an error.
func TestMirrorSecondaryKilledDuringWrites(t *testing.T) {
	needQemuIO(t)
	a, b, _ := startedPair(t)
	p, s, pv := syncedVolume(t, a, a, b, "w", 64<<20)
	var cmds, checks []string
	// Three passes over the volume, so the stream surely spans the kill; the last
	// pass's pattern is what must be there.
	for i := 0; i < 3000; i++ {
		off := (i % 1000) * 64 << 10
		cmds = append(cmds, fmt.Sprintf("write -P 0x%02x %d 64k", i%250+1, off))
		if i >= 2000 {
			checks = append(checks, fmt.Sprintf("read -P 0x%02x %d 64k", i%250+1, off))
		}
	}
	cmds = append(cmds, "flush")
	done := make(chan error, 1)
	var out string
	start := time.Now()
	go func() {
		var err error
		out, err = qemuIOAt(pv.NBDAddress, "w", cmds...)
		done <- err
	}()
	time.Sleep(100 * time.Millisecond)
	s.kill()
	killedAfter := time.Since(start)
	if err := <-done; err != nil {
		t.Fatalf("writes failed while the secondary died: %v\n%s", err, out)
	}
	// The stream was still running when the secondary died.
	if took := time.Since(start); took < killedAfter+200*time.Millisecond {
		t.Fatalf("the writes finished in %v, before the secondary's death (at %v) could matter", took, killedAfter)
	} else {
		t.Logf("writes took %v across the secondary's death at %v", took, killedAfter)
	}
	p.waitState(t, "w", "primary", adminclient.MirrorDegraded, 10*time.Second)
	if out, err := qemuIOAt(pv.NBDAddress, "w", checks...); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	s.start()
	p.waitState(t, "w", "primary", adminclient.MirrorSynced, 20*time.Second)
	a.stop()
	b.stop()
	sameBytes(t, "w", readVolume(t, a.cfg.DataDir, "w"), readVolume(t, b.cfg.DataDir, "w"))
}

// drain moves every primary to the partner (data intact, the drained side serves
// nothing); resume gives the home volumes back once they are synced.
func TestMirrorDrainResume(t *testing.T) {
	needQemuIO(t)
	a, b, _ := startedPair(t)
	ctx := context.Background()
	var names []string
	homes := map[string]string{}
	for i := 0; len(names) < 4 && i < 40; i++ {
		name := fmt.Sprintf("d%d", i)
		h := homeOf(name, a.name, b.name)
		if n := len(names); (n%2 == 0) != (h == a.name) {
			continue
		}
		if _, err := b.cl.CreateVolume(ctx, name, 16<<20); err != nil {
			t.Fatal(err)
		}
		names = append(names, name)
		homes[name] = h
	}
	for i, name := range names {
		p, _ := primaryAndSecondary(t, a, b, name)
		pv := p.waitState(t, name, "primary", adminclient.MirrorSynced, 10*time.Second)
		if out, err := qemuIOAt(pv.NBDAddress, name, fmt.Sprintf("write -P 0x%02x 0 2M", 0x30+i), "flush"); err != nil {
			t.Fatalf("%v\n%s", err, out)
		}
	}
	res, err := b.cl.Drain(ctx, a.name) // asked of the partner: forwarded to a
	if err != nil {
		t.Fatal(err)
	}
	for !res.Done {
		time.Sleep(200 * time.Millisecond)
		if res, err = a.cl.Drain(ctx, a.name); err != nil {
			t.Fatal(err)
		}
	}
	for i, name := range names {
		v := b.waitState(t, name, "primary", adminclient.MirrorSynced, 10*time.Second)
		a.waitState(t, name, "secondary", adminclient.MirrorSynced, 10*time.Second)
		if out, err := qemuIOAt(v.NBDAddress, name, fmt.Sprintf("read -P 0x%02x 0 2M", 0x30+i), "write -P 0x55 4M 64k", "flush"); err != nil {
			t.Fatalf("after drain: %v\n%s", err, out)
		}
		if out, err := qemuIOAt(a.cfg.NBDAddr, name, "read 0 4k"); err == nil {
			t.Fatalf("the drained controller serves %s:\n%s", name, out)
		}
	}
	st, err := a.cl.MirrorStatus(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Serves) != 0 {
		t.Fatalf("the drained controller serves %v", st.Serves)
	}
	// A volume created while a is drained gets its primary on b whatever its home.
	if _, err := a.cl.CreateVolume(ctx, "late", 16<<20); err != nil {
		t.Fatal(err)
	}
	b.waitState(t, "late", "primary", adminclient.MirrorSynced, 10*time.Second)
	names = append(names, "late")
	homes["late"] = homeOf("late", a.name, b.name)

	res, err = a.cl.Resume(ctx, a.name)
	if err != nil {
		t.Fatal(err)
	}
	for !res.Done {
		time.Sleep(200 * time.Millisecond)
		if res, err = b.cl.Resume(ctx, a.name); err != nil {
			t.Fatal(err)
		}
	}
	for _, name := range names {
		p, s := a, b
		if homes[name] == b.name {
			p, s = b, a
		}
		pv := p.waitState(t, name, "primary", adminclient.MirrorSynced, 10*time.Second)
		s.waitState(t, name, "secondary", adminclient.MirrorSynced, 10*time.Second)
		if name != "late" {
			if out, err := qemuIOAt(pv.NBDAddress, name, "read -P 0x55 4M 64k"); err != nil {
				t.Fatalf("after resume: %v\n%s", err, out)
			}
		}
	}
	a.stop()
	b.stop()
	for _, name := range names {
		sameBytes(t, name, readVolume(t, a.cfg.DataDir, name), readVolume(t, b.cfg.DataDir, name))
	}
}

func setStateFile(t *testing.T, n *node, vol, role string, epoch uint64) {
	t.Helper()
	p := filepath.Join(n.cfg.DataDir, "mirror", vol+".json")
	var sf stateFile
	if err := readJSON(p, &sf); err != nil {
		t.Fatal(err)
	}
	sf.Role, sf.Epoch = role, epoch
	if err := writeJSONFile(p, sf); err != nil {
		t.Fatal(err)
	}
}

// Both sides wrote alone at the same epoch (only possible by an operator override,
// made here by editing the state files): the volume freezes as split on both sides,
// serves nobody, and resolve keeps one side's data, keeps the other's as a snapshot,
// and resyncs until both are identical.
func TestMirrorSplitAndResolve(t *testing.T) {
	needQemuIO(t)
	a, b, _ := startedPair(t)
	ctx := context.Background()
	if _, err := a.cl.CreateVolume(ctx, "sp", 32<<20); err != nil {
		t.Fatal(err)
	}
	p, _ := primaryAndSecondary(t, a, b, "sp")
	pv := p.waitState(t, "sp", "primary", adminclient.MirrorSynced, 10*time.Second)
	if out, err := qemuIOAt(pv.NBDAddress, "sp", "write -P 0x01 0 4M", "flush"); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	a.stop()
	b.stop()
	// Each side alone believes it holds epoch 5 and takes writes.
	for i, n := range []*node{a, b} {
		setStateFile(t, n, "sp", "primary-degraded", 5)
		other := b
		if n == b {
			other = a
		}
		_ = other
		n.start()
		v := n.waitState(t, "sp", "primary", adminclient.MirrorDegraded, 10*time.Second)
		if out, err := qemuIOAt(v.NBDAddress, "sp", fmt.Sprintf("write -P 0x%02x %dM 1M", 0x10+i, 8+8*i), "flush"); err != nil {
			t.Fatalf("%v\n%s", err, out)
		}
		n.stop()
	}
	a.start()
	b.start()
	for _, n := range []*node{a, b} {
		n.waitState(t, "sp", "secondary", adminclient.MirrorSplit, 10*time.Second)
		if out, err := qemuIOAt(n.cfg.NBDAddr, "sp", "read 0 4k"); err == nil {
			t.Fatalf("split volume served by %s:\n%s", n.name, out)
		}
	}
	if _, err := b.cl.Resolve(ctx, "sp", "nobody"); adminclient.StatusOf(err) != 400 {
		t.Fatalf("resolve keeping an unknown controller: %v", err)
	}
	if _, err := b.cl.Resolve(ctx, "sp", a.name); err != nil {
		t.Fatal(err)
	}
	v := a.waitState(t, "sp", "primary", adminclient.MirrorSynced, 15*time.Second)
	b.waitState(t, "sp", "secondary", adminclient.MirrorSynced, 10*time.Second)
	if out, err := qemuIOAt(v.NBDAddress, "sp", "read -P 0x01 0 4M", "read -P 0x10 8M 1M", "read -P 0 16M 1M"); err != nil {
		t.Fatalf("kept data: %v\n%s", err, out)
	}
	vols, err := b.cl.ListVolumes(ctx)
	if err != nil {
		t.Fatal(err)
	}
	snap := ""
	for _, x := range vols {
		if strings.HasPrefix(x.Name, "sp@split-") {
			snap = x.Name
		}
	}
	if snap == "" {
		t.Fatal("the discarded side's data was not kept as a snapshot")
	}
	a.stop()
	b.stop()
	sameBytes(t, "sp", readVolume(t, a.cfg.DataDir, "sp"), readVolume(t, b.cfg.DataDir, "sp"))
	kept := readVolume(t, b.cfg.DataDir, snap)
	if kept[16<<20] != 0x11 || kept[0] != 0x01 {
		t.Fatalf("the snapshot of the discarded side holds %x at 16M, want its own write", kept[16<<20])
	}
}

// An image imported on one controller exists on both; clones of it on either side
// are mirrored volumes; a resize asked of the secondary is applied on both.
func TestMirrorImageCloneResize(t *testing.T) {
	needQemuIO(t)
	a, b, _ := startedPair(t)
	ctx := context.Background()
	img := bytes.Repeat([]byte{0xab}, 4<<20)
	copy(img[1<<20:], bytes.Repeat([]byte{0}, 1<<20))
	importImage(t, a, "gold", img)
	if v := b.volume("gold"); v == nil || v.Kind != "image" || v.Size != int64(len(img)) {
		t.Fatalf("image on the partner: %+v", v)
	}
	if _, err := b.cl.CloneVolume(ctx, "gold", "c1"); err != nil {
		t.Fatal(err)
	}
	p, s := primaryAndSecondary(t, a, b, "c1")
	pv := p.waitState(t, "c1", "primary", adminclient.MirrorSynced, 10*time.Second)
	s.waitState(t, "c1", "secondary", adminclient.MirrorSynced, 10*time.Second)
	if out, err := qemuIOAt(pv.NBDAddress, "c1", "read -P 0xab 0 1M", "read -P 0 1M 1M", "write -P 0x01 2M 4k", "flush"); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	// Resize asked of the secondary: proxied to the primary, applied on both.
	if _, err := s.cl.ResizeVolume(ctx, "c1", 8<<20); err != nil {
		t.Fatal(err)
	}
	pv = p.waitState(t, "c1", "primary", adminclient.MirrorSynced, 10*time.Second)
	if sv := s.volume("c1"); pv.Size != 8<<20 || sv.Size != 8<<20 {
		t.Fatalf("sizes after resize: %d and %d", pv.Size, sv.Size)
	}
	if out, err := qemuIOAt(pv.NBDAddress, "c1", "write -P 0x02 7M 64k", "flush", "read -P 0x01 2M 4k"); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	// A partner that is down makes snapshots wait (503) but not I/O (creations,
	// deletions and resizes go on alone: TestMirrorChangesWhilePartnerAway).
	s.kill()
	waitFor(t, 10*time.Second, p.name+" to lose its partner", func() (bool, string) {
		st, err := p.cl.MirrorStatus(ctx)
		return err == nil && !st.PartnerReachable, "reachable"
	})
	if _, err := p.cl.Snapshot(ctx, "c1", "s9"); adminclient.StatusOf(err) != 503 {
		t.Fatalf("snapshot with the partner down: %v", err)
	}
	if out, err := qemuIOAt(pv.NBDAddress, "c1", "write -P 0x03 3M 4k", "flush"); err != nil {
		t.Fatalf("I/O with the partner down: %v\n%s", err, out)
	}
	s.start()
	p.waitState(t, "c1", "primary", adminclient.MirrorSynced, 20*time.Second)
	a.stop()
	b.stop()
	for _, n := range []string{"gold", "c1"} {
		sameBytes(t, n, readVolume(t, a.cfg.DataDir, n), readVolume(t, b.cfg.DataDir, n))
	}
}

// TestMirrorImageToOldPartner checks the image copy to a partner running a binary from
// before segmented uploads: it answers the segmented upload "unknown image format" at
// once, without reading the body, and the image reaches it intact as a raw upload.
func TestMirrorImageToOldPartner(t *testing.T) {
	if testing.Short() {
		t.Skip("mirror pair tests run real controller processes")
	}
	a, b, _ := testPair(t)
	// A reaches B through a stand-in for B's old binary: it refuses what that
	// binary refused and passes everything else on to B.
	bURL, err := url.Parse(a.cfg.Mirror.Peer)
	if err != nil {
		t.Fatal(err)
	}
	proxy := httputil.NewSingleHostReverseProxy(bURL)
	proxy.FlushInterval = -1
	var segmented, raw atomic.Int32
	old := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodPut && strings.HasPrefix(r.URL.Path, "/v1/images/") {
			switch f := r.URL.Query().Get("format"); f {
			case adminclient.FormatRaw, "":
				raw.Add(1)
			case adminclient.FormatQcow2:
			default:
				segmented.Add(1)
				writeError(w, http.StatusBadRequest, adminclient.CodeInvalid, fmt.Sprintf("%v: unknown image format %q (want raw or qcow2)", errBadRequest, f))
				return
			}
		}
		proxy.ServeHTTP(w, r)
	}))
	defer old.Close()
	a.cfg.Mirror.Peer = old.URL
	a.start()
	b.start()
	pairUp(t, a, b)

	// 8 MiB, larger than any buffer on the way: data, a run of zeroes, data.
	img := make([]byte, 8<<20)
	for i := range img {
		img[i] = byte(i*7 + i>>12)
	}
	clear(img[2<<20 : 4<<20])
	importImage(t, a, "gold", img)
	if segmented.Load() != 1 || raw.Load() != 1 {
		t.Fatalf("the partner got %d segmented and %d raw uploads, want one of each", segmented.Load(), raw.Load())
	}
	if v := b.volume("gold"); v == nil || v.Kind != "image" || v.Size != int64(len(img)) {
		t.Fatalf("image on the partner: %+v", v)
	}
	a.stop()
	b.stop()
	sameBytes(t, "gold on the partner", img, readVolume(t, b.cfg.DataDir, "gold"))
}

// With TLS material the mirror link is TLS (a plain client gets no challenge) and the
// pair works as usual.
func TestMirrorPairOverTLS(t *testing.T) {
	needQemuIO(t)
	a, b, _ := testPair(t)
	dir := t.TempDir()
	certFile, keyFile := writeSelfSigned(t, dir)
	for _, n := range []*node{a, b} {
		n.cfg.TLSCert, n.cfg.TLSKey = certFile, keyFile
		n.cfg.Mirror.Peer = strings.Replace(n.cfg.Mirror.Peer, "http:", "https:", 1)
		cl, err := adminclient.New("https://"+n.cfg.APIAddr, n.token)
		if err != nil {
			t.Fatal(err)
		}
		if n.cl, err = cl.WithCACert(certFile); err != nil {
			t.Fatal(err)
		}
	}
	a.start()
	b.start()
	pairUp(t, a, b)
	_, s, pv := syncedVolume(t, b, a, b, "t1", 16<<20)
	if out, err := qemuIOAt(pv.NBDAddress, "t1", "write -P 0x44 0 2M", "flush"); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	c, err := net.DialTimeout("tcp", s.cfg.Mirror.Listen, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	c.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
	if n, _ := c.Read(make([]byte, 32)); n > 0 {
		t.Fatal("the mirror link answered a plain-text client")
	}
	c.Close()
	a.stop()
	b.stop()
	sameBytes(t, "t1", readVolume(t, a.cfg.DataDir, "t1"), readVolume(t, b.cfg.DataDir, "t1"))
}

// writeSelfSigned writes a certificate for 127.0.0.1 and its key as PEM files.
func writeSelfSigned(t *testing.T, dir string) (string, string) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "storaged"},
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kb, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	cf, kf := filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	if err := os.WriteFile(cf, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(kf, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb}), 0o600); err != nil {
		t.Fatal(err)
	}
	return cf, kf
}

// Metadata operations originated on both controllers at once do not wait for each
// other's locks: concurrent creates of distinct names all succeed quickly.
func TestMirrorConcurrentCreates(t *testing.T) {
	if testing.Short() {
		t.Skip("runs controller processes")
	}
	a, b, _ := startedPair(t)
	start := time.Now()
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	for i := 0; i < 16; i++ {
		n := []*node{a, b}[i%2]
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := n.cl.CreateVolume(context.Background(), fmt.Sprintf("cc%d", i), 4<<20); err != nil {
				errs <- err
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if took := time.Since(start); took > 5*time.Second {
		t.Fatalf("16 concurrent creates took %v", took)
	}
	for i := 0; i < 16; i++ {
		for _, n := range []*node{a, b} {
			if n.volume(fmt.Sprintf("cc%d", i)) == nil {
				t.Fatalf("cc%d missing on %s", i, n.name)
			}
		}
	}
}
