package mirror

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/growserver/grow/test/testbed"
)

// Sizes of the guests' data volumes: 16384 writer slots of 4 KiB, so that the ring
// does not wrap within a test at the write interval used here.
const (
	guestVolSize  = 64 << 20
	guestSlots    = guestVolSize / 4096
	writeInterval = "20ms"
)

// needTools fails the test if a tool is missing (`make deps` installs them all).
func needTools(t *testing.T, tools ...string) {
	t.Helper()
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s is not installed (run make deps)", tool)
		}
	}
}

// setup builds a bed with one host and a controller pair (skipped with -short).
func setup(t *testing.T, opts testbed.StoragePairOptions) (*testbed.Bed, *testbed.StoragePair) {
	t.Helper()
	b := testbed.New(t, testbed.Options{Hosts: 1})
	needTools(t, "qemu-system-x86_64", "qemu-io", "nbdcopy", "nbdinfo", "nft")
	if opts.DiskSize == "" {
		opts.DiskSize = "1GiB"
	}
	return b, b.StartStoragePair(t, opts)
}

// createVolume creates a volume through controller c and waits until the pair reports it synced.
func createVolume(t *testing.T, p *testbed.StoragePair, c *testbed.PairController, name string, size int64) testbed.PairView {
	t.Helper()
	v, err := p.CreateVolume(c, name, size)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// primaryOf returns the current primary of a volume and its partner.
func primaryOf(t *testing.T, p *testbed.StoragePair, name string) (*testbed.PairController, *testbed.PairController) {
	t.Helper()
	pc, err := p.PrimaryOf(name)
	if err != nil {
		t.Fatal(err)
	}
	return pc, pc.Other()
}

// waitSynced waits for the pair to report the volume synced, failing the test if it does not.
func waitSynced(t *testing.T, p *testbed.StoragePair, name string, timeout time.Duration) testbed.PairView {
	t.Helper()
	v, err := p.WaitSynced(name, timeout)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// guest is a test guest whose data disk is a mirrored volume, reached at the
// volume's nbd_address with QEMU's reconnect-delay, running the disk writer.
type guest struct {
	vm     *testbed.VM
	volume string
	ioErrs int // console offset up to which I/O errors have been checked
}

// startGuest boots a guest on host 0 with the volume as its data disk (serial
// growdata), addressed as the pair reports it, and waits for its first acknowledged writes.
func startGuest(t *testing.T, b *testbed.Bed, p *testbed.StoragePair, name, volume string) *guest {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	pc, err := p.View(ctx, volume).Primary(p)
	if err != nil {
		t.Fatal(err)
	}
	v, err := pc.Volume(ctx, volume)
	if err != nil {
		t.Fatal(err)
	}
	host, port, err := v.NBDHostPort()
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range p.Ctl {
		if host == c.IP {
			t.Errorf("volume %s: nbd_address %s is a controller's own address, not a service address that can move", volume, v.NBDAddress)
		}
	}
	vm := testbed.StartVM(t, testbed.VMConfig{
		Name:  name,
		Netns: b.Hosts[0].Netns,
		Append: fmt.Sprintf("panic=-1 grow.run=diskwriter grow.disk=serial:growdata grow.slots=%d grow.write_interval=%s",
			guestSlots, writeInterval),
		Disks: []testbed.Disk{guestDisk(p, host, port, volume)},
	})
	g := &guest{vm: vm, volume: volume}
	if _, err := vm.Console.WaitReady(0, 150*time.Second); err != nil {
		t.Fatalf("guest %s did not boot: %v", name, err)
	}
	g.waitAcks(t, 20, 60*time.Second, "its first writes")
	return g
}

// guestDisk is the guest's data disk: the volume at its service address, over TLS
// with the bed's host certificate when the pair requires it, verified against the
// name both controllers' certificates carry (either may answer on that address).
func guestDisk(p *testbed.StoragePair, host string, port int, volume string) testbed.Disk {
	d := testbed.Disk{NBDHost: host, NBDPort: port, Export: volume, Serial: "growdata", ReconnectDelay: 20}
	if p.PKI != nil {
		d.TLSCredsDir, d.TLSHostname = p.PKI.ClientDir, testbed.TLSServerName
	}
	return d
}

// ioErrorRe matches what the guest prints when a write fails: the writer's retry or
// error lines, and the kernel's block-layer errors.
var ioErrorRe = regexp.MustCompile(`GROW-WRITER-RETRY[^\n]*|GROW-WRITER-ERROR[^\n]*|[^\n]*I/O error[^\n]*|[^\n]*blk_update_request[^\n]*`)

// checkNoIOError fails the test if the guest's console shows an I/O error since the last check.
func (g *guest) checkNoIOError(t *testing.T, when string) {
	t.Helper()
	out := g.vm.Console.Output()
	if m := ioErrorRe.FindString(out[g.ioErrs:]); m != "" {
		t.Errorf("guest on %s saw an I/O error %s: %s", g.volume, when, strings.TrimSpace(m))
	}
	g.ioErrs = len(out)
}

// lastAck is the newest sequence number the guest's writer reported acknowledged.
func (g *guest) lastAck() uint64 {
	n, _ := g.vm.Console.LastAck()
	return n
}

// waitAcks waits until the writer acknowledged n more blocks than it had.
func (g *guest) waitAcks(t *testing.T, n uint64, timeout time.Duration, what string) time.Duration {
	t.Helper()
	t0 := time.Now()
	before := g.lastAck()
	if _, err := g.vm.Console.WaitAckAbove(before+n-1, timeout); err != nil {
		t.Fatalf("guest on %s did not continue (%s): %v", g.volume, what, err)
	}
	return time.Since(t0)
}

// stop kills the guest and returns the newest acknowledged sequence number.
func (g *guest) stop() uint64 {
	g.vm.Kill()
	// The console file is tailed every 20 ms: let the last lines in.
	time.Sleep(100 * time.Millisecond)
	return g.lastAck()
}

// verifyBlocks checks, reading the volume over NBD from controller c's own address,
// that every block the guest saw acknowledged (the newest guestSlots of them) is there.
func verifyBlocks(t *testing.T, b *testbed.Bed, c *testbed.PairController, volume string, lastAck uint64) {
	t.Helper()
	rep, err := testbed.VerifyBlocksNBD(b.Hosts[0].Netns, c.NBDURI(volume), guestSlots, lastAck)
	if err != nil {
		t.Fatalf("volume %s read from %s: acknowledged guest writes lost: %v", volume, c.Name, err)
	}
	if rep.Checked == 0 || rep.Newest < lastAck {
		t.Fatalf("volume %s read from %s: %+v for last acknowledged %d", volume, c.Name, rep, lastAck)
	}
	t.Logf("volume %s on %s: %d acknowledged blocks verify (newest %d)", volume, c.Name, rep.Checked, rep.Newest)
}

// chunkHashes reads a whole export over NBD (from inside ns) and returns the SHA-256
// of each 1 MiB chunk.
func chunkHashes(ns, uri string) ([][32]byte, error) {
	cmd := testbed.NetnsCommand(ns, "nbdcopy", "--synchronous", uri, "-")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("Failed to start nbdcopy: %w", err)
	}
	defer func() { _ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL); _ = cmd.Wait() }()
	r := bufio.NewReaderSize(out, 1<<20)
	buf := make([]byte, 1<<20)
	var sums [][32]byte
	for {
		n, err := io.ReadFull(r, buf)
		if n > 0 {
			sums = append(sums, sha256.Sum256(buf[:n]))
		}
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("Failed to read %s: %w", uri, err)
		}
	}
	if err := cmd.Wait(); err != nil {
		return nil, fmt.Errorf("nbdcopy %s: %w: %s", uri, err, bytes.TrimSpace(stderr.Bytes()))
	}
	return sums, nil
}

// compareSides proves that both controllers hold the same data for a synced volume:
// it reads the volume from the primary, drains the primary so that its partner
// becomes primary, reads the volume from the partner, compares the two 1 MiB chunk by
// chunk, and resumes the drained controller.
func compareSides(t *testing.T, b *testbed.Bed, p *testbed.StoragePair, volume string) {
	t.Helper()
	waitSynced(t, p, volume, 90*time.Second)
	pc, sc := primaryOf(t, p, volume)
	ns := b.Hosts[0].Netns
	first, err := chunkHashes(ns, pc.NBDURI(volume))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if _, err := pc.CLI(ctx, "controller", "drain", pc.Name); err != nil {
		t.Fatal(err)
	}
	if _, err := p.WaitVolume(volume, 60*time.Second, "primary on "+sc.Name, func(v testbed.PairView) bool {
		np, err := v.Primary(p)
		return err == nil && np == sc && v.Synced()
	}); err != nil {
		t.Fatal(err)
	}
	second, err := chunkHashes(ns, sc.NBDURI(volume))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := pc.CLI(ctx, "controller", "resume", pc.Name); err != nil {
		t.Fatal(err)
	}
	if len(first) != len(second) {
		t.Fatalf("volume %s: %d MiB read from %s, %d MiB from %s", volume, len(first), pc.Name, len(second), sc.Name)
	}
	var diff []string
	for i := range first {
		if first[i] != second[i] {
			diff = append(diff, strconv.Itoa(i))
		}
	}
	if len(diff) > 0 {
		t.Fatalf("volume %s differs between %s and %s in %d of %d MiB chunks: %s", volume, pc.Name, sc.Name,
			len(diff), len(first), strings.Join(diff[:min(len(diff), 20)], " "))
	}
	t.Logf("volume %s: %s and %s identical over %d MiB", volume, pc.Name, sc.Name, len(first))
	waitSynced(t, p, volume, 90*time.Second)
}

// nbdWrite writes length bytes of the byte pat at off to an export with qemu-io from
// inside ns, then flushes; it reports whether the server acknowledged both within timeout.
func nbdWrite(ns, uri string, off, length int64, pat byte, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, "ip", "netns", "exec", ns, "qemu-io", "-f", "raw",
		"-c", fmt.Sprintf("write -P 0x%02x %d %d", pat, off, length), "-c", "flush", uri)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = time.Second
	out, err := cmd.CombinedOutput()
	if ctx.Err() != nil {
		return fmt.Errorf("no answer within %s", timeout)
	}
	if err != nil {
		return fmt.Errorf("%w: %s", err, bytes.TrimSpace(out))
	}
	if bytes.Contains(out, []byte("failed")) {
		return fmt.Errorf("%s", bytes.TrimSpace(out))
	}
	return nil
}
