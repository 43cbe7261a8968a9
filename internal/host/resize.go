package host

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/growserver/grow/internal/host/hostapi"
	"github.com/growserver/grow/internal/host/qemu"
)

// Resize grows a disk (the guest sees it at once, see growDisk), adds memory (a
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
		var disk *hostapi.Disk
		for i := range spec.Disks {
			if spec.Disks[i].ID == req.Disk {
				disk = &spec.Disks[i]
			}
		}
		if disk == nil {
			return fmt.Errorf("Disk %q of VM %q: %w", req.Disk, name, ErrNotFound)
		}
		if req.DiskBytes <= 0 || req.DiskBytes%512 != 0 {
			return fmt.Errorf("%w: disk_bytes must be a positive multiple of 512", ErrInvalid)
		}
		if err := growDisk(ctx, inst.Monitor, *disk, req.DiskBytes); err != nil {
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
		// Rounded up: TCG guests run with a few KiB less than their plan (see qemu.memArg).
		cur := int((mem.BaseMemory + mem.PluggedMemory + 1<<20 - 1) >> 20)
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

// growDisk makes a running guest see its grown NBD volume. QEMU's NBD client fixes an
// export's size at connect and refuses to grow ("Cannot grow NBD nodes"), so the disk's
// raw node is switched (blockdev-reopen, which drains in-flight I/O) onto a fresh NBD
// connection that already sees the new size, and block_resize then tells the guest.
// Any failure before the switch leaves the disk as it was.
func growDisk(ctx context.Context, m *qemu.Monitor, d hostapi.Disk, size int64) error {
	nodes, err := namedNodeSizes(ctx, m)
	if err != nil {
		return err
	}
	diskNode := qemu.DiskNodeName(d.ID)
	cur, ok := nodes[diskNode]
	if !ok {
		return fmt.Errorf("QEMU has no block node %q", diskNode)
	}
	switch {
	case size < cur:
		return fmt.Errorf("%w: disk is %d bytes; a disk can only grow", ErrInvalid, cur)
	case size == cur:
		return nil
	}
	prefix := "nbd-" + d.ID + "-"
	fresh := prefix + strconv.FormatInt(time.Now().UnixNano(), 36)
	opts := qemu.NBDNode(d)
	opts["node-name"] = fresh
	if err := m.Execute(ctx, "blockdev-add", opts, nil); err != nil {
		return fmt.Errorf("Failed to open a new connection to the volume: %w", err)
	}
	undo := func() {
		_ = m.Execute(context.WithoutCancel(ctx), "blockdev-del", map[string]any{"node-name": fresh}, nil)
	}
	nodes, err = namedNodeSizes(ctx, m)
	if err != nil {
		undo()
		return err
	}
	if got := nodes[fresh]; got < size {
		undo()
		return fmt.Errorf("%w: the volume is %d bytes, less than %d; grow it on the storage controller first", ErrConflict, got, size)
	}
	reopen := map[string]any{"options": []any{qemu.DiskNode(d, fresh)}}
	if err := m.Execute(ctx, "blockdev-reopen", reopen, nil); err != nil {
		undo()
		return fmt.Errorf("Failed to switch the disk to the new connection: %w", err)
	}
	// Connections of earlier resizes are no longer used by the disk: close them.
	for n := range nodes {
		if strings.HasPrefix(n, prefix) && n != fresh {
			_ = m.Execute(ctx, "blockdev-del", map[string]any{"node-name": n}, nil)
		}
	}
	return m.Execute(ctx, "block_resize", map[string]any{"node-name": diskNode, "size": size}, nil)
}

// namedNodeSizes returns the virtual size of every named block node of a QEMU.
func namedNodeSizes(ctx context.Context, m *qemu.Monitor) (map[string]int64, error) {
	var nodes []struct {
		NodeName string `json:"node-name"`
		Image    struct {
			VirtualSize int64 `json:"virtual-size"`
		} `json:"image"`
	}
	if err := m.Execute(ctx, "query-named-block-nodes", map[string]any{"flat": true}, &nodes); err != nil {
		return nil, fmt.Errorf("Failed to list block nodes: %w", err)
	}
	sizes := make(map[string]int64, len(nodes))
	for _, n := range nodes {
		sizes[n.NodeName] = n.Image.VirtualSize
	}
	return sizes, nil
}
