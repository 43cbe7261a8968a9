package pool

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// logBuffer collects a logger's output for tests that check what the pool reported.
type logBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func bitSet(b []byte, r int64) bool { return r/8 < int64(len(b)) && b[r/8]&(1<<(r%8)) != 0 }

// chunkIndex is the bitmap index of the chunk holding disk offset off of pair.
func (p *Pool) chunkIndex(pair int, off int64) int64 {
	return int64(pair)*p.dirty.perPair + (off-p.l.dataOff)/p.chunk
}

// chunkOffset is the pool offset of the first byte of chunk c of pair in a pool of
// two pairs with 64 KiB units (16 disk units per 1 MiB chunk).
func chunkOffset(pair int, c int64) int64 { return (2*16*c + int64(pair)) * (64 << 10) }

// markedCount counts the chunks marked in memory.
func markedCount(p *Pool) int {
	n := 0
	for w := range p.dirty.bits {
		for v := p.dirty.bits[w].Load(); v != 0; v &= v - 1 {
			n++
		}
	}
	return n
}

// waitNoMarks waits until no chunk is marked, in memory and in the file.
func waitNoMarks(t *testing.T, p *Pool, state string, within time.Duration) {
	t.Helper()
	deadline := time.Now().Add(within)
	zero := make([]byte, len(p.dirty.bits)*8)
	for {
		b, err := os.ReadFile(filepath.Join(state, dirtyFile))
		if err != nil {
			t.Fatal(err)
		}
		if markedCount(p) == 0 && bytes.Equal(b, zero) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d chunks still marked after %v", markedCount(p), within)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestMarkDurableBeforeWrite records the bitmap as each of its fdatasyncs left it and
// checks, at every data write to a disk, that the chunk written is marked there: a
// power loss at any moment finds every chunk being written marked.
func TestMarkDurableBeforeWrite(t *testing.T) {
	state, paths := makeDisks(t, 4, testDiskSize)
	var p *Pool
	var armed atomic.Bool
	var mu sync.Mutex
	var durable []byte // the bitmap file as its last fdatasync left it
	syncs, checked := 0, 0
	var bad atomic.Value
	hook := func(disk int, op string, off int64) error {
		if op != "write" || !armed.Load() {
			return nil
		}
		r := p.chunkIndex(disk/2, off)
		mu.Lock()
		ok := bitSet(durable, r)
		checked++
		mu.Unlock()
		if !ok {
			bad.Store(fmt.Sprintf("write to disk %d at %d: chunk %d is not marked in the synced bitmap", disk, off, r))
		}
		return nil
	}
	p = openTestPool(t, state, paths, Options{Fault: hook, HealthInterval: 10 * time.Millisecond})
	path := filepath.Join(state, dirtyFile)
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	durable = b
	p.dirty.afterSync = func() {
		b, err := os.ReadFile(path)
		if err != nil {
			bad.Store(err.Error())
		}
		mu.Lock()
		durable = b
		syncs++
		mu.Unlock()
	}
	armed.Store(true)
	var wg sync.WaitGroup
	for g := 0; g < 4; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(g), 7))
			buf := make([]byte, 300<<10)
			for i := 0; i < 300; i++ {
				n := 4096 * (1 + r.Int64N(int64(len(buf))/4096))
				off := r.Int64N(p.Size()-n) / 4096 * 4096
				if _, err := p.WriteAt(buf[:n], off); err != nil {
					bad.Store(err.Error())
					return
				}
				if i%25 == 0 {
					// Lets the cleaner clear idle chunks, which must then be marked again.
					if err := p.Sync(); err != nil {
						bad.Store(err.Error())
						return
					}
					time.Sleep(3 * time.Millisecond)
				}
			}
		}()
	}
	wg.Wait()
	if v := bad.Load(); v != nil {
		t.Fatal(v)
	}
	mu.Lock()
	defer mu.Unlock()
	t.Logf("%d disk writes checked, %d bitmap syncs", checked, syncs)
	if syncs < 2 || checked < 2400 {
		t.Fatalf("%d bitmap syncs and %d disk writes checked: the test did not exercise marking", syncs, checked)
	}
}

// TestGroupCommit: writers that need marks at the same time share fdatasyncs of the
// bitmap; each returns only once its own chunk is durably marked.
func TestGroupCommit(t *testing.T) {
	state, paths := makeDisks(t, 4, testDiskSize)
	p := openTestPool(t, state, paths, Options{HealthInterval: time.Hour})
	var syncs atomic.Int32
	p.dirty.afterSync = func() {
		syncs.Add(1)
		time.Sleep(20 * time.Millisecond) // a slow disk: the other writers pile up
	}
	start := make(chan struct{})
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	for i := 0; i < 16; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			if _, err := p.WriteAt(make([]byte, 4096), chunkOffset(i%2, int64(i/2))); err != nil {
				errs <- err
			}
		}()
	}
	close(start)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(state, dirtyFile))
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 16; i++ {
		if r := p.chunkIndex(i%2, p.l.dataOff+int64(i/2)*p.chunk); !bitSet(b, r) {
			t.Fatalf("chunk %d of pair %d is not marked in the file", i/2, i%2)
		}
	}
	t.Logf("16 writers needing marks: %d bitmap syncs", syncs.Load())
	if n := syncs.Load(); n > 4 {
		t.Fatalf("16 concurrent writers needing marks made %d bitmap syncs, want at most 4", n)
	}
}

// TestMarksWaitForSync: writes to chunks already marked sync nothing; marks are
// cleared only after a sync of the disks that began after the writes ended (a client
// FLUSH, or the cleaner's own after 30 health intervals).
func TestMarksWaitForSync(t *testing.T) {
	state, paths := makeDisks(t, 4, testDiskSize)
	var diskSyncs atomic.Int32
	hook := func(disk int, op string, off int64) error {
		if op == "sync" {
			diskSyncs.Add(1)
		}
		return nil
	}
	p := openTestPool(t, state, paths, Options{HealthInterval: 50 * time.Millisecond, Fault: hook}) // self-sync after 1.5 s
	var syncs atomic.Int32
	p.dirty.afterSync = func() { syncs.Add(1) }
	// Mark the first 2 MiB of the pool (one chunk of each pair) once...
	if _, err := p.WriteAt(make([]byte, 2<<20), 0); err != nil {
		t.Fatal(err)
	}
	if n := syncs.Load(); n != 1 {
		t.Fatalf("one write needing marks made %d bitmap syncs", n)
	}
	// ...then 4 KiB random writes there need no sync at all.
	r := rand.New(rand.NewPCG(3, 3))
	buf := make([]byte, 4096)
	for i := 0; i < 2000; i++ {
		if _, err := p.WriteAt(buf, r.Int64N(512)*4096); err != nil {
			t.Fatal(err)
		}
	}
	if n := syncs.Load(); n != 1 {
		t.Fatalf("writes to marked chunks made %d more bitmap syncs", n-1)
	}
	// Idle but not synced: the marks stay (many cleaning passes).
	time.Sleep(300 * time.Millisecond)
	if n := markedCount(p); n != 2 || diskSyncs.Load() != 0 {
		t.Fatalf("without a sync, %d chunks are marked (want 2) and the disks were synced %d times", n, diskSyncs.Load())
	}
	if err := p.Sync(); err != nil {
		t.Fatal(err)
	}
	waitNoMarks(t, p, state, time.Second)
	// Without a client sync the cleaner syncs the disks itself, after 1.5 s here.
	if _, err := p.WriteAt(buf, 5<<20); err != nil {
		t.Fatal(err)
	}
	began := time.Now()
	before := diskSyncs.Load()
	waitNoMarks(t, p, state, 5*time.Second)
	if diskSyncs.Load() == before {
		t.Fatal("the marks were cleared without a sync of the disks")
	}
	t.Logf("the cleaner synced the disks itself %v after the write", time.Since(began).Round(time.Millisecond))
}

// crashCopy makes, in dir, the pool a power loss would leave: disks from the given
// contents, pool.json from st with the copies' paths and an earlier boot, and the bitmap.
func crashCopy(t *testing.T, dir string, st *persisted, disks [][]byte, bitmap []byte) (string, []string) {
	t.Helper()
	state := filepath.Join(dir, "state")
	if err := os.MkdirAll(state, 0o700); err != nil {
		t.Fatal(err)
	}
	var paths []string
	for i, b := range disks {
		path := filepath.Join(dir, fmt.Sprintf("disk%d.img", i))
		if err := os.WriteFile(path, b, 0o600); err != nil {
			t.Fatal(err)
		}
		st.Disks[i].Path = path
		paths = append(paths, path)
	}
	st.Unclean, st.BootID = true, "a-previous-boot"
	if err := saveState(state, st); err != nil {
		t.Fatal(err)
	}
	if bitmap != nil {
		if err := os.WriteFile(filepath.Join(state, dirtyFile), bitmap, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return state, paths
}

var resyncedRe = regexp.MustCompile(`durable write-intent bitmap marks.* chunks=(\d+) marked=(\d+)`)

// TestMachineRestartResyncsMarkedChunks: the machine goes down after writes to three
// chunks that no sync covered, and only one disk of each pair kept them. The next Open
// (another boot) recopies exactly the three marked chunks before serving, starts no
// full resync, and both sides then agree with the written data.
func TestMachineRestartResyncsMarkedChunks(t *testing.T) {
	state, paths := makeDisks(t, 4, testDiskSize)
	p := openTestPool(t, state, paths, Options{})
	model := fill(t, p, 71)
	if err := p.Sync(); err != nil {
		t.Fatal(err)
	}
	waitNoMarks(t, p, state, 2*time.Second)
	type w struct {
		pair int
		c    int64
	}
	written := []w{{0, 0}, {1, 3}, {0, 5}}
	for i, x := range written {
		b := bytes.Repeat([]byte{byte(0xA0 + i)}, 10000)
		off := chunkOffset(x.pair, x.c) + 4096
		if _, err := p.WriteAt(b, off); err != nil {
			t.Fatal(err)
		}
		copy(model[off:], b)
	}
	// The power loss: pool.json and the bitmap as they are now; the first disk of each
	// pair kept the new writes, the second lost them (its chunks hold other data).
	st, err := loadState(state)
	if err != nil {
		t.Fatal(err)
	}
	bitmap, err := os.ReadFile(filepath.Join(state, dirtyFile))
	if err != nil {
		t.Fatal(err)
	}
	var disks [][]byte
	for _, path := range paths {
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		disks = append(disks, b)
	}
	for _, x := range written {
		off := p.l.dataOff + x.c*p.chunk
		copy(disks[2*x.pair+1][off:off+p.chunk], bytes.Repeat([]byte{0xEE}, int(p.chunk)))
	}
	if !st.IntentDurable || !st.Unclean {
		t.Fatalf("pool.json of an open mirrored pool: %+v", st)
	}
	var logs logBuffer
	state2, paths2 := crashCopy(t, t.TempDir(), st, disks, bitmap)
	p2 := openTestPool(t, state2, paths2, Options{Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	m := resyncedRe.FindStringSubmatch(logs.String())
	if m == nil {
		t.Fatalf("no resync of the marked chunks logged:\n%s", logs.String())
	}
	if n, _ := strconv.Atoi(m[1]); n != len(written) {
		t.Fatalf("resynced %s chunks (%s marked), want %d:\n%s", m[1], m[2], len(written), logs.String())
	}
	if s := p2.Status(); s.State != StateOK {
		t.Fatalf("a full resync started: %+v", s)
	}
	compareSides(t, p2, paths2)
	verify(t, p2, model)
	if st, _ := loadState(state2); !st.IntentDurable || st.BootID == "a-previous-boot" {
		t.Fatalf("pool.json after the restart: %+v", st)
	}
	// The same crash without the bitmap (lost or of another size) resyncs everything.
	st.IntentDurable = true
	state3, paths3 := crashCopy(t, t.TempDir(), st, disks, nil)
	p3 := openTestPool(t, state3, paths3, Options{RebuildRate: -1})
	if s := p3.Status(); s.Disks[1].State != DiskRebuilding && s.Disks[3].State != DiskRebuilding {
		t.Fatalf("no full resync without the bitmap: %+v", s)
	}
	if err := p3.WaitRebuild(context.Background()); err != nil {
		t.Fatal(err)
	}
	compareSides(t, p3, paths3)
	verify(t, p3, model)
}

// TestPowerLossKeepsMirrorsEqual simulates power losses after concurrent writes,
// client syncs, cleaning passes and the cleaner's own syncs: each disk keeps either
// everything written to it or only what its last fdatasync covered (each pair one of
// each), and the bitmap keeps a mark only if both its last fdatasync and its current
// content have it (clears may reach the disk early, sets only when synced). After the
// restart, which resyncs only the marked chunks, both sides of every pair must agree
// and every write a completed Sync covered must be there.
func TestPowerLossKeepsMirrorsEqual(t *testing.T) {
	for round := 0; round < 3; round++ {
		t.Run(fmt.Sprint(round), func(t *testing.T) { powerLossRound(t, uint64(round)) })
	}
}

func powerLossRound(t *testing.T, seed uint64) {
	state, paths := makeDisks(t, 4, 33<<20+tailSize) // 64 chunks, so that some stay idle

	var mu sync.Mutex // guards the snapshots; held while the crash is taken
	synced := make([][]byte, len(paths))
	var syncedMap []byte
	var bad atomic.Value
	var nsync atomic.Int32
	hook := func(disk int, op string, off int64) error {
		if op != "sync" {
			return nil
		}
		// Called just before the fdatasync: the file now holds at least every write
		// that completed before the sync began.
		mu.Lock()
		defer mu.Unlock()
		b, err := os.ReadFile(paths[disk])
		if err != nil {
			bad.Store(err.Error())
		}
		synced[disk] = b
		nsync.Add(1)
		return nil
	}
	for i, path := range paths {
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		synced[i] = b
	}
	// Cleaning every 10 ms; the cleaner's own sync (after 3 s) does not come.
	p := openTestPool(t, state, paths, Options{Fault: hook, HealthInterval: 100 * time.Millisecond})
	mapPath := filepath.Join(state, dirtyFile)
	b, err := os.ReadFile(mapPath)
	if err != nil {
		t.Fatal(err)
	}
	syncedMap = b
	p.dirty.afterSync = func() {
		b, err := os.ReadFile(mapPath)
		if err != nil {
			bad.Store(err.Error())
		}
		mu.Lock()
		syncedMap = b
		mu.Unlock()
	}
	model := make([]byte, p.Size())
	const workers = 4
	region := p.Size() / workers
	// unsynced[w] lists the ranges worker w wrote since its last completed Sync.
	unsynced := make([][][2]int64, workers)
	ctx, cancel := context.WithTimeout(context.Background(), 1500*time.Millisecond)
	defer cancel()
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(seed, uint64(w)))
			lo := int64(w) * region
			buf := make([]byte, 64<<10)
			write := func() bool {
				n := 1 + r.Int64N(int64(len(buf)))
				off := lo + r.Int64N(region-n+1)
				b := buf[:n]
				for i := range b {
					b[i] = byte(r.Uint32())
				}
				if _, err := p.WriteAt(b, off); err != nil {
					bad.Store(err.Error())
					return false
				}
				copy(model[off:], b)
				unsynced[w] = append(unsynced[w], [2]int64{off, off + n})
				return true
			}
			for ctx.Err() == nil {
				switch r.IntN(40) {
				case 0:
					if err := p.Sync(); err != nil {
						bad.Store(err.Error())
						return
					}
					unsynced[w] = unsynced[w][:0]
				case 1:
					time.Sleep(time.Duration(r.IntN(20)) * time.Millisecond) // idle: cleaning passes
				default:
					if !write() {
						return
					}
				}
			}
			// A tail of writes no Sync covers, then idle cleaning passes: every power
			// loss finds sides that differ.
			for i := 0; i < 6; i++ {
				if !write() {
					return
				}
			}
			time.Sleep(50 * time.Millisecond)
		}()
	}
	wg.Wait()
	if v := bad.Load(); v != nil {
		t.Fatal(v)
	}
	// The power loss, with no sync able to complete meanwhile.
	mu.Lock()
	st, err := loadState(state)
	if err != nil {
		mu.Unlock()
		t.Fatal(err)
	}
	cur, err := os.ReadFile(mapPath)
	if err != nil {
		mu.Unlock()
		t.Fatal(err)
	}
	bitmap := make([]byte, len(cur))
	for i := range cur {
		bitmap[i] = cur[i] & syncedMap[i]
	}
	disks := make([][]byte, len(paths))
	for i, path := range paths {
		keepAll := (i+i/2)%2 == 0 // pair 0: disk 0 keeps all; pair 1: disk 3 does
		if keepAll {
			disks[i], err = os.ReadFile(path)
			if err != nil {
				mu.Unlock()
				t.Fatal(err)
			}
		} else {
			disks[i] = bytes.Clone(synced[i])
		}
	}
	mu.Unlock()
	diverged := 0
	for pair := 0; pair < 2; pair++ {
		end := p.l.dataOff + p.l.unitsPerDisk*p.l.unit
		a, b := disks[2*pair][p.l.dataOff:end], disks[2*pair+1][p.l.dataOff:end]
		for c := int64(0); c*p.chunk < int64(len(a)); c++ {
			if !bytes.Equal(a[c*p.chunk:(c+1)*p.chunk], b[c*p.chunk:(c+1)*p.chunk]) {
				diverged++
			}
		}
	}
	marked := 0
	for _, v := range bitmap {
		for ; v != 0; v &= v - 1 {
			marked++
		}
	}
	t.Logf("at the power loss (%d disk syncs before): %d chunks differ between the sides, %d are marked", nsync.Load(), diverged, marked)
	p.Close()
	state2, paths2 := crashCopy(t, t.TempDir(), st, disks, bitmap)
	p2 := openTestPool(t, state2, paths2, Options{})
	if s := p2.Status(); s.State != StateOK {
		t.Fatalf("%+v", s)
	}
	compareSides(t, p2, paths2)
	got := make([]byte, p2.Size())
	if _, err := p2.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	for w := 0; w < workers; w++ {
		lo, hi := int64(w)*region, int64(w+1)*region
		mask := make([]bool, hi-lo)
		for _, rg := range unsynced[w] {
			for i := rg[0]; i < rg[1]; i++ {
				mask[i-lo] = true
			}
		}
		for i := lo; i < hi; i++ {
			if !mask[i-lo] && got[i] != model[i] {
				t.Fatalf("byte %d, written before worker %d's last completed Sync, was lost", i, w)
			}
		}
	}
}
