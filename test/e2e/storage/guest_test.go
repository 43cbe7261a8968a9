package storage

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/growserver/grow/guest/block"
	"github.com/growserver/grow/test/testbed"
)

// serialLog collects a guest's console and lets the test wait for lines.
type serialLog struct {
	mu      sync.Mutex
	lines   []string
	lastAck uint64
	changed chan struct{}
}

var ackRE = regexp.MustCompile(`GROW-ACK seq=(\d+)`)

func (s *serialLog) consume(r io.Reader) {
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		line := strings.TrimRight(sc.Text(), "\r")
		s.mu.Lock()
		if m := ackRE.FindStringSubmatch(line); m != nil {
			n, _ := strconv.ParseUint(m[1], 10, 64)
			s.lastAck = max(s.lastAck, n)
		} else {
			s.lines = append(s.lines, line)
		}
		ch := s.changed
		s.changed = make(chan struct{})
		s.mu.Unlock()
		close(ch)
	}
}

// wait waits until cond (called under the lock) is true.
func (s *serialLog) wait(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.After(timeout)
	for {
		s.mu.Lock()
		ok := cond()
		ch := s.changed
		s.mu.Unlock()
		if ok {
			return
		}
		select {
		case <-ch:
		case <-deadline:
			s.mu.Lock()
			tail := s.lines[max(0, len(s.lines)-30):]
			s.mu.Unlock()
			t.Fatalf("Timed out after %s waiting for %s; console tail:\n%s", timeout, what, strings.Join(tail, "\n"))
		}
	}
}

func (s *serialLog) find(prefix string) string {
	for _, l := range s.lines {
		if i := strings.Index(l, prefix); i >= 0 {
			return l[i:]
		}
	}
	return ""
}

func (s *serialLog) ack() uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.lastAck
}

// TestGuestDiskOverNBD boots the tiny test guest with its root filesystem on a clone of
// the imported gold image and a blank data disk, both served by grow storaged over NBD.
// The guest writes self-checking blocks with O_DIRECT|O_DSYNC; the controller is killed
// with SIGKILL and restarted under it; every block the guest saw acknowledged must be
// on the disk afterwards.
func TestGuestDiskOverNBD(t *testing.T) {
	needTools(t, "qemu-system-x86_64", "nbdcopy", "qemu-img")
	guest := testbed.GuestDir(t)
	c := startCtl(t)
	// A private copy of the gold master: `make guest` may rebuild the original meanwhile.
	gold := filepath.Join(t.TempDir(), "gold.raw")
	mustRun(t, "cp", "--sparse=always", filepath.Join(guest, "disk.raw"), gold)
	c.mustCLI("image", "import", "guest-gold", gold)
	c.mustCLI("volume", "clone", "guest-gold", "vm-root")
	c.mustCLI("volume", "create", "vm-data", "--size", "64MiB")

	accel := testbed.Accel()
	nbdDev := func(node, export string) string {
		return fmt.Sprintf(`{"driver":"raw","node-name":%q,"file":{"driver":"nbd","server":{"type":"unix","path":%q},"export":%q,"reconnect-delay":10}}`, node, c.Socket, export)
	}
	args := []string{"-accel", accel, "-M", "pc", "-m", "256", "-smp", "1",
		"-nodefaults", "-display", "none", "-monitor", "none", "-serial", "stdio", "-no-reboot",
		"-kernel", filepath.Join(guest, "vmlinux"), "-initrd", filepath.Join(guest, "initrd.img"),
		"-append", "console=ttyS0 panic=-1 grow.run=diskwriter grow.disk=serial:growdata grow.write_interval=10ms",
		"-blockdev", nbdDev("root", "vm-root"), "-device", "virtio-blk-pci,drive=root,serial=growroot",
		"-blockdev", nbdDev("data", "vm-data"), "-device", "virtio-blk-pci,drive=data,serial=growdata",
		"-nic", "none",
	}
	if accel == "kvm" {
		args = append(args, "-cpu", "host")
	}
	cmd := exec.Command("qemu-system-x86_64", args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = cmd.Stdout
	if err := cmd.Start(); err != nil {
		t.Fatalf("Failed to start QEMU: %v", err)
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-exited
	})
	con := &serialLog{changed: make(chan struct{})}
	go con.consume(stdout)

	con.wait(t, 150*time.Second, "the guest to boot from its NBD root", func() bool { return con.find("GROW-READY") != "" })
	ready := con.find("GROW-READY")
	t.Logf("guest: %s", ready)
	if !strings.Contains(ready, "root=vda") {
		t.Fatalf("the guest did not boot from its NBD root disk: %s", ready)
	}
	con.wait(t, 60*time.Second, "the guest's disk writer to get 100 acknowledgements", func() bool {
		return con.find("GROW-WRITER-ERROR") != "" || con.lastAck >= 100
	})
	if e := con.find("GROW-WRITER-ERROR"); e != "" {
		t.Fatalf("guest disk writer: %s", e)
	}
	writer := con.find("GROW-WRITER ")
	var slots uint64
	if m := regexp.MustCompile(`slots=(\d+)`).FindStringSubmatch(writer); m != nil {
		slots, _ = strconv.ParseUint(m[1], 10, 64)
	}
	if slots == 0 {
		t.Fatalf("cannot tell the writer's slot count from %q", writer)
	}

	// Kill the controller under the running guest and bring it back.
	before := con.ack()
	c.kill()
	time.Sleep(500 * time.Millisecond)
	c.restart()
	con.wait(t, 90*time.Second, "the guest's writes to resume after the controller restart", func() bool { return con.lastAck >= before+100 })
	t.Logf("guest writes: %d acknowledged before the kill, %d after the restart", before, con.ack())

	// Stop the guest, then check that every acknowledged block is on the volume.
	_ = cmd.Process.Kill()
	<-exited
	last := con.ack()
	out := filepath.Join(t.TempDir(), "data.raw")
	mustRun(t, "nbdcopy", c.uri("vm-data"), out)
	f, err := os.Open(out)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	rep, err := block.Verify(f, slots, last)
	if err != nil {
		t.Fatalf("acknowledged guest writes lost: %v", err)
	}
	if rep.Checked == 0 || rep.Newest < last {
		t.Fatalf("verify: %+v for last ack %d", rep, last)
	}
	// The gold image is untouched by the guest's writes to its clone.
	mustRun(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", gold, c.qemuJSON("guest-gold"))
	if out := c.mustCLI("check"); !strings.Contains(out, "OK") {
		t.Errorf("check: %s", out)
	}
}
