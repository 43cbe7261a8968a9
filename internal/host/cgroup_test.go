package host

import (
	"os"
	"path/filepath"
	"reflect"
	"testing"

	"github.com/growserver/grow/internal/host/hostapi"
)

func TestCgroupFiles(t *testing.T) {
	lim := hostapi.Limits{CPUPercent: 150, MemoryMaxBytes: 1 << 30}
	if got, want := cgroupFiles("v2", lim), [][2]string{{"cpu.max", "150000 100000"}, {"memory.max", "1073741824"}}; !reflect.DeepEqual(got, want) {
		t.Errorf("v2: %v", got)
	}
	if got, want := cgroupFiles("v1", lim), [][2]string{{"cpu/cpu.cfs_period_us", "100000"}, {"cpu/cpu.cfs_quota_us", "150000"},
		{"memory/memory.limit_in_bytes", "1073741824"}}; !reflect.DeepEqual(got, want) {
		t.Errorf("v1: %v", got)
	}
	if got := cgroupFiles("v2", hostapi.Limits{MemoryMaxBytes: 1 << 30}); got[0][1] != "max 100000" {
		t.Errorf("v2 without CPU quota: %v", got)
	}
	if got := cgroupFiles("v1", hostapi.Limits{CPUPercent: 50}); got[1][1] != "50000" || got[2][1] != "-1" {
		t.Errorf("v1 without memory limit: %v", got)
	}
}

// TestCgroupApplyV2 runs apply against a fake v2 hierarchy in a temporary directory.
func TestCgroupApplyV2(t *testing.T) {
	root := t.TempDir()
	old := cgroupRoot
	cgroupRoot = root
	t.Cleanup(func() { cgroupRoot = old })
	if err := os.WriteFile(filepath.Join(root, "cgroup.controllers"), []byte("cpuset cpu io memory pids\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	c := detectCgroups("grow")
	if c.mode != "v2" {
		t.Fatalf("mode %q", c.mode)
	}
	if err := c.apply("vm1", 4242, hostapi.Limits{}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(root, "grow", "vm1")); !os.IsNotExist(err) {
		t.Error("a VM without limits got a cgroup")
	}
	if err := c.apply("vm1", 4242, hostapi.Limits{CPUPercent: 200, MemoryMaxBytes: 512 << 20}); err != nil {
		t.Fatal(err)
	}
	for f, want := range map[string]string{"grow/vm1/cpu.max": "200000 100000", "grow/vm1/memory.max": "536870912",
		"grow/vm1/cgroup.procs": "4242", "grow/cgroup.subtree_control": "+cpu +memory", "cgroup.subtree_control": "+cpu +memory"} {
		b, err := os.ReadFile(filepath.Join(root, f))
		if err != nil || string(b) != want {
			t.Errorf("%s = %q (%v), want %q", f, b, err, want)
		}
	}
}

func TestCgroupNone(t *testing.T) {
	old := cgroupRoot
	cgroupRoot = t.TempDir()
	t.Cleanup(func() { cgroupRoot = old })
	c := detectCgroups("grow")
	if c.mode != "none" {
		t.Fatalf("mode %q", c.mode)
	}
	if err := c.apply("vm", 1, hostapi.Limits{}); err != nil {
		t.Errorf("no limits, no cgroups: %v", err)
	}
	if err := c.apply("vm", 1, hostapi.Limits{CPUPercent: 10}); err == nil {
		t.Error("limits accepted without cgroups")
	}
}
