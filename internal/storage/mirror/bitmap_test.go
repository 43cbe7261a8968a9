package mirror

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"testing"
)

func TestBitmapMarkPersistReopen(t *testing.T) {
	path := filepath.Join(t.TempDir(), "vol.bitmap")
	const size = 100<<20 + 123 // last region is partial
	b, err := OpenBitmap(path, size, DefaultRegionSize)
	if err != nil {
		t.Fatal(err)
	}
	if b.Regions() != 101 || b.Count() != 0 {
		t.Fatalf("regions %d count %d, want 101 and 0", b.Regions(), b.Count())
	}
	// A write straddling regions 2 and 3, one inside 7, and one at the very end.
	for _, w := range [][2]int64{{3<<20 - 10, 20}, {7<<20 + 5, 4096}, {size - 1, 1}} {
		if err := b.MarkDurable(w[0], w[1]); err != nil {
			t.Fatal(err)
		}
	}
	newly, err := b.Mark(7<<20, 1)
	if err != nil || newly {
		t.Fatalf("re-marking region 7: newly=%v err=%v, want false, nil", newly, err)
	}
	want := []uint64{2, 3, 7, 100}
	if got := b.Dirty(); !slices.Equal(got, want) {
		t.Fatalf("dirty %v, want %v", got, want)
	}
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	b, err = OpenBitmap(path, size, DefaultRegionSize)
	if err != nil {
		t.Fatal(err)
	}
	if got := b.Dirty(); !slices.Equal(got, want) {
		t.Fatalf("after reopen dirty %v, want %v", got, want)
	}
	b.Clear(3)
	b.Clear(100)
	if err := b.Persist(); err != nil {
		t.Fatal(err)
	}
	b.Close()
	b, err = OpenBitmap(path, size, DefaultRegionSize)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if got := b.Dirty(); !slices.Equal(got, []uint64{2, 7}) || b.Count() != 2 {
		t.Fatalf("after clear dirty %v count %d, want [2 7] and 2", b.Dirty(), b.Count())
	}
}

func TestBitmapRejectsBadInput(t *testing.T) {
	dir := t.TempDir()
	for _, g := range [][2]int64{{0, DefaultRegionSize}, {-5, DefaultRegionSize}, {1 << 30, 3 << 20}, {1 << 30, 1024}} {
		if _, err := OpenBitmap(filepath.Join(dir, "x"), g[0], g[1]); err == nil {
			t.Errorf("OpenBitmap(size %d, region %d) succeeded", g[0], g[1])
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "x")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("a refused OpenBitmap left a file behind: %v", err)
	}
	path := filepath.Join(dir, "b")
	b, err := OpenBitmap(path, 10<<20, DefaultRegionSize)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range [][2]int64{{-1, 10}, {10 << 20, 1}, {10<<20 - 1, 2}, {0, 0}} {
		if _, err := b.Mark(r[0], r[1]); err == nil {
			t.Errorf("Mark(%d, %d) succeeded", r[0], r[1])
		}
	}
	if err := b.MarkRegions([]uint64{1, 10}); err == nil {
		t.Error("MarkRegions with region 10 of 10 succeeded")
	}
	if b.Count() != 0 {
		t.Fatalf("refused marks changed the bitmap: %v", b.Dirty())
	}
	b.Close()
	if _, err := OpenBitmap(path, 20<<20, DefaultRegionSize); err == nil {
		t.Fatal("opening with another volume size succeeded")
	}
	if _, err := OpenBitmap(path, 10<<20, 64<<10); err == nil {
		t.Fatal("opening with another region size succeeded")
	}
}

// A torn or corrupted write of the newest slot leaves the previous state readable.
func TestBitmapTornSlotFallsBack(t *testing.T) {
	path := filepath.Join(t.TempDir(), "b")
	b, err := OpenBitmap(path, 64<<20, DefaultRegionSize)
	if err != nil {
		t.Fatal(err)
	}
	if err := b.MarkDurable(1<<20, 1); err != nil { // seq 2, slot 0
		t.Fatal(err)
	}
	if err := b.MarkDurable(5<<20, 1); err != nil { // seq 3, slot 1
		t.Fatal(err)
	}
	b.Close()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	l := len(data) / 2
	for _, tc := range []struct {
		name string
		mut  func([]byte)
		want []uint64
	}{
		{"intact", func([]byte) {}, []uint64{1, 5}},
		{"newest bit flipped", func(d []byte) { d[l+bitmapHeaderLen] ^= 0x40 }, []uint64{1}},
		{"newest torn to zeroes", func(d []byte) { clear(d[l+20:]) }, []uint64{1}},
		{"newest magic gone", func(d []byte) { clear(d[l : l+8]) }, []uint64{1}},
		{"older slot corrupt", func(d []byte) { d[40] ^= 1 }, []uint64{1, 5}},
		{"older header torn", func(d []byte) { clear(d[:16]) }, []uint64{1, 5}},
	} {
		d := bytes.Clone(data)
		tc.mut(d)
		if err := os.WriteFile(path, d, 0o600); err != nil {
			t.Fatal(err)
		}
		b, err := OpenBitmap(path, 64<<20, DefaultRegionSize)
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		if got := b.Dirty(); !slices.Equal(got, tc.want) {
			t.Errorf("%s: dirty %v, want %v", tc.name, got, tc.want)
		}
		b.Close()
	}
	d := bytes.Clone(data)
	d[40] ^= 1
	d[l+40] ^= 1
	os.WriteFile(path, d, 0o600)
	if _, err := OpenBitmap(path, 64<<20, DefaultRegionSize); !errors.Is(err, ErrCorruptBitmap) {
		t.Fatalf("both slots corrupt: err %v, want ErrCorruptBitmap", err)
	}
}

// Random marks, clears and reopens agree with a plain model.
func TestBitmapModel(t *testing.T) {
	path := filepath.Join(t.TempDir(), "b")
	const size = 300 << 16
	b, err := OpenBitmap(path, size, 64<<10)
	if err != nil {
		t.Fatal(err)
	}
	model := map[uint64]bool{}
	rng := rand.New(rand.NewPCG(1, 2))
	for i := 0; i < 3000; i++ {
		switch rng.IntN(10) {
		case 0:
			if err := b.Persist(); err != nil {
				t.Fatal(err)
			}
			b.Close()
			if b, err = OpenBitmap(path, size, 64<<10); err != nil {
				t.Fatal(err)
			}
		case 1, 2:
			r := uint64(rng.IntN(300))
			b.Clear(r)
			delete(model, r)
		default:
			off := rng.Int64N(size)
			n := 1 + rng.Int64N(min(size-off, 300<<10))
			if _, err := b.Mark(off, n); err != nil {
				t.Fatal(err)
			}
			for r := off >> 16; r <= (off+n-1)>>16; r++ {
				model[uint64(r)] = true
			}
		}
		if b.Count() != uint64(len(model)) {
			t.Fatalf("step %d: count %d, model %d", i, b.Count(), len(model))
		}
	}
	for _, r := range b.Dirty() {
		if !model[r] {
			t.Fatalf("region %d dirty but not in the model", r)
		}
	}
	b.Close()
}

func FuzzBitmapDecode(f *testing.F) {
	dir := f.TempDir()
	b, err := OpenBitmap(filepath.Join(dir, "seed"), 200<<20, DefaultRegionSize)
	if err != nil {
		f.Fatal(err)
	}
	b.MarkDurable(0, 1)
	b.MarkDurable(150<<20, 5<<20)
	b.Close()
	seed, _ := os.ReadFile(filepath.Join(dir, "seed"))
	f.Add(seed)
	f.Add(seed[:len(seed)/2])
	f.Add([]byte(bitmapMagic))
	f.Fuzz(func(t *testing.T, data []byte) {
		s, err := decodeBitmap(data)
		if err != nil {
			return
		}
		// A decoded slot re-encodes to bytes that decode to the same thing.
		n := regionCount(s.size, s.region)
		again, err := decodeSlot(encodeSlot(s.seq, s.size, s.region, n, s.words))
		if err != nil {
			t.Fatalf("re-encoded slot does not decode: %v", err)
		}
		if again.seq != s.seq || again.size != s.size || again.region != s.region || !slices.Equal(again.words, s.words) {
			t.Fatal("re-encoded slot differs")
		}
	})
}
