package pool

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/growserver/grow/internal/storage/dev"
)

const testDiskSize = 9<<20 + tailSize // 1 MiB header area, 8 MiB of data, the tail block

func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

// makeDisks creates n sparse disk files and returns the state dir and their paths.
func makeDisks(t *testing.T, n int, size int64) (string, []string) {
	t.Helper()
	dir := t.TempDir()
	var paths []string
	for i := 0; i < n; i++ {
		p := filepath.Join(dir, fmt.Sprintf("disk%d.img", i))
		if err := CreateFileDisk(p, size); err != nil {
			t.Fatal(err)
		}
		paths = append(paths, p)
	}
	return filepath.Join(dir, "state"), paths
}

// faults makes chosen disks return EIO: the test seam behind Options.Fault.
type faults struct{ mask atomic.Uint64 }

func (f *faults) set(disk int)   { f.mask.Or(1 << disk) }
func (f *faults) clear(disk int) { f.mask.And(^uint64(1 << disk)) }
func (f *faults) hook(disk int, op string, off int64) error {
	if f.mask.Load()&(1<<disk) != 0 {
		return syscall.EIO
	}
	return nil
}

func openTestPool(t *testing.T, state string, paths []string, opts Options) *Pool {
	t.Helper()
	if opts.Logger == nil {
		opts.Logger = testLogger(t)
	}
	if opts.HealthInterval == 0 {
		opts.HealthInterval = 20 * time.Millisecond
	}
	p, err := Open(state, paths, opts)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

// fill writes random data over the whole pool and returns it as the model.
func fill(t *testing.T, p *Pool, seed uint64) []byte {
	t.Helper()
	model := make([]byte, p.Size())
	r := rand.New(rand.NewPCG(seed, 1))
	for i := range model {
		model[i] = byte(r.Uint32())
	}
	for off := int64(0); off < p.Size(); off += 1 << 20 {
		n := min(1<<20, p.Size()-off)
		if _, err := p.WriteAt(model[off:off+n], off); err != nil {
			t.Fatalf("fill: %v", err)
		}
	}
	return model
}

func verify(t *testing.T, p *Pool, model []byte) {
	t.Helper()
	got := make([]byte, len(model))
	// Read in odd-sized pieces so requests straddle stripe units and pairs.
	for off := 0; off < len(model); {
		n := min(100_000, len(model)-off)
		if _, err := p.ReadAt(got[off:off+n], int64(off)); err != nil {
			t.Fatalf("verify read at %d: %v", off, err)
		}
		off += n
	}
	if i := firstDiff(got, model); i >= 0 {
		t.Fatalf("pool content differs from the model at byte %d", i)
	}
}

func firstDiff(a, b []byte) int {
	for i := range a {
		if a[i] != b[i] {
			return i
		}
	}
	return -1
}

// load runs workers that each own a region of the pool, write random data and read it
// back against the model; it returns a stop function that reports the op count.
func load(t *testing.T, p *Pool, model []byte, workers int, seed uint64) func() int64 {
	t.Helper()
	var ops atomic.Int64
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	region := int64(len(model)) / int64(workers)
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(seed, uint64(w)))
			lo := int64(w) * region
			buf := make([]byte, 256<<10)
			for ctx.Err() == nil {
				n := 1 + r.Int64N(min(int64(len(buf)), region))
				off := lo + r.Int64N(region-n+1)
				if r.IntN(2) == 0 {
					b := buf[:n]
					for i := range b {
						b[i] = byte(r.Uint32())
					}
					if _, err := p.WriteAt(b, off); err != nil {
						t.Errorf("load write %d at %d: %v", n, off, err)
						return
					}
					copy(model[off:], b)
				} else {
					b := buf[:n]
					if _, err := p.ReadAt(b, off); err != nil {
						t.Errorf("load read %d at %d: %v", n, off, err)
						return
					}
					if i := firstDiff(b, model[off:off+n]); i >= 0 {
						t.Errorf("load read %d at %d: wrong data at byte %d", n, off, off+int64(i))
						return
					}
				}
				if r.IntN(50) == 0 {
					if err := p.Sync(); err != nil {
						t.Errorf("load sync: %v", err)
						return
					}
				}
				ops.Add(1)
			}
		}()
	}
	return func() int64 {
		cancel()
		wg.Wait()
		return ops.Load()
	}
}

// compareSides checks that both disks of every pair hold identical data areas.
func compareSides(t *testing.T, p *Pool, paths []string) {
	t.Helper()
	for pair := 0; pair < len(paths)/2; pair++ {
		a, err := os.ReadFile(paths[2*pair])
		if err != nil {
			t.Fatal(err)
		}
		b, err := os.ReadFile(paths[2*pair+1])
		if err != nil {
			t.Fatal(err)
		}
		lo, hi := p.l.dataOff, p.l.diskBytes()
		if int64(len(a)) < hi || int64(len(b)) < hi {
			t.Fatalf("pair %d: disks are %d and %d bytes, need %d", pair, len(a), len(b), hi)
		}
		if i := firstDiff(a[lo:hi], b[lo:hi]); i >= 0 {
			t.Fatalf("pair %d: %s and %s differ at disk offset %d", pair, paths[2*pair], paths[2*pair+1], lo+int64(i))
		}
	}
}

func waitState(t *testing.T, p *Pool, disk int, want string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		if p.Status().Disks[disk].State == want {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("disk %d did not become %s: %+v", disk, want, p.Status())
}

func TestReadWrite(t *testing.T) {
	for _, n := range []int{1, 2, 4, 6} {
		t.Run(fmt.Sprintf("%d disks", n), func(t *testing.T) {
			state, paths := makeDisks(t, n, testDiskSize)
			p := openTestPool(t, state, paths, Options{})
			pairs := max(1, n/2)
			if want := int64(pairs) * 8 << 20; p.Size() != want {
				t.Fatalf("Size = %d, want %d", p.Size(), want)
			}
			model := fill(t, p, uint64(n))
			stop := load(t, p, model, 3, 7)
			time.Sleep(200 * time.Millisecond)
			if ops := stop(); ops == 0 {
				t.Fatal("no load ran")
			}
			verify(t, p, model)
			if err := p.Sync(); err != nil {
				t.Fatal(err)
			}
			if n > 1 {
				compareSides(t, p, paths)
			}
			if st := p.Status(); st.State != StateOK {
				t.Fatalf("status %+v", st)
			}
			// Out of range requests are errors that touch nothing.
			if _, err := p.ReadAt(make([]byte, 10), p.Size()-5); err == nil {
				t.Fatal("read past the end succeeded")
			}
			if _, err := p.WriteAt(make([]byte, 10), -1); err == nil {
				t.Fatal("write at a negative offset succeeded")
			}
			p.Close()
			if _, err := p.ReadAt(make([]byte, 1), 0); !errors.Is(err, ErrClosed) {
				t.Fatalf("read after close: %v", err)
			}
			p = openTestPool(t, state, paths, Options{})
			verify(t, p, model)
		})
	}
}

func TestDiscard(t *testing.T) {
	state, paths := makeDisks(t, 4, testDiskSize)
	p := openTestPool(t, state, paths, Options{})
	model := fill(t, p, 3)
	off, n := int64(100_000), int64(3<<20+12345)
	if err := p.Discard(off, n); err != nil {
		t.Fatal(err)
	}
	clear(model[off : off+n])
	verify(t, p, model)
	compareSides(t, p, paths)
	var st syscall.Stat_t
	if err := syscall.Stat(paths[0], &st); err != nil {
		t.Fatal(err)
	}
	if st.Blocks*512 > 9<<20-1<<20 {
		t.Fatalf("discard gave no space back: %d bytes allocated", st.Blocks*512)
	}
	if err := p.Discard(p.Size()-10, 11); err == nil {
		t.Fatal("discard past the end succeeded")
	}
}

// TestDegradedAndReplace loses one disk of each pair under load (I/O errors, truncation,
// deletion), keeps serving, survives a restart, then replaces and rebuilds every lost
// disk under load and checks both sides of every pair byte for byte.
func TestDegradedAndReplace(t *testing.T) {
	for _, tc := range []struct {
		disks int
		kinds []string
	}{
		{4, []string{"truncate", "eio"}},
		{6, []string{"eio", "delete", "truncate"}},
		{2, []string{"delete"}},
	} {
		t.Run(fmt.Sprintf("%d disks %v", tc.disks, tc.kinds), func(t *testing.T) {
			var fl faults
			state, paths := makeDisks(t, tc.disks, testDiskSize)
			opts := Options{Fault: fl.hook, RebuildRate: 16 << 20}
			p := openTestPool(t, state, paths, opts)
			model := fill(t, p, 11)
			stop := load(t, p, model, 4, 1)
			time.Sleep(100 * time.Millisecond)

			var lost []int
			for pair, kind := range tc.kinds {
				d := 2*pair + pair%2
				lost = append(lost, d)
				switch kind {
				case "eio":
					fl.set(d)
				case "truncate":
					if err := os.Truncate(paths[d], 2<<20); err != nil {
						t.Fatal(err)
					}
				case "delete":
					if err := os.Remove(paths[d]); err != nil {
						t.Fatal(err)
					}
				}
			}
			for _, d := range lost {
				waitState(t, p, d, DiskFailed)
			}
			time.Sleep(100 * time.Millisecond)
			if ops := stop(); ops == 0 {
				t.Fatal("no load ran")
			}
			if t.Failed() {
				t.FailNow()
			}
			st := p.Status()
			if st.State != StateDegraded {
				t.Fatalf("pool state %q, want degraded: %+v", st.State, st)
			}
			for _, d := range lost {
				if st.Disks[d].Error == "" {
					t.Errorf("disk %d failed without a reason", d)
				}
			}
			verify(t, p, model)

			// A restart must not trust the lost disks, even the one whose
			// faults are gone (its data is stale).
			p.Close()
			for _, d := range lost {
				fl.clear(d)
			}
			p = openTestPool(t, state, paths, opts)
			if st := p.Status(); st.State != StateDegraded {
				t.Fatalf("after restart: %+v", st)
			}
			verify(t, p, model)

			// Replace each lost disk with a fresh file while the load runs.
			stop = load(t, p, model, 4, 2)
			newPaths := append([]string(nil), paths...)
			for _, d := range lost {
				np := filepath.Join(filepath.Dir(paths[d]), fmt.Sprintf("new%d.img", d))
				if err := CreateFileDisk(np, testDiskSize); err != nil {
					t.Fatal(err)
				}
				if err := p.Replace(paths[d], np); err != nil {
					t.Fatalf("Replace: %v", err)
				}
				if s := p.Status().Disks[d]; s.State != DiskRebuilding && s.State != DiskOK {
					t.Fatalf("new disk %d is %+v", d, s)
				}
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				err := p.WaitRebuild(ctx)
				cancel()
				if err != nil {
					t.Fatalf("WaitRebuild: %v", err)
				}
				newPaths[d] = np
			}
			stop()
			if t.Failed() {
				t.FailNow()
			}
			if st := p.Status(); st.State != StateOK {
				t.Fatalf("after rebuild: %+v", st)
			}
			verify(t, p, model)
			if err := p.Sync(); err != nil {
				t.Fatal(err)
			}
			compareSides(t, p, newPaths)
			p.Close()

			// pool.json knows the new members even when the old paths are given.
			p = openTestPool(t, state, paths, opts)
			if st := p.Status(); st.State != StateOK {
				t.Fatalf("after rebuild and restart: %+v", st)
			}
			verify(t, p, model)
			compareSides(t, p, newPaths)
		})
	}
}

// TestPairLost loses both disks of a pair: its data gives errors, never wrong data,
// while the other pair keeps working.
func TestPairLost(t *testing.T) {
	var fl faults
	state, paths := makeDisks(t, 4, testDiskSize)
	opts := Options{Fault: fl.hook}
	p := openTestPool(t, state, paths, opts)
	model := fill(t, p, 5)
	unit := p.l.unit
	fl.set(0)
	buf := make([]byte, 4096)
	// Unit 0 (pair 0) still reads from disk 1.
	for i := 0; i < 4; i++ {
		if _, err := p.ReadAt(buf, int64(i)*2*unit); err != nil {
			t.Fatalf("degraded read: %v", err)
		}
	}
	fl.set(1)
	if _, err := p.ReadAt(buf, 0); err == nil {
		t.Fatal("read from a pair with no disk left succeeded")
	}
	if _, err := p.WriteAt(buf, 10); err == nil {
		t.Fatal("write to a pair with no disk left succeeded")
	}
	if _, err := p.ReadAt(buf, unit); err != nil {
		t.Fatalf("pair 1 stopped working: %v", err)
	}
	if !bytes.Equal(buf, model[unit:unit+4096]) {
		t.Fatal("pair 1 returned wrong data")
	}
	if st := p.Status(); st.State != StateFailed {
		t.Fatalf("state %q, want failed", st.State)
	}
	if err := p.Replace(paths[0], paths[0]+".new"); err == nil {
		t.Fatal("Replace without a healthy mirror succeeded")
	}
	p.Close()
	// The last copy is retried after a restart (a transient fault), the other stays failed.
	fl.clear(0)
	fl.clear(1)
	p = openTestPool(t, state, paths, opts)
	st := p.Status()
	if st.State != StateDegraded || st.Disks[0].State != DiskFailed || st.Disks[1].State != DiskOK {
		t.Fatalf("after restart: %+v", st)
	}
	verify(t, p, model)
}

func TestSingleDisk(t *testing.T) {
	var fl faults
	state, paths := makeDisks(t, 1, testDiskSize)
	p := openTestPool(t, state, paths, Options{Fault: fl.hook})
	model := fill(t, p, 9)
	verify(t, p, model)
	if err := p.Replace(paths[0], paths[0]+".x"); err == nil {
		t.Fatal("Replace on a single-disk pool succeeded")
	}
	fl.set(0)
	if _, err := p.ReadAt(make([]byte, 10), 0); err == nil {
		t.Fatal("read from a failing single disk succeeded")
	}
	if p.Status().State != StateFailed {
		t.Fatalf("%+v", p.Status())
	}
	p.Close()
	fl.clear(0)
	p = openTestPool(t, state, paths, Options{Fault: fl.hook})
	if p.Status().State != StateOK {
		t.Fatalf("a single disk was not retried after restart: %+v", p.Status())
	}
	verify(t, p, model)
}

func TestOpenRefusesWrongDisks(t *testing.T) {
	dir := t.TempDir()
	mk := func(name string, size int64) string {
		p := filepath.Join(dir, name)
		if err := CreateFileDisk(p, size); err != nil {
			t.Fatal(err)
		}
		return p
	}
	a0, a1, b0, b1 := mk("a0", testDiskSize), mk("a1", testDiskSize), mk("b0", testDiskSize), mk("b1", testDiskSize)
	for _, s := range []struct{ state, x, y string }{{"sa", a0, a1}, {"sb", b0, b1}} {
		p, err := Open(filepath.Join(dir, s.state), []string{s.x, s.y}, Options{Logger: testLogger(t)})
		if err != nil {
			t.Fatal(err)
		}
		p.Close()
	}
	cases := map[string][]string{
		"odd count":       {mk("o1", testDiskSize), mk("o2", testDiskSize), mk("o3", testDiskSize)},
		"two pools mixed": {a0, b1},
		"duplicate":       {a0, a0},
		"too small":       {mk("s1", 1<<20), mk("s2", testDiskSize)},
		"none":            {},
	}
	junk := mk("junk", testDiskSize)
	f, _ := os.OpenFile(junk, os.O_WRONLY, 0)
	f.WriteAt([]byte("an ext4 superblock, say"), 1024)
	f.Close()
	cases["foreign data"] = []string{junk, mk("j2", testDiskSize)}
	for name, disks := range cases {
		before := map[string][]byte{}
		for _, d := range disks {
			before[d], _ = os.ReadFile(d)
		}
		if _, err := Open(filepath.Join(dir, "state-"+name), disks, Options{Logger: testLogger(t)}); err == nil {
			t.Errorf("%s: Open succeeded", name)
		} else {
			t.Logf("%s: %v", name, err)
		}
		for _, d := range disks {
			if after, _ := os.ReadFile(d); !bytes.Equal(before[d], after) {
				t.Errorf("%s: Open changed %s", name, d)
			}
		}
	}
	// pool.json names a disk that now holds another pool's header.
	os.Rename(a1, a1+".away")
	os.Rename(b1, a1)
	if _, err := Open(filepath.Join(dir, "sa"), []string{a0, a1}, Options{Logger: testLogger(t)}); err == nil {
		t.Error("Open accepted a disk of another pool in place of a member")
	}
	os.Rename(a1, b1)
	os.Rename(a1+".away", a1)
	if _, err := Open(filepath.Join(dir, "sa"), []string{a0, a1}, Options{Logger: testLogger(t), StripeUnit: 128 << 10}); err == nil {
		t.Error("Open accepted another stripe unit")
	}
	p, err := Open(filepath.Join(dir, "sa"), []string{a0, a1}, Options{Logger: testLogger(t)})
	if err != nil {
		t.Fatalf("the intact pool no longer opens: %v", err)
	}
	p.Close()
}

func TestReplaceValidation(t *testing.T) {
	state, paths := makeDisks(t, 4, testDiskSize)
	p := openTestPool(t, state, paths, Options{RebuildRate: 1 << 20})
	dir := filepath.Dir(paths[0])
	small := filepath.Join(dir, "small")
	CreateFileDisk(small, 2<<20)
	junk := filepath.Join(dir, "junk")
	CreateFileDisk(junk, testDiskSize)
	f, _ := os.OpenFile(junk, os.O_WRONLY, 0)
	f.WriteAt([]byte{1}, 0)
	f.Close()
	for name, args := range map[string][2]string{
		"not a member":  {filepath.Join(dir, "nope"), junk},
		"new in use":    {paths[0], paths[2]},
		"new too small": {paths[0], small},
		"new has data":  {paths[0], junk},
		"new missing":   {paths[0], filepath.Join(dir, "missing")},
	} {
		if err := p.Replace(args[0], args[1]); err == nil {
			t.Errorf("%s: Replace succeeded", name)
		}
	}
	if st := p.Status(); st.State != StateOK {
		t.Fatalf("a refused Replace changed the pool: %+v", st)
	}
	fresh := filepath.Join(dir, "fresh")
	CreateFileDisk(fresh, testDiskSize)
	fill(t, p, 1)
	if err := p.Replace(paths[0], fresh); err != nil {
		t.Fatal(err)
	}
	fresh2 := filepath.Join(dir, "fresh2")
	CreateFileDisk(fresh2, testDiskSize)
	if err := p.Replace(paths[2], fresh2); !errors.Is(err, ErrRebuildRunning) {
		t.Fatalf("second concurrent Replace: %v", err)
	}
}

// TestRebuildResume closes the pool in the middle of a rebuild and checks that the
// next Open resumes from the persisted watermark and finishes with identical sides.
func TestRebuildResume(t *testing.T) {
	state, paths := makeDisks(t, 2, 17<<20)
	p := openTestPool(t, state, paths, Options{RebuildRate: 4 << 20})
	model := fill(t, p, 4)
	fresh := filepath.Join(filepath.Dir(paths[0]), "fresh")
	CreateFileDisk(fresh, 17<<20)
	if err := p.Replace(paths[1], fresh); err != nil {
		t.Fatal(err)
	}
	time.Sleep(1500 * time.Millisecond)
	done := p.Status().Disks[1].RebuildDone
	p.Close()
	st, err := loadState(state)
	if err != nil {
		t.Fatal(err)
	}
	d := st.Disks[1]
	if d.State != DiskRebuilding || d.Path != fresh || d.RebuildDone <= 0 || d.RebuildDone >= 16<<20 {
		t.Fatalf("persisted rebuild state %+v (progress was %d)", d, done)
	}
	p = openTestPool(t, state, []string{paths[0], fresh}, Options{RebuildRate: -1})
	if err := p.WaitRebuild(context.Background()); err != nil {
		t.Fatal(err)
	}
	if st := p.Status(); st.State != StateOK {
		t.Fatalf("%+v", st)
	}
	verify(t, p, model)
	compareSides(t, p, []string{paths[0], fresh})
}

// TestBlankMemberAtOpen: a member lost while the controller was down and recreated as
// an empty file opens degraded instead of refusing to start, and can be replaced.
func TestBlankMemberAtOpen(t *testing.T) {
	state, paths := makeDisks(t, 4, testDiskSize)
	p := openTestPool(t, state, paths, Options{})
	model := fill(t, p, 8)
	p.Close()
	os.Remove(paths[2])
	CreateFileDisk(paths[2], testDiskSize)
	p = openTestPool(t, state, paths, Options{})
	st := p.Status()
	if st.State != StateDegraded || st.Disks[2].State != DiskFailed || st.DiskSize != testDiskSize {
		t.Fatalf("%+v", st)
	}
	verify(t, p, model)
	if err := p.Replace(paths[0], paths[0]); err == nil {
		t.Fatal("Replace of a healthy disk by itself succeeded")
	}
	// The new blank disk sits at the old path, like a hot-swapped device.
	if err := p.Replace(paths[2], paths[2]); err != nil {
		t.Fatal(err)
	}
	if err := p.WaitRebuild(context.Background()); err != nil {
		t.Fatal(err)
	}
	if st := p.Status(); st.State != StateOK || st.Disks[1].Error != "" {
		t.Fatalf("%+v", st)
	}
	compareSides(t, p, paths)
	verify(t, p, model)
}

// TestStateLost checks that without pool.json the pool is reassembled from the disk
// headers, and a disk that missed a generation is not trusted.
func TestStateLost(t *testing.T) {
	var fl faults
	state, paths := makeDisks(t, 4, testDiskSize)
	p := openTestPool(t, state, paths, Options{Fault: fl.hook})
	model := fill(t, p, 6)
	fl.set(3)
	p.WriteAt([]byte("x"), p.l.unit) // pair 1: disk 3 fails
	copy(model[p.l.unit:], "x")
	p.Close()
	fl.clear(3)
	os.Remove(filepath.Join(state, stateFile))
	// Disks given in another order: headers say which is which.
	p = openTestPool(t, state, []string{paths[1], paths[0], paths[3], paths[2]}, Options{})
	st := p.Status()
	if st.State != StateDegraded || st.Disks[3].State != DiskFailed || st.Disks[0].Path != paths[0] {
		t.Fatalf("%+v", st)
	}
	verify(t, p, model)
}

// TestTruncatedAndExtended truncates a disk file, lets a write extend it again (so the
// lost range reads as zeroes, not as a short read) and checks that reads still return
// the data from the mirror, with only the read path to notice (no health check).
func TestTruncatedAndExtended(t *testing.T) {
	state, paths := makeDisks(t, 2, testDiskSize)
	p := openTestPool(t, state, paths, Options{HealthInterval: time.Hour})
	model := fill(t, p, 12)
	if err := os.Truncate(paths[0], 2<<20); err != nil {
		t.Fatal(err)
	}
	end := p.Size() - 4096
	b := make([]byte, 4096)
	copy(b, "late write")
	if _, err := p.WriteAt(b, end); err != nil {
		t.Fatal(err)
	}
	copy(model[end:], b)
	verify(t, p, model)
	if st := p.Status(); st.Disks[0].State != DiskFailed {
		t.Fatalf("%+v", st)
	}
}

// TestTruncatedToFullSize: a file truncated and grown back to its full size is caught
// by the health check's tail block.
func TestTruncatedToFullSize(t *testing.T) {
	state, paths := makeDisks(t, 2, testDiskSize)
	p := openTestPool(t, state, paths, Options{})
	model := fill(t, p, 13)
	os.Truncate(paths[1], 0)
	os.Truncate(paths[1], testDiskSize)
	waitState(t, p, 1, DiskFailed)
	verify(t, p, model)
	t.Log(p.Status().Disks[1].Error)
}

// benchPool opens a pool of n disks of 64 MiB of data each, fully written once so that
// the benchmark measures overwrites, not the filesystem's block allocation.
func benchPool(b *testing.B, n int) *Pool {
	dir := b.TempDir()
	var paths []string
	for i := 0; i < n; i++ {
		p := filepath.Join(dir, fmt.Sprint(i))
		CreateFileDisk(p, 65<<20+tailSize)
		paths = append(paths, p)
	}
	p, err := Open(filepath.Join(dir, "s"), paths, Options{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { p.Close() })
	buf := make([]byte, 1<<20)
	for off := int64(0); off < p.Size(); off += int64(len(buf)) {
		p.WriteAt(buf, off)
	}
	return p
}

// benchFile is the baseline: one plain file of the same size, written once.
func benchFile(b *testing.B) *dev.File {
	f, err := dev.OpenFile(filepath.Join(b.TempDir(), "f"), 64<<20)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { f.Close() })
	buf := make([]byte, 1<<20)
	for off := int64(0); off < 64<<20; off += int64(len(buf)) {
		f.WriteAt(buf, off)
	}
	return f
}

func runRandom(b *testing.B, d dev.Device, size int, write bool) {
	slots := d.Size() / int64(size)
	b.SetBytes(int64(size))
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		r := rand.New(rand.NewPCG(rand.Uint64(), 0))
		buf := make([]byte, size)
		buf[0] = 1
		for pb.Next() {
			off := r.Int64N(slots) * int64(size)
			var err error
			if write {
				_, err = d.WriteAt(buf, off)
			} else {
				_, err = d.ReadAt(buf, off)
			}
			if err != nil {
				b.Error(err)
				return
			}
		}
	})
}

// BenchmarkPoolWrite writes random blocks through pools of 1 and 4 disks; the "file"
// case is a plain file, the floor the pool's overhead adds to (a 4-disk pool writes
// every byte twice).
func BenchmarkPoolWrite(b *testing.B) {
	for _, size := range []int{4 << 10, 1 << 20} {
		b.Run(fmt.Sprintf("file/size=%d", size), func(b *testing.B) { runRandom(b, benchFile(b), size, true) })
		for _, n := range []int{1, 4} {
			b.Run(fmt.Sprintf("disks=%d/size=%d", n, size), func(b *testing.B) { runRandom(b, benchPool(b, n), size, true) })
		}
	}
}

// BenchmarkPoolRead reads random blocks, as BenchmarkPoolWrite writes them.
func BenchmarkPoolRead(b *testing.B) {
	for _, size := range []int{4 << 10, 1 << 20} {
		b.Run(fmt.Sprintf("file/size=%d", size), func(b *testing.B) { runRandom(b, benchFile(b), size, false) })
		for _, n := range []int{1, 4} {
			b.Run(fmt.Sprintf("disks=%d/size=%d", n, size), func(b *testing.B) { runRandom(b, benchPool(b, n), size, false) })
		}
	}
}

// TestRebuildSparseUnderWrites replaces disks of a mostly empty (sparse) pool while
// writers keep landing in its holes: the copy skips holes without locking, so this is
// where a rebuild could miss a concurrent write.
func TestRebuildSparseUnderWrites(t *testing.T) {
	state, paths := makeDisks(t, 4, testDiskSize)
	p := openTestPool(t, state, paths, Options{RebuildRate: -1})
	model := make([]byte, p.Size())
	cur := append([]string(nil), paths...)
	for round := 0; round < 4; round++ {
		stop := load(t, p, model, 4, uint64(round))
		d := round % 4
		np := filepath.Join(filepath.Dir(paths[0]), fmt.Sprintf("r%d.img", round))
		if err := CreateFileDisk(np, testDiskSize); err != nil {
			t.Fatal(err)
		}
		if err := p.Replace(cur[d], np); err != nil {
			t.Fatal(err)
		}
		if err := p.WaitRebuild(context.Background()); err != nil {
			t.Fatal(err)
		}
		cur[d] = np
		stop()
		if t.Failed() {
			t.FailNow()
		}
		verify(t, p, model)
		compareSides(t, p, cur)
	}
}

// TestRebuildWaitsForEarlierWrites holds a write that chose its disks before Replace
// (so it does not know the new disk) and checks that the rebuild copies its data.
func TestRebuildWaitsForEarlierWrites(t *testing.T) {
	entered, release := make(chan struct{}), make(chan struct{})
	var armed atomic.Bool
	hook := func(disk int, op string, off int64) error {
		if disk == 0 && op == "write" && armed.CompareAndSwap(true, false) {
			close(entered)
			<-release
		}
		return nil
	}
	state, paths := makeDisks(t, 2, testDiskSize)
	p := openTestPool(t, state, paths, Options{Fault: hook, RebuildRate: -1})
	data := bytes.Repeat([]byte("earlier write "), 300)
	const off = 5 << 20
	armed.Store(true)
	werr := make(chan error, 1)
	go func() {
		_, err := p.WriteAt(data, off)
		werr <- err
	}()
	<-entered
	np := paths[1] + ".new"
	CreateFileDisk(np, testDiskSize)
	if err := p.Replace(paths[1], np); err != nil {
		t.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond) // time enough for a rebuild that does not wait
	close(release)
	if err := <-werr; err != nil {
		t.Fatal(err)
	}
	if err := p.WaitRebuild(context.Background()); err != nil {
		t.Fatal(err)
	}
	compareSides(t, p, []string{paths[0], np})
}

// TestSyncFailure: a disk whose fdatasync fails is failed; Sync still succeeds from
// its mirror, and the failure is persisted.
func TestSyncFailure(t *testing.T) {
	var bad atomic.Int32
	bad.Store(-1)
	hook := func(disk int, op string, off int64) error {
		if op == "sync" && int32(disk) == bad.Load() {
			return syscall.EIO
		}
		return nil
	}
	state, paths := makeDisks(t, 4, testDiskSize)
	p := openTestPool(t, state, paths, Options{Fault: hook})
	model := fill(t, p, 21)
	bad.Store(2)
	if err := p.Sync(); err != nil {
		t.Fatalf("Sync with one failing disk: %v", err)
	}
	if s := p.Status(); s.Disks[2].State != DiskFailed || s.State != StateDegraded {
		t.Fatalf("%+v", s)
	}
	st, err := loadState(state)
	if err != nil || st.Disks[2].State != DiskFailed {
		t.Fatalf("failure not persisted: %+v %v", st, err)
	}
	bad.Store(3)
	if err := p.Sync(); err == nil {
		t.Fatal("Sync succeeded with both disks of pair 1 failing")
	}
	verify(t, p, model[:p.l.unit]) // pair 0 still reads
}

// TestCloseUnderLoad closes the pool while I/O is in flight: requests fail with
// ErrClosed, nothing panics and no disk is marked failed.
func TestCloseUnderLoad(t *testing.T) {
	state, paths := makeDisks(t, 4, testDiskSize)
	p := openTestPool(t, state, paths, Options{})
	var wg sync.WaitGroup
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, 200_000)
			for i := 0; ; i++ {
				off := int64(i*7919*512) % (p.Size() - int64(len(buf)))
				var err error
				switch i % 3 {
				case 0:
					_, err = p.WriteAt(buf, off)
				case 1:
					_, err = p.ReadAt(buf, off)
				default:
					err = p.Sync()
				}
				if err != nil {
					if !errors.Is(err, ErrClosed) && !errors.Is(err, os.ErrClosed) {
						t.Errorf("I/O during Close: %v", err)
					}
					return
				}
			}
		}()
	}
	time.Sleep(100 * time.Millisecond)
	p.Close()
	wg.Wait()
	st, err := loadState(state)
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range st.Disks {
		if d.State != DiskOK {
			t.Fatalf("Close under load marked a disk %s: %+v", d.State, d)
		}
	}
}

// setUnclean rewrites pool.json as a run that never reached Close on boot bootID.
func setUnclean(t *testing.T, state, bootID string) {
	t.Helper()
	editState(t, state, func(st *persisted) { st.Unclean, st.BootID = true, bootID })
}

// editState applies edit to pool.json.
func editState(t *testing.T, state string, edit func(*persisted)) {
	t.Helper()
	st, err := loadState(state)
	if err != nil {
		t.Fatal(err)
	}
	edit(st)
	if err := saveState(state, st); err != nil {
		t.Fatal(err)
	}
}

// TestResyncAfterMachineRestart: the pool was open when the machine went down, and a
// write reached only one disk of each pair; pool.json was written by a version without
// a durable write-intent bitmap (no intent_durable). The next Open copies each pair's
// first disk over the second and reads only the first meanwhile, so no read flips
// between versions.
func TestResyncAfterMachineRestart(t *testing.T) {
	state, paths := makeDisks(t, 4, testDiskSize)
	p := openTestPool(t, state, paths, Options{})
	if st, _ := loadState(state); !st.Unclean || st.BootID == "" {
		t.Fatalf("an open pool is not recorded as open: %+v", st)
	}
	model := fill(t, p, 31)
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	if st, _ := loadState(state); st.Unclean {
		t.Fatal("Close did not record a clean shutdown")
	}
	if st, _ := loadState(state); !st.IntentDurable {
		t.Fatal("pool.json of a mirrored pool does not say its marks are durable")
	}
	editState(t, state, func(st *persisted) { st.Unclean, st.BootID, st.IntentDurable = true, "a-previous-boot", false })
	// The torn writes: different data on the second disk of each pair, in units that
	// readers would otherwise serve from that disk (odd disk units).
	for _, d := range []int{1, 3} {
		f, err := os.OpenFile(paths[d], os.O_WRONLY, 0)
		if err != nil {
			t.Fatal(err)
		}
		for u := int64(1); u < 128; u += 2 {
			f.WriteAt(bytes.Repeat([]byte{0xEE}, 4096), (1<<20)+u*(64<<10))
		}
		f.Close()
	}
	p = openTestPool(t, state, paths, Options{RebuildRate: 16 << 20})
	st := p.Status()
	if st.Disks[1].State != DiskRebuilding && st.Disks[3].State != DiskRebuilding {
		t.Fatalf("no resync started: %+v", st)
	}
	verify(t, p, model) // during the resync: only the first disks are read
	if err := p.WaitRebuild(context.Background()); err != nil {
		t.Fatal(err)
	}
	if st := p.Status(); st.State != StateOK || st.Disks[1].Error != "" {
		t.Fatalf("%+v", st)
	}
	compareSides(t, p, paths)
	verify(t, p, model)
}

// TestNoResyncAfterProcessCrash: after a crash of the process alone (same boot), the
// kernel still had every completed write, so no resync is needed.
func TestNoResyncAfterProcessCrash(t *testing.T) {
	state, paths := makeDisks(t, 4, testDiskSize)
	p := openTestPool(t, state, paths, Options{})
	p.Close()
	setUnclean(t, state, readBootID())
	p = openTestPool(t, state, paths, Options{})
	if st := p.Status(); st.State != StateOK {
		t.Fatalf("resync after a process crash: %+v", st)
	}
	if err := p.WaitRebuild(context.Background()); err != nil {
		t.Fatal(err)
	}
}

// TestExclusive: a pool's state and disks belong to one process at a time.
func TestExclusive(t *testing.T) {
	state, paths := makeDisks(t, 2, testDiskSize)
	p := openTestPool(t, state, paths, Options{})
	before, _ := os.ReadFile(filepath.Join(state, stateFile))
	if _, err := Open(state, paths, Options{Logger: testLogger(t)}); err == nil {
		t.Fatal("a second Open of the same pool succeeded")
	}
	if _, err := Open(filepath.Join(t.TempDir(), "other"), paths, Options{Logger: testLogger(t)}); err == nil {
		t.Fatal("a second pool on the same disks opened")
	} else {
		t.Log(err)
	}
	after, _ := os.ReadFile(filepath.Join(state, stateFile))
	if !bytes.Equal(before, after) {
		t.Fatal("a refused Open changed pool.json")
	}
	if st := p.Status(); st.State != StateOK {
		t.Fatalf("%+v", st)
	}
	p.Close()
	openTestPool(t, state, paths, Options{}) // free again after Close
}
