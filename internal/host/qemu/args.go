package qemu

import (
	"encoding/json"
	"fmt"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/growserver/grow/internal/host/hostapi"
)

// Config is everything needed to build a QEMU command line for one VM.
type Config struct {
	Spec     hostapi.VMSpec
	Dir      string   // the VM's runtime directory (sockets, logs, seed)
	Accel    string   // "kvm" or "tcg"
	Taps     []string // one tap name per NIC, in spec order
	SeedISO  string   // path of the NoCloud ISO ("" = none)
	Incoming bool     // start with -incoming defer, waiting for a migration
	Binary   string   // default qemu-system-x86_64
}

// QMPPath is the VM's QMP socket.
func (c Config) QMPPath() string { return filepath.Join(c.Dir, "qmp.sock") }

// ConsolePath is the VM's serial console socket.
func (c Config) ConsolePath() string { return filepath.Join(c.Dir, "console.sock") }

// ConsoleLog is the file QEMU copies all serial output to.
func (c Config) ConsoleLog() string { return filepath.Join(c.Dir, "console.log") }

// LogPath receives QEMU's own stdout and stderr.
func (c Config) LogPath() string { return filepath.Join(c.Dir, "qemu.log") }

func (c Config) binary() string {
	if c.Binary != "" {
		return c.Binary
	}
	return "qemu-system-x86_64"
}

// optValue escapes a value for QEMU's comma-separated option syntax.
func optValue(s string) string { return strings.ReplaceAll(s, ",", ",,") }

// Args returns the full QEMU command line (argv[0] included) for c. The same spec
// always yields the same device layout, which live migration requires.
func (c Config) Args() ([]string, error) {
	s := c.Spec
	if len(c.Taps) != len(s.NICs) {
		return nil, fmt.Errorf("Got %d tap names for %d NICs", len(c.Taps), len(s.NICs))
	}
	if c.Accel != "kvm" && c.Accel != "tcg" {
		return nil, fmt.Errorf("Unknown accelerator %q", c.Accel)
	}
	cpu := s.CPUModel
	if cpu == "" {
		cpu = hostapi.DefaultCPUModel
	}
	maxv := s.MaxVCPUs
	if maxv < s.VCPUs {
		maxv = s.VCPUs
	}
	a := []string{c.binary(),
		"-name", "guest=" + optValue(s.Name) + ",debug-threads=on",
		"-nodefaults", "-no-user-config", "-display", "none",
		"-machine", "pc", "-accel", c.Accel,
		"-cpu", cpu,
		"-smp", fmt.Sprintf("%d,maxcpus=%d", s.VCPUs, maxv),
	}
	mem := memArg(c.Accel, s.MemoryMiB)
	if s.MaxMemMiB > s.MemoryMiB {
		mem += fmt.Sprintf(",slots=8,maxmem=%dM", s.MaxMemMiB)
	}
	a = append(a, "-m", mem)
	a = append(a,
		"-chardev", "socket,id=qmp,path="+optValue(c.QMPPath())+",server=on,wait=off",
		"-mon", "chardev=qmp,mode=control",
		"-chardev", "socket,id=console,path="+optValue(c.ConsolePath())+",server=on,wait=off,logfile="+optValue(c.ConsoleLog())+",logappend=on",
		"-serial", "chardev:console",
	)
	for _, d := range s.Disks {
		if d.TLSCredsDir != "" {
			a = append(a, "-object", "tls-creds-x509,id="+TLSCredsID(d)+",dir="+optValue(d.TLSCredsDir)+",endpoint=client")
		}
		b, err := json.Marshal(DiskNode(d, NBDNode(d)))
		if err != nil {
			return nil, fmt.Errorf("Failed to encode disk %q: %w", d.ID, err)
		}
		a = append(a, "-blockdev", string(b),
			"-device", "virtio-blk-pci,drive="+DiskNodeName(d.ID)+",id=vd-"+d.ID+",serial="+d.ID)
	}
	if c.SeedISO != "" {
		node := map[string]any{"driver": "raw", "node-name": "seed", "read-only": true,
			"file": map[string]any{"driver": "file", "filename": c.SeedISO, "read-only": true}}
		b, _ := json.Marshal(node)
		a = append(a, "-blockdev", string(b), "-device", "virtio-blk-pci,drive=seed,id=vd-seed,serial=cidata")
	}
	for i, n := range s.NICs {
		a = append(a,
			"-netdev", fmt.Sprintf("tap,id=net%d,ifname=%s,script=no,downscript=no", i, c.Taps[i]),
			"-device", fmt.Sprintf("virtio-net-pci,netdev=net%d,mac=%s,id=nic%d", i, n.MAC, i))
	}
	if b := s.Boot; b != nil {
		a = append(a, "-kernel", b.Kernel)
		if b.Initrd != "" {
			a = append(a, "-initrd", b.Initrd)
		}
		if line := kernelLine(c.Accel, b.Append); line != "" {
			a = append(a, "-append", line)
		}
	}
	if c.Incoming {
		a = append(a, "-incoming", "defer")
	}
	a = append(a, "-msg", "timestamp=on")
	return a, nil
}

// memArg is the -m size. Under TCG, QEMU before 9.0 loses guest writes during live
// migration when a RAM block's size is a multiple of 256 KiB (a dirty-bitmap sync path
// does not reset the vCPUs' write tracking; fixed upstream in 2024), so TCG guests get
// 8 KiB less than their plan, which keeps them correct across migrations. KVM tracks
// dirty pages itself and gets the exact size. Both ends of a migration build the same
// value, so their RAM sizes agree.
func memArg(accel string, mib int) string {
	if accel == "tcg" {
		return fmt.Sprintf("%dk", mib*1024-8)
	}
	return fmt.Sprintf("%dM", mib)
}

// kernelLine is the command line of a directly booted kernel. Under TCG on a busy host
// the kernel's IO-APIC timer check can fail spuriously and panic the boot, so TCG guests
// also get no_timer_check (as is usual for emulated guests). Every guest gets
// memhp_default_state=online, so memory added by a resize is used at once.
func kernelLine(accel, line string) string {
	if !strings.Contains(line, "memhp_default_state=") {
		line = strings.TrimSpace(line + " memhp_default_state=online")
	}
	if accel == "tcg" && !strings.Contains(line, "no_timer_check") {
		return strings.TrimSpace(line + " no_timer_check")
	}
	return line
}

// DiskNodeName is the node name of a disk's raw format node, the drive of its device.
func DiskNodeName(id string) string { return "disk-" + id }

// TLSCredsID is the id of the tls-creds-x509 object a TLS disk's NBD client uses.
func TLSCredsID(d hostapi.Disk) string { return "tls-" + d.ID }

// NBDNode returns the blockdev options of a disk's NBD client node. Without a
// node-name it is embedded in the disk node; resize adds a named one.
func NBDNode(d hostapi.Disk) map[string]any {
	file := map[string]any{"driver": "nbd", "export": d.Export}
	if d.Socket != "" {
		file["server"] = map[string]any{"type": "unix", "path": d.Socket}
	} else {
		file["server"] = map[string]any{"type": "inet", "host": d.Host, "port": strconv.Itoa(d.Port)}
	}
	if d.ReconnectDelay > 0 {
		file["reconnect-delay"] = d.ReconnectDelay
	}
	if d.TLSCredsDir != "" {
		file["tls-creds"] = TLSCredsID(d)
		if d.TLSHostname != "" {
			file["tls-hostname"] = d.TLSHostname
		}
	}
	return file
}

// DiskNode returns the blockdev options of a disk's raw node over file (the NBD
// node's options, or the node name of an existing one). blockdev-reopen resets
// every option it is not given, so resize reuses exactly these.
func DiskNode(d hostapi.Disk, file any) map[string]any {
	return map[string]any{"driver": "raw", "node-name": DiskNodeName(d.ID), "read-only": d.ReadOnly, "file": file,
		"discard": "unmap", "cache": map[string]any{"direct": false, "no-flush": false}}
}
