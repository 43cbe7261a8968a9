package control

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/growserver/grow/test/testbed"
)

// TestDebianGoldMaster builds a real Debian 12 gold master with `grow image build`,
// provisions a server from it on `grow serve` all-in-one (inside a private network
// namespace) and checks that cloud-init inside applied the hostname, the address and
// the SSH key. It takes minutes: debootstrap downloads about 90 MiB and the guest boots
// systemd and cloud-init under TCG.
func TestDebianGoldMaster(t *testing.T) {
	if testing.Short() {
		t.Skip("needs root, network access to a Debian mirror, debootstrap and QEMU; takes minutes")
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	// Mostly downloading and unpacking at first: overlap it with the two-host scenario.
	t.Parallel()
	bin := testbed.GrowBinary(t)
	ns := fmt.Sprintf("growdeb-%d", os.Getpid())
	if out, err := exec.Command("ip", "netns", "add", ns).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add: %v: %s", err, out)
	}
	t.Cleanup(func() {
		if pids, err := exec.Command("ip", "netns", "pids", ns).Output(); err == nil {
			for _, p := range strings.Fields(string(pids)) {
				_ = exec.Command("kill", "-9", p).Run()
			}
		}
		_ = exec.Command("ip", "netns", "del", ns).Run()
	})
	if out, err := exec.Command("ip", "-n", ns, "link", "set", "lo", "up").CombinedOutput(); err != nil {
		t.Fatalf("lo up: %v: %s", err, out)
	}
	data := t.TempDir()
	log, err := os.Create(filepath.Join(data, "serve.log"))
	if err != nil {
		t.Fatal(err)
	}
	srv := testbed.NetnsCommand(ns, bin, "serve", "--data", data, "--api", serveAddr, "--guest-dir", "",
		"--bridge", "grow0", "--bridge-cidr", "10.78.0.1/24", "--pool-size", "8GiB", "--cache", "64MiB", "--ready-timeout", "12m")
	srv.Stdout, srv.Stderr = log, log
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	s := &serve{t: t, bin: bin, ns: ns, data: data, logPath: log.Name(), cmd: srv, done: make(chan struct{})}
	go func() { _ = srv.Wait(); close(s.done) }()
	t.Cleanup(func() {
		s.kill()
		if t.Failed() {
			b, _ := os.ReadFile(s.logPath)
			t.Logf("grow serve log:\n%s", tail(string(b), 80))
		}
	})
	s.url = "http://" + testbed.Forward(t, ns, serveAddr)
	s.waitUp()
	b, _ := os.ReadFile(filepath.Join(data, "admin.token"))
	s.token = strings.TrimSpace(string(b))

	t0 := time.Now()
	s.mustGrow("image", "build", "debian-12", "deb12", "--boot-dir", filepath.Join(data, "images", "deb12"), "--work-dir", data)
	t.Logf("%6.1fs gold master built and imported", time.Since(t0).Seconds())
	key := filepath.Join(t.TempDir(), "id.pub")
	if err := os.WriteFile(key, []byte("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGrowDebianE2E e2e@example\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	s.mustGrow("customer", "create", "deb")
	out := s.mustGrow("server", "create", "deb1", "--customer", "deb", "--plan", "D", "--image", "deb12", "--ssh-key", key)
	t.Logf("%6.1fs %s", time.Since(t0).Seconds(), strings.TrimSpace(out))
	if !strings.Contains(out, "GROW-READY hostname=deb1 ip=10.78.0.2") || !strings.Contains(out, "keys=1") {
		t.Fatalf("the Debian guest did not report hostname, address and key from cloud-init:\n%s", out)
	}
	s.mustGrow("server", "delete", "deb1")
}
