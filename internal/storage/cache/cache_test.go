package cache

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/growserver/grow/internal/storage/dev"
)

func fileDev(t testing.TB, size int64) *dev.File {
	t.Helper()
	f, err := dev.OpenFile(filepath.Join(t.TempDir(), "dev.img"), size)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

// failingDev makes writes fail on demand, to check that a failed write drops cached pages.
type failingDev struct {
	dev.Device
	failWrites atomic.Bool
}

func (d *failingDev) WriteAt(p []byte, off int64) (int, error) {
	if d.failWrites.Load() {
		// Write half, then fail: the device content is now unknown to the cache.
		n, _ := d.Device.WriteAt(p[:len(p)/2], off)
		return n, errors.New("injected write error")
	}
	return d.Device.WriteAt(p, off)
}

func TestCacheReadWrite(t *testing.T) {
	const size = 8 << 20
	f := fileDev(t, size)
	c := New(f, 2<<20) // smaller than the device: eviction happens
	model := make([]byte, size)
	r := rand.New(rand.NewPCG(1, 2))
	src := make([]byte, 1<<20)
	rand.NewChaCha8([32]byte{1}).Read(src)
	for i := 0; i < 3000; i++ {
		n := 1 + r.IntN(200<<10)
		off := r.Int64N(size - int64(n) + 1)
		if r.IntN(3) == 0 {
			start := r.IntN(len(src) - n + 1)
			b := src[start : start+n]
			if _, err := c.WriteAt(b, off); err != nil {
				t.Fatal(err)
			}
			copy(model[off:], b)
		} else {
			b := make([]byte, n)
			if _, err := c.ReadAt(b, off); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(b, model[off:off+int64(n)]) {
				t.Fatalf("op %d: read %d at %d returned wrong data", i, n, off)
			}
		}
	}
	st := c.Stats()
	if st.Hits == 0 || st.Misses == 0 {
		t.Fatalf("stats %+v: expected both hits and misses", st)
	}
	if st.Bytes > st.Capacity || st.Capacity != 2<<20 {
		t.Fatalf("stats %+v: cache holds more than its capacity", st)
	}
	// The device itself holds everything written: the cache is write-through.
	got := make([]byte, size)
	if _, err := f.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, model) {
		t.Fatal("device content differs from what was written through the cache")
	}
}

func TestCacheHitsAfterWarm(t *testing.T) {
	f := fileDev(t, 1<<20)
	c := New(f, 4<<20)
	b := make([]byte, 4096)
	for off := int64(0); off < 1<<20; off += 4096 {
		c.ReadAt(b, off)
	}
	before := c.Stats()
	for off := int64(0); off < 1<<20; off += 4096 {
		c.ReadAt(b, off)
	}
	after := c.Stats()
	if after.Misses != before.Misses || after.Hits-before.Hits != 256 {
		t.Fatalf("warm reads missed: before %+v after %+v", before, after)
	}
	if after.Bytes != 1<<20 {
		t.Fatalf("cached bytes %d, want %d", after.Bytes, 1<<20)
	}
}

func TestCacheWriteErrorDropsPage(t *testing.T) {
	fd := &failingDev{Device: fileDev(t, 1<<20)}
	c := New(fd, 1<<20)
	b := make([]byte, PageSize)
	c.ReadAt(b, 0) // cached: zeroes
	fd.failWrites.Store(true)
	if _, err := c.WriteAt(bytes.Repeat([]byte{7}, PageSize), 0); err == nil {
		t.Fatal("write error was not returned")
	}
	fd.failWrites.Store(false)
	if _, err := c.ReadAt(b, 0); err != nil {
		t.Fatal(err)
	}
	want := make([]byte, PageSize)
	fd.Device.ReadAt(want, 0)
	if !bytes.Equal(b, want) {
		t.Fatal("after a failed write the cache returned data the device does not hold")
	}
}

func TestCacheDiscard(t *testing.T) {
	f := fileDev(t, 1<<20)
	c := New(f, 1<<20)
	c.WriteAt(bytes.Repeat([]byte{9}, 1<<20), 0)
	b := make([]byte, 1<<20)
	c.ReadAt(b, 0)
	if err := c.Discard(1000, 200_000); err != nil {
		t.Fatal(err)
	}
	c.ReadAt(b, 0)
	for i, v := range b {
		want := byte(9)
		if i >= 1000 && i < 201_000 {
			want = 0
		}
		if v != want {
			t.Fatalf("byte %d = %d after discard, want %d", i, v, want)
		}
	}
	if err := c.Discard(1<<20-1, 2); err == nil {
		t.Fatal("discard past the end succeeded")
	}
	nd := New(struct{ dev.Device }{f}, 1<<20)
	if err := nd.Discard(0, 1); !errors.Is(err, ErrDiscardUnsupported) {
		t.Fatalf("discard on a device without it: %v", err)
	}
}

func TestCacheDisabled(t *testing.T) {
	f := fileDev(t, 1<<20)
	c := New(f, 0)
	c.WriteAt([]byte("hello"), 70000)
	b := make([]byte, 5)
	if _, err := c.ReadAt(b, 70000); err != nil || string(b) != "hello" {
		t.Fatalf("%q %v", b, err)
	}
	if st := c.Stats(); st != (Stats{}) {
		t.Fatalf("disabled cache has stats %+v", st)
	}
	if _, err := c.ReadAt(b, 1<<20-2); err == nil {
		t.Fatal("read past the end succeeded")
	}
}

// TestCacheCoherence runs writers and readers on the same blocks at once through a
// cache small enough to evict constantly. Each writer stamps a block with increasing
// versions and publishes a version once its write returned; a reader that saw version
// v published before it started must read at least v.
func TestCacheCoherence(t *testing.T) {
	// 4 KiB writes only: every write updates cached blocks in place.
	checkCoherence(t, 8*PageSize, func(r *rand.Rand, w int) (int64, int64) {
		// Writer w owns blocks w, w+4, ...: one writer per block.
		return int64(w + 4*r.IntN(coherenceBlocks/4)), 1
	})
}

// TestCacheCoherenceWholePages mixes block writes, which update cached blocks, with
// multi-page writes, which drop the pages they cover entirely and update the partly
// covered pages at their ends, while readers check that nothing stale is ever served.
func TestCacheCoherenceWholePages(t *testing.T) {
	const pageBlocks = PageSize / coherenceBS
	checkCoherence(t, 8*PageSize, func(r *rand.Rand, w int) (int64, int64) {
		// Writer w owns the two-page groups w, w+4, ...
		group := int64(w+4*r.IntN(coherenceBlocks/(8*pageBlocks))) * 2 * pageBlocks
		switch r.IntN(3) {
		case 0: // one block
			return group + r.Int64N(2*pageBlocks), 1
		case 1: // both pages entirely
			return group, 2 * pageBlocks
		default: // at least a page, with partly covered pages at either end
			n := pageBlocks + r.Int64N(pageBlocks)
			return group + r.Int64N(2*pageBlocks-n+1), n
		}
	})
}

const (
	coherenceBlocks = 256
	coherenceBS     = 4096
)

// checkCoherence runs four writers and four readers for a while on a cache of cacheSize
// over coherenceBlocks blocks; pick gives writer w's next write as a first block and a
// block count, from blocks that no other writer writes. Every block carries a version
// number; a reader must never see a version older than one already published.
func checkCoherence(t *testing.T, cacheSize int64, pick func(r *rand.Rand, w int) (blk, n int64)) {
	const blocks, bs = coherenceBlocks, coherenceBS
	f := fileDev(t, blocks*bs)
	c := New(f, cacheSize)
	var published [blocks]atomic.Uint64
	deadline := time.Now().Add(2 * time.Second)
	if testing.Short() {
		deadline = time.Now().Add(300 * time.Millisecond)
	}
	var wg sync.WaitGroup
	var reads, writes atomic.Int64
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(w), 9))
			buf := make([]byte, blocks*bs)
			for time.Now().Before(deadline) {
				blk, n := pick(r, w)
				b := buf[:n*bs]
				for i := int64(0); i < n; i++ {
					v := published[blk+i].Load() + 1
					for j := 0; j < bs; j += 8 {
						binary.LittleEndian.PutUint64(b[i*bs+int64(j):], v)
					}
				}
				if _, err := c.WriteAt(b, blk*bs); err != nil {
					t.Error(err)
					return
				}
				for i := int64(0); i < n; i++ {
					published[blk+i].Add(1)
				}
				writes.Add(1)
			}
		}()
	}
	for rd := 0; rd < 4; rd++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(rd), 10))
			buf := make([]byte, 3*bs)
			for time.Now().Before(deadline) {
				blk := int64(r.IntN(blocks - 2))
				var before [3]uint64
				for i := range before {
					before[i] = published[blk+int64(i)].Load()
				}
				if _, err := c.ReadAt(buf, blk*bs); err != nil {
					t.Error(err)
					return
				}
				for i := range before {
					if got := binary.LittleEndian.Uint64(buf[i*bs:]); got < before[i] {
						t.Errorf("block %d: read version %d after version %d was written", blk+int64(i), got, before[i])
						return
					}
				}
				reads.Add(1)
			}
		}()
	}
	wg.Wait()
	buf := make([]byte, bs)
	for blk := int64(0); blk < blocks; blk++ {
		c.ReadAt(buf, blk*bs)
		if got, want := binary.LittleEndian.Uint64(buf), published[blk].Load(); got != want {
			t.Fatalf("block %d: final version %d, want %d", blk, got, want)
		}
	}
	t.Logf("%d reads, %d writes, %+v", reads.Load(), writes.Load(), c.Stats())
}

// BenchmarkCacheHit reads random 4 KiB blocks from a warm cache, from a working set that
// fits the CPU caches (4 MiB) and from one that does not (64 MiB); BenchmarkCopyFloor is
// the bare memory copy of the same pattern, the floor any ReadAt-based cache pays.
func BenchmarkCacheHit(b *testing.B) {
	for _, size := range []int64{4 << 20, 64 << 20} {
		b.Run(fmt.Sprintf("set=%dMiB", size>>20), func(b *testing.B) {
			f := fileDev(b, size)
			c := New(f, 2*size)
			buf := make([]byte, PageSize)
			for off := int64(0); off < size; off += int64(len(buf)) {
				c.ReadAt(buf, off)
			}
			b.SetBytes(4096)
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				r := rand.New(rand.NewPCG(rand.Uint64(), 0))
				p := make([]byte, 4096)
				for pb.Next() {
					if _, err := c.ReadAt(p, r.Int64N(size/4096)*4096); err != nil {
						b.Error(err)
						return
					}
				}
			})
			b.StopTimer()
			if st := c.Stats(); st.Misses > size/PageSize {
				b.Fatalf("warm cache missed: %+v", st)
			}
		})
	}
}

func BenchmarkCopyFloor(b *testing.B) {
	for _, size := range []int64{4 << 20, 64 << 20} {
		b.Run(fmt.Sprintf("set=%dMiB", size>>20), func(b *testing.B) {
			src := make([]byte, size)
			for i := range src {
				src[i] = byte(i)
			}
			b.SetBytes(4096)
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				r := rand.New(rand.NewPCG(rand.Uint64(), 0))
				p := make([]byte, 4096)
				for pb.Next() {
					off := r.Int64N(size/4096) * 4096
					copy(p, src[off:off+4096])
				}
			})
		})
	}
}

func BenchmarkCacheMiss(b *testing.B) {
	const size = 64 << 20
	f := fileDev(b, size)
	c := New(f, 1<<20)
	b.SetBytes(4096)
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		r := rand.New(rand.NewPCG(rand.Uint64(), 0))
		p := make([]byte, 4096)
		for pb.Next() {
			if _, err := c.ReadAt(p, r.Int64N(size/4096)*4096); err != nil {
				b.Error(err)
				return
			}
		}
	})
}

// TestCacheBlockValidity: a small miss caches only the blocks it read; a write that
// covers part of an uncached block does not make it look cached.
func TestCacheBlockValidity(t *testing.T) {
	f := fileDev(t, 1<<20)
	want := make([]byte, 1<<20)
	rand.NewChaCha8([32]byte{2}).Read(want)
	f.WriteAt(want, 0)
	c := New(f, 1<<20)
	read := func(off, n int64) {
		t.Helper()
		b := make([]byte, n)
		if _, err := c.ReadAt(b, off); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(b, want[off:off+n]) {
			t.Fatalf("read %d at %d: wrong data", n, off)
		}
	}
	misses := func() int64 { return c.Stats().Misses }
	read(8192, 4096)
	m := misses()
	read(8192+100, 1000) // same block: hit
	if misses() != m {
		t.Fatal("a read inside a cached block missed")
	}
	read(4096, 8192) // needs block 1, which was not read
	if misses() != m+1 {
		t.Fatal("a read of an uncached block of a cached page hit")
	}
	// Partial write into uncached block 5 and full write of block 6.
	w := bytes.Repeat([]byte{0xAB}, 4096+300)
	c.WriteAt(w, 5*4096+4096-300)
	copy(want[5*4096+4096-300:], w)
	m = misses()
	read(6*4096, 4096) // fully written: cached by the write
	if misses() != m {
		t.Fatal("a block fully written through the cache was not cached")
	}
	read(5*4096, 4096) // partly written, never read: must come from the device
	if misses() != m+1 {
		t.Fatal("a partly written block was served from the cache")
	}
	// The device's last page may be short: validity stops at its end.
	g := fileDev(t, 100_000)
	gc := New(g, 1<<20)
	gb := bytes.Repeat([]byte{7}, 100_000-65536)
	got := make([]byte, len(gb))
	gc.ReadAt(got[:4096], 65536)      // caches the short page's first block
	gc.WriteAt(gb[4096:], 65536+4096) // the rest, to the page's end: every block valid
	copy(gb, got[:4096])
	m = gc.Stats().Misses
	if _, err := gc.ReadAt(got, 65536); err != nil || !bytes.Equal(got, gb) || gc.Stats().Misses != m {
		t.Fatalf("short last page: err %v, equal %v, misses %d -> %d", err, bytes.Equal(got, gb), m, gc.Stats().Misses)
	}
	gb[0]++
	gc.WriteAt(gb, 65536) // the whole short page: dropped, read back from the device
	if _, err := gc.ReadAt(got, 65536); err != nil || !bytes.Equal(got, gb) || gc.Stats().Misses != m+1 {
		t.Fatalf("short last page written entirely: err %v, equal %v, misses %d -> %d", err, bytes.Equal(got, gb), m, gc.Stats().Misses)
	}
}

func TestBlockMasks(t *testing.T) {
	cases := []struct {
		lo, hi, plen int
		any, full    uint32
	}{
		{0, 4096, PageSize, 1, 1},
		{1, 4096, PageSize, 1, 0},
		{0, PageSize, PageSize, 0xFFFF, 0xFFFF},
		{4095, 8193, PageSize, 0b111, 0b010},
		{0, 5000, 5000, 0b11, 0b11},
		{100, 5000, 5000, 0b11, 0b10},
	}
	for _, c := range cases {
		if got := blocks(c.lo, c.hi); got != c.any {
			t.Errorf("blocks(%d, %d) = %b, want %b", c.lo, c.hi, got, c.any)
		}
		if got := fullBlocks(c.lo, c.hi, c.plen); got != c.full {
			t.Errorf("fullBlocks(%d, %d, %d) = %b, want %b", c.lo, c.hi, c.plen, got, c.full)
		}
	}
}

// TestCacheWholePageWrite checks the write rule: the cached pages a write covers
// entirely are dropped (and read back fresh from the device), the partly covered pages
// at its ends are updated in place and keep serving hits.
func TestCacheWholePageWrite(t *testing.T) {
	f := fileDev(t, 1<<20)
	c := New(f, 1<<20)
	want := make([]byte, 1<<20)
	rand.NewChaCha8([32]byte{3}).Read(want)
	f.WriteAt(want, 0)
	blk := make([]byte, BlockSize)
	for off := int64(0); off < 5*PageSize; off += BlockSize {
		c.ReadAt(blk, off) // pages 0-4 entirely cached
	}
	if got := c.Stats().Bytes; got != 5*PageSize {
		t.Fatalf("cached %d bytes after warming, want %d", got, 5*PageSize)
	}
	// From the middle of page 0 to the middle of page 3: pages 1 and 2 entirely.
	w := make([]byte, 3*PageSize)
	rand.NewChaCha8([32]byte{4}).Read(w)
	off := int64(PageSize / 2)
	if _, err := c.WriteAt(w, off); err != nil {
		t.Fatal(err)
	}
	copy(want[off:], w)
	if got := c.Stats().Bytes; got != 3*PageSize {
		t.Fatalf("cached %d bytes after the write, want %d (pages 1 and 2 dropped)", got, 3*PageSize)
	}
	check := func(off int64, hit bool) {
		t.Helper()
		m := c.Stats().Misses
		if _, err := c.ReadAt(blk, off); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(blk, want[off:off+BlockSize]) {
			t.Fatalf("block at %d: stale data after the write", off)
		}
		if missed := c.Stats().Misses != m; missed == hit {
			t.Fatalf("block at %d: missed %v, want a hit %v", off, missed, hit)
		}
	}
	check(0, true)                     // page 0, not written
	check(PageSize-BlockSize, true)    // page 0, updated in place
	check(PageSize, false)             // page 1, dropped: refilled from the device
	check(PageSize, true)              // and cached again
	check(2*PageSize+BlockSize, false) // page 2, dropped
	check(3*PageSize, true)            // page 3, updated in place
	check(3*PageSize+PageSize/2, true) // page 3, not written
	// Exactly one page: dropped too; the page after it stays.
	one := bytes.Repeat([]byte{9}, PageSize)
	if _, err := c.WriteAt(one, 4*PageSize); err != nil {
		t.Fatal(err)
	}
	copy(want[4*PageSize:], one)
	check(4*PageSize+BlockSize, false)
	check(3*PageSize, true)
}
