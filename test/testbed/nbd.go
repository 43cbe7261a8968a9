package testbed

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/growserver/grow/guest/block"
)

// QemuNBD is a qemu-nbd server of one image file, for tests that do not need grow storaged.
type QemuNBD struct {
	Socket string // unix socket path
	Image  string
	cmd    *exec.Cmd
	done   chan struct{}
}

// StartQemuNBD serves image (raw) over a unix socket with qemu-nbd until the test ends.
func StartQemuNBD(t testing.TB, image string) *QemuNBD {
	t.Helper()
	dir, err := os.MkdirTemp("", "gnbd-")
	if err != nil {
		t.Fatalf("Failed to create a socket directory: %v", err)
	}
	s := &QemuNBD{Socket: filepath.Join(dir, "nbd.sock"), Image: image, done: make(chan struct{})}
	var out bytes.Buffer
	// --shared=8: the source and destination QEMU of a migration connect at once; --persistent: reconnects.
	s.cmd = exec.Command("qemu-nbd", "--format=raw", "--cache=none", "--aio=threads", "--shared=8", "--persistent",
		"--socket="+s.Socket, image)
	s.cmd.Stdout, s.cmd.Stderr = &out, &out
	s.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := s.cmd.Start(); err != nil {
		os.RemoveAll(dir)
		t.Fatalf("Failed to start qemu-nbd: %v", err)
	}
	go func() { _ = s.cmd.Wait(); close(s.done) }()
	t.Cleanup(func() {
		s.Stop()
		os.RemoveAll(dir)
	})
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := net.Dial("unix", s.Socket)
		if err == nil {
			c.Close()
			break
		}
		select {
		case <-s.done:
			t.Fatalf("qemu-nbd exited: %s", out.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("qemu-nbd did not listen on %s: %v", s.Socket, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	return s
}

// URI returns the server's NBD URI for libnbd tools.
func (s *QemuNBD) URI() string { return "nbd+unix:///?socket=" + s.Socket }

// Disk returns a VM disk on this server.
func (s *QemuNBD) Disk() Disk { return Disk{NBDSocket: s.Socket} }

// Stop kills qemu-nbd and waits for it.
func (s *QemuNBD) Stop() {
	select {
	case <-s.done:
		return
	default:
	}
	_ = syscall.Kill(-s.cmd.Process.Pid, syscall.SIGKILL)
	<-s.done
}

// CopyGuestImage copies the guest's disk.raw (the gold master) into dir and returns the copy.
func CopyGuestImage(t testing.TB, dir string) string {
	t.Helper()
	src := filepath.Join(GuestDir(t), "disk.raw")
	dst := filepath.Join(dir, "root.raw")
	in, err := os.Open(src)
	if err != nil {
		t.Fatalf("Failed to open %s: %v", src, err)
	}
	defer in.Close()
	out, err := os.Create(dst)
	if err != nil {
		t.Fatalf("Failed to create %s: %v", dst, err)
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		t.Fatalf("Failed to copy the guest image: %v", err)
	}
	if err := out.Close(); err != nil {
		t.Fatalf("Failed to write %s: %v", dst, err)
	}
	return dst
}

// BlankImage creates a sparse raw image of size bytes.
func BlankImage(t testing.TB, path string, size int64) string {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatalf("Failed to create %s: %v", path, err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatalf("Failed to size %s: %v", path, err)
	}
	return path
}

// VerifyBlocksFile checks the disk writer's blocks in a raw image file.
func VerifyBlocksFile(path string, slots, lastAck uint64) (block.Report, error) {
	f, err := os.Open(path)
	if err != nil {
		return block.Report{}, fmt.Errorf("Failed to open %s: %w", path, err)
	}
	defer f.Close()
	return block.Verify(f, slots, lastAck)
}

// VerifyBlocksNBD reads the first slots blocks of an NBD export (libnbd URI, e.g.
// nbd://10.99.0.2/vol or nbd+unix:///?socket=P) with nbdcopy, run inside netns if set,
// and checks the disk writer's blocks up to lastAck from the host side.
func VerifyBlocksNBD(netns, uri string, slots, lastAck uint64) (block.Report, error) {
	buf, err := ReadNBD(netns, uri, int64(slots)*block.Size)
	if err != nil {
		return block.Report{}, err
	}
	return block.Verify(bytes.NewReader(buf), slots, lastAck)
}

// ReadNBD returns the first n bytes of an NBD export, read with nbdcopy (inside netns if set).
func ReadNBD(netns, uri string, n int64) ([]byte, error) {
	argv := []string{"nbdcopy", "--synchronous", uri, "-"}
	if netns != "" {
		argv = append([]string{"ip", "netns", "exec", netns}, argv...)
	}
	cmd := exec.Command(argv[0], argv[1:]...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	pipe, err := cmd.StdoutPipe()
	if err != nil {
		return nil, fmt.Errorf("Failed to start nbdcopy: %w", err)
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("Failed to start nbdcopy: %w", err)
	}
	buf := make([]byte, n)
	_, rerr := io.ReadFull(pipe, buf)
	// The rest of the export is not needed.
	_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
	_ = cmd.Wait()
	if rerr != nil {
		return nil, fmt.Errorf("Failed to read %d bytes of %s with nbdcopy: %w: %s", n, uri, rerr, bytes.TrimSpace(stderr.Bytes()))
	}
	return buf, nil
}
