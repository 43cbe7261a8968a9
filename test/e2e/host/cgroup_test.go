package host_test

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// checkCgroup verifies that QEMU pid sits in the VM's cgroup with the asked limits
// (this machine has cgroup v1; v2 hosts are checked the same way through cpu.max).
func checkCgroup(t *testing.T, parent, name string, pid, cpuPercent int, mem int64) {
	t.Helper()
	read := func(p string) string {
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatalf("Failed to read %s: %v", p, err)
		}
		return strings.TrimSpace(string(b))
	}
	if _, err := os.Stat("/sys/fs/cgroup/cgroup.controllers"); err == nil {
		d := filepath.Join("/sys/fs/cgroup", parent, name)
		if got, want := read(filepath.Join(d, "cpu.max")), strconv.Itoa(cpuPercent*1000)+" 100000"; got != want {
			t.Errorf("cpu.max = %q, want %q", got, want)
		}
		if got := read(filepath.Join(d, "memory.max")); got != strconv.FormatInt(mem, 10) {
			t.Errorf("memory.max = %q, want %d", got, mem)
		}
		if !strings.Contains("\n"+read(filepath.Join(d, "cgroup.procs"))+"\n", "\n"+strconv.Itoa(pid)+"\n") {
			t.Errorf("QEMU %d is not in %s", pid, d)
		}
		return
	}
	cpu := filepath.Join("/sys/fs/cgroup/cpu", parent, name)
	memd := filepath.Join("/sys/fs/cgroup/memory", parent, name)
	if got := read(filepath.Join(cpu, "cpu.cfs_quota_us")); got != strconv.Itoa(cpuPercent*1000) {
		t.Errorf("cpu.cfs_quota_us = %s, want %d", got, cpuPercent*1000)
	}
	if got := read(filepath.Join(memd, "memory.limit_in_bytes")); got != strconv.FormatInt(mem, 10) {
		t.Errorf("memory.limit_in_bytes = %s, want %d", got, mem)
	}
	for _, d := range []string{cpu, memd} {
		if !strings.Contains("\n"+read(filepath.Join(d, "cgroup.procs"))+"\n", "\n"+strconv.Itoa(pid)+"\n") {
			t.Errorf("QEMU %d is not in %s", pid, d)
		}
	}
}
