package volume

import (
	"errors"
	"testing"

	"github.com/growserver/grow/internal/storage/dev"
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
	var fds [2]int
	if err := unix.Pipe2(fds[:], unix.O_NONBLOCK|unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fds[0])
	defer unix.Close(fds[1])
	if _, err := unix.FcntlInt(uintptr(fds[1]), unix.F_SETPIPE_SZ, 1<<20); err != nil {
		t.Skipf("cannot grow a pipe to 1 MiB: %v", err)
	}
	if err := h.SpliceTo(fds[1], off, n); err != nil {
		return nil, err
	}
	b := make([]byte, n)
	for done := 0; done < n; {
		k, err := unix.Read(fds[0], b[done:])
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
