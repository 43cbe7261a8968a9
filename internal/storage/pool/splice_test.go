package pool

import (
	"bytes"
	"errors"
	"fmt"
	"testing"

	"github.com/growserver/grow/internal/storage/dev"
	"github.com/growserver/grow/internal/storage/dev/devtest"
	"golang.org/x/sys/unix"
)

// drain reads exactly n bytes from the pipe.
func drain(t *testing.T, r, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	for done := 0; done < n; {
		k, err := unix.Read(r, b[done:])
		if err != nil || k == 0 {
			t.Fatalf("pipe read after %d of %d bytes: %v", done, n, err)
		}
		done += k
	}
	return b
}

func TestSpliceTo(t *testing.T) {
	for _, n := range []int{1, 2, 4} {
		t.Run(fmt.Sprintf("%d disks", n), func(t *testing.T) {
			state, paths := makeDisks(t, n, testDiskSize)
			var fl faults
			p := openTestPool(t, state, paths, Options{Fault: fl.hook})
			for i := range p.disks {
				if !p.disks[i].Load().punch {
					t.Skip("the test file system cannot punch holes")
				}
			}
			model := fill(t, p, 3)
			r, w := devtest.Pipe(t)
			check := func() {
				t.Helper()
				// Pieces that start and end inside stripe units and cross pairs.
				for _, c := range [][2]int64{{0, 4096}, {4096, 1 << 20}, {65536 - 4096, 3 * 65536}, {100_000, 1_000_000}, {p.Size() - 70_000, 70_000}} {
					if err := p.SpliceTo(w, c[0], int(c[1])); err != nil {
						t.Fatalf("SpliceTo(%d, %d): %v", c[0], c[1], err)
					}
					if got := drain(t, r, int(c[1])); !bytes.Equal(got, model[c[0]:c[0]+c[1]]) {
						t.Fatalf("SpliceTo(%d, %d) differs from the model at byte %d", c[0], c[1], firstDiff(got, model[c[0]:]))
					}
				}
			}
			check()
			if err := p.SpliceTo(w, p.Size()-10, 20); err == nil {
				t.Fatal("splice past the end succeeded")
			}
			if n > 1 {
				// A failing disk is not failed over by SpliceTo (its caller falls back
				// to ReadAt, which does that); once it is marked failed, the
				// mirror serves the splices.
				fl.set(0)
				if err := p.SpliceTo(w, 0, 1<<20); err == nil {
					t.Fatal("splice from a failing disk succeeded")
				}
				drainAll(r)
				verify(t, p, model)
				waitState(t, p, 0, DiskFailed)
				check()
			}
			// A disk that cannot punch holes is never spliced from.
			for i := range p.disks {
				p.disks[i].Load().punch = false
			}
			if err := p.SpliceTo(w, 0, 4096); !errors.Is(err, dev.ErrNoSplice) {
				t.Fatalf("splice from disks that do not punch: %v", err)
			}
		})
	}
}

// drainAll empties a non-blocking pipe.
func drainAll(r int) {
	b := make([]byte, 1<<20)
	for {
		if n, err := unix.Read(r, b); n <= 0 || err != nil {
			return
		}
	}
}

// TestSplicedDataSurvivesDiscard: data spliced into a pipe is what the range held at
// the time, even when the range is discarded and written again before the pipe is
// read (it then belongs to another volume): a discard detaches the pages, so the
// pipe never shows the new owner's data.
func TestSplicedDataSurvivesDiscard(t *testing.T) {
	for _, n := range []int{1, 2} {
		t.Run(fmt.Sprintf("%d disks", n), func(t *testing.T) {
			state, paths := makeDisks(t, n, testDiskSize)
			p := openTestPool(t, state, paths, Options{})
			if !p.disks[0].Load().punch {
				t.Skip("the test file system cannot punch holes")
			}
			model := fill(t, p, 5)
			r, w := devtest.Pipe(t)
			const off, size = 1 << 20, 1 << 20
			if err := p.SpliceTo(w, off, size); err != nil {
				t.Fatal(err)
			}
			if err := p.Discard(off, size); err != nil {
				t.Fatal(err)
			}
			other := bytes.Repeat([]byte("another volume's data "), size/22+1)[:size]
			if _, err := p.WriteAt(other, off); err != nil {
				t.Fatal(err)
			}
			if got := drain(t, r, size); !bytes.Equal(got, model[off:off+size]) {
				t.Fatalf("the spliced data changed after its range was discarded and rewritten (first difference at byte %d)", firstDiff(got, model[off:]))
			}
			got := make([]byte, size)
			if _, err := p.ReadAt(got, off); err != nil || !bytes.Equal(got, other) {
				t.Fatalf("the pool does not hold the new data: %v", err)
			}
		})
	}
}

// TestDiscardUnalignedOnSplicedDisk: a discard that is not page-aligned still reads as
// zeroes and leaves its neighbours alone on a disk that punches holes.
func TestDiscardUnalignedOnSplicedDisk(t *testing.T) {
	state, paths := makeDisks(t, 2, testDiskSize)
	p := openTestPool(t, state, paths, Options{})
	model := fill(t, p, 9)
	for _, c := range [][2]int64{{100_000, 1 << 20}, {5000, 100}, {4000, 200}, {8192, 4096}} {
		if err := p.Discard(c[0], c[1]); err != nil {
			t.Fatal(err)
		}
		clear(model[c[0] : c[0]+c[1]])
	}
	verify(t, p, model)
	compareSides(t, p, paths)
}

// fillPipe writes b into the pipe's write end w.
func fillPipe(t *testing.T, w int, b []byte) {
	t.Helper()
	for len(b) > 0 {
		k, err := unix.Write(w, b)
		if err != nil {
			t.Fatalf("pipe write: %v", err)
		}
		b = b[k:]
	}
}

// TestSpliceFrom: writes taken from a pipe land where WriteAt puts them, on one disk
// (spliced) and on mirror pairs (both sides identical afterwards), for pieces that start
// and end inside stripe units and cross pairs; the pipe is drained exactly.
func TestSpliceFrom(t *testing.T) {
	for _, n := range []int{1, 2, 4} {
		t.Run(fmt.Sprintf("%d disks", n), func(t *testing.T) {
			state, paths := makeDisks(t, n, testDiskSize)
			p := openTestPool(t, state, paths, Options{})
			model := fill(t, p, 5)
			r, w := devtest.Pipe(t)
			for i, c := range [][2]int64{{0, 4096}, {4096, 1 << 20}, {65536 - 4096, 3 * 65536}, {100_000, 1_000_000}, {p.Size() - 70_000, 70_000}} {
				data := bytes.Repeat([]byte{byte(i + 1), byte(i * 7)}, int(c[1]/2))
				fillPipe(t, w, data)
				if err := p.SpliceFrom(r, c[0], int(c[1])); err != nil {
					t.Fatalf("SpliceFrom(%d, %d): %v", c[0], c[1], err)
				}
				if k, err := unix.IoctlGetInt(r, unix.TIOCINQ); err != nil || k != 0 {
					t.Fatalf("pipe holds %d bytes after SpliceFrom (%v)", k, err)
				}
				copy(model[c[0]:], data)
			}
			verify(t, p, model)
			if n > 1 {
				compareSides(t, p, paths)
			}
			// Out of range: an error, and the pipe is left as it was.
			fillPipe(t, w, make([]byte, 8192))
			if err := p.SpliceFrom(r, p.Size()-4096, 8192); err == nil {
				t.Fatal("SpliceFrom past the end succeeded")
			}
			if k, _ := unix.IoctlGetInt(r, unix.TIOCINQ); k != 8192 {
				t.Fatalf("a refused SpliceFrom took %d bytes from the pipe", 8192-k)
			}
		})
	}
}

// TestSpliceFromFailingDisk: a disk that fails a spliced write is marked failed like
// one that fails WriteAt; a pair keeps its data on the survivor.
func TestSpliceFromFailingDisk(t *testing.T) {
	for _, n := range []int{1, 2} {
		t.Run(fmt.Sprintf("%d disks", n), func(t *testing.T) {
			state, paths := makeDisks(t, n, testDiskSize)
			var fl faults
			p := openTestPool(t, state, paths, Options{Fault: fl.hook})
			model := fill(t, p, 6)
			r, w := devtest.Pipe(t)
			fl.set(0)
			data := bytes.Repeat([]byte{0xa5}, 256<<10)
			fillPipe(t, w, data)
			err := p.SpliceFrom(r, 1<<20, len(data))
			if n == 1 {
				if err == nil {
					t.Fatal("a spliced write to a failing lone disk succeeded")
				}
				return
			}
			if err != nil {
				t.Fatalf("SpliceFrom with one side failing: %v", err)
			}
			fl.clear(0)
			waitState(t, p, 0, DiskFailed)
			copy(model[1<<20:], data)
			verify(t, p, model)
		})
	}
}
