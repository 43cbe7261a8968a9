package pool

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"math/bits"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// TestHelperReplaceForever is not a test: TestKillDuringRebuild runs it in a child
// process that starts a rebuild and is then killed with SIGKILL.
func TestHelperReplaceForever(t *testing.T) {
	dir := os.Getenv("POOL_HELPER_DIR")
	if dir == "" {
		t.Skip("helper process only")
	}
	paths := strings.Split(os.Getenv("POOL_HELPER_DISKS"), ",")
	p, err := Open(filepath.Join(dir, "state"), paths, Options{RebuildRate: 8 << 20, Logger: testLogger(t), HealthInterval: 20 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	// Lose disk 2 the way an operator would notice it: its file is deleted.
	if err := os.Remove(paths[2]); err != nil {
		t.Fatal(err)
	}
	for p.Status().Disks[2].State != DiskFailed {
		time.Sleep(10 * time.Millisecond)
	}
	if err := p.Replace(paths[2], filepath.Join(dir, "new.img")); err != nil {
		t.Fatal(err)
	}
	for {
		os.Stdout.WriteString("progress " + time.Now().String() + "\n")
		if p.Status().Disks[2].RebuildDone > 3<<20 {
			os.Stdout.WriteString("ready\n")
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestKillDuringRebuild kills a process in the middle of a rebuild (no Close, no
// persisted watermark beyond the last periodic one) and checks that the next Open
// finishes the rebuild with the right data on both sides.
func TestKillDuringRebuild(t *testing.T) {
	if testing.Short() {
		t.Skip("runs a child process")
	}
	dir := t.TempDir()
	var paths []string
	for i := 0; i < 4; i++ {
		p := filepath.Join(dir, "disk"+string(rune('0'+i))+".img")
		if err := CreateFileDisk(p, 33<<20+tailSize); err != nil {
			t.Fatal(err)
		}
		paths = append(paths, p)
	}
	state := filepath.Join(dir, "state")
	p := openTestPool(t, state, paths, Options{})
	// Sparse like a real pool: data in some MiBs, holes in the others.
	model := make([]byte, p.Size())
	src := fill(t, p, 51)
	if err := p.Discard(0, p.Size()); err != nil {
		t.Fatal(err)
	}
	for off := int64(0); off < p.Size(); off += 3 << 20 {
		n := min(1<<20+12345, p.Size()-off)
		if _, err := p.WriteAt(src[off:off+n], off); err != nil {
			t.Fatal(err)
		}
		copy(model[off:], src[off:off+n])
	}
	p.Close()
	if err := CreateFileDisk(filepath.Join(dir, "new.img"), 33<<20+tailSize); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestHelperReplaceForever$", "-test.v")
	cmd.Env = append(os.Environ(), "POOL_HELPER_DIR="+dir, "POOL_HELPER_DISKS="+strings.Join(paths, ","))
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	sc := bufio.NewScanner(out)
	ready := false
	for sc.Scan() {
		if sc.Text() == "ready" {
			ready = true
			break
		}
	}
	if !ready {
		t.Fatal("the helper never reported rebuild progress")
	}
	cmd.Process.Signal(syscall.SIGKILL)
	cmd.Wait()
	st, err := loadState(state)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("state after the kill: %+v", st.Disks[2])
	// Restarted with the original disk list, which still names the deleted disk.
	p = openTestPool(t, state, paths, Options{RebuildRate: -1})
	if s := p.Status().Disks[2]; s.State != DiskRebuilding && s.State != DiskOK {
		t.Fatalf("after the kill: %+v", s)
	}
	if err := p.WaitRebuild(context.Background()); err != nil {
		t.Fatal(err)
	}
	verify(t, p, model)
	compareSides(t, p, []string{paths[0], paths[1], filepath.Join(dir, "new.img"), paths[3]})
}

// TestHelperDieBetweenWrites is not a test: TestKillBetweenMirrorWrites runs it in a
// child process that stops for good between the two writes of a mirrored write.
func TestHelperDieBetweenWrites(t *testing.T) {
	dir := os.Getenv("POOL_HELPER_BETWEEN")
	if dir == "" {
		t.Skip("helper process only")
	}
	var armed atomic.Bool
	hook := func(disk int, op string, off int64) error {
		if disk == 1 && op == "write" && armed.Load() {
			os.Stdout.WriteString("between\n")
			select {} // the process is killed here, after disk 0 got the write
		}
		return nil
	}
	paths := strings.Split(os.Getenv("POOL_HELPER_DISKS"), ",")
	p, err := Open(filepath.Join(dir, "state"), paths, Options{Fault: hook, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	armed.Store(true)
	p.WriteAt(bytes.Repeat([]byte("new data "), 1000), 3<<20+100)
}

// TestKillBetweenMirrorWrites kills a process after the first disk of a pair got a
// write and before the second did: the next Open resyncs that chunk from the bitmap,
// so both sides agree and no read can flip between the old and the new data.
func TestKillBetweenMirrorWrites(t *testing.T) {
	if testing.Short() {
		t.Skip("runs a child process")
	}
	state, paths := makeDisks(t, 2, testDiskSize)
	p := openTestPool(t, state, paths, Options{})
	model := fill(t, p, 61)
	p.Close()
	cmd := exec.Command(os.Args[0], "-test.run=^TestHelperDieBetweenWrites$", "-test.v")
	cmd.Env = append(os.Environ(), "POOL_HELPER_BETWEEN="+filepath.Dir(state), "POOL_HELPER_DISKS="+strings.Join(paths, ","))
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	sc := bufio.NewScanner(out)
	between := false
	for sc.Scan() {
		if sc.Text() == "between" {
			between = true
			break
		}
	}
	if !between {
		t.Fatal("the helper never reached the second write")
	}
	cmd.Process.Signal(syscall.SIGKILL)
	cmd.Wait()
	// The sides differ now: that is the state a SIGKILL can leave behind.
	a, _ := os.ReadFile(paths[0])
	b, _ := os.ReadFile(paths[1])
	if bytes.Equal(a[1<<20:9<<20], b[1<<20:9<<20]) {
		t.Fatal("the helper did not leave the pair different")
	}
	p = openTestPool(t, state, paths, Options{})
	if st := p.Status(); st.State != StateOK {
		t.Fatalf("%+v", st)
	}
	compareSides(t, p, paths)
	// The interrupted write was never acknowledged: either version is fine, but
	// both sides must agree, which compareSides showed; the rest is untouched.
	got := make([]byte, len(model))
	if _, err := p.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	lo, hi := 3<<20+100, 3<<20+100+9000
	if !bytes.Equal(got[:lo], model[:lo]) || !bytes.Equal(got[hi:], model[hi:]) {
		t.Fatal("data outside the interrupted write changed")
	}
}

// TestDirtyBitsCleared: a chunk's bit is in the file for as long as a write to it is
// in flight, across many cleaning passes, and is cleared, in memory and in the file,
// soon after the write completed: a kill then recopies only what was being written,
// not everything written in the last seconds.
func TestDirtyBitsCleared(t *testing.T) {
	state, paths := makeDisks(t, 4, testDiskSize)
	inWrite, release := make(chan struct{}), make(chan struct{})
	var armed atomic.Bool
	hook := func(disk int, op string, off int64) error {
		if disk == 3 && op == "write" && armed.CompareAndSwap(true, false) {
			close(inWrite)
			<-release
		}
		return nil
	}
	p := openTestPool(t, state, paths, Options{HealthInterval: 20 * time.Millisecond, Fault: hook}) // cleaning every 2 ms
	onDisk := func() []byte {
		b, err := os.ReadFile(filepath.Join(state, dirtyFile))
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	zero := make([]byte, len(p.dirty.bits)*8)
	// Written in full (4 MiB over both pairs), then idle: no mark is left for long.
	if _, err := p.WriteAt(make([]byte, 4<<20), 0); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for !bytes.Equal(onDisk(), zero) {
		if time.Now().After(deadline) {
			t.Fatal("chunks written 5 s ago are still marked in the file")
		}
		time.Sleep(5 * time.Millisecond)
	}
	armed.Store(true)
	done := make(chan error, 1)
	go func() {
		_, err := p.WriteAt(make([]byte, 10), 5*p.l.unit) // pair 1, disk unit 2: disk 2 first, then disk 3
		done <- err
	}()
	<-inWrite
	r := 1*p.dirty.perPair + (2*p.l.unit)/p.chunk
	for i := 0; i < 20; i++ {
		time.Sleep(5 * time.Millisecond)
		if b := onDisk(); b[r/8]&(1<<(r%8)) == 0 {
			t.Fatalf("the chunk being written is not marked in the file (after %d ms)", 5*(i+1))
		}
	}
	close(release)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	for p.dirty.bits[r/64].Load() != 0 || !bytes.Equal(onDisk(), zero) {
		if time.Now().After(deadline) {
			t.Fatal("the chunk was never cleaned after its write")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestDirtyMarksRaceCleaner: writers on few chunks and a cleaner running every
// millisecond; every disk write must find its chunk marked in the file.
func TestDirtyMarksRaceCleaner(t *testing.T) {
	state, paths := makeDisks(t, 4, testDiskSize)
	var p *Pool
	var f *os.File
	var armed atomic.Bool
	var bad atomic.Value
	hook := func(disk int, op string, off int64) error {
		if op != "write" || !armed.Load() {
			return nil
		}
		r := int64(disk/2)*p.dirty.perPair + (off-p.l.dataOff)/p.chunk
		var b [1]byte
		if _, err := f.ReadAt(b[:], r/8); err != nil || b[0]&(1<<(r%8)) == 0 {
			bad.Store(fmt.Sprintf("write to disk %d at %d (chunk %d) not marked in the file (%v)", disk, off, r, err))
		}
		return nil
	}
	p = openTestPool(t, state, paths, Options{HealthInterval: 10 * time.Millisecond, Fault: hook})
	f, err := os.Open(filepath.Join(state, dirtyFile))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	armed.Store(true)
	var wg sync.WaitGroup
	for g := 0; g < 4; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, 4096)
			for i := 0; i < 2000; i++ {
				off := int64((g*7+i*13)%6)*p.chunk/2 + int64(i%8)*4096
				if _, err := p.WriteAt(buf, off); err != nil {
					bad.Store(err.Error())
					return
				}
			}
		}()
	}
	wg.Wait()
	if v := bad.Load(); v != nil {
		t.Fatal(v)
	}
}

// TestDiscardTakesNoMark: a discard (free space, see markWrite) sets no write-intent
// bit, so a controller killed right after discarding a whole fresh pool does not
// resync every chunk when it comes back; a write still does.
func TestDiscardTakesNoMark(t *testing.T) {
	state, paths := makeDisks(t, 4, testDiskSize)
	p := openTestPool(t, state, paths, Options{HealthInterval: time.Hour})
	if err := p.Discard(0, p.Size()); err != nil {
		t.Fatal(err)
	}
	for w := range p.dirty.bits {
		if p.dirty.bits[w].Load() != 0 {
			t.Fatalf("a discard marked chunks (word %d)", w)
		}
	}
	if _, err := p.WriteAt(make([]byte, 10), 5*p.l.unit); err != nil {
		t.Fatal(err)
	}
	marked := 0
	for w := range p.dirty.bits {
		marked += bits.OnesCount64(p.dirty.bits[w].Load())
	}
	if marked != 1 {
		t.Fatalf("a 10-byte write marked %d chunks, want 1", marked)
	}
}
