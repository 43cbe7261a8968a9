package testbed

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Daemon is a grow daemon (hostd or storaged) running inside a bed namespace.
type Daemon struct {
	Name    string // "hostd-h0", "storaged-s0"
	Netns   string
	Addr    string // API address inside the bed, e.g. 10.99.0.11:8444
	URL     string // API URL the test process can use (forwarded to Addr)
	PeerURL string // API URL other namespaces of the bed can use (http://Addr)
	Token   string // admin token from DATA/admin.token
	DataDir string
	Args    []string // the daemon's arguments after the binary
	// NetworkOnly enters only the network namespace (NetworkOnlyCommand), so the
	// daemon sees the machine's cgroups as on a real host (hostd).
	NetworkOnly bool

	t       testing.TB
	mu      sync.Mutex
	cmd     *exec.Cmd
	done    chan struct{}
	waitErr error
	logPath string
}

// Log returns the daemon's stdout and stderr so far (across restarts).
func (d *Daemon) Log() string {
	b, _ := os.ReadFile(d.logPath)
	return string(b)
}

func (d *Daemon) start() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	enter := NetnsCommand
	if d.NetworkOnly {
		enter = NetworkOnlyCommand
	}
	cmd := enter(d.Netns, GrowBinary(d.t), d.Args...)
	// A file, not a pipe: children that inherit it (VMs) must not hold up Wait.
	logf, err := os.OpenFile(d.logPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return fmt.Errorf("Failed to open the log of %s: %w", d.Name, err)
	}
	defer logf.Close()
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("Failed to start %s: %w", d.Name, err)
	}
	done := make(chan struct{})
	d.cmd, d.done = cmd, done
	go func() {
		// waitErr is read only after done is closed; Stop holds d.mu while it waits for done.
		d.waitErr = cmd.Wait()
		close(done)
	}()
	if err := WaitListening(d.Netns, d.Addr, 30*time.Second, done); err != nil {
		d.killLocked()
		return fmt.Errorf("%s did not come up: %w; log:\n%s", d.Name, err, d.Log())
	}
	tok, err := os.ReadFile(filepath.Join(d.DataDir, "admin.token"))
	if err != nil {
		d.killLocked()
		return fmt.Errorf("Failed to read the token of %s: %w", d.Name, err)
	}
	d.Token = strings.TrimSpace(string(tok))
	return nil
}

// Stop sends SIGTERM and waits up to timeout for a clean exit, then kills the daemon.
// Processes the daemon started in their own process groups (VMs) keep running.
func (d *Daemon) Stop(timeout time.Duration) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	select {
	case <-d.done:
		return nil
	default:
	}
	// `ip netns exec` execs the daemon, so the pid is the daemon's.
	_ = d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-d.done:
		return nil
	case <-time.After(timeout):
		d.killLocked()
		return fmt.Errorf("%s did not exit within %s of SIGTERM", d.Name, timeout)
	}
}

// Kill kills the daemon's process group at once (a crash).
func (d *Daemon) Kill() {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.killLocked()
}

func (d *Daemon) killLocked() {
	select {
	case <-d.done:
		return
	default:
	}
	_ = syscall.Kill(-d.cmd.Process.Pid, syscall.SIGKILL)
	select {
	case <-d.done:
	case <-time.After(10 * time.Second):
	}
}

// Running reports whether the daemon's process is alive.
func (d *Daemon) Running() bool {
	select {
	case <-d.Exited():
		return false
	default:
		return true
	}
}

// Start starts a daemon that was killed or stopped, with the same arguments.
func (d *Daemon) Start() error {
	if d.Running() {
		return fmt.Errorf("%s is already running", d.Name)
	}
	return d.start()
}

// Restart stops the daemon (SIGTERM) and starts it again with the same arguments.
func (d *Daemon) Restart() error {
	if err := d.Stop(30 * time.Second); err != nil {
		return err
	}
	return d.start()
}

// Exited is closed when the current daemon process has exited.
func (d *Daemon) Exited() <-chan struct{} {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.done
}

// newDaemon starts d (Name, Netns, Addr, DataDir, Args and NetworkOnly filled in) and
// stops it when the test ends.
func newDaemon(t testing.TB, d *Daemon) *Daemon {
	t.Helper()
	d.t, d.PeerURL = t, "http://"+d.Addr
	logDir := shortTempDir(t, "gtb-log-")
	d.logPath = filepath.Join(logDir, d.Name+".log")
	t.Cleanup(func() {
		t0 := time.Now()
		err := d.Stop(10 * time.Second)
		if os.Getenv("GROW_TESTBED_DEBUG") != "" {
			t.Logf("stopped %s in %s: %v", d.Name, time.Since(t0), err)
		}
		if t.Failed() {
			t.Logf("%s log:\n%s", d.Name, tail(d.Log(), 6000))
		}
	})
	if err := d.start(); err != nil {
		t.Fatal(err)
	}
	d.URL = "http://" + Forward(t, d.Netns, d.Addr)
	return d
}

func tail(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}

func shortTempDir(t testing.TB, prefix string) string {
	t.Helper()
	dir, err := os.MkdirTemp("", prefix)
	if err != nil {
		t.Fatalf("Failed to create a directory: %v", err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// HostdOptions configures Host.StartHostd.
type HostdOptions struct {
	DataDir string   // default: a new temporary directory
	Extra   []string // more flags
	// NBDTLSDir is --nbd-tls-dir: the client credentials for controllers that require TLS.
	NBDTLSDir string
	// TLS serves the agent's API over https with this PKI's server certificate (which
	// must name the host's storage address and 127.0.0.1); its URLs are then https.
	TLS *PKI
}

// HostdPort is the port hostd listens on inside its host namespace.
const HostdPort = 8444

// CgroupParent is the cgroup directory under which hostd on this host puts VMs with limits.
func (h *Host) CgroupParent() string { return fmt.Sprintf("%s-h%d", h.Bed.ID, h.Index) }

// StartHostd runs `grow hostd --data DIR --api STORAGEIP:8444 --bridge br0` in the
// host's network namespace (only: like an agent on a real host it sees the machine's
// cgroups) and returns it once its API answers. The API is reachable from the test
// process at d.URL and from the other hosts at d.PeerURL. $GROW_QEMU, when set, is the
// QEMU binary hostd runs (another QEMU build to test with).
func (h *Host) StartHostd(t testing.TB, opts HostdOptions) *Daemon {
	t.Helper()
	dir := opts.DataDir
	if dir == "" {
		dir = shortTempDir(t, fmt.Sprintf("gtb-h%d-", h.Index))
	}
	addr := fmt.Sprintf("%s:%d", h.StorageIP, HostdPort)
	args := []string{"hostd", "--data", dir, "--api", addr, "--bridge", h.Bridge,
		"--cgroup-parent", h.CgroupParent()}
	if q := os.Getenv("GROW_QEMU"); q != "" {
		args = append(args, "--qemu", q)
	}
	if opts.NBDTLSDir != "" {
		args = append(args, "--nbd-tls-dir", opts.NBDTLSDir)
	}
	if opts.TLS != nil {
		args = append(args, "--tls-cert", opts.TLS.ServerCert, "--tls-key", opts.TLS.ServerKey)
	}
	args = append(args, opts.Extra...)
	// The bed removes the cgroups at teardown, once the VMs in them are gone.
	h.Bed.mu.Lock()
	h.Bed.cgroups = append(h.Bed.cgroups, h.CgroupParent())
	h.Bed.mu.Unlock()
	d := newDaemon(t, &Daemon{Name: fmt.Sprintf("hostd-h%d", h.Index), Netns: h.Netns, Addr: addr, DataDir: dir, Args: args,
		NetworkOnly: true})
	if opts.TLS != nil {
		d.URL, d.PeerURL = "https"+strings.TrimPrefix(d.URL, "http"), "https"+strings.TrimPrefix(d.PeerURL, "http")
	}
	return d
}

// removeCgroups removes the cgroup tree named parent under every hierarchy once its
// processes are gone. A killed QEMU whose agent died first stays a zombie until PID 1
// reaps it, and keeps its cgroup busy until then: it waits up to 15 s for that.
func removeCgroups(parent string) {
	roots, _ := filepath.Glob("/sys/fs/cgroup/*/" + parent)
	if p := "/sys/fs/cgroup/" + parent; dirExists(p) {
		roots = append(roots, p)
	}
	deadline := time.Now().Add(15 * time.Second)
	for _, r := range roots {
		for {
			var dirs []string
			_ = filepath.WalkDir(r, func(p string, de os.DirEntry, err error) error {
				if err == nil && de.IsDir() {
					dirs = append(dirs, p)
				}
				return nil
			})
			for i := len(dirs) - 1; i >= 0; i-- {
				_ = syscall.Rmdir(dirs[i])
			}
			if !dirExists(r) || time.Now().After(deadline) {
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
}

func dirExists(p string) bool {
	st, err := os.Stat(p)
	return err == nil && st.IsDir()
}

// StoragedOptions configures Bed.StartStoraged.
type StoragedOptions struct {
	DataDir string   // default: a new temporary directory
	Disks   []string // --disk paths (none: DATA/disk0.img)
	Extra   []string // more flags, e.g. --pool-size 2GiB --cache 64MiB
	// TLS gives the controller a certificate of a new test CA (Storaged.PKI) and makes
	// it require TLS with verified client certificates for NBD; its API is then https.
	TLS bool
}

// Storaged is a storage controller in its own namespace on the storage network.
type Storaged struct {
	*Daemon
	IP      string // address on the storage network
	NBDAddr string // NBD TCP address (IP:10809), reachable from every host
	// TLSClientDir, when the controller requires TLS, holds the CA and a client
	// certificate (libnbd's tls-certificates, QEMU's tls-creds-x509 dir).
	TLSClientDir string
	PKI          *PKI // with StoragedOptions.TLS
}

// NBDURI returns the libnbd URI of an export, for tools run inside a bed namespace.
func (s *Storaged) NBDURI(export string) string {
	if s.TLSClientDir != "" {
		return "nbds://" + s.NBDAddr + "/" + export + "?tls-certificates=" + s.TLSClientDir
	}
	return "nbd://" + s.NBDAddr + "/" + export
}

// Disk returns a VM disk (host and port) for an export of this controller.
func (s *Storaged) Disk(export string) Disk {
	return Disk{NBDHost: s.IP, NBDPort: 10809, Export: export}
}

// StartStoraged runs `grow storaged` in a new namespace on the storage network
// (10.99.0.2, .3, ...), with NBD on IP:10809 and its admin API on IP:7480.
func (b *Bed) StartStoraged(t testing.TB, opts StoragedOptions) *Storaged {
	t.Helper()
	b.mu.Lock()
	i := b.storage
	b.storage++
	b.mu.Unlock()
	ns := fmt.Sprintf("%s-s%d", b.ID, i)
	if err := b.addNetns(ns); err != nil {
		t.Fatal(err)
	}
	if err := b.plug(ns, "st0", "snet", fmt.Sprintf("c%d", i)); err != nil {
		t.Fatal(err)
	}
	ip := fmt.Sprintf("%s%d", StoragePrefix, 2+i)
	if err := b.ip(ns, "addr", "add", ip+"/24", "dev", "st0"); err != nil {
		t.Fatal(err)
	}
	dir := opts.DataDir
	if dir == "" {
		dir = shortTempDir(t, fmt.Sprintf("gtb-s%d-", i))
	}
	addr := ip + ":7480"
	args := []string{"storaged", "--data", dir, "--nbd", ip + ":10809", "--api", addr}
	for _, d := range opts.Disks {
		args = append(args, "--disk", d)
	}
	args = append(args, opts.Extra...)
	var pki *PKI
	if opts.TLS {
		var err error
		if pki, err = NewPKI(shortTempDir(t, "gtb-pki-"), ip, "127.0.0.1"); err != nil {
			t.Fatal(err)
		}
		args = append(args, "--tls-cert", pki.ServerCert, "--tls-key", pki.ServerKey, "--tls-client-ca", pki.CA, "--tls-required")
	}
	d := newDaemon(t, &Daemon{Name: fmt.Sprintf("storaged-s%d", i), Netns: ns, Addr: addr, DataDir: dir, Args: args})
	if pki != nil {
		d.URL, d.PeerURL = "https"+strings.TrimPrefix(d.URL, "http"), "https"+strings.TrimPrefix(d.PeerURL, "http")
	}
	// Cleanups run last-in first-out, so this runs before the controller is stopped:
	// VMs still connected would hold its graceful shutdown for its full timeout.
	t.Cleanup(b.killHostProcesses)
	s := &Storaged{Daemon: d, IP: ip, NBDAddr: ip + ":10809", PKI: pki}
	if pki != nil {
		s.TLSClientDir = pki.ClientDir
	}
	return s
}

// killHostProcesses kills every process in the host namespaces (agents and VMs).
func (b *Bed) killHostProcesses() {
	for _, h := range b.Hosts {
		killNetnsProcesses(h.Netns)
	}
}
