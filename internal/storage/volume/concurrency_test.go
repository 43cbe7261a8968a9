package volume

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"sort"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// TestConcurrentIO has many goroutines write, read, trim and flush interleaved sectors
// of the same clusters (so first writes race on copy-on-write allocation) on a plain
// volume and on a clone, while snapshots come and go and checkpoints run. Every
// goroutine owns the sectors s with s%workers == its index and verifies them.
func TestConcurrentIO(t *testing.T) {
	const (
		workers = 6
		size    = 2 * MiB
		iters   = 400
	)
	b := newBed(t, 64*MiB)
	img := pattern(size, 11)
	if _, err := b.m.ImportImage("img", size, bytes.NewReader(img), nil); err != nil {
		t.Fatal(err)
	}
	if _, err := b.m.Create("plain", size); err != nil {
		t.Fatal(err)
	}
	if _, err := b.m.Clone("img", "clone"); err != nil {
		t.Fatal(err)
	}
	models := map[string][]byte{"plain": make([]byte, size), "clone": bytes.Clone(img)}
	var wg sync.WaitGroup
	var stop atomic.Bool
	errs := make(chan error, 64)
	for name, model := range models {
		for w := 0; w < workers; w++ {
			wg.Add(1)
			go func(name string, model []byte, w int) {
				defer wg.Done()
				h, err := b.m.Open(name)
				if err != nil {
					errs <- err
					return
				}
				defer h.Close()
				rng := rand.New(rand.NewPCG(uint64(w), uint64(len(name))))
				buf := make([]byte, sector)
				for i := 0; i < iters; i++ {
					s := int64(rng.IntN(size/sector/workers)*workers + w)
					off := s * sector
					switch rng.IntN(10) {
					case 0, 1, 2, 3, 4, 5:
						p := pattern(sector, byte(rng.IntN(250)+1))
						if err := h.WriteAt(p, off, rng.IntN(20) == 0); err != nil {
							errs <- err
							return
						}
						copy(model[off:], p)
					case 6:
						if err := h.WriteZeroes(off, sector, false, false, false); err != nil {
							errs <- err
							return
						}
						clear(model[off : off+sector])
					case 7:
						if err := h.Flush(); err != nil {
							errs <- err
							return
						}
					default:
						if err := h.ReadAt(buf, off); err != nil {
							errs <- err
							return
						}
						if !bytes.Equal(buf, model[off:off+sector]) {
							errs <- fmt.Errorf("%s: worker %d sector %d reads wrong data", name, w, s)
							return
						}
					}
				}
			}(name, model, w)
		}
	}
	// Structure changes while I/O runs.
	var admin sync.WaitGroup
	admin.Add(1)
	go func() {
		defer admin.Done()
		for i := 0; !stop.Load(); i++ {
			if _, err := b.m.Snapshot("plain", fmt.Sprintf("s%d", i)); err != nil {
				errs <- err
				return
			}
			if i > 0 {
				if err := b.m.Delete(fmt.Sprintf("plain@s%d", i-1)); err != nil {
					errs <- err
					return
				}
			}
			if i%3 == 0 {
				if err := b.m.Checkpoint(); err != nil {
					errs <- err
					return
				}
			}
			time.Sleep(2 * time.Millisecond)
		}
	}()
	wg.Wait()
	stop.Store(true)
	admin.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	for name, model := range models {
		h := mustOpen(t, b.m, name)
		mustEqual(t, name, readAll(t, h), model)
		h.Close()
	}
	b.check()
	b.reopen(false)
	b.check()
	for name, model := range models {
		h := mustOpen(t, b.m, name)
		mustEqual(t, name+" after reopen", readAll(t, h), model)
	}
}

func TestNoSpace(t *testing.T) {
	b := newBed(t, 32*ClusterSize)
	if _, err := b.m.Create("v", 64*ClusterSize); err != nil {
		t.Fatal(err)
	}
	h := mustOpen(t, b.m, "v")
	var written int64
	var err error
	for c := int64(0); c < 64; c++ {
		if err = h.WriteAt(pattern(ClusterSize, byte(c)), c*ClusterSize, false); err != nil {
			break
		}
		written++
	}
	wantErr(t, "write beyond capacity", err, ErrNoSpace)
	if written != 32 {
		t.Fatalf("wrote %d clusters before running out, want 32", written)
	}
	if st := b.m.Stats(); st.ClustersFree != 0 || st.ClustersUsed != 32 {
		t.Fatalf("stats when full: %+v", st)
	}
	// Overwriting allocated clusters still works; nothing was corrupted.
	if err := h.WriteAt([]byte("still fine"), 5, false); err != nil {
		t.Fatal(err)
	}
	for c := int64(0); c < written; c++ {
		want := pattern(ClusterSize, byte(c))
		if c == 0 {
			copy(want[5:], "still fine")
		}
		got := make([]byte, ClusterSize)
		if err := h.ReadAt(got, c*ClusterSize); err != nil {
			t.Fatal(err)
		}
		mustEqual(t, fmt.Sprintf("cluster %d", c), got, want)
	}
	b.check()
	// Trimmed clusters come back once the trim is durable (alloc syncs by itself).
	if err := h.Trim(0, 4*ClusterSize, false); err != nil {
		t.Fatal(err)
	}
	if st := b.m.Stats(); st.ClustersPendingFree != 4 {
		t.Fatalf("pending free after trim: %+v", st)
	}
	for c := int64(40); c < 44; c++ {
		if err := h.WriteAt(pattern(ClusterSize, 99), c*ClusterSize, false); err != nil {
			t.Fatalf("write after trim: %v", err)
		}
	}
	wantErr(t, "full again", h.WriteAt([]byte{1}, 50*ClusterSize, false), ErrNoSpace)
	b.check()
}

// TestCloneIsConstantTime clones a 100 MiB and a 10 GiB image (both with data) and
// checks that both clones take well under 100 ms and about the same time.
func TestCloneIsConstantTime(t *testing.T) {
	b := newBed(t, 1<<30)
	small := pattern(100*MiB, 3)
	if _, err := b.m.ImportImage("small", int64(len(small)), bytes.NewReader(small), nil); err != nil {
		t.Fatal(err)
	}
	// 10 GiB with one 64 KiB run of data every 16 MiB (640 clusters).
	big := &sparseReader{size: 10 << 30, every: 16 * MiB}
	if _, err := b.m.ImportImage("big", big.size, big, nil); err != nil {
		t.Fatal(err)
	}
	if i, _ := b.m.Get("big"); i.Allocated != 640*ClusterSize {
		t.Fatalf("big image allocated %d", i.Allocated)
	}
	timeClones := func(src string) time.Duration {
		var d []time.Duration
		for i := 0; i < 5; i++ {
			start := time.Now()
			if _, err := b.m.Clone(src, fmt.Sprintf("%s-c%d", src, i)); err != nil {
				t.Fatal(err)
			}
			d = append(d, time.Since(start))
		}
		sort.Slice(d, func(i, j int) bool { return d[i] < d[j] })
		return d[len(d)/2]
	}
	ts, tb := timeClones("small"), timeClones("big")
	t.Logf("median clone time: 100 MiB image %v, 10 GiB image %v", ts, tb)
	if ts > 100*time.Millisecond || tb > 100*time.Millisecond {
		t.Fatalf("clone too slow: 100 MiB %v, 10 GiB %v", ts, tb)
	}
	if tb > 3*ts+20*time.Millisecond {
		t.Fatalf("cloning 10 GiB (%v) is much slower than 100 MiB (%v): not O(1)", tb, ts)
	}
	// Snapshots are O(1) too: an empty volume and one with 640 clusters of its own.
	bh := mustOpen(t, b.m, "big-c1")
	for c := int64(0); c < 640; c++ {
		if err := bh.WriteAt([]byte{1}, c*16*MiB, false); err != nil {
			t.Fatal(err)
		}
	}
	if err := bh.Flush(); err != nil {
		t.Fatal(err)
	}
	for _, v := range []string{"big-c2", "big-c1"} {
		var d []time.Duration
		for i := 0; i < 5; i++ {
			start := time.Now()
			if _, err := b.m.Snapshot(v, fmt.Sprintf("s%d", i)); err != nil {
				t.Fatal(err)
			}
			d = append(d, time.Since(start))
		}
		sort.Slice(d, func(i, j int) bool { return d[i] < d[j] })
		t.Logf("median snapshot time of %s: %v", v, d[2])
		if d[2] > 100*time.Millisecond {
			t.Fatalf("snapshot of %s took %v (median of 5)", v, d[2])
		}
	}
	h := mustOpen(t, b.m, "big-c0")
	p := make([]byte, 2*ClusterSize)
	if err := h.ReadAt(p, 160*MiB-ClusterSize); err != nil {
		t.Fatal(err)
	}
	if !isZero(p[:ClusterSize]) || isZero(p[ClusterSize:]) {
		t.Fatal("clone of the big image does not read the image's data")
	}
}

// sparseReader yields size bytes: a cluster of 0xAB every `every` bytes, zeroes elsewhere.
type sparseReader struct {
	size, every, off int64
}

func (r *sparseReader) Read(p []byte) (int, error) {
	if r.off >= r.size {
		return 0, io.EOF
	}
	n := min(int64(len(p)), r.size-r.off)
	p = p[:n]
	clear(p)
	for i := int64(0); i < n; {
		pos := r.off + i
		if pos%r.every < ClusterSize {
			end := min(n, i+ClusterSize-pos%r.every)
			for j := i; j < end; j++ {
				p[j] = 0xAB
			}
			i = end
			continue
		}
		i += min(n-i, r.every-pos%r.every)
	}
	r.off += n
	return int(n), nil
}

// TestTrimRaceNeverLeaks has writers and readers on volume "a" race with trims of the
// same clusters and flushes (so freed clusters are reused at once), while volume "b"
// allocates, writes and verifies whole clusters: a stale write of "a" landing in a
// cluster reused by "b", or "a" reading "b"'s data, would show.
func TestTrimRaceNeverLeaks(t *testing.T) {
	const clusters = 32
	b := newBed(t, 2*clusters*ClusterSize+8*ClusterSize)
	for _, n := range []string{"a", "b"} {
		if _, err := b.m.Create(n, clusters*ClusterSize); err != nil {
			t.Fatal(err)
		}
	}
	ha, hb := mustOpen(t, b.m, "a"), mustOpen(t, b.m, "b")
	// Stretch the time between finding a cluster and using it.
	var hookN atomic.Int64
	testHookIO = func() {
		if hookN.Add(1)%8 == 0 {
			time.Sleep(20 * time.Millisecond)
		}
	}
	t.Cleanup(func() { testHookIO = nil })
	var stop atomic.Bool
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	aData := bytes.Repeat([]byte{0xAA}, 4096)
	for w := 0; w < 3; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(w), 9))
			buf := make([]byte, 4096)
			for !stop.Load() {
				off := rng.Int64N(clusters*ClusterSize/4096) * 4096
				if rng.IntN(2) == 0 {
					if err := ha.WriteAt(aData, off, false); err != nil && !errors.Is(err, ErrNoSpace) {
						errs <- err
						return
					}
					continue
				}
				if err := ha.ReadAt(buf, off); err != nil {
					errs <- err
					return
				}
				if !isZero(buf) && !bytes.Equal(buf, aData) {
					errs <- fmt.Errorf("volume a at %d reads foreign data", off)
					return
				}
			}
		}(w)
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		rng := rand.New(rand.NewPCG(7, 7))
		for !stop.Load() {
			c := rng.Int64N(clusters)
			if err := ha.Trim(c*ClusterSize, ClusterSize, true); err != nil {
				errs <- err
				return
			}
		}
	}()
	deadline := time.Now().Add(2 * time.Second)
	buf := make([]byte, ClusterSize)
	for round := 1; time.Now().Before(deadline); round++ {
		for c := int64(0); c < clusters; c++ {
			p := pattern(ClusterSize, byte(round)+byte(c))
			if err := hb.WriteAt(p, c*ClusterSize, false); err != nil && !errors.Is(err, ErrNoSpace) {
				t.Fatal(err)
			}
		}
		if err := hb.Flush(); err != nil {
			t.Fatal(err)
		}
		for c := int64(0); c < clusters; c++ {
			if err := hb.ReadAt(buf, c*ClusterSize); err != nil {
				t.Fatal(err)
			}
			if !isZero(buf) && !bytes.Equal(buf, pattern(ClusterSize, byte(round)+byte(c))) {
				stop.Store(true)
				wg.Wait()
				t.Fatalf("round %d: volume b cluster %d was overwritten by another volume", round, c)
			}
		}
		if err := hb.Trim(0, clusters*ClusterSize, true); err != nil {
			t.Fatal(err)
		}
	}
	stop.Store(true)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	b.check()
}
