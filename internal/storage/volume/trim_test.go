package volume

import (
	"bytes"
	"reflect"
	"testing"
)

func extents(t *testing.T, h *Handle, off, n int64) []Extent {
	t.Helper()
	e, err := h.Extents(off, n)
	if err != nil {
		t.Fatalf("Extents: %v", err)
	}
	return e
}

func data(n int64) Extent { return Extent{Length: n} }
func hole(n int64) Extent { return Extent{Length: n, Hole: true, Zero: true} }

func TestTrimZeroesExtents(t *testing.T) {
	const C = ClusterSize
	b := newBed(t, 64*MiB)
	img := pattern(8*C, 1)
	clear(img[2*C : 3*C])
	if _, err := b.m.ImportImage("img", 8*C, bytes.NewReader(img), nil); err != nil {
		t.Fatal(err)
	}
	if _, err := b.m.Clone("img", "v"); err != nil {
		t.Fatal(err)
	}
	h := mustOpen(t, b.m, "v")
	if got, want := extents(t, h, 0, 8*C), []Extent{data(2 * C), hole(C), data(5 * C)}; !reflect.DeepEqual(got, want) {
		t.Fatalf("extents through clone: %+v, want %+v", got, want)
	}
	// Unaligned start and end.
	if got, want := extents(t, h, C+10, C), []Extent{data(C - 10), hole(10)}; !reflect.DeepEqual(got, want) {
		t.Fatalf("unaligned extents: %+v, want %+v", got, want)
	}
	want := bytes.Clone(img)
	// Whole-cluster trim of data inherited from the image masks it with zeroes.
	if err := h.Trim(0, C, false); err != nil {
		t.Fatal(err)
	}
	clear(want[:C])
	// Trim of a partial cluster leaves it alone.
	if err := h.Trim(3*C+100, 200, false); err != nil {
		t.Fatal(err)
	}
	mustEqual(t, "after trims", readAll(t, h), want)
	if got, want := extents(t, h, 0, 8*C), []Extent{hole(C), data(C), hole(C), data(5 * C)}; !reflect.DeepEqual(got, want) {
		t.Fatalf("extents after trim: %+v, want %+v", got, want)
	}
	// Write to a cluster, then zero it: the cluster goes back to the device.
	if err := h.WriteAt(pattern(C, 5), 5*C, false); err != nil {
		t.Fatal(err)
	}
	copy(want[5*C:], pattern(C, 5))
	if i, _ := b.m.Get("v"); i.Allocated != C {
		t.Fatalf("allocated %d", i.Allocated)
	}
	if err := h.WriteZeroes(5*C, C, false, true, true); err != nil {
		t.Fatalf("fast zero of a whole cluster: %v", err)
	}
	clear(want[5*C : 6*C])
	if i, _ := b.m.Get("v"); i.Allocated != 0 {
		t.Fatalf("allocated after zeroing %d", i.Allocated)
	}
	if st := b.m.Stats(); st.ClustersUsed != 7 || st.ClustersPendingFree != 0 {
		t.Fatalf("stats after fua zero: %+v", st) // 7 image clusters; the freed one is durable (FUA)
	}
	// Fast zero of a partial cluster holding data is refused and changes nothing.
	wantErr(t, "fast partial zero", h.WriteZeroes(6*C+1, 10, false, true, false), ErrNotFast)
	wantErr(t, "fast no-hole zero", h.WriteZeroes(6*C, C, true, true, false), ErrNotFast)
	mustEqual(t, "after refused fast zero", readAll(t, h), want)
	// Fast zero of a partial cluster that already reads as zero is fine.
	if err := h.WriteZeroes(2*C+7, 100, false, true, false); err != nil {
		t.Fatal(err)
	}
	// Slow partial zero writes zeroes (copy-on-write).
	if err := h.WriteZeroes(6*C+1, 10, false, false, false); err != nil {
		t.Fatal(err)
	}
	clear(want[6*C+1 : 6*C+11])
	// NO_HOLE zeroing allocates.
	if err := h.WriteZeroes(7*C, C, true, false, false); err != nil {
		t.Fatal(err)
	}
	clear(want[7*C:])
	mustEqual(t, "after zeroing", readAll(t, h), want)
	if got, want := extents(t, h, 0, 8*C), []Extent{hole(C), data(C), hole(C), data(2 * C), hole(C), data(2 * C)}; !reflect.DeepEqual(got, want) {
		t.Fatalf("extents after zeroing: %+v, want %+v", got, want)
	}
	// Trim of everything.
	if err := h.Trim(0, 8*C, false); err != nil {
		t.Fatal(err)
	}
	mustEqual(t, "after full trim", readAll(t, h), make([]byte, 8*C))
	if got := extents(t, h, 0, 8*C); !reflect.DeepEqual(got, []Extent{hole(8 * C)}) {
		t.Fatalf("extents after full trim: %+v", got)
	}
	b.check()
	h.Close()
	b.reopen(false)
	b.check()
	h = mustOpen(t, b.m, "v")
	mustEqual(t, "after reopen", readAll(t, h), make([]byte, 8*C))
	g := mustOpen(t, b.m, "img")
	mustEqual(t, "image untouched", readAll(t, g), img)
}

func TestExtentsOfHugeSparseVolume(t *testing.T) {
	b := newBed(t, 16*MiB)
	const size = 1 << 40
	if _, err := b.m.Create("big", size); err != nil {
		t.Fatal(err)
	}
	h := mustOpen(t, b.m, "big")
	if err := h.WriteAt([]byte{1}, size/2, false); err != nil {
		t.Fatal(err)
	}
	got := extents(t, h, 0, size)
	want := []Extent{hole(size / 2), data(ClusterSize), hole(size/2 - ClusterSize)}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("extents %+v, want %+v", got, want)
	}
}

func TestTrimDiscardsOnDevice(t *testing.T) {
	b := newBed(t, 64*MiB)
	if _, err := b.m.Create("v", 32*MiB); err != nil {
		t.Fatal(err)
	}
	h := mustOpen(t, b.m, "v")
	if err := h.WriteAt(pattern(16*MiB, 2), 0, true); err != nil {
		t.Fatal(err)
	}
	before := allocatedBytes(t, b.path)
	if err := h.Trim(0, 16*MiB, true); err != nil {
		t.Fatal(err)
	}
	after := allocatedBytes(t, b.path)
	if before < 16*MiB || after > before-15*MiB {
		t.Fatalf("device file allocation %d before trim, %d after: space not given back", before, after)
	}
}
