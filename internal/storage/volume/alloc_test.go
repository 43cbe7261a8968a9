package volume

import (
	"bytes"
	"math/rand/v2"
	"sync"
	"testing"
)

// physOf returns the physical cluster of vc in the volume's top layer (or -1).
func physOf(h *Handle, vc uint64) int64 {
	h.o.tab.RLock()
	defer h.o.tab.RUnlock()
	if e := h.o.layer.tab.get(vc); isPhys(e) {
		return int64(e - entPhys)
	}
	return -1
}

// devCalls counts the device calls a sequential pass of req-byte writes over the
// volume makes, which is what placement is for.
func runsOf(h *Handle, req int64) (calls int) {
	for off := int64(0); off < h.Size(); off += req {
		vc := uint64(off / ClusterSize)
		calls++
		for k := uint64(1); k < uint64(req/ClusterSize); k++ {
			if physOf(h, vc+k) != physOf(h, vc+k-1)+1 {
				calls++
			}
		}
	}
	return calls
}

// TestAllocPlacesChunksContiguously writes a fresh volume the way a parallel copy
// does (many 256 KiB writes in flight, finishing in any order) and checks that every
// 4 MiB chunk still lands in one physical group, in order, so that a 1 MiB write is one
// device call. After a restart (reservations forgotten), the rest of half-written
// chunks follows their mapped neighbours.
func TestAllocPlacesChunksContiguously(t *testing.T) {
	b := newBed(t, 256<<20)
	const size = 64 << 20
	if _, err := b.m.Create("v", size); err != nil {
		t.Fatal(err)
	}
	h := mustOpen(t, b.m, "v")
	const req = 256 << 10
	var offs []int64
	for off := int64(0); off < size; off += req {
		offs = append(offs, off)
	}
	r := rand.New(rand.NewPCG(1, 2))
	r.Shuffle(len(offs), func(i, j int) { offs[i], offs[j] = offs[j], offs[i] })
	// Write only the first half of every chunk now, the rest after a restart.
	firstHalf := func(off int64) bool { return off%(groupSize*ClusterSize) < groupSize*ClusterSize/2 }
	write := func(first bool) {
		work := make(chan int64)
		var wg sync.WaitGroup
		for w := 0; w < 8; w++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for off := range work {
					if err := h.WriteAt(pattern(req, byte(off>>16)), off, false); err != nil {
						t.Error(err)
					}
				}
			}()
		}
		for _, off := range offs {
			if firstHalf(off) == first {
				work <- off
			}
		}
		close(work)
		wg.Wait()
	}
	write(true)
	if err := h.Flush(); err != nil {
		t.Fatal(err)
	}
	h.Close()
	b.reopen(false)
	h = mustOpen(t, b.m, "v")
	write(false)
	for vc := uint64(0); vc < size/ClusterSize; vc++ {
		p := physOf(h, vc)
		first := physOf(h, vc&^groupMask)
		if p != first+int64(vc&groupMask) || first&groupMask != 0 {
			t.Fatalf("virtual cluster %d is at physical %d; its chunk starts at %d", vc, p, first)
		}
	}
	if calls := runsOf(h, 1<<20); calls != size/(1<<20) {
		t.Fatalf("a sequential pass of 1 MiB writes takes %d device calls, want %d", calls, size/(1<<20))
	}
	for off := int64(0); off < size; off += req {
		got := make([]byte, req)
		if err := h.ReadAt(got, off); err != nil {
			t.Fatal(err)
		}
		mustEqual(t, "data after placement", got, pattern(req, byte(off>>16)))
	}
	b.check()
}

// TestAllocFallsBackWhenFragmented fills a device, frees every other cluster, and
// checks that all freed clusters can still be allocated (no entirely free group is
// left, so placement must fall back to any free cluster) and that the allocator's
// accounting stays exact.
func TestAllocFallsBackWhenFragmented(t *testing.T) {
	const clusters = 3*groupSize + 5 // a short last group too
	b := newBed(t, clusters*ClusterSize)
	if _, err := b.m.Create("a", clusters*ClusterSize); err != nil {
		t.Fatal(err)
	}
	h := mustOpen(t, b.m, "a")
	for vc := int64(0); vc < clusters; vc++ {
		if err := h.WriteAt(pattern(ClusterSize, byte(vc)), vc*ClusterSize, false); err != nil {
			t.Fatalf("fill cluster %d: %v", vc, err)
		}
	}
	wantErr(t, "write to a full device", func() error {
		if _, err := b.m.Create("b", clusters*ClusterSize); err != nil {
			t.Fatal(err)
		}
		return mustOpen(t, b.m, "b").WriteAt([]byte{1}, 0, false)
	}(), ErrNoSpace)
	for vc := int64(0); vc < clusters; vc += 2 {
		if err := h.Trim(vc*ClusterSize, ClusterSize, false); err != nil {
			t.Fatal(err)
		}
	}
	if err := h.Flush(); err != nil {
		t.Fatal(err)
	}
	b.check()
	hb := mustOpen(t, b.m, "b")
	freed := int64((clusters + 1) / 2)
	for vc := int64(0); vc < freed; vc++ {
		if err := hb.WriteAt(pattern(ClusterSize, byte(vc+100)), vc*ClusterSize, false); err != nil {
			t.Fatalf("write %d of %d freed clusters: %v", vc+1, freed, err)
		}
	}
	wantErr(t, "write after every freed cluster is reused", hb.WriteAt([]byte{1}, freed*ClusterSize, false), ErrNoSpace)
	for vc := int64(0); vc < clusters; vc++ {
		got := make([]byte, ClusterSize)
		if err := h.ReadAt(got, vc*ClusterSize); err != nil {
			t.Fatal(err)
		}
		want := make([]byte, ClusterSize)
		if vc%2 == 1 {
			want = pattern(ClusterSize, byte(vc))
		}
		mustEqual(t, "surviving data", got, want)
	}
	if err := hb.Flush(); err != nil {
		t.Fatal(err)
	}
	b.check()
	b.reopen(true)
	b.check()
}

// TestNeighbourGoal pins the neighbour rule on a table.
func TestNeighbourGoal(t *testing.T) {
	tab := newTable()
	if g := tab.neighbourGoal(70); g != noGoal {
		t.Fatalf("empty table: goal %d", g)
	}
	tab.set(64+3, physEntry(5*groupSize+3)) // chunk 1, placed by the rule in group 5
	if g := tab.neighbourGoal(64 + 10); g != 5*groupSize+10 {
		t.Fatalf("goal %d, want %d", g, 5*groupSize+10)
	}
	if g := tab.neighbourGoal(10); g != noGoal {
		t.Fatalf("other chunk: goal %d", g)
	}
	tab.set(128+1, physEntry(7*groupSize+9)) // chunk 2, placed elsewhere: names no group
	if g := tab.neighbourGoal(128 + 2); g != noGoal {
		t.Fatalf("misplaced neighbour gave goal %d", g)
	}
	tab.set(128+40, physEntry(2*groupSize+40))
	if g := tab.neighbourGoal(128 + 2); g != 2*groupSize+2 {
		t.Fatalf("goal %d, want %d", g, 2*groupSize+2)
	}
}

// TestAllocatorModel runs random allocations and frees against a plain set and checks
// after each step that the allocator hands out only free clusters, never fails while
// one is free, and keeps its counts, group counts and map of free groups exact.
func TestAllocatorModel(t *testing.T) {
	for _, total := range []uint64{1, 63, 64, 200, 5*groupSize + 17} {
		used := newBitmap(total)
		a := newAllocator(total, used)
		inUse := map[uint64]bool{}
		r := rand.New(rand.NewPCG(total, 3))
		for step := 0; step < 4000; step++ {
			if r.IntN(3) > 0 {
				goal := noGoal
				if r.IntN(2) == 0 {
					goal = r.Uint64N(total)
				}
				p, _, ok := a.get(r.Uint64N(4), r.Uint64N(1<<12), goal)
				if ok != (len(inUse) < int(total)) {
					t.Fatalf("total %d step %d: get ok=%v with %d of %d in use", total, step, ok, len(inUse), total)
				}
				if ok {
					if inUse[p] || p >= total {
						t.Fatalf("total %d step %d: handed out cluster %d, in use or out of range", total, step, p)
					}
					inUse[p] = true
				}
			} else if len(inUse) > 0 {
				for p := range inUse {
					delete(inUse, p)
					a.put(p, r.IntN(2) == 0)
					break
				}
			}
			var free, full uint64
			for g := uint64(0); g < uint64(len(a.groupFree)); g++ {
				n := 0
				for p := g * groupSize; p < min((g+1)*groupSize, total); p++ {
					if a.free.has(p) == inUse[p] {
						t.Fatalf("total %d step %d: cluster %d free=%v, in use=%v", total, step, p, a.free.has(p), inUse[p])
					}
					if a.free.has(p) {
						n++
					}
				}
				if int(a.groupFree[g]) != n || a.fullMap.has(g) != (n == groupSize) {
					t.Fatalf("total %d step %d: group %d counts %d (full %v), has %d free", total, step, g, a.groupFree[g], a.fullMap.has(g), n)
				}
				free += uint64(n)
				if n == groupSize {
					full++
				}
			}
			if free != a.nfree || full != a.fullFree {
				t.Fatalf("total %d step %d: counts %d free, %d full groups; really %d and %d", total, step, a.nfree, a.fullFree, free, full)
			}
		}
	}
}

// TestConcurrentRunAllocation has writers allocate runs of whole clusters (and partial
// ones, and trims) side by side in a clone of an image and in a plain volume, each
// writer in its own 8-cluster blocks, interleaved with the others' blocks; then every
// byte must match the writers' models, before and after a restart, and check is clean.
func TestConcurrentRunAllocation(t *testing.T) {
	const (
		writers = 4
		block   = 8 * ClusterSize
		size    = 64 * block
	)
	b := newBed(t, 128*MiB)
	img := pattern(size, 5)
	if _, err := b.m.ImportImage("img", size, bytes.NewReader(img), nil); err != nil {
		t.Fatal(err)
	}
	if _, err := b.m.Clone("img", "clone"); err != nil {
		t.Fatal(err)
	}
	if _, err := b.m.Create("plain", size); err != nil {
		t.Fatal(err)
	}
	models := map[string][]byte{"clone": bytes.Clone(img), "plain": make([]byte, size)}
	var wg sync.WaitGroup
	for name, model := range models {
		h := mustOpen(t, b.m, name)
		for w := 0; w < writers; w++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				r := rand.New(rand.NewPCG(uint64(w), uint64(len(name))))
				for i := 0; i < 150; i++ {
					base := int64(r.IntN(size/block/writers)*writers+w) * block
					off := base + r.Int64N(block)
					if r.IntN(2) == 0 {
						off = base + r.Int64N(8)*ClusterSize // whole clusters
					}
					n := 1 + r.Int64N(base+block-off)
					if r.IntN(2) == 0 {
						n = (base + block - off) / ClusterSize * ClusterSize
					}
					if n == 0 {
						continue
					}
					if r.IntN(5) == 0 {
						if err := h.Trim(off, n, false); err != nil {
							t.Error(err)
							return
						}
						// Whole clusters of a trim read as zeroes; partial ones stay.
						for c := (off + ClusterSize - 1) / ClusterSize * ClusterSize; c+ClusterSize <= off+n; c += ClusterSize {
							clear(model[c : c+ClusterSize])
						}
						continue
					}
					p := pattern(int(n), byte(r.IntN(250)+1))
					if err := h.WriteAt(p, off, r.IntN(10) == 0); err != nil {
						t.Error(err)
						return
					}
					copy(model[off:], p)
				}
			}()
		}
	}
	wg.Wait()
	if t.Failed() {
		return
	}
	verify := func(when string) {
		for name, model := range models {
			h := mustOpen(t, b.m, name)
			mustEqual(t, name+" "+when, readAll(t, h), model)
			h.Close()
		}
		b.check()
	}
	verify("after the writes")
	b.reopen(false)
	verify("after a restart")
}
