package host

import (
	"context"
	"fmt"

	"github.com/growserver/grow/internal/host/hostapi"
)

// Resize grows a disk (block_resize; the guest sees it at once), adds memory (a
// pc-dimm, up to max_memory_mib) or vCPUs (up to max_vcpus) of a running VM. Memory
// and vCPUs added this way live until the VM stops; they are not part of its spec, so
// a VM with hot-added resources must be restarted before it can migrate.
func (a *Agent) Resize(ctx context.Context, name string, req hostapi.ResizeRequest) error {
	v, err := a.get(name)
	if err != nil {
		return err
	}
	v.opMu.Lock()
	defer v.opMu.Unlock()
	inst := v.instance()
	if inst == nil {
		return fmt.Errorf("VM %q is not running: %w", name, ErrConflict)
	}
	spec := v.info().Spec
	if req.Disk == "" && req.MemoryMiB == 0 && req.VCPUs == 0 {
		return fmt.Errorf("%w: nothing to resize", ErrInvalid)
	}
	if req.Disk != "" {
		found := false
		for _, d := range spec.Disks {
			found = found || d.ID == req.Disk
		}
		if !found {
			return fmt.Errorf("Disk %q of VM %q: %w", req.Disk, name, ErrNotFound)
		}
		if req.DiskBytes <= 0 || req.DiskBytes%512 != 0 {
			return fmt.Errorf("%w: disk_bytes must be a positive multiple of 512", ErrInvalid)
		}
		if err := inst.Monitor.Execute(ctx, "block_resize", map[string]any{"node-name": "disk-" + req.Disk, "size": req.DiskBytes}, nil); err != nil {
			return fmt.Errorf("Failed to resize disk %q of VM %q: %w", req.Disk, name, err)
		}
	}
	if req.MemoryMiB != 0 {
		var mem struct {
			BaseMemory    int64 `json:"base-memory"`
			PluggedMemory int64 `json:"plugged-memory"`
		}
		if err := inst.Monitor.Execute(ctx, "query-memory-size-summary", nil, &mem); err != nil {
			return fmt.Errorf("Failed to query memory of VM %q: %w", name, err)
		}
		cur := int((mem.BaseMemory + mem.PluggedMemory) >> 20)
		add := req.MemoryMiB - cur
		if add <= 0 || req.MemoryMiB > spec.MaxMemMiB || add%128 != 0 {
			return fmt.Errorf("%w: memory can grow from %d MiB up to max_memory_mib %d in steps of 128 MiB", ErrInvalid, cur, spec.MaxMemMiB)
		}
		id := fmt.Sprintf("hp%d", cur)
		if err := inst.Monitor.Execute(ctx, "object-add", map[string]any{"qom-type": "memory-backend-ram", "id": "mem-" + id, "size": int64(add) << 20}, nil); err != nil {
			return fmt.Errorf("Failed to add memory to VM %q: %w", name, err)
		}
		if err := inst.Monitor.Execute(ctx, "device_add", map[string]any{"driver": "pc-dimm", "id": "dimm-" + id, "memdev": "mem-" + id}, nil); err != nil {
			_ = inst.Monitor.Execute(ctx, "object-del", map[string]any{"id": "mem-" + id}, nil)
			return fmt.Errorf("Failed to plug memory into VM %q: %w", name, err)
		}
		v.markHotplugged()
	}
	if req.VCPUs != 0 {
		var cpus []struct {
			Type     string         `json:"type"`
			Props    map[string]any `json:"props"`
			QOMPath  string         `json:"qom-path"`
			VCPUsCnt int            `json:"vcpus-count"`
		}
		if err := inst.Monitor.Execute(ctx, "query-hotpluggable-cpus", nil, &cpus); err != nil {
			return fmt.Errorf("Failed to query CPUs of VM %q: %w", name, err)
		}
		plugged := 0
		for _, c := range cpus {
			if c.QOMPath != "" {
				plugged++
			}
		}
		if req.VCPUs <= plugged || req.VCPUs > spec.MaxVCPUs {
			return fmt.Errorf("%w: vCPUs can grow from %d up to max_vcpus %d", ErrInvalid, plugged, spec.MaxVCPUs)
		}
		need := req.VCPUs - plugged
		for i := len(cpus) - 1; i >= 0 && need > 0; i-- { // QEMU lists the highest ids first
			c := cpus[i]
			if c.QOMPath != "" {
				continue
			}
			args := map[string]any{"driver": c.Type, "id": fmt.Sprintf("cpu%d", len(cpus)-1-i)}
			for k, val := range c.Props {
				args[k] = val
			}
			if err := inst.Monitor.Execute(ctx, "device_add", args, nil); err != nil {
				return fmt.Errorf("Failed to add a vCPU to VM %q: %w", name, err)
			}
			need--
			v.markHotplugged()
		}
	}
	return nil
}
