package pool

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// loopDevices attaches n fresh files as loop block devices, detached at cleanup.
func loopDevices(t *testing.T, n int, size int64) []string {
	t.Helper()
	if testing.Short() {
		t.Skip("loop devices need root; skipped with -short")
	}
	if os.Geteuid() != 0 {
		t.Skip("loop devices need root")
	}
	if _, err := exec.LookPath("losetup"); err != nil {
		t.Skip("losetup is not installed")
	}
	dir := t.TempDir()
	var devs []string
	for i := 0; i < n; i++ {
		f := filepath.Join(dir, fmt.Sprintf("loop%d.img", i))
		if err := CreateFileDisk(f, size); err != nil {
			t.Fatal(err)
		}
		out, err := exec.Command("losetup", "--find", "--show", f).CombinedOutput()
		if err != nil {
			t.Skipf("losetup cannot attach a loop device here: %v: %s", err, out)
		}
		dev := strings.TrimSpace(string(out))
		t.Cleanup(func() { exec.Command("losetup", "--detach", dev).Run() })
		devs = append(devs, dev)
	}
	return devs
}

// TestBlockDevices runs a mirror pair on real block devices: sizes come from the
// device, there is no hole information, discard zeroes the range, and a replacement
// is rebuilt byte for byte.
func TestBlockDevices(t *testing.T) {
	devs := loopDevices(t, 3, testDiskSize)
	state := filepath.Join(t.TempDir(), "state")
	p := openTestPool(t, state, devs[:2], Options{RebuildRate: -1})
	if p.Size() != 8<<20 {
		t.Fatalf("pool size %d", p.Size())
	}
	model := fill(t, p, 41)
	if err := p.Discard(100_000, 1<<20); err != nil {
		t.Fatal(err)
	}
	clear(model[100_000 : 100_000+1<<20])
	verify(t, p, model)
	if err := p.Replace(devs[1], devs[2]); err != nil {
		t.Fatal(err)
	}
	if err := p.WaitRebuild(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := p.Sync(); err != nil {
		t.Fatal(err)
	}
	compareSides(t, p, []string{devs[0], devs[2]})
	p.Close()
	p = openTestPool(t, state, []string{devs[0], devs[2]}, Options{})
	if st := p.Status(); st.State != StateOK {
		t.Fatalf("%+v", st)
	}
	verify(t, p, model)
}
