package host

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/growserver/grow/internal/host/hostapi"
)

// cgroupRoot is where cgroup hierarchies are mounted.
var cgroupRoot = "/sys/fs/cgroup"

// cpuPeriodUS is the CFS period used for CPU quotas.
const cpuPeriodUS = 100000

// cgroups places each QEMU in its own cgroup under parent, on v2 (unified) or v1
// (cpu and memory controllers mounted separately).
type cgroups struct {
	mode   string // "v2", "v1" or "none"
	parent string
}

func detectCgroups(parent string) *cgroups {
	if b, err := os.ReadFile(filepath.Join(cgroupRoot, "cgroup.controllers")); err == nil {
		f := strings.Fields(string(b))
		if contains(f, "cpu") && contains(f, "memory") {
			return &cgroups{mode: "v2", parent: parent}
		}
	}
	_, errCPU := os.Stat(filepath.Join(cgroupRoot, "cpu", "cpu.cfs_quota_us"))
	_, errMem := os.Stat(filepath.Join(cgroupRoot, "memory", "memory.limit_in_bytes"))
	if errCPU == nil && errMem == nil {
		return &cgroups{mode: "v1", parent: parent}
	}
	return &cgroups{mode: "none", parent: parent}
}

func contains(l []string, s string) bool {
	for _, x := range l {
		if x == s {
			return true
		}
	}
	return false
}

// Files returns, for limits, the cgroup files to write and their values, in order
// (pure: used by apply and by tests).
func cgroupFiles(mode string, lim hostapi.Limits) [][2]string {
	quota := "-1"
	if lim.CPUPercent > 0 {
		quota = strconv.Itoa(lim.CPUPercent * cpuPeriodUS / 100)
	}
	switch mode {
	case "v2":
		cpu := "max " + strconv.Itoa(cpuPeriodUS)
		if lim.CPUPercent > 0 {
			cpu = quota + " " + strconv.Itoa(cpuPeriodUS)
		}
		mem := "max"
		if lim.MemoryMaxBytes > 0 {
			mem = strconv.FormatInt(lim.MemoryMaxBytes, 10)
		}
		return [][2]string{{"cpu.max", cpu}, {"memory.max", mem}}
	case "v1":
		mem := "-1"
		if lim.MemoryMaxBytes > 0 {
			mem = strconv.FormatInt(lim.MemoryMaxBytes, 10)
		}
		return [][2]string{{"cpu/cpu.cfs_period_us", strconv.Itoa(cpuPeriodUS)}, {"cpu/cpu.cfs_quota_us", quota},
			{"memory/memory.limit_in_bytes", mem}}
	}
	return nil
}

func (c *cgroups) dirs(name string) []string {
	switch c.mode {
	case "v2":
		return []string{filepath.Join(cgroupRoot, c.parent, name)}
	case "v1":
		return []string{filepath.Join(cgroupRoot, "cpu", c.parent, name), filepath.Join(cgroupRoot, "memory", c.parent, name)}
	}
	return nil
}

// apply creates the VM's cgroup, writes its limits and moves pid into it. A VM without
// limits stays in the agent's cgroup: a cgroup of its own would weigh like a single
// process against everything else on the host (cgroup v1 CPU shares) and starve it.
func (c *cgroups) apply(name string, pid int, lim hostapi.Limits) error {
	if lim.CPUPercent == 0 && lim.MemoryMaxBytes == 0 {
		return nil
	}
	if c.mode == "none" {
		return fmt.Errorf("No usable cgroup hierarchy (cpu and memory) on this host")
	}
	return c.applyMode(name, pid, lim)
}

func (c *cgroups) applyMode(name string, pid int, lim hostapi.Limits) error {
	if c.mode == "v2" {
		parent := filepath.Join(cgroupRoot, c.parent)
		if err := os.MkdirAll(parent, 0o755); err != nil {
			return fmt.Errorf("Failed to create cgroup %q: %w", parent, err)
		}
		for _, d := range []string{cgroupRoot, parent} {
			if err := os.WriteFile(filepath.Join(d, "cgroup.subtree_control"), []byte("+cpu +memory"), 0o644); err != nil {
				return fmt.Errorf("Failed to enable cpu and memory controllers in %q: %w", d, err)
			}
		}
	}
	for _, d := range c.dirs(name) {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return fmt.Errorf("Failed to create cgroup %q: %w", d, err)
		}
	}
	base := filepath.Join(cgroupRoot, c.parent, name)
	for _, f := range cgroupFiles(c.mode, lim) {
		p := filepath.Join(base, f[0])
		if c.mode == "v1" {
			ctl, file, _ := strings.Cut(f[0], "/")
			p = filepath.Join(cgroupRoot, ctl, c.parent, name, file)
		}
		if err := os.WriteFile(p, []byte(f[1]), 0o644); err != nil {
			return fmt.Errorf("Failed to write %s to %q: %w", f[1], p, err)
		}
	}
	for _, d := range c.dirs(name) {
		if err := os.WriteFile(filepath.Join(d, "cgroup.procs"), []byte(strconv.Itoa(pid)), 0o644); err != nil {
			return fmt.Errorf("Failed to move QEMU %d into cgroup %q: %w", pid, d, err)
		}
	}
	return nil
}

// path returns the VM's cgroup directory of a controller ("cpu", "memory"), for inspection.
func (c *cgroups) path(name, controller string) string {
	if c.mode == "v1" {
		return filepath.Join(cgroupRoot, controller, c.parent, name)
	}
	return filepath.Join(cgroupRoot, c.parent, name)
}

// remove deletes the VM's cgroups; one still populated by an exiting QEMU is retried
// in the background for a few seconds.
func (c *cgroups) remove(name string) {
	for _, d := range c.dirs(name) {
		if err := os.Remove(d); err != nil && !errors.Is(err, os.ErrNotExist) {
			go func() {
				for i := 0; i < 100; i++ {
					sleepMS(50)
					if err := os.Remove(d); err == nil || errors.Is(err, os.ErrNotExist) {
						return
					}
				}
			}()
		}
	}
}
