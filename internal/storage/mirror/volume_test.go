package mirror

import (
	"context"
	"errors"
	"math/rand/v2"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/growserver/grow/internal/storage/nbd"
)

const testSize = 64 << 20

// syncedPair builds a primary volume and a secondary controller in sync at epoch 1.
func syncedPair(t *testing.T) (*Volume, *fileExport, *secondary, string) {
	v, disk, path := newPrimary(t, testSize)
	sec := startSecondary(t, newFileExport(t, "secondary.img", testSize), State{RoleSecondary, 1})
	if err := v.Resync(context.Background(), sec.dial(1), ResyncOptions{}); err != nil {
		t.Fatal(err)
	}
	mustMode(t, v, ModeSynced)
	if got := v.Progress().Bytes; got != 0 {
		t.Fatalf("resync of a new pair copied %d bytes", got)
	}
	return v, disk, sec, path
}

func TestMirroredWritesLandOnBoth(t *testing.T) {
	v, disk, sec, _ := syncedPair(t)
	ex := v.Export()
	var wg sync.WaitGroup
	var sent, fuas atomic.Int64
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(g), 9))
			for i := 0; i < 150; i++ {
				// Small window so concurrent writes overlap often: both sides must still agree.
				off := rng.Int64N(4<<20) + int64(g%2)*(32<<20)
				n := 1 + rng.Int64N(256<<10)
				var err error
				switch rng.IntN(10) {
				case 0:
					err = ex.Trim(off, n, false)
				case 1:
					err = ex.WriteZeroes(off, n, nbd.ZeroFlags{NoHole: true})
				case 2:
					err = ex.WriteZeroes(off, n, nbd.ZeroFlags{Fast: true})
					if errors.Is(err, nbd.ErrFastZeroUnsupported) {
						err = nil
					}
				case 3:
					err = ex.WriteAt(pattern(g*1000+i, int(n)), off, true)
					fuas.Add(1)
					sent.Add(n)
				default:
					err = ex.WriteAt(pattern(g*1000+i, int(n)), off, false)
					sent.Add(n)
				}
				if err != nil {
					t.Errorf("op %d of writer %d: %v", i, g, err)
					return
				}
			}
		}()
	}
	wg.Wait()
	syncsBefore := sec.disk.syncs.Load()
	if err := ex.Flush(); err != nil {
		t.Fatal(err)
	}
	if sec.disk.syncs.Load() <= syncsBefore {
		t.Fatal("FLUSH did not reach the secondary's disk")
	}
	if got := sec.disk.fuaWrites.Load(); got != fuas.Load() {
		t.Fatalf("secondary saw %d FUA writes, the client sent %d", got, fuas.Load())
	}
	if got := sec.target.BytesWritten.Load(); got != sent.Load() {
		t.Fatalf("secondary applied %d write bytes, the client wrote %d", got, sent.Load())
	}
	mustMode(t, v, ModeSynced)
	if d := sameContent(t, disk, sec.disk, DefaultRegionSize); len(d) != 0 {
		t.Fatalf("sides differ in regions %v", d)
	}
	if v.Bitmap().Count() != 0 {
		t.Fatalf("a synced pair marked regions %v", v.Bitmap().Dirty())
	}
	// Reads are local: corrupt the secondary and the client still reads the primary's data.
	want := make([]byte, 4096)
	disk.ReadAt(want, 1<<20)
	sec.disk.WriteAt(make([]byte, 4096), 1<<20, false)
	got := make([]byte, 4096)
	if err := ex.ReadAt(got, 1<<20); err != nil || !slices.Equal(got, want) {
		t.Fatalf("read did not come from the primary (err %v)", err)
	}
}

func TestPeerLossDegradesAndResyncCopiesOnlyDirty(t *testing.T) {
	v, disk, sec, path := syncedPair(t)
	ex := v.Export()
	for i := 0; i < 64; i++ {
		if err := ex.WriteAt(pattern(i, 64<<10), int64(i)<<20, false); err != nil {
			t.Fatal(err)
		}
	}
	if err := ex.Flush(); err != nil {
		t.Fatal(err)
	}
	sec.kill()

	// Writes go on without an error and mark exactly the regions they touch.
	want := []uint64{0, 3, 4, 17, 18, 40, 63}
	writes := [][2]int64{{10, 100}, {3<<20 + 5, 1<<20 - 5}, {4 << 20, 4096}, {18<<20 - 1, 2}, {40<<20 + 999, 64 << 10}, {testSize - 4096, 4096}}
	for i, w := range writes {
		if err := ex.WriteAt(pattern(100+i, int(w[1])), w[0], false); err != nil {
			t.Fatalf("write %d after the peer died: %v", i, err)
		}
	}
	if err := ex.Flush(); err != nil {
		t.Fatalf("flush while degraded: %v", err)
	}
	mustMode(t, v, ModeDegraded)
	if got := v.Bitmap().Dirty(); !slices.Equal(got, want) {
		t.Fatalf("dirty regions %v, want %v", got, want)
	}
	// The marks are on disk.
	bm2, err := OpenBitmap(path, testSize, DefaultRegionSize)
	if err != nil {
		t.Fatal(err)
	}
	if got := bm2.Dirty(); !slices.Equal(got, want) {
		t.Fatalf("persisted dirty regions %v, want %v", got, want)
	}
	bm2.Close()
	if d := sameContent(t, disk, sec.disk, DefaultRegionSize); !slices.Equal(d, want) {
		t.Fatalf("sides differ in %v, want exactly %v", d, want)
	}

	// The secondary comes back stale at epoch 1; the primary went on at epoch 2.
	sec.target.SetState(State{RoleStale, 1})
	sec.start()
	before := sec.target.BytesWritten.Load()
	if err := v.Resync(context.Background(), sec.dial(2), ResyncOptions{}); err != nil {
		t.Fatal(err)
	}
	mustMode(t, v, ModeSynced)
	copied := sec.target.BytesWritten.Load() - before
	if wantBytes := int64(len(want)) * DefaultRegionSize; copied != wantBytes || v.Progress().Bytes != wantBytes {
		t.Fatalf("resync copied %d bytes (progress says %d), want %d", copied, v.Progress().Bytes, wantBytes)
	}
	if d := sameContent(t, disk, sec.disk, DefaultRegionSize); len(d) != 0 {
		t.Fatalf("after resync sides differ in %v", d)
	}
	if st := sec.target.State(); st != (State{RoleSecondary, 2}) {
		t.Fatalf("secondary is %v@%d after resync, want secondary@2", st.Role, st.Epoch)
	}
	if v.Bitmap().Count() != 0 {
		t.Fatalf("bitmap still marks %v", v.Bitmap().Dirty())
	}
	// Mirrored again.
	if err := ex.WriteAt(pattern(7, 4096), 9<<20, false); err != nil {
		t.Fatal(err)
	}
	if d := sameContent(t, disk, sec.disk, DefaultRegionSize); len(d) != 0 {
		t.Fatalf("write after resync not mirrored: %v", d)
	}
}

func TestPeerKilledMidStream(t *testing.T) {
	v, disk, sec, _ := syncedPair(t)
	ex := v.Export()
	var written sync.Map // regions any writer touched
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var ops atomic.Int64
	for g := 0; g < 4; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(g), 77))
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				off := rng.Int64N(testSize - 128<<10)
				n := 4096 + rng.Int64N(124<<10)
				for r := off >> 20; r <= (off+n-1)>>20; r++ {
					written.Store(uint64(r), true)
				}
				if err := ex.WriteAt(pattern(g*100000+i, int(n)), off, false); err != nil {
					t.Errorf("writer %d: %v", g, err)
					return
				}
				if i%50 == 0 {
					if err := ex.Flush(); err != nil {
						t.Errorf("flush: %v", err)
						return
					}
				}
				ops.Add(1)
			}
		}()
	}
	time.Sleep(300 * time.Millisecond)
	killedAt := ops.Load()
	sec.kill()
	time.Sleep(300 * time.Millisecond)
	close(stop)
	wg.Wait()
	if ops.Load() <= killedAt+20 {
		t.Fatalf("writes stalled after the peer died: %d before, %d in all", killedAt, ops.Load())
	}
	mustMode(t, v, ModeDegraded)
	if st := v.Status(); st.ModeName != "degraded" || st.DirtyRegions != uint64(len(v.Bitmap().Dirty())) || st.DirtyBytes != int64(st.DirtyRegions)<<20 || st.PeerFailures != 1 {
		t.Fatalf("status %+v", st)
	}
	if v.PeerFailures() != 1 {
		t.Fatalf("%d peer failures, want 1", v.PeerFailures())
	}
	dirty := v.Bitmap().Dirty()
	// Every region that differs is marked; nothing is marked that no one wrote.
	for _, r := range sameContent(t, disk, sec.disk, DefaultRegionSize) {
		if !slices.Contains(dirty, r) {
			t.Fatalf("region %d differs between the sides but is not marked (dirty %s)", r, fmtRegions(dirty))
		}
	}
	for _, r := range dirty {
		if _, ok := written.Load(r); !ok {
			t.Fatalf("region %d marked but never written", r)
		}
	}
	sec.target.SetState(State{RoleStale, 1})
	sec.start()
	if err := v.Resync(context.Background(), sec.dial(2), ResyncOptions{}); err != nil {
		t.Fatal(err)
	}
	if d := sameContent(t, disk, sec.disk, DefaultRegionSize); len(d) != 0 {
		t.Fatalf("after resync sides differ in %v", d)
	}
	t.Logf("%d ops, %d dirty regions of %d resynced", ops.Load(), len(dirty), testSize>>20)
}

// degradedWith returns a synced pair whose peer died after n regions were written.
func degradedWith(t *testing.T, n int) (*Volume, *fileExport, *secondary, string) {
	v, disk, sec, path := syncedPair(t)
	sec.kill()
	for i := 0; i < n; i++ {
		if err := v.WriteAt(pattern(i, 8192), int64(i)<<20+100, false); err != nil {
			t.Fatal(err)
		}
	}
	mustMode(t, v, ModeDegraded)
	if got := v.Bitmap().Count(); got != uint64(n) {
		t.Fatalf("%d dirty regions, want %d", got, n)
	}
	sec.target.SetState(State{RoleStale, 1})
	sec.start()
	return v, disk, sec, path
}

func TestResyncResumesAfterInterruption(t *testing.T) {
	const n = 40
	v, disk, sec, path := degradedWith(t, n)
	// 20 MiB/s: 40 regions take 2 s; stop after about a third.
	ctx, cancel := context.WithTimeout(context.Background(), 700*time.Millisecond)
	defer cancel()
	start := time.Now()
	err := v.Resync(ctx, sec.dial(2), ResyncOptions{Rate: 20 << 20, BatchRegions: 4})
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("interrupted resync returned %v", err)
	}
	mustMode(t, v, ModeDegraded)
	left := v.Bitmap().Count()
	if left == 0 || left >= n {
		t.Fatalf("%d of %d regions left after an interrupted resync", left, n)
	}
	// The rate limit held: no more than about 0.7 s worth was copied.
	if b := v.Progress().Bytes; float64(b) > 1.2*20*(1<<20)*time.Since(start).Seconds()+float64(DefaultRegionSize) {
		t.Fatalf("copied %d bytes in %v at a 20 MiB/s limit", b, time.Since(start))
	}
	bm2, err := OpenBitmap(path, testSize, DefaultRegionSize)
	if err != nil {
		t.Fatal(err)
	}
	if bm2.Count() != left {
		t.Fatalf("persisted bitmap has %d regions, memory %d", bm2.Count(), left)
	}
	bm2.Close()

	// A write while degraded marks a region already copied again.
	if err := v.WriteAt(pattern(99, 100), 0, false); err != nil {
		t.Fatal(err)
	}
	firstPass := v.Progress().Bytes
	if err := v.Resync(context.Background(), sec.dial(2), ResyncOptions{BatchRegions: 4}); err != nil {
		t.Fatal(err)
	}
	mustMode(t, v, ModeSynced)
	total := v.Progress().Bytes
	second := total - firstPass
	if second > int64(left+1)*DefaultRegionSize {
		t.Fatalf("resumed resync copied %d bytes for %d regions left: it did not resume", second, left+1)
	}
	// At most one batch is copied twice.
	if total > int64(n+1+4)*DefaultRegionSize {
		t.Fatalf("resync copied %d bytes in all for %d dirty regions", total, n+1)
	}
	if d := sameContent(t, disk, sec.disk, DefaultRegionSize); len(d) != 0 {
		t.Fatalf("after resumed resync sides differ in %v", d)
	}
}

func TestResyncInterruptedByPeerLoss(t *testing.T) {
	const n = 30
	v, disk, sec, _ := degradedWith(t, n)
	errc := make(chan error, 1)
	go func() {
		errc <- v.Resync(context.Background(), sec.dial(2), ResyncOptions{Rate: 30 << 20, BatchRegions: 2})
	}()
	time.Sleep(300 * time.Millisecond)
	sec.kill()
	if err := <-errc; !errors.Is(err, ErrPeerLost) {
		t.Fatalf("resync with a dead peer returned %v, want ErrPeerLost", err)
	}
	mustMode(t, v, ModeDegraded)
	// Under heavy load no batch may have finished yet; what must hold is that something is left.
	if left := v.Bitmap().Count(); left == 0 || left > n {
		t.Fatalf("%d of %d regions left", left, n)
	}
	sec.start()
	if err := v.Resync(context.Background(), sec.dial(2), ResyncOptions{}); err != nil {
		t.Fatal(err)
	}
	if d := sameContent(t, disk, sec.disk, DefaultRegionSize); len(d) != 0 {
		t.Fatalf("sides differ in %v", d)
	}
}

// Writes racing with a resync of the same regions never leave old data on the peer.
func TestWritesDuringResync(t *testing.T) {
	const n = 48
	v, disk, sec, _ := degradedWith(t, n)
	errc := make(chan error, 1)
	go func() { errc <- v.Resync(context.Background(), sec.dial(2), ResyncOptions{Rate: 100 << 20}) }()
	rng := rand.New(rand.NewPCG(5, 5))
	for i := 0; i < 300; i++ {
		off := rng.Int64N(int64(n) << 20)
		if err := v.WriteAt(pattern(1000+i, 3000), off, false); err != nil {
			t.Fatal(err)
		}
	}
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	mustMode(t, v, ModeSynced)
	if d := sameContent(t, disk, sec.disk, DefaultRegionSize); len(d) != 0 {
		t.Fatalf("sides differ in %v", d)
	}
}

// A primary whose peer moved to a newer epoch is fenced: its write reaches neither disk.
func TestDeposedPrimaryIsFenced(t *testing.T) {
	v, disk, sec, _ := syncedPair(t)
	if err := v.WriteAt(pattern(1, 4096), 0, false); err != nil {
		t.Fatal(err)
	}
	sec.target.SetState(State{RolePrimaryDegraded, 2}) // the partner took over at epoch 2
	before := make([]byte, 4096)
	sec.disk.ReadAt(before, 8192)
	if err := v.WriteAt(pattern(2, 4096), 8192, false); !errors.Is(err, ErrFenced) {
		t.Fatalf("write of a deposed primary returned %v, want ErrFenced", err)
	}
	mustMode(t, v, ModeFenced)
	after := make([]byte, 4096)
	sec.disk.ReadAt(after, 8192)
	if !slices.Equal(before, after) {
		t.Fatal("the new primary's disk took a write from the deposed one")
	}
	if err := v.WriteAt(pattern(3, 10), 0, false); !errors.Is(err, ErrFenced) {
		t.Fatalf("second write: %v, want ErrFenced", err)
	}
	if err := v.Resync(context.Background(), nil, ResyncOptions{}); !errors.Is(err, ErrFenced) {
		t.Fatalf("resync from a fenced side: %v, want ErrFenced", err)
	}
	_ = disk
}

func TestLinkHelloRefusals(t *testing.T) {
	sec := startSecondary(t, newFileExport(t, "s.img", 8<<20), State{RoleSecondary, 3})
	ctx := context.Background()
	for _, e := range []uint64{2, 4} {
		_, err := DialLink(ctx, sec.addr, "vol", 8<<20, e, time.Second)
		var stale *StaleError
		if !errors.As(err, &stale) || !stale.Known || stale.Peer != (State{RoleSecondary, 3}) {
			t.Fatalf("epoch %d against secondary@3: %v", e, err)
		}
	}
	if _, err := DialLink(ctx, sec.addr, "other", 8<<20, 3, time.Second); err == nil {
		t.Fatal("hello for an unknown volume succeeded")
	}
	if _, err := DialLink(ctx, sec.addr, "vol", 4<<20, 3, time.Second); err == nil {
		t.Fatal("hello with the wrong size succeeded")
	}
	if _, err := DialLink(ctx, sec.addr, "", 8<<20, 3, time.Second); err == nil {
		t.Fatal("hello with no name succeeded")
	}
	l, err := DialLink(ctx, sec.addr, "vol", 8<<20, 3, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if err := l.WriteAt(make([]byte, 10), 8<<20-5, false); !errors.Is(err, ErrPeerIO) {
		t.Fatalf("out-of-range write over the link: %v", err)
	}
	sec.kill()
	if err := l.Flush(); !errors.Is(err, ErrPeerLost) {
		t.Fatalf("flush over a dead link: %v, want ErrPeerLost", err)
	}
}

// Writes the secondary acknowledged but had not flushed when it crashed are marked dirty,
// and writes covered by a completed FLUSH are not.
func TestUnflushedPeerWritesAreMarkedOnPeerCrash(t *testing.T) {
	v, disk, _ := newPrimary(t, testSize)
	vol := &volatileExport{fileExport: newFileExport(t, "secondary.img", testSize)}
	target := NewTarget(vol, State{RoleSecondary, 1})
	sec := &secondary{t: t, disk: vol.fileExport, target: target}
	sec.start()
	t.Cleanup(sec.kill)
	if err := v.Resync(context.Background(), sec.dial(1), ResyncOptions{}); err != nil {
		t.Fatal(err)
	}
	ex := v.Export()
	write := func(region int64, seed int) {
		t.Helper()
		if err := ex.WriteAt(pattern(seed, 4096), region<<20+512, false); err != nil {
			t.Fatal(err)
		}
	}
	write(2, 1)
	if err := ex.Flush(); err != nil { // region 2 is durable on both
		t.Fatal(err)
	}
	write(5, 2)
	write(6, 3) // acknowledged by the secondary, in its volatile cache only
	sec.kill()
	vol.crash()
	write(9, 4) // the peer is gone: degraded
	mustMode(t, v, ModeDegraded)
	want := []uint64{5, 6, 9}
	if got := v.Bitmap().Dirty(); !slices.Equal(got, want) {
		t.Fatalf("dirty %v, want %v", got, want)
	}
	if d := sameContent(t, disk, vol.fileExport, DefaultRegionSize); !slices.Equal(d, want) {
		t.Fatalf("sides differ in %v, want %v", d, want)
	}
	target.SetState(State{RoleStale, 1})
	sec.start()
	if err := v.Resync(context.Background(), sec.dial(2), ResyncOptions{}); err != nil {
		t.Fatal(err)
	}
	if d := sameContent(t, disk, vol.fileExport, DefaultRegionSize); len(d) != 0 {
		t.Fatalf("after resync sides differ in %v", d)
	}
}

// A client write into a region while resync copies it waits, so older data from the
// copy can never land on the peer after the newer write.
func TestResyncCopyDoesNotOverwriteNewerWrite(t *testing.T) {
	v, disk, sec, _ := degradedWith(t, 4)
	slow := &slowPeer{Peer: sec.dial(2), region: DefaultRegionSize, delay: 200 * time.Millisecond, started: make(chan struct{})}
	errc := make(chan error, 1)
	go func() { errc <- v.Resync(context.Background(), slow, ResyncOptions{}) }()
	<-slow.started // region 0 has been read and is on its way to the peer
	if err := v.WriteAt(pattern(42, 4096), 1000, false); err != nil {
		t.Fatal(err)
	}
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	if d := sameContent(t, disk, sec.disk, DefaultRegionSize); len(d) != 0 {
		t.Fatalf("sides differ in %v", d)
	}
}

// A primary that crashed while degraded restarts with its bitmap and resyncs only the
// regions marked before the crash.
func TestRestartWhileDegradedKeepsDirtyRegions(t *testing.T) {
	v, disk, sec, path := degradedWith(t, 5)
	if err := v.WriteAt(pattern(1, 10), 50<<20, false); err != nil {
		t.Fatal(err)
	}
	want := v.Bitmap().Dirty()
	// Crash: the process is gone without Detach, Flush or Close.
	bm, err := OpenBitmap(path, testSize, DefaultRegionSize)
	if err != nil {
		t.Fatal(err)
	}
	defer bm.Close()
	if got := bm.Dirty(); !slices.Equal(got, want) {
		t.Fatalf("after restart dirty %v, want %v", got, want)
	}
	v2, err := NewVolume(disk, bm)
	if err != nil {
		t.Fatal(err)
	}
	mustMode(t, v2, ModeDegraded)
	if err := v2.Resync(context.Background(), sec.dial(2), ResyncOptions{}); err != nil {
		t.Fatal(err)
	}
	if got, wantB := v2.Progress().Bytes, int64(len(want))*DefaultRegionSize; got != wantB {
		t.Fatalf("resync after restart copied %d bytes, want %d", got, wantB)
	}
	if d := sameContent(t, disk, sec.disk, DefaultRegionSize); len(d) != 0 {
		t.Fatalf("sides differ in %v", d)
	}
	if _, err := NewVolume(newFileExport(t, "small.img", 1<<20), bm); err == nil {
		t.Fatal("NewVolume accepted a bitmap of another size")
	}
}

// A fast zero the local side refuses changes neither side; a fenced side zeroes nothing.
func TestFastZeroRefusalChangesNeitherSide(t *testing.T) {
	v, disk, sec, _ := syncedPair(t)
	data := pattern(9, 1<<20)
	if err := v.WriteAt(data, 0, false); err != nil {
		t.Fatal(err)
	}
	if err := v.WriteZeroes(0, 1<<20, nbd.ZeroFlags{Fast: true}); !errors.Is(err, nbd.ErrFastZeroUnsupported) {
		t.Fatalf("fast zero: %v, want ErrFastZeroUnsupported", err)
	}
	got := make([]byte, 1<<20)
	sec.disk.ReadAt(got, 0)
	if !slices.Equal(got, data) {
		t.Fatal("a refused fast zero zeroed the secondary")
	}
	if d := sameContent(t, disk, sec.disk, DefaultRegionSize); len(d) != 0 {
		t.Fatalf("sides differ in %v", d)
	}
	sec.target.SetState(State{RolePrimaryDegraded, 2})
	v.WriteAt(data[:10], 0, false) // learns it is fenced
	mustMode(t, v, ModeFenced)
	if err := v.WriteZeroes(0, 4096, nbd.ZeroFlags{}); !errors.Is(err, ErrFenced) {
		t.Fatalf("zero on a fenced side: %v", err)
	}
	disk.ReadAt(got[:4096], 0)
	if !slices.Equal(got[:4096], data[:4096]) {
		t.Fatal("a fenced side zeroed its local disk")
	}
	// The write that raced with the fence may have reached the local disk: it is marked,
	// so the new primary's resync (given this side's bitmap as PeerDirty) overwrites it.
	if got := v.Bitmap().Dirty(); !slices.Equal(got, []uint64{0}) {
		t.Fatalf("fenced side marked %v, want [0]", got)
	}
}

// Regions the peer marked itself are copied too.
func TestResyncCopiesPeerDirtyRegions(t *testing.T) {
	v, disk, sec, _ := degradedWith(t, 2)
	sec.disk.WriteAt(pattern(5, 100), 33<<20, false) // the peer applied a write we never saw
	if err := v.Resync(context.Background(), sec.dial(2), ResyncOptions{PeerDirty: []uint64{33}}); err != nil {
		t.Fatal(err)
	}
	if got := v.Progress().Bytes; got != 3*DefaultRegionSize {
		t.Fatalf("copied %d bytes, want 3 regions", got)
	}
	if d := sameContent(t, disk, sec.disk, DefaultRegionSize); len(d) != 0 {
		t.Fatalf("sides differ in %v", d)
	}
	if err := v.Detach(); err != nil {
		t.Fatal(err)
	}
	if err := v.Resync(context.Background(), sec.dial(2), ResyncOptions{PeerDirty: []uint64{64}}); err == nil {
		t.Fatal("resync accepted a peer region outside the volume")
	}
	mustMode(t, v, ModeDegraded)
}

// The secondary crashes (losing its unflushed writes) and returns again and again while
// clients keep writing and flushing; every resync leaves the sides identical.
func TestRepeatedSecondaryCrashesUnderLoad(t *testing.T) {
	v, disk, _ := newPrimary(t, testSize)
	vol := &volatileExport{fileExport: newFileExport(t, "secondary.img", testSize)}
	target := NewTarget(vol, State{RoleSecondary, 1})
	sec := &secondary{t: t, disk: vol.fileExport, target: target}
	sec.start()
	t.Cleanup(sec.kill)
	if err := v.Resync(context.Background(), sec.dial(1), ResyncOptions{}); err != nil {
		t.Fatal(err)
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for g := 0; g < 3; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(g), 3))
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				off := rng.Int64N(testSize - 64<<10)
				var err error
				if i%7 == 0 {
					err = v.Flush()
				} else {
					err = v.WriteAt(pattern(g*1000000+i, 4096+rng.IntN(60<<10)), off, i%11 == 0)
				}
				if err != nil {
					t.Errorf("writer %d: %v", g, err)
					return
				}
			}
		}()
	}
	rng := rand.New(rand.NewPCG(8, 8))
	epoch := uint64(1)
	const cycles = 8
	for c := 0; c < cycles; c++ {
		time.Sleep(time.Duration(50+rng.IntN(100)) * time.Millisecond)
		sec.kill()
		vol.crash()
		time.Sleep(time.Duration(20+rng.IntN(80)) * time.Millisecond)
		if v.Mode() != ModeDegraded {
			// No write reached the dead peer yet; a flush notices it.
			v.Flush()
		}
		mustMode(t, v, ModeDegraded)
		target.SetState(State{RoleStale, epoch})
		epoch++
		sec.start()
		if err := v.Resync(context.Background(), sec.dial(epoch), ResyncOptions{BatchRegions: 4}); err != nil {
			t.Fatalf("cycle %d: %v", c, err)
		}
		mustMode(t, v, ModeSynced)
	}
	close(stop)
	wg.Wait()
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	if d := sameContent(t, disk, vol.fileExport, DefaultRegionSize); len(d) != 0 {
		t.Fatalf("after %d crashes the sides differ in %v", cycles, d)
	}
	if v.PeerFailures() != cycles {
		t.Fatalf("%d peer failures recorded, want %d", v.PeerFailures(), cycles)
	}
	t.Logf("%d crashes, %d MiB resynced in all", cycles, v.Progress().Bytes>>20)
}

// While synced, a region is marked durably before a write to it is issued and cleared
// by a FLUSH on both sides, so a primary crash leaves its possibly divergent regions marked.
func TestWriteIntentWhileSynced(t *testing.T) {
	v, _, _, path := syncedPair(t)
	onDisk := func() []uint64 { return marksOnDisk(t, path) }
	if err := v.WriteAt(pattern(1, 4096), 7<<20, false); err != nil {
		t.Fatal(err)
	}
	if err := v.WriteAt(pattern(2, 8192), 12<<20-4096, false); err != nil {
		t.Fatal(err)
	}
	// A crash now: the restarted side must know regions 7, 11 and 12 may differ.
	if got := onDisk(); !slices.Equal(got, []uint64{7, 11, 12}) {
		t.Fatalf("intent on disk %v, want [7 11 12]", got)
	}
	mustMode(t, v, ModeSynced)
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	if got := onDisk(); len(got) != 0 {
		t.Fatalf("intent on disk after FLUSH on both sides: %v", got)
	}
	// A write still in flight while a FLUSH completes keeps its mark.
	release := make(chan struct{})
	cur, _ := v.currentPeer()
	cur.Close() // swap in a peer that holds the write to region 30
	v.WriteAt(pattern(0, 10), 0, false)
	mustMode(t, v, ModeDegraded)
	sec := startSecondary(t, newFileExport(t, "s2.img", testSize), State{RoleStale, 1})
	bp := &blockingPeer{Peer: sec.dial(2), at: 30 << 20, release: release, entered: make(chan struct{})}
	if err := v.Resync(context.Background(), bp, ResyncOptions{}); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- v.WriteAt(pattern(3, 4096), 30<<20, false) }()
	<-bp.entered
	if err := v.WriteAt(pattern(4, 4096), 40<<20, false); err != nil {
		t.Fatal(err)
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	if got := onDisk(); !slices.Equal(got, []uint64{30}) {
		t.Fatalf("intent on disk with a write in flight across a FLUSH: %v, want [30]", got)
	}
	close(release)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	if got := onDisk(); len(got) != 0 {
		t.Fatalf("intent on disk after FLUSH: %v", got)
	}
}

// blockingPeer holds the write at offset at until release is closed.
type blockingPeer struct {
	Peer
	at      int64
	release chan struct{}
	entered chan struct{}
}

func (b *blockingPeer) WriteAt(p []byte, off int64, fua bool) error {
	if off == b.at {
		close(b.entered)
		<-b.release
	}
	return b.Peer.WriteAt(p, off, fua)
}

// After a FLUSH a synced primary keeps the marks of its most recently written regions
// (the activity log), clearing the least recently written beyond that number, so a guest
// rewriting a few hot regions between flushes does not re-mark (fsync) them each time.
func TestWriteIntentKeepsHotRegions(t *testing.T) {
	v, _, _, path := syncedPair(t)
	v.SetIntentKeep(2)
	onDisk := func() []uint64 { return marksOnDisk(t, path) }
	write := func(region int64) {
		t.Helper()
		if err := v.WriteAt(pattern(int(region), 4096), region<<20, false); err != nil {
			t.Fatal(err)
		}
	}
	flush := func() {
		t.Helper()
		if err := v.Flush(); err != nil {
			t.Fatal(err)
		}
	}
	for r := int64(1); r <= 5; r++ {
		write(r)
	}
	flush()
	if got := onDisk(); !slices.Equal(got, []uint64{4, 5}) {
		t.Fatalf("marks after FLUSH keeping 2: %v, want [4 5]", got)
	}
	write(4) // region 4 is now more recent than 5
	write(6)
	flush()
	if got := onDisk(); !slices.Equal(got, []uint64{4, 6}) {
		t.Fatalf("marks after the second FLUSH: %v, want [4 6] (5 least recently written)", got)
	}
	mustMode(t, v, ModeSynced)
	// When the peer is lost, flushed regions of the log are the same on both sides: only
	// the write that found the peer gone is dirty, and a resync will copy only it.
	cur, _ := v.currentPeer()
	cur.Close()
	write(7)
	mustMode(t, v, ModeDegraded)
	if got := onDisk(); !slices.Equal(got, []uint64{7}) {
		t.Fatalf("dirty after losing the peer: %v, want [7]", got)
	}
}

// marksOnDisk returns the regions marked in the bitmap file at path, as a restart would read them.
func marksOnDisk(t *testing.T, path string) []uint64 {
	t.Helper()
	bm, err := OpenBitmap(path, testSize, DefaultRegionSize)
	if err != nil {
		t.Fatal(err)
	}
	defer bm.Close()
	return bm.Dirty()
}
