// Package hostapi holds the JSON types of the host agent's HTTP API (`grow hostd`) and
// their validation. It is imported by the agent, its Go client and the control plane;
// it must never do I/O or depend on the agent's internals.
package hostapi

import (
	"fmt"
	"net"
	"net/netip"
	"regexp"
	"strings"
	"time"
)

// DefaultCPUModel is the CPU model every VM gets unless its spec names another. Nehalem
// is an x86-64-v2-class model (SSE4.2, POPCNT, CX16) that both KVM on any current host
// and QEMU's TCG provide, so a VM can move between hosts of different generations.
const DefaultCPUModel = "Nehalem"

// VM states reported by the agent.
const (
	StateDefined   = "defined"   // known, no QEMU process
	StateRunning   = "running"   // QEMU runs and the guest executes
	StatePaused    = "paused"    // QEMU runs, the guest is paused
	StateIncoming  = "incoming"  // QEMU waits for an incoming migration
	StateMigrating = "migrating" // the source side of a migration in progress
	StateStopped   = "stopped"   // QEMU exited (see ExitReason)
)

// VMSpec describes a VM: what the agent needs to run it on any host of the cluster.
type VMSpec struct {
	Name      string      `json:"name"`
	VCPUs     int         `json:"vcpus"`
	MaxVCPUs  int         `json:"max_vcpus,omitempty"` // for vCPU hotplug; default VCPUs
	MemoryMiB int         `json:"memory_mib"`
	MaxMemMiB int         `json:"max_memory_mib,omitempty"` // for memory hotplug; default MemoryMiB
	CPUModel  string      `json:"cpu_model,omitempty"`
	Disks     []Disk      `json:"disks,omitempty"`
	NICs      []NIC       `json:"nics,omitempty"`
	Seed      *Seed       `json:"seed,omitempty"`
	Boot      *DirectBoot `json:"boot,omitempty"`
	Limits    Limits      `json:"limits,omitempty"`
}

// Disk is a virtio disk backed by an NBD export.
type Disk struct {
	ID             string `json:"id"`               // short name, e.g. "root"
	Host           string `json:"host,omitempty"`   // TCP host; or Socket
	Port           int    `json:"port,omitempty"`   // TCP port
	Socket         string `json:"socket,omitempty"` // unix socket path
	Export         string `json:"export"`
	TLS            bool   `json:"tls,omitempty"`           // NBD over TLS with the agent's credentials (hostd --nbd-tls-dir)
	TLSCredsDir    string `json:"tls_creds_dir,omitempty"` // x509 dir with ca-cert.pem (client side); set by the agent when TLS
	TLSHostname    string `json:"tls_hostname,omitempty"`
	ReconnectDelay int    `json:"reconnect_delay,omitempty"` // seconds; 0 = QEMU default (no reconnect)
	ReadOnly       bool   `json:"read_only,omitempty"`
}

// NIC is a virtio NIC on a tap enslaved to a host bridge.
type NIC struct {
	Bridge string   `json:"bridge,omitempty"` // default: the agent's --bridge
	MAC    string   `json:"mac"`
	IPv4   []string `json:"ipv4,omitempty"` // addresses the guest may send from
	IPv6   []string `json:"ipv6,omitempty"`
	// InRate and OutRate shape traffic to and from the guest, in bits per second (0 = unlimited).
	InRate  uint64 `json:"in_rate_bps,omitempty"`
	OutRate uint64 `json:"out_rate_bps,omitempty"`
}

// Seed is a cloud-init NoCloud seed; the agent writes it as an ISO labelled cidata.
type Seed struct {
	MetaData      string `json:"meta_data"`
	UserData      string `json:"user_data,omitempty"`
	NetworkConfig string `json:"network_config,omitempty"`
}

// DirectBoot boots a kernel and initrd directly (paths on the host).
type DirectBoot struct {
	Kernel string `json:"kernel"`
	Initrd string `json:"initrd,omitempty"`
	Append string `json:"append,omitempty"`
}

// Limits caps a VM's host resources through cgroups.
type Limits struct {
	CPUPercent     int   `json:"cpu_percent,omitempty"`      // 100 = one host CPU; 0 = unlimited
	MemoryMaxBytes int64 `json:"memory_max_bytes,omitempty"` // whole QEMU process; 0 = unlimited
}

// VM is the agent's view of one VM.
type VM struct {
	Spec       VMSpec    `json:"spec"`
	State      string    `json:"state"`
	PID        int       `json:"pid,omitempty"`
	Accel      string    `json:"accel,omitempty"`
	ExitReason string    `json:"exit_reason,omitempty"`
	StartedAt  time.Time `json:"started_at,omitempty"`
	Taps       []string  `json:"taps,omitempty"`
}

// Counters are a VM's traffic counters, summed over its NICs and kept across restarts.
type Counters struct {
	RxBytes uint64 `json:"rx_bytes"` // received by the guest
	TxBytes uint64 `json:"tx_bytes"` // sent by the guest
}

// ResizeRequest grows a disk, the memory or the vCPU count of a running VM.
type ResizeRequest struct {
	Disk      string `json:"disk,omitempty"`
	DiskBytes int64  `json:"disk_bytes,omitempty"`
	MemoryMiB int    `json:"memory_mib,omitempty"`
	VCPUs     int    `json:"vcpus,omitempty"`
}

// StopRequest asks for an ACPI shutdown, forced after TimeoutSeconds (default 30).
type StopRequest struct {
	TimeoutSeconds int `json:"timeout_seconds,omitempty"`
}

// MigrateRequest asks the source agent to move a running VM to another agent.
type MigrateRequest struct {
	TargetURL   string `json:"target_url"`
	TargetToken string `json:"target_token"`
	// TargetCACert is the PEM CA that signed an https target agent's certificate.
	TargetCACert string `json:"target_ca_cert,omitempty"`
	// ListenHost is the address the destination QEMU listens on for the migration stream.
	ListenHost string `json:"listen_host"`
	// DowntimeLimitMS caps the guest pause at switch-over (default 50).
	DowntimeLimitMS int `json:"downtime_limit_ms,omitempty"`
	// BandwidthMiBps caps the migration stream (0 = unlimited).
	BandwidthMiBps int `json:"bandwidth_mibps,omitempty"`
}

// ShapeRequest sets the rates of every NIC of a VM, in bits per second (0 = unlimited).
type ShapeRequest struct {
	InRate  uint64 `json:"in_rate_bps"`
	OutRate uint64 `json:"out_rate_bps"`
}

// IncomingRequest asks a destination agent to prepare a VM to receive a migration.
type IncomingRequest struct {
	Spec       VMSpec `json:"spec"`
	ListenHost string `json:"listen_host"`
	// TLS: the source sends the stream over TLS (its agent has --migration-tls-dir); the
	// destination must then have credentials too, and refuses the other case as well.
	TLS bool `json:"tls,omitempty"`
	// Counters carries the VM's traffic so far, so that its counters continue on the destination.
	Counters Counters `json:"counters"`
}

// IncomingReply tells the source where to send the migration stream.
type IncomingReply struct {
	URI string `json:"uri"`
}

// Operation states.
const (
	OpRunning   = "running"
	OpSucceeded = "succeeded"
	OpFailed    = "failed"
	OpCancelled = "cancelled"
)

// Operation is a long-running task (a migration) that can be polled and cancelled.
type Operation struct {
	ID       string    `json:"id"`
	Kind     string    `json:"kind"`
	VM       string    `json:"vm"`
	Status   string    `json:"status"`
	Progress float64   `json:"progress"` // 0..1
	Message  string    `json:"message,omitempty"`
	Error    string    `json:"error,omitempty"`
	Created  time.Time `json:"created"`
	Updated  time.Time `json:"updated"`
	// Migration statistics as QEMU reports them (milliseconds).
	TotalTimeMS int64 `json:"total_time_ms,omitempty"`
	DowntimeMS  int64 `json:"downtime_ms,omitempty"`
	SetupTimeMS int64 `json:"setup_time_ms,omitempty"`
	// TransferredBytes is the RAM QEMU sent, DirtySyncs how many passes it made.
	TransferredBytes int64 `json:"transferred_bytes,omitempty"`
	DirtySyncs       int64 `json:"dirty_syncs,omitempty"`
}

// Error is the JSON error body of every failed request.
type Error struct {
	Code    string `json:"code"`
	Message string `json:"message"`
}

// Error codes.
const (
	CodeInvalid  = "invalid"
	CodeNotFound = "not_found"
	CodeConflict = "conflict"
	CodeInternal = "internal"
)

var nameRE = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`)
var idRE = regexp.MustCompile(`^[a-z0-9][a-z0-9_-]{0,15}$`)

// ValidName reports whether s is a valid VM name (DNS label, lower case).
func ValidName(s string) bool { return nameRE.MatchString(s) }

// Validate checks a spec and fills in defaults; it returns the first problem found.
func (s *VMSpec) Validate() error {
	if !ValidName(s.Name) {
		return fmt.Errorf("Invalid VM name %q: use 1-63 lower-case letters, digits and dashes", s.Name)
	}
	if s.VCPUs < 1 || s.VCPUs > 255 {
		return fmt.Errorf("Invalid vcpus %d: must be 1-255", s.VCPUs)
	}
	if s.MaxVCPUs == 0 {
		s.MaxVCPUs = s.VCPUs
	}
	if s.MaxVCPUs < s.VCPUs || s.MaxVCPUs > 255 {
		return fmt.Errorf("Invalid max_vcpus %d: must be between vcpus (%d) and 255", s.MaxVCPUs, s.VCPUs)
	}
	if s.MemoryMiB < 16 || s.MemoryMiB > 4<<20 {
		return fmt.Errorf("Invalid memory_mib %d: must be 16 MiB to 4 TiB", s.MemoryMiB)
	}
	if s.MaxMemMiB == 0 {
		s.MaxMemMiB = s.MemoryMiB
	}
	if s.MaxMemMiB < s.MemoryMiB {
		return fmt.Errorf("Invalid max_memory_mib %d: smaller than memory_mib %d", s.MaxMemMiB, s.MemoryMiB)
	}
	if s.CPUModel == "" {
		s.CPUModel = DefaultCPUModel
	}
	if !regexp.MustCompile(`^[A-Za-z0-9_.+-]+$`).MatchString(s.CPUModel) {
		return fmt.Errorf("Invalid cpu_model %q", s.CPUModel)
	}
	ids := map[string]bool{}
	for i := range s.Disks {
		d := &s.Disks[i]
		if !idRE.MatchString(d.ID) {
			return fmt.Errorf("Invalid disk id %q: use 1-16 lower-case letters, digits, '-' or '_'", d.ID)
		}
		if ids[d.ID] {
			return fmt.Errorf("Duplicate disk id %q", d.ID)
		}
		ids[d.ID] = true
		if (d.Socket == "") == (d.Host == "") {
			return fmt.Errorf("Disk %q: give exactly one of host:port or socket", d.ID)
		}
		if d.Host != "" && (d.Port < 1 || d.Port > 65535) {
			return fmt.Errorf("Disk %q: invalid port %d", d.ID, d.Port)
		}
		if d.Host != "" && strings.ContainsAny(d.Host, " ,\"") {
			return fmt.Errorf("Disk %q: invalid host %q", d.ID, d.Host)
		}
		if d.Socket != "" && !strings.HasPrefix(d.Socket, "/") {
			return fmt.Errorf("Disk %q: socket %q must be an absolute path", d.ID, d.Socket)
		}
		if d.ReconnectDelay < 0 || d.ReconnectDelay > 3600 {
			return fmt.Errorf("Disk %q: reconnect_delay %d out of range 0-3600", d.ID, d.ReconnectDelay)
		}
		if d.TLSCredsDir != "" && !strings.HasPrefix(d.TLSCredsDir, "/") {
			return fmt.Errorf("Disk %q: tls_creds_dir must be an absolute path", d.ID)
		}
	}
	macs := map[string]bool{}
	for i := range s.NICs {
		n := &s.NICs[i]
		hw, err := net.ParseMAC(n.MAC)
		if err != nil || len(hw) != 6 {
			return fmt.Errorf("NIC %d: invalid MAC %q", i, n.MAC)
		}
		if hw[0]&1 == 1 {
			return fmt.Errorf("NIC %d: MAC %q is a multicast address", i, n.MAC)
		}
		n.MAC = hw.String()
		if macs[n.MAC] {
			return fmt.Errorf("NIC %d: duplicate MAC %q", i, n.MAC)
		}
		macs[n.MAC] = true
		if n.Bridge != "" && !validIfName(n.Bridge) {
			return fmt.Errorf("NIC %d: invalid bridge name %q", i, n.Bridge)
		}
		for _, a := range n.IPv4 {
			ip, err := netip.ParseAddr(a)
			if err != nil || !ip.Is4() {
				return fmt.Errorf("NIC %d: invalid IPv4 address %q", i, a)
			}
		}
		for _, a := range n.IPv6 {
			ip, err := netip.ParseAddr(a)
			if err != nil || !ip.Is6() || ip.Is4In6() {
				return fmt.Errorf("NIC %d: invalid IPv6 address %q", i, a)
			}
		}
	}
	if s.Boot != nil {
		if !strings.HasPrefix(s.Boot.Kernel, "/") {
			return fmt.Errorf("Boot kernel %q must be an absolute path", s.Boot.Kernel)
		}
		if s.Boot.Initrd != "" && !strings.HasPrefix(s.Boot.Initrd, "/") {
			return fmt.Errorf("Boot initrd %q must be an absolute path", s.Boot.Initrd)
		}
	}
	if len(s.Disks) == 0 && s.Boot == nil {
		return fmt.Errorf("VM %q has neither a disk nor a kernel to boot", s.Name)
	}
	if s.Seed != nil && s.Seed.MetaData == "" {
		return fmt.Errorf("Seed meta_data must not be empty (it names the instance)")
	}
	if s.Limits.CPUPercent < 0 || s.Limits.CPUPercent > 100*256 {
		return fmt.Errorf("Invalid cpu_percent %d", s.Limits.CPUPercent)
	}
	if s.Limits.MemoryMaxBytes != 0 && s.Limits.MemoryMaxBytes < int64(s.MaxMemMiB)<<20 {
		return fmt.Errorf("memory_max_bytes %d is below the guest memory (%d MiB): QEMU would be killed", s.Limits.MemoryMaxBytes, s.MaxMemMiB)
	}
	return nil
}

func validIfName(s string) bool {
	if len(s) == 0 || len(s) > 15 {
		return false
	}
	for _, c := range s {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_' || c == '.') {
			return false
		}
	}
	return true
}
