package pool

import (
	"bufio"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
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
