package storage

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/growserver/grow/internal/storage/adminclient"
)

// poolStatus reads `grow storage disk list --output json`.
func (c *ctl) poolStatus() adminclient.PoolStatus {
	c.t.Helper()
	var s adminclient.PoolStatus
	if err := json.Unmarshal([]byte(c.mustCLI("disk", "list", "--output", "json")), &s); err != nil {
		c.t.Fatalf("disk list --output json: %v", err)
	}
	return s
}

// ioLoad writes and verifies 4 KiB blocks of its own region until stopped, counting
// errors: the load a VM puts on the controller while a disk fails and is replaced.
type ioLoad struct {
	stop     chan struct{}
	wg       sync.WaitGroup
	ops      atomic.Int64
	failures atomic.Int64
	mu       sync.Mutex
	firstErr error
}

func startLoad(t *testing.T, c *ctl, volume string, base, size int64) *ioLoad {
	t.Helper()
	l := &ioLoad{stop: make(chan struct{})}
	for w := 0; w < 2; w++ {
		conn, err := dialNBD("unix", c.Socket, volume)
		if err != nil {
			t.Fatal(err)
		}
		l.wg.Add(1)
		go func(w int) {
			defer l.wg.Done()
			defer conn.Close()
			rng := rand.New(rand.NewPCG(uint64(w), 99))
			slots := int(size / crashBlock / 2)
			last := make(map[int]uint64)
			buf, rd := make([]byte, crashBlock), make([]byte, crashBlock)
			seq := uint64(w+1) << 40
			for i := 0; ; i++ {
				select {
				case <-l.stop:
					return
				default:
				}
				slot := rng.IntN(slots)*2 + w
				off := base + int64(slot)*crashBlock
				if rng.IntN(2) == 0 {
					seq++
					blockFor(buf, slot, seq)
					if err := conn.WriteAt(buf, off, false); err != nil {
						l.fail(fmt.Errorf("write at %d: %w", off, err))
						return
					}
					last[slot] = seq
				} else {
					if err := conn.ReadAt(rd, off); err != nil {
						l.fail(fmt.Errorf("read at %d: %w", off, err))
						return
					}
					blockFor(buf, slot, last[slot])
					if !bytes.Equal(buf, rd) {
						l.fail(fmt.Errorf("block at %d does not hold the last write %d", off, last[slot]))
						return
					}
				}
				if i%64 == 63 {
					if err := conn.Flush(); err != nil {
						l.fail(fmt.Errorf("flush: %w", err))
						return
					}
				}
				l.ops.Add(1)
			}
		}(w)
	}
	return l
}

func (l *ioLoad) fail(err error) {
	l.failures.Add(1)
	l.mu.Lock()
	if l.firstErr == nil {
		l.firstErr = err
	}
	l.mu.Unlock()
}

// finish stops the load and fails the test if any I/O failed.
func (l *ioLoad) finish(t *testing.T) {
	t.Helper()
	close(l.stop)
	l.wg.Wait()
	if n := l.failures.Load(); n > 0 {
		t.Fatalf("%d I/O failures under load, first: %v", n, l.firstErr)
	}
	t.Logf("load completed %d requests", l.ops.Load())
}

// samePairData fails unless two disks of a mirror pair hold the same data past the header area.
func samePairData(t *testing.T, a, b string) {
	t.Helper()
	const dataOffset = 1 << 20
	fa, err := os.Open(a)
	if err != nil {
		t.Fatal(err)
	}
	defer fa.Close()
	fb, err := os.Open(b)
	if err != nil {
		t.Fatal(err)
	}
	defer fb.Close()
	ra := io.NewSectionReader(fa, dataOffset, 1<<62)
	rb := io.NewSectionReader(fb, dataOffset, 1<<62)
	ba, bb := make([]byte, 1<<20), make([]byte, 1<<20)
	var off int64
	for {
		na, ea := io.ReadFull(ra, ba)
		nb, eb := io.ReadFull(rb, bb)
		n := min(na, nb)
		if !bytes.Equal(ba[:n], bb[:n]) {
			t.Fatalf("the mirror pair %s and %s differ in the MiB at data offset %d", a, b, off)
		}
		if ea != nil || eb != nil {
			// A longer disk may only have zeroes past the shorter one's end.
			if !bytes.Equal(ba[n:na], make([]byte, na-n)) || !bytes.Equal(bb[n:nb], make([]byte, nb-n)) {
				t.Fatalf("the mirror pair %s and %s differ at the end of the shorter disk", a, b)
			}
			return
		}
		off += int64(n)
	}
}

// TestPoolLoseAndReplaceDisk4 deletes one disk of a 4-disk pool under load.
func TestPoolLoseAndReplaceDisk4(t *testing.T) {
	testPoolLoseAndReplace(t, 4, 1, false, func(path string) error { return os.Remove(path) })
}

// TestPoolLoseAndReplaceDisk6 truncates one disk of a 6-disk pool under load.
func TestPoolLoseAndReplaceDisk6(t *testing.T) {
	testPoolLoseAndReplace(t, 6, 4, true, func(path string) error { return os.Truncate(path, 0) })
}

// testPoolLoseAndReplace loses disk victim under load, then replaces it: following the
// CLI's progress bar, or (noWait) polling the pool status for the rebuild's progress.
func testPoolLoseAndReplace(t *testing.T, ndisks, victim int, noWait bool, lose func(string) error) {
	needTools(t, "nbdcopy", "qemu-io")
	ddir := t.TempDir()
	var args []string
	var disks []string
	for i := 0; i < ndisks; i++ {
		p := filepath.Join(ddir, fmt.Sprintf("disk%d.img", i))
		disks = append(disks, p)
		args = append(args, "--disk", p)
	}
	args = append(args, "--pool-size", "192MiB")
	c := startCtl(t, args...)
	if s := c.poolStatus(); s.State != "ok" || len(s.Disks) != ndisks {
		t.Fatalf("a new pool of %d disks: %+v", ndisks, s)
	}
	// Fill a volume with random data that spans every pair, and run a load on another region.
	const size = 128 << 20
	src := randomFile(t, t.TempDir(), "src.raw", size/2, 11)
	c.mustCLI("volume", "create", "pv", "--size", fmt.Sprint(size))
	mustRun(t, "nbdcopy", src, c.uri("pv"))
	load := startLoad(t, c, "pv", size/2, size/2)
	time.Sleep(300 * time.Millisecond)

	old := disks[victim]
	if err := lose(old); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 30*time.Second, "the pool to report the lost disk", func() bool {
		s := c.poolStatus()
		return s.State == "degraded" && s.Disks[victim].State != "ok"
	})
	t.Logf("pool degraded: %+v", c.poolStatus().Disks[victim])
	time.Sleep(300 * time.Millisecond)
	if n := load.ops.Load(); n == 0 {
		t.Fatal("no I/O completed")
	}
	// Every volume stays readable and writable.
	sameAsFile(t, c, "pv", src)
	c.mustCLI("volume", "create", "while-degraded", "--size", "64MiB")
	mustRun(t, "qemu-io", "-f", "raw", "-c", "write -P 0x42 0 8M", "-c", "flush", "-c", "read -P 0x42 0 8M", c.uri("while-degraded"))

	// Replace it with a new disk while the load continues, following the progress.
	newDisk := filepath.Join(ddir, "new.img")
	if noWait {
		// Through the API rather than the CLI: a rebuild of little data can finish
		// before a CLI process has even exited.
		cl := c.client()
		var seen []string
		started, err := cl.ReplaceDisk(context.Background(), old, newDisk)
		if err != nil {
			t.Fatalf("replace: %v", err)
		}
		if d := started.Disks[victim]; d.Path == newDisk && d.State == "rebuilding" {
			seen = append(seen, fmt.Sprintf("%d/%d", d.RebuildDone, d.RebuildTotal))
		}
		deadline := time.Now().Add(120 * time.Second)
		for {
			st, err := cl.Pool(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			d := st.Disks[victim]
			if d.State == "rebuilding" && d.RebuildTotal > 0 {
				seen = append(seen, fmt.Sprintf("%d/%d", d.RebuildDone, d.RebuildTotal))
			}
			if d.State == "ok" {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("the rebuild did not finish in 120 s: %+v", d)
			}
			time.Sleep(10 * time.Millisecond)
		}
		t.Logf("rebuild progress seen while polling: %v", seen)
		if len(seen) == 0 {
			t.Errorf("the pool status never showed the rebuild's progress")
		}
	} else {
		r := c.cli("disk", "replace", old, newDisk)
		if r.Code != 0 {
			t.Fatalf("disk replace: exit %d\n%s%s\n%s", r.Code, r.Stdout, r.Stderr, c.log())
		}
		if !strings.Contains(r.Stderr, "Rebuilding onto") {
			t.Errorf("disk replace showed no progress:\n%s", r.Stderr)
		}
	}
	s := c.poolStatus()
	if s.State != "ok" || s.Disks[victim].Path != newDisk || s.Disks[victim].State != "ok" {
		t.Fatalf("after the replace: %+v", s)
	}
	load.finish(t)
	sameAsFile(t, c, "pv", src)
	if out := c.mustCLI("check"); !strings.Contains(out, "OK") {
		t.Errorf("check after the rebuild: %s", out)
	}

	// After a clean stop both sides of the pair hold the same data.
	c.stop()
	partner := disks[victim^1]
	samePairData(t, partner, newDisk)

	// The pool comes back healthy with the new disk, from pool.json.
	c.restart()
	if s := c.poolStatus(); s.State != "ok" || s.Disks[victim].Path != newDisk {
		t.Fatalf("after a restart: %+v", s)
	}
	sameAsFile(t, c, "pv", src)
	mustRun(t, "qemu-io", "-f", "raw", "-r", "-c", "read -P 0x42 0 8M", c.uri("while-degraded"))
}

// sameAsFile fails unless the start of a volume holds exactly the content of file.
func sameAsFile(t *testing.T, c *ctl, volume, file string) {
	t.Helper()
	want, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	conn, err := dialNBD("unix", c.Socket, volume)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	buf := make([]byte, 1<<20)
	for off := 0; off < len(want); off += len(buf) {
		n := min(len(buf), len(want)-off)
		if err := conn.ReadAt(buf[:n], int64(off)); err != nil {
			t.Fatalf("read %s at %d: %v", volume, off, err)
		}
		if !bytes.Equal(buf[:n], want[off:off+n]) {
			t.Fatalf("%s differs from %s in the MiB at %d", volume, file, off)
		}
	}
}

// TestPoolCrashDuringRebuild kills the controller with SIGKILL in the middle of a
// rebuild: after the restart the rebuild completes, the data is intact and both sides
// of the pair match.
func TestPoolCrashDuringRebuild(t *testing.T) {
	needTools(t, "nbdcopy")
	ddir := t.TempDir()
	var args, disks []string
	for i := 0; i < 4; i++ {
		p := filepath.Join(ddir, fmt.Sprintf("disk%d.img", i))
		disks = append(disks, p)
		args = append(args, "--disk", p)
	}
	c := startCtl(t, append(args, "--pool-size", "384MiB")...)
	const size = 256 << 20
	src := randomFile(t, t.TempDir(), "src.raw", size, 21)
	c.mustCLI("volume", "create", "rb", "--size", fmt.Sprint(size))
	mustRun(t, "nbdcopy", "--flush", src, c.uri("rb")) // durable before the kill
	if err := os.Remove(disks[2]); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 30*time.Second, "the pool to report the lost disk", func() bool { return c.poolStatus().State == "degraded" })
	newDisk := filepath.Join(ddir, "new2.img")
	c.mustCLI("disk", "replace", "--no-wait", disks[2], newDisk)
	cl := c.client()
	waitFor(t, 30*time.Second, "the rebuild to make progress", func() bool {
		st, err := cl.Pool(context.Background())
		return err == nil && st.Disks[2].RebuildDone > 0
	})
	st, _ := cl.Pool(context.Background())
	t.Logf("killing the controller at rebuild %d/%d (%s)", st.Disks[2].RebuildDone, st.Disks[2].RebuildTotal, st.Disks[2].State)
	c.kill()
	state, _ := os.ReadFile(filepath.Join(c.dir, "pool.json"))
	t.Logf("pool.json after the kill: %s", state)
	c.restart()
	after := c.poolStatus()
	t.Logf("after the restart: %s, disk 2 %s at %s %d/%d", after.State, after.Disks[2].Path, after.Disks[2].State, after.Disks[2].RebuildDone, after.Disks[2].RebuildTotal)
	if after.Disks[2].Path != newDisk {
		t.Fatalf("after the restart the pool forgot the replacement: %+v", after.Disks[2])
	}
	// The data is readable at once, from the surviving side while the rebuild goes on.
	if after.Disks[2].State != "rebuilding" && after.Disks[2].State != "ok" {
		t.Errorf("after the restart disk 2 is %s", after.Disks[2].State)
	}
	defer func() {
		if t.Failed() {
			t.Logf("controller log:\n%s", c.log())
		}
	}()
	sameAsFile(t, c, "rb", src)
	waitFor(t, 120*time.Second, "the rebuild to complete after the restart", func() bool {
		s := c.poolStatus()
		return s.State == "ok" && s.Disks[2].State == "ok"
	})
	sameAsFile(t, c, "rb", src)
	if out := c.mustCLI("check"); !strings.Contains(out, "OK") {
		t.Errorf("check: %s", out)
	}
	c.stop()
	samePairData(t, disks[3], newDisk)
}
