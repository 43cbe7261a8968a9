// Package control holds the end-to-end tests of the control plane: `grow serve` with
// its CLI, driving a real storage controller and two real host agents on the namespace
// test bed, with real QEMU guests, on SQLite and on PostgreSQL.
package control

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/growserver/grow/client"
	"github.com/growserver/grow/internal/host/agentclient"
	"github.com/growserver/grow/internal/storage/adminclient"
	"github.com/growserver/grow/internal/store/storetest"
	"github.com/growserver/grow/test/testbed"
)

// serve is a `grow serve --local=false` running inside a bed host's namespace.
type serve struct {
	t       *testing.T
	bin     string
	ns      string
	data    string
	dsn     string
	logPath string
	mu      sync.Mutex
	cmd     *exec.Cmd
	done    chan struct{}
	url     string
	token   string
}

const serveAddr = "127.0.0.1:7470"

func startServe(t *testing.T, ns, dsn string) *serve {
	s := &serve{t: t, bin: testbed.GrowBinary(t), ns: ns, data: t.TempDir(), dsn: dsn}
	s.logPath = filepath.Join(s.data, "serve.log")
	s.start()
	t.Cleanup(func() {
		s.kill()
		if t.Failed() {
			b, _ := os.ReadFile(s.logPath)
			t.Logf("grow serve log:\n%s", tail(string(b), 60))
		}
	})
	s.url = "http://" + testbed.Forward(t, ns, serveAddr)
	s.waitUp()
	b, err := os.ReadFile(filepath.Join(s.data, "admin.token"))
	if err != nil {
		t.Fatal(err)
	}
	s.token = strings.TrimSpace(string(b))
	return s
}

func (s *serve) start() {
	s.t.Helper()
	args := []string{"serve", "--local=false", "--data", s.data, "--api", serveAddr, "--ready-timeout", "4m", "--traffic-interval", "5s"}
	if s.dsn != "" {
		args = append(args, "--database", s.dsn)
	}
	log, err := os.OpenFile(s.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		s.t.Fatal(err)
	}
	cmd := testbed.NetnsCommand(s.ns, s.bin, args...)
	cmd.Stdout, cmd.Stderr = log, log
	if err := cmd.Start(); err != nil {
		s.t.Fatalf("Failed to start grow serve: %v", err)
	}
	log.Close()
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	s.mu.Lock()
	s.cmd, s.done = cmd, done
	s.mu.Unlock()
}

func (s *serve) waitUp() {
	s.t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		if b, err := os.ReadFile(filepath.Join(s.data, "admin.token")); err == nil {
			if c, err := client.New(s.url, strings.TrimSpace(string(b))); err == nil {
				ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
				_, err := c.Whoami(ctx)
				cancel()
				if err == nil {
					return
				}
			}
		}
		select {
		case <-s.done:
			s.t.Fatalf("grow serve exited at start")
		case <-time.After(200 * time.Millisecond):
		}
	}
	s.t.Fatal("grow serve did not answer within 60 s")
}

// kill is kill -9 of grow serve (its whole process group).
func (s *serve) kill() {
	s.mu.Lock()
	cmd, done := s.cmd, s.done
	s.mu.Unlock()
	if cmd == nil || cmd.Process == nil {
		return
	}
	_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
	<-done
}

func (s *serve) restart() {
	s.kill()
	s.start()
	s.waitUp()
}

func (s *serve) client() *client.Client {
	c, err := client.New(s.url, s.token)
	if err != nil {
		s.t.Fatal(err)
	}
	return c
}

// grow runs the CLI against this control plane; it returns stdout and the exit code.
func (s *serve) grow(args ...string) (string, int) {
	s.t.Helper()
	cmd := exec.Command(s.bin, args...)
	cmd.Env = append(os.Environ(), "GROW_URL="+s.url, "GROW_TOKEN="+s.token)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	code := 0
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		code = ee.ExitCode()
	} else if err != nil {
		s.t.Fatalf("grow %v: %v", args, err)
	}
	if code != 0 {
		s.t.Logf("grow %s: exit %d: %s", strings.Join(args, " "), code, strings.TrimSpace(errb.String()))
	}
	return out.String(), code
}

func (s *serve) mustGrow(args ...string) string {
	s.t.Helper()
	out, code := s.grow(args...)
	if code != 0 {
		s.t.Fatalf("grow %s failed with exit %d: %s", strings.Join(args, " "), code, out)
	}
	return out
}

func tail(s string, n int) string {
	lines := strings.Split(s, "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

type cluster struct {
	bed    *testbed.Bed
	stor   *testbed.Storaged
	hostds []*testbed.Daemon
	sc     *adminclient.Client
	agents []*agentclient.Client
	s      *serve
}

func TestControlPlane(t *testing.T) {
	if testing.Short() {
		t.Skip("needs root, network namespaces and QEMU")
	}
	t.Parallel()
	for _, backend := range []string{"sqlite", "postgres"} {
		t.Run(backend, func(t *testing.T) { runScenario(t, backend) })
	}
}

func runScenario(t *testing.T, backend string) {
	t0 := time.Now()
	phase := func(what string) { t.Logf("%6.1fs %s", time.Since(t0).Seconds(), what) }
	guest := testbed.GuestDir(t)
	bed := testbed.New(t, testbed.Options{Hosts: 2})
	c := &cluster{bed: bed}
	// The PostgreSQL run also puts every disk behind TLS: the controller requires it
	// with verified client certificates, its API is https, and each host has its
	// credentials; provisioning, online resize and migration must all work over it.
	useTLS := backend == "postgres"
	c.stor = bed.StartStoraged(t, testbed.StoragedOptions{Extra: []string{"--pool-size", "4GiB", "--cache", "32MiB"}, TLS: useTLS})
	// The host agents' APIs are https too (the control plane, and each agent during a
	// migration, trust their CA), and live migrations between them are TLS with both
	// hosts verified (a host with credentials refuses a plain stream).
	var hostPKI *testbed.PKI
	var hostCA []byte
	var hostExtra []string
	if useTLS {
		ips := []string{"127.0.0.1"}
		for _, h := range bed.Hosts {
			ips = append(ips, h.StorageIP)
		}
		var err error
		if hostPKI, err = testbed.NewPKI(t.TempDir(), ips...); err != nil {
			t.Fatal(err)
		}
		if hostCA, err = os.ReadFile(hostPKI.CA); err != nil {
			t.Fatal(err)
		}
		migDir := t.TempDir()
		for dst, src := range map[string]string{"ca-cert.pem": hostPKI.CA, "server-cert.pem": hostPKI.ServerCert, "server-key.pem": hostPKI.ServerKey,
			"client-cert.pem": filepath.Join(hostPKI.ClientDir, "client-cert.pem"), "client-key.pem": filepath.Join(hostPKI.ClientDir, "client-key.pem")} {
			b, err := os.ReadFile(src)
			if err == nil {
				err = os.WriteFile(filepath.Join(migDir, dst), b, 0o600)
			}
			if err != nil {
				t.Fatal(err)
			}
		}
		hostExtra = []string{"--migration-tls-dir", migDir}
	}
	for _, h := range bed.Hosts {
		d := h.StartHostd(t, testbed.HostdOptions{NBDTLSDir: c.stor.TLSClientDir, TLS: hostPKI, Extra: hostExtra})
		c.hostds = append(c.hostds, d)
		ac, err := agentclient.NewWithCAPEM(d.URL, d.Token, string(hostCA))
		if err != nil {
			t.Fatal(err)
		}
		c.agents = append(c.agents, ac)
	}
	var err error
	if c.sc, err = adminclient.New(c.stor.URL, c.stor.Token); err != nil {
		t.Fatal(err)
	}
	if useTLS {
		if c.sc, err = c.sc.WithCACert(c.stor.PKI.CA); err != nil {
			t.Fatal(err)
		}
	}
	dsn := ""
	if backend == "postgres" {
		pg, err := storetest.StartPostgresIn("", bed.Hosts[0].Netns)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = pg.Stop() })
		if dsn, err = pg.CreateDatabase("grow"); err != nil {
			t.Fatal(err)
		}
	}
	s := startServe(t, bed.Hosts[0].Netns, dsn)
	c.s = s
	phase("daemons and grow serve up")

	// The web console answers from the running serve, with its CSP.
	if resp, err := http.Get(s.url + "/ui/"); err != nil {
		t.Fatalf("GET /ui/: %v", err)
	} else {
		page, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if csp := resp.Header.Get("Content-Security-Policy"); resp.StatusCode != http.StatusOK || !strings.HasPrefix(csp, "default-src 'none'") || !bytes.Contains(page, []byte(`src="app.js"`)) {
			t.Fatalf("GET /ui/: HTTP %d, CSP %q, page %.200q", resp.StatusCode, csp, page)
		}
	}

	// The operator registers the daemons and the guest network, imports the gold master.
	addStorage := []string{"controller", "add", "s0", "--storage-url", c.stor.PeerURL, "--storage-token", c.stor.Token}
	if useTLS {
		addStorage = append(addStorage, "--storage-ca-cert", c.stor.PKI.CA)
	}
	s.mustGrow(addStorage...)
	for i, d := range c.hostds {
		addHost := []string{"host", "add", fmt.Sprintf("h%d", i), "--agent-url", d.PeerURL, "--agent-token", d.Token, "--cpus", "2", "--memory", "2GiB"}
		if useTLS {
			if !strings.HasPrefix(d.PeerURL, "https://") {
				t.Fatalf("host agent %d is not https: %s", i, d.PeerURL)
			}
			addHost = append(addHost, "--agent-ca-cert", hostPKI.CA)
		}
		s.mustGrow(addHost...)
	}
	s.mustGrow("ippool", "create", "guests", "--cidr", "10.77.0.0/24", "--first", testbed.GuestPrefix+"10", "--last", testbed.GuestPrefix+"60")
	s.mustGrow("image", "import", "tiny", filepath.Join(guest, "disk.raw"), "--kernel", filepath.Join(guest, "vmlinux"),
		"--initrd", filepath.Join(guest, "initrd.img"), "--cmdline", "console=ttyS0")
	s.mustGrow("customer", "create", "acme", "--max-servers", "5")
	key := filepath.Join(t.TempDir(), "id.pub")
	ud := filepath.Join(t.TempDir(), "user-data")
	if err := os.WriteFile(key, []byte("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGrowE2E e2e@example\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(ud, []byte("#cloud-config\ngrow_test:\n  run: [counter, responder]\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	phase("registered")

	// Create: the guest reports the hostname and address cloud-init gave it.
	out := s.mustGrow("server", "create", "web1", "--customer", "acme", "--plan", "E", "--image", "tiny", "--ssh-key", key, "--user-data", ud)
	if !strings.Contains(out, "GROW-READY hostname=web1 ip="+testbed.GuestIP(0)) || !strings.Contains(out, "keys=1") {
		t.Fatalf("create output lacks the guest's ready report with hostname, address and key:\n%s", out)
	}
	phase("web1 created")
	resp := c.query(t, "web1", testbed.GuestPrefix+"10")
	web1 := c.server(t, "web1")
	c.console(t, "web1", "echo console-ok-$((40+2))", "console-ok-42")
	if useTLS {
		// The controller refuses plain NBD, so the guest's disk can only be this TLS one.
		vm, err := c.agents[c.hostIndex(t, web1.HostID)].Get(context.Background(), web1.ID)
		if err != nil || len(vm.Spec.Disks) == 0 || !vm.Spec.Disks[0].TLS || vm.Spec.Disks[0].TLSCredsDir != c.stor.TLSClientDir {
			t.Fatalf("web1's disk is not over TLS with the host's credentials: %+v, %v", vm.Spec.Disks, err)
		}
	}
	if web1.IPv4 != testbed.GuestPrefix+"10" {
		t.Fatalf("web1 has address %s", web1.IPv4)
	}

	// Resize: plan D grows the volume to 20 GiB; the guest keeps running.
	out = s.mustGrow("server", "resize", "web1", "--plan", "D")
	phase("web1 resized: " + strings.TrimSpace(out))
	vol, err := c.sc.GetVolume(context.Background(), web1.Volume)
	if err != nil || vol.Size != 20<<30 {
		t.Fatalf("volume after resize: %+v, %v; want 20 GiB", vol, err)
	}
	if strings.Contains(out, "disk at the next stop") {
		t.Fatalf("the disk was not grown online: %s", out)
	}
	// The running guest itself sees the 20 GiB disk (41943040 sectors of 512 bytes).
	c.console(t, "web1", "echo vda-sectors=$(cat /sys/block/vda/size)-end", "vda-sectors=41943040-end")
	phase("web1 sees its grown disk online")
	if strings.Contains(out, "memory") {
		t.Fatalf("memory was not grown online: %s", out)
	}
	// Plan D's 512 MiB were hot-plugged and onlined: the guest has more than plan E's 256 MiB.
	c.console(t, "web1", "echo mem-$([ $(awk '/MemTotal/{print int($2/1024)}' /proc/meminfo) -gt 300 ] && echo big || echo small)-end", "mem-big-end")
	phase("web1 sees its added memory online")
	// A VM with hot-added memory migrates only after a restart (hostd refuses with 409),
	// which applies the plan to a fresh definition of the same sizes.
	s.mustGrow("server", "stop", "web1")
	s.mustGrow("server", "start", "web1")
	phase("web1 restarted after its online resize")
	c.console(t, "web1", "echo vda-sectors=$(cat /sys/block/vda/size)-end", "vda-sectors=41943040-end")
	c.console(t, "web1", "echo mem-$([ $(awk '/MemTotal/{print int($2/1024)}' /proc/meminfo) -gt 300 ] && echo big || echo small)-end", "mem-big-end")
	resp = c.query(t, "web1", testbed.GuestPrefix+"10")

	// Migrate: the server moves to the other host and the guest keeps counting.
	src := c.hostIndex(t, web1.HostID)
	dst := 1 - src
	s.mustGrow("server", "migrate", "web1", "--to", fmt.Sprintf("h%d", dst))
	phase("web1 migrated")
	web1 = c.server(t, "web1")
	if c.hostIndex(t, web1.HostID) != dst {
		t.Fatalf("web1 on host %s after migrate, want h%d", web1.HostID, dst)
	}
	if vm, err := c.agents[dst].Get(context.Background(), web1.ID); err != nil || vm.State != "running" {
		t.Fatalf("VM on the destination: %+v, %v", vm, err)
	}
	if _, err := c.agents[src].Get(context.Background(), web1.ID); !agentclient.IsNotFound(err) {
		t.Fatalf("VM still on the source host: %v", err)
	}
	after := c.query(t, "web1", testbed.GuestPrefix+"10")
	if after.Hostname != resp.Hostname {
		t.Fatalf("guest after migration: %+v, before: %+v", after, resp)
	}
	c.waitCounterAbove(t, "web1", testbed.GuestPrefix+"10", after.Counter)

	// kill -9 of grow serve in the middle of creates: afterwards each server either runs or left nothing.
	for i, killAt := range []string{"admitted", "wait for guest"} {
		name := fmt.Sprintf("crash%d", i)
		opID := strings.TrimSpace(s.mustGrow("server", "create", name, "--customer", "acme", "--plan", "E", "--image", "tiny", "--user-data", ud, "--no-wait"))
		c.waitStep(t, opID, killAt)
		s.restart()
		phase(fmt.Sprintf("grow serve killed at %q and restarted", killAt))
		op := c.waitOp(t, opID)
		c.runningOrNothing(t, name, op)
		phase(fmt.Sprintf("%s after the crash: operation %s", name, op.State))
	}

	// Delete frees the volume, the address and the QEMU.
	svs, err := s.client().ListServers(context.Background(), client.ServerFilter{})
	if err != nil {
		t.Fatal(err)
	}
	for _, sv := range svs {
		s.mustGrow("server", "delete", sv.Name)
		c.gone(t, sv)
	}
	phase("all deleted")
}

func (c *cluster) server(t *testing.T, name string) client.Server {
	t.Helper()
	sv, err := c.s.client().GetServer(context.Background(), name)
	if err != nil {
		t.Fatalf("server %s: %v", name, err)
	}
	return sv
}

func (c *cluster) hostIndex(t *testing.T, id string) int {
	t.Helper()
	h, err := c.s.client().GetHost(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	var i int
	if _, err := fmt.Sscanf(h.Name, "h%d", &i); err != nil {
		t.Fatalf("host name %q", h.Name)
	}
	return i
}

// query asks the guest's responder for its status, retrying while it comes up.
func (c *cluster) query(t *testing.T, name, ip string) testbed.Response {
	t.Helper()
	var last error
	for deadline := time.Now().Add(90 * time.Second); time.Now().Before(deadline); time.Sleep(500 * time.Millisecond) {
		r, err := c.bed.Query(ip+":7777", 3*time.Second)
		if err == nil {
			if r.Hostname != name {
				t.Fatalf("the guest at %s says it is %q, want %q", ip, r.Hostname, name)
			}
			return r
		}
		last = err
	}
	t.Fatalf("guest %s at %s does not answer: %v", name, ip, last)
	return testbed.Response{}
}

// waitCounterAbove waits until the guest's counter (which ticks twice a second) goes past n:
// a guest that is alive keeps counting.
func (c *cluster) waitCounterAbove(t *testing.T, name, ip string, n uint64) {
	t.Helper()
	var r testbed.Response
	for deadline := time.Now().Add(15 * time.Second); time.Now().Before(deadline); time.Sleep(250 * time.Millisecond) {
		if r = c.query(t, name, ip); r.Counter > n {
			return
		}
	}
	t.Fatalf("%s's counter stays at %d, was %d", name, r.Counter, n)
}

func (c *cluster) waitStep(t *testing.T, opID, step string) {
	t.Helper()
	for deadline := time.Now().Add(3 * time.Minute); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		op, err := c.s.client().GetOperation(context.Background(), opID)
		if err != nil {
			t.Fatal(err)
		}
		if op.Step == step || op.Done() {
			return
		}
	}
	t.Fatalf("operation %s never reached step %q", opID, step)
}

func (c *cluster) waitOp(t *testing.T, opID string) client.Operation {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	op, err := c.s.client().WaitOperation(ctx, opID, 200*time.Millisecond, nil)
	if err != nil {
		t.Fatalf("operation %s: %v", opID, err)
	}
	return op
}

// runningOrNothing checks the outcome of an interrupted create: a running, reachable
// server, or no trace at all (row, lease, volume, VM).
func (c *cluster) runningOrNothing(t *testing.T, name string, op client.Operation) {
	t.Helper()
	sv, err := c.s.client().GetServer(context.Background(), name)
	if op.State == "succeeded" {
		if err != nil || sv.State != "running" {
			t.Fatalf("%s: operation succeeded but server is %+v, %v", name, sv, err)
		}
		c.query(t, name, sv.IPv4)
		return
	}
	if client.StatusOf(err) != 404 {
		t.Fatalf("%s: operation %s (%s) but the server is still recorded: %+v %v", name, op.State, op.Error, sv, err)
	}
	c.gone(t, client.Server{ID: op.ServerID, Volume: op.ServerID})
}

// gone checks that nothing of a server remains anywhere.
func (c *cluster) gone(t *testing.T, sv client.Server) {
	t.Helper()
	ctx := context.Background()
	if _, err := c.sc.GetVolume(ctx, sv.Volume); !adminclient.IsNotFound(err) {
		t.Fatalf("volume %s of %s still exists: %v", sv.Volume, sv.Name, err)
	}
	for i, a := range c.agents {
		if _, err := a.Get(ctx, sv.ID); !agentclient.IsNotFound(err) {
			t.Fatalf("VM %s still defined on h%d: %v", sv.ID, i, err)
		}
	}
	leases, err := c.s.client().ListLeases(ctx, "guests")
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range leases {
		if l.ServerID == sv.ID {
			t.Fatalf("address %s still leased to %s", l.Address, sv.ID)
		}
	}
	if out, err := exec.Command("pgrep", "-f", "qemu-system.*"+sv.ID).Output(); err == nil && len(out) > 0 {
		t.Fatalf("QEMU of %s still runs: pid %s", sv.ID, out)
	}
}

// console attaches to a server's serial console through the control plane, expects the
// scrollback with the ready line, runs command in the guest's shell and waits for want
// (which must differ from the echoed command line).
func (c *cluster) console(t *testing.T, name, command, want string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	ws, err := c.s.client().AttachConsole(ctx, name)
	if err != nil {
		t.Fatalf("attach console of %s: %v", name, err)
	}
	defer ws.CloseNow()
	var seen strings.Builder
	until := func(want string) {
		t.Helper()
		for !strings.Contains(seen.String(), want) {
			_, b, err := ws.Read(ctx)
			if err != nil {
				t.Fatalf("console of %s: waiting for %q: %v; got %q", name, want, err, tail(seen.String(), 30))
			}
			seen.Write(b)
		}
	}
	until("GROW-READY hostname=" + name)
	if err := ws.Write(ctx, websocket.MessageBinary, []byte("\n"+command+"\n")); err != nil {
		t.Fatal(err)
	}
	until(want)
}
