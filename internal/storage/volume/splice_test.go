package volume

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/growserver/grow/internal/storage/dev"
	"github.com/growserver/grow/internal/storage/dev/devtest"
	"golang.org/x/sys/unix"
)

// spliceFile is a dev.File that splices from its file, for tests.
type spliceFile struct{ *dev.File }

func (f spliceFile) SpliceTo(fd int, off int64, n int) error {
	for n > 0 {
		k, err := unix.Splice(int(f.Fd()), &off, fd, nil, n, unix.SPLICE_F_NONBLOCK)
		if err != nil {
			return err
		}
		if k == 0 {
			return errors.New("short splice")
		}
		n -= int(k)
	}
	return nil
}

// spliceAll splices n bytes at off of h through a 1 MiB pipe.
func spliceAll(t *testing.T, h *Handle, off int64, n int) ([]byte, error) {
	t.Helper()
	r, w := devtest.Pipe(t)
	if err := h.SpliceTo(w, off, n); err != nil {
		return nil, err
	}
	b := make([]byte, n)
	for done := 0; done < n; {
		k, err := unix.Read(r, b[done:])
		if err != nil || k == 0 {
			t.Fatalf("pipe read after %d of %d bytes: %v", done, n, err)
		}
		done += k
	}
	return b, nil
}

// TestSpliceToMatchesReadAt: a splice of any range gives what ReadAt gives, over
// allocated clusters (runs and single ones), unallocated and trimmed ones, and
// clusters that fall through to a snapshot.
func TestSpliceToMatchesReadAt(t *testing.T) {
	b := newBedWith(t, 64<<20, func(f *dev.File) dev.Device { return spliceFile{f} })
	if _, err := b.m.Create("v", 4<<20); err != nil {
		t.Fatal(err)
	}
	h := mustOpen(t, b.m, "v")
	pattern := func(n int, seed byte) []byte {
		p := make([]byte, n)
		for i := range p {
			p[i] = seed + byte(i*7)
		}
		return p
	}
	for _, w := range [][2]int64{{0, 1 << 20}, {3 * ClusterSize / 2, 5000}, {2 << 20, 300_000}} {
		if err := h.WriteAt(pattern(int(w[1]), byte(w[0])), w[0], false); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := b.m.Snapshot("v", "s"); err != nil {
		t.Fatal(err)
	}
	// After the snapshot: new clusters in the top layer, others fall through.
	if err := h.WriteAt(pattern(100_000, 3), 200_000, false); err != nil {
		t.Fatal(err)
	}
	if err := h.Trim(512<<10, 2*ClusterSize, false); err != nil {
		t.Fatal(err)
	}
	for _, c := range [][2]int64{{0, 1 << 20}, {4096, 777_777}, {1 << 20, 1 << 20}, {3<<20 - 12345, 12345}, {0, 1}} {
		want := make([]byte, c[1])
		if err := h.ReadAt(want, c[0]); err != nil {
			t.Fatal(err)
		}
		got, err := spliceAll(t, h, c[0], int(c[1]))
		if err != nil {
			t.Fatalf("SpliceTo(%d, %d): %v", c[0], c[1], err)
		}
		mustEqual(t, "spliced data", got, want)
	}
	if _, err := spliceAll(t, h, 4<<20-10, 20); !errors.Is(err, ErrInvalid) {
		t.Fatalf("splice past the end: %v", err)
	}
}

// TestSpliceToNeedsASplicer: without a device that splices, SpliceTo says so.
func TestSpliceToNeedsASplicer(t *testing.T) {
	b := newBed(t, 16<<20)
	if _, err := b.m.Create("v", 1<<20); err != nil {
		t.Fatal(err)
	}
	h := mustOpen(t, b.m, "v")
	if _, err := spliceAll(t, h, 0, 4096); !errors.Is(err, dev.ErrNoSplice) {
		t.Fatalf("SpliceTo on a plain file: %v", err)
	}
}

// pipeFile is a dev.File that also takes writes from a pipe with splice(2), as the pool does.
type pipeFile struct {
	*dev.File
	spliced atomic.Int64
}

func (f *pipeFile) SpliceFrom(fd int, off int64, n int) error {
	for n > 0 {
		k, err := unix.Splice(fd, nil, int(f.Fd()), &off, n, unix.SPLICE_F_NONBLOCK)
		if err != nil {
			return err
		}
		if k == 0 {
			return errors.New("short splice")
		}
		n -= int(k)
	}
	f.spliced.Add(1)
	return nil
}

// spliceWrite writes p at off of h through the pipe (r, w) and checks that the pipe is drained.
func spliceWrite(t testing.TB, h *Handle, r, w int, p []byte, off int64, fua bool) error {
	for b := p; len(b) > 0; {
		k, err := unix.Write(w, b)
		if err != nil {
			t.Fatalf("pipe write: %v", err)
		}
		b = b[k:]
	}
	err := h.SpliceFrom(r, off, len(p), fua)
	if err == nil {
		if k, ierr := unix.IoctlGetInt(r, unix.TIOCINQ); ierr != nil || k != 0 {
			t.Fatalf("pipe holds %d bytes after SpliceFrom (%v)", k, ierr)
		}
	}
	return err
}

// TestSpliceFromMatchesWriteAt: writes taken from a pipe give the volume the content
// WriteAt gives it, over mapped runs, first writes of whole and partial clusters, clusters
// shared with a snapshot (copy-on-write) and trimmed ones, with a device that splices and
// with one that cannot (the data is then copied through a buffer).
func TestSpliceFromMatchesWriteAt(t *testing.T) {
	for _, splicing := range []bool{true, false} {
		t.Run(fmt.Sprintf("device splices %v", splicing), func(t *testing.T) {
			var pf *pipeFile
			wrap := func(f *dev.File) dev.Device { return f }
			if splicing {
				wrap = func(f *dev.File) dev.Device { pf = &pipeFile{File: f}; return pf }
			}
			b := newBedWith(t, 64<<20, wrap)
			if _, err := b.m.Create("v", 4<<20); err != nil {
				t.Fatal(err)
			}
			h := mustOpen(t, b.m, "v")
			r, w := devtest.Pipe(t)
			model := make([]byte, 4<<20)
			write := func(off int64, p []byte, viaPipe bool) {
				t.Helper()
				var err error
				if viaPipe {
					err = spliceWrite(t, h, r, w, p, off, false)
				} else {
					err = h.WriteAt(p, off, false)
				}
				if err != nil {
					t.Fatalf("write %d bytes at %d (pipe %v): %v", len(p), off, viaPipe, err)
				}
				copy(model[off:], p)
			}
			write(0, pattern(1<<20, 1), true)                 // first writes of whole clusters
			write(1<<20+1000, pattern(200_000, 2), true)      // partial first writes
			write(0, pattern(1<<20, 3), true)                 // a mapped run
			write(2<<20, pattern(512<<10, 4), false)          // mapped by WriteAt
			if _, err := b.m.Snapshot("v", "s"); err != nil { // now every cluster is shared
				t.Fatal(err)
			}
			snap := append([]byte(nil), model...)
			write(1<<20-4096, pattern(300_000, 5), true) // copy-on-write of partial clusters
			if err := h.Trim(2<<20, 128<<10, false); err != nil {
				t.Fatal(err)
			}
			clear(model[2<<20 : 2<<20+128<<10])
			write(2<<20+4096, pattern(8192, 6), true) // into a trimmed cluster
			write(3<<20, pattern(1<<20, 7), true)     // up to the end
			mustEqual(t, "volume", readAll(t, h), model)
			mustEqual(t, "snapshot", readAll(t, mustOpen(t, b.m, "v@s")), snap)
			if splicing && pf.spliced.Load() == 0 {
				t.Fatal("the device was never spliced into")
			}
			// Out of range: refused before the pipe is touched.
			if err := spliceWrite(t, h, r, w, pattern(8192, 8), 4<<20-4096, false); !errors.Is(err, ErrInvalid) {
				t.Fatalf("SpliceFrom past the end: %v, want ErrInvalid", err)
			}
			if k, _ := unix.IoctlGetInt(r, unix.TIOCINQ); k != 8192 {
				t.Fatalf("a refused SpliceFrom took %d bytes from the pipe", 8192-k)
			}
			b.reopen(false)
			mustEqual(t, "volume after reopen", readAll(t, mustOpen(t, b.m, "v")), model)
			b.check()
		})
	}
}

// TestSpliceFromConcurrent: spliced writes, copied writes, reads and trims race on
// overlapping ranges; every 4 KiB block ends up zero or all of one writer's bytes (no
// block mixes writers or shows a freed cluster's old data), and the metadata checks clean.
func TestSpliceFromConcurrent(t *testing.T) {
	b := newBedWith(t, 64<<20, func(f *dev.File) dev.Device { return &pipeFile{File: f} })
	const size = 2 << 20
	if _, err := b.m.Create("v", size); err != nil {
		t.Fatal(err)
	}
	h := mustOpen(t, b.m, "v")
	var wg sync.WaitGroup
	for g := 0; g < 6; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(g), 9))
			r, w := devtest.Pipe(t)
			buf := make([]byte, 1<<20)
			for i := 0; i < 150; i++ {
				off := rng.Int64N(size/4096) * 4096
				n := min(int64(1+rng.IntN(256))*4096, size-off)
				fill := bytes.Repeat([]byte{byte(1 + g)}, int(n))
				var err error
				switch op := rng.IntN(10); {
				case op < 5:
					err = spliceWrite(t, h, r, w, fill, off, false)
				case op < 7:
					err = h.WriteAt(fill, off, false)
				case op < 9:
					err = h.ReadAt(buf[:n], off)
				default:
					err = h.Trim(off, n, false)
				}
				if err != nil {
					t.Errorf("op at %d+%d: %v", off, n, err)
					return
				}
			}
		}()
	}
	wg.Wait()
	got := readAll(t, h)
	for blk := 0; blk < size; blk += 4096 {
		p := got[blk : blk+4096]
		if p[0] > 6 || !bytes.Equal(p, bytes.Repeat(p[:1], 4096)) {
			t.Fatalf("block at %d mixes writers or holds foreign data (first bytes % x)", blk, p[:16])
		}
	}
	b.check()
}

// TestSpliceFromFUA: a FUA write taken from a pipe is durable when it returns: after a
// reopen without the closing checkpoint it reads back.
func TestSpliceFromFUA(t *testing.T) {
	b := newBedWith(t, 64<<20, func(f *dev.File) dev.Device { return &pipeFile{File: f} })
	if _, err := b.m.Create("v", 4<<20); err != nil {
		t.Fatal(err)
	}
	h := mustOpen(t, b.m, "v")
	r, w := devtest.Pipe(t)
	data := pattern(1<<20, 11)
	if err := spliceWrite(t, h, r, w, data, 1<<20, true); err != nil {
		t.Fatal(err)
	}
	if b.m.dirty.Load() {
		t.Fatal("metadata still dirty after a FUA write")
	}
	b.reopen(false)
	got := make([]byte, len(data))
	if err := mustOpen(t, b.m, "v").ReadAt(got, 1<<20); err != nil {
		t.Fatal(err)
	}
	mustEqual(t, "FUA data after reopen", got, data)
}
