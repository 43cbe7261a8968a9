// Package host is the hypervisor host agent behind `grow hostd`: it keeps the registry
// of the VMs of one host in its data directory, runs each VM as a QEMU process (through
// internal/host/qemu) with its taps, anti-spoofing rules, shaping and cgroup limits,
// serves the token-protected HTTP API with consoles, counters and live migration.
// The agent may be restarted at any time: it must never stop, signal or restart a
// running QEMU on its own start or exit; it reattaches to each through its QMP socket.
package host

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/growserver/grow/internal/host/hostapi"
	"github.com/growserver/grow/internal/host/qemu"
)

// Config configures an agent.
type Config struct {
	DataDir      string // VM records, sockets, logs, seeds; admin.token
	Bridge       string // default bridge for NICs that name none
	Accel        string // "auto", "kvm" or "tcg"
	CgroupParent string // cgroup directory name for VMs (default "grow")
	QEMUBinary   string // default qemu-system-x86_64
	NBDTLSDir    string // x509 client credentials for disks with TLS: ca-cert.pem, client-cert.pem, client-key.pem
	// MigrationTLSDir holds x509 credentials (migrationTLSFiles) with which every live
	// migration in or out of this host is encrypted and both hosts are verified.
	MigrationTLSDir string
	Logger          *slog.Logger
}

// Agent runs the VMs of one host.
type Agent struct {
	cfg    Config
	accel  string
	cg     *cgroups
	log    *slog.Logger
	mu     sync.Mutex
	vms    map[string]*vm
	ops    map[string]*operation
	closed bool
}

// ErrNotFound, ErrConflict and ErrInvalid classify agent errors (the API maps them to codes).
var (
	ErrNotFound = errors.New("not found")
	ErrConflict = errors.New("conflict")
	ErrInvalid  = errors.New("invalid")
)

// New opens (or creates) the agent's data directory and reattaches to every QEMU that
// a previous agent left running.
func New(ctx context.Context, cfg Config) (*Agent, error) {
	if cfg.DataDir == "" {
		return nil, fmt.Errorf("No data directory given")
	}
	if cfg.CgroupParent == "" {
		cfg.CgroupParent = "grow"
	}
	if cfg.NBDTLSDir != "" {
		if !filepath.IsAbs(cfg.NBDTLSDir) {
			return nil, fmt.Errorf("NBD TLS directory %q must be an absolute path", cfg.NBDTLSDir)
		}
		if _, err := os.Stat(filepath.Join(cfg.NBDTLSDir, "ca-cert.pem")); err != nil {
			return nil, fmt.Errorf("NBD TLS directory %q has no usable ca-cert.pem: %w", cfg.NBDTLSDir, err)
		}
	}
	if cfg.MigrationTLSDir != "" {
		if !filepath.IsAbs(cfg.MigrationTLSDir) {
			return nil, fmt.Errorf("Migration TLS directory %q must be an absolute path", cfg.MigrationTLSDir)
		}
		for _, f := range migrationTLSFiles {
			if _, err := os.Stat(filepath.Join(cfg.MigrationTLSDir, f)); err != nil {
				return nil, fmt.Errorf("Migration TLS directory %q lacks %s (it needs %s): %w", cfg.MigrationTLSDir, f, strings.Join(migrationTLSFiles, ", "), err)
			}
		}
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.NewTextHandler(os.Stderr, nil))
	}
	accel := cfg.Accel
	switch accel {
	case "", "auto":
		accel = qemu.DetectAccel()
	case "kvm", "tcg":
	default:
		return nil, fmt.Errorf("Unknown accelerator %q (want auto, kvm or tcg)", cfg.Accel)
	}
	if err := os.MkdirAll(filepath.Join(cfg.DataDir, "vms"), 0o700); err != nil {
		return nil, fmt.Errorf("Failed to create data directory %q: %w", cfg.DataDir, err)
	}
	a := &Agent{cfg: cfg, accel: accel, cg: detectCgroups(cfg.CgroupParent), log: cfg.Logger,
		vms: map[string]*vm{}, ops: map[string]*operation{}}
	entries, err := os.ReadDir(filepath.Join(cfg.DataDir, "vms"))
	if err != nil {
		return nil, fmt.Errorf("Failed to read VM directory: %w", err)
	}
	for _, e := range entries {
		if !e.IsDir() || !hostapi.ValidName(e.Name()) {
			continue
		}
		v, err := a.loadVM(e.Name())
		if err != nil {
			a.log.Error("Skipping unreadable VM record", "vm", e.Name(), "err", err)
			continue
		}
		a.vms[v.name] = v
		v.recover(ctx)
	}
	a.log.Info("Host agent ready", "data", cfg.DataDir, "accel", accel, "cgroups", a.cg.mode, "vms", len(a.vms))
	return a, nil
}

// Accel is the accelerator QEMU uses on this host.
func (a *Agent) Accel() string { return a.accel }

// Close detaches from every QEMU (which keeps running) and stops background work.
func (a *Agent) Close() {
	a.mu.Lock()
	a.closed = true
	vms := make([]*vm, 0, len(a.vms))
	for _, v := range a.vms {
		vms = append(vms, v)
	}
	for _, op := range a.ops {
		op.cancel()
	}
	a.mu.Unlock()
	for _, v := range vms {
		v.detach()
	}
}

func (a *Agent) vmDir(name string) string { return filepath.Join(a.cfg.DataDir, "vms", name) }

func (a *Agent) get(name string) (*vm, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	v := a.vms[name]
	if v == nil {
		return nil, fmt.Errorf("VM %q: %w", name, ErrNotFound)
	}
	return v, nil
}

// Define registers a VM from its spec without starting it.
func (a *Agent) Define(spec hostapi.VMSpec) (hostapi.VM, error) {
	return a.define(spec, hostapi.Counters{})
}

func (a *Agent) define(spec hostapi.VMSpec, base hostapi.Counters) (hostapi.VM, error) {
	return a.defineAs(spec, base, true)
}

// defineAs registers a VM; durable fsyncs its record (an incoming VM's need not be:
// after a crash its QEMU is gone and the source still owns the guest).
func (a *Agent) defineAs(spec hostapi.VMSpec, base hostapi.Counters, durable bool) (hostapi.VM, error) {
	if err := spec.Validate(); err != nil {
		return hostapi.VM{}, fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	for i := range spec.NICs {
		if spec.NICs[i].Bridge == "" {
			if a.cfg.Bridge == "" {
				return hostapi.VM{}, fmt.Errorf("%w: NIC %d names no bridge and the agent has no --bridge", ErrInvalid, i)
			}
			spec.NICs[i].Bridge = a.cfg.Bridge
		}
	}
	spec.Disks = slices.Clone(spec.Disks)
	for i := range spec.Disks {
		// Each host uses its own credentials, also for a VM that migrates in.
		if d := &spec.Disks[i]; d.TLS {
			if a.cfg.NBDTLSDir == "" {
				return hostapi.VM{}, fmt.Errorf("%w: disk %q needs NBD over TLS and the agent has no --nbd-tls-dir", ErrInvalid, d.ID)
			}
			d.TLSCredsDir = a.cfg.NBDTLSDir
		}
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.vms[spec.Name] != nil {
		return hostapi.VM{}, fmt.Errorf("VM %q already exists: %w", spec.Name, ErrConflict)
	}
	v := &vm{a: a, name: spec.Name, dir: a.vmDir(spec.Name)}
	v.rec = record{Spec: spec, State: hostapi.StateDefined, Counters: base}
	if err := os.MkdirAll(v.dir, 0o700); err != nil {
		return hostapi.VM{}, fmt.Errorf("Failed to create directory of VM %q: %w", spec.Name, err)
	}
	persist := v.persistLocked
	if durable {
		persist = v.persistDurableLocked
	}
	if err := persist(); err != nil {
		_ = os.RemoveAll(v.dir)
		return hostapi.VM{}, err
	}
	a.vms[spec.Name] = v
	return v.info(), nil
}

// List returns every VM of this host, by name.
func (a *Agent) List() []hostapi.VM {
	a.mu.Lock()
	vms := make([]*vm, 0, len(a.vms))
	for _, v := range a.vms {
		vms = append(vms, v)
	}
	a.mu.Unlock()
	out := make([]hostapi.VM, 0, len(vms))
	for _, v := range vms {
		out = append(out, v.info())
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Spec.Name < out[j].Spec.Name })
	return out
}

// Get returns one VM.
func (a *Agent) Get(name string) (hostapi.VM, error) {
	v, err := a.get(name)
	if err != nil {
		return hostapi.VM{}, err
	}
	return v.info(), nil
}

// Delete removes a stopped VM (or, with force, kills it first) and its files.
func (a *Agent) Delete(ctx context.Context, name string, force bool) error {
	v, err := a.get(name)
	if err != nil {
		return err
	}
	v.opMu.Lock()
	defer v.opMu.Unlock()
	if v.instance() != nil {
		if !force {
			return fmt.Errorf("VM %q is %s; stop it first: %w", name, v.state(), ErrConflict)
		}
		if err := v.killLocked(); err != nil {
			return err
		}
	}
	a.mu.Lock()
	delete(a.vms, name)
	a.mu.Unlock()
	v.detach()
	a.cg.remove(name)
	if err := os.RemoveAll(v.dir); err != nil {
		return fmt.Errorf("Failed to remove files of VM %q: %w", name, err)
	}
	return nil
}

// Start boots a defined or stopped VM.
func (a *Agent) Start(ctx context.Context, name string) error {
	v, err := a.get(name)
	if err != nil {
		return err
	}
	v.opMu.Lock()
	defer v.opMu.Unlock()
	return v.startLocked(ctx, false)
}

// Stop asks the guest to power off (ACPI) and kills QEMU after timeout.
func (a *Agent) Stop(ctx context.Context, name string, timeout time.Duration) error {
	v, err := a.get(name)
	if err != nil {
		return err
	}
	v.opMu.Lock()
	defer v.opMu.Unlock()
	return v.stopLocked(ctx, timeout)
}

// Reboot resets the VM (as the reset button does).
func (a *Agent) Reboot(ctx context.Context, name string) error {
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
	if err := inst.Monitor.Execute(ctx, "system_reset", nil, nil); err != nil {
		return fmt.Errorf("Failed to reset VM %q: %w", name, err)
	}
	v.console.note("\r\n[grow: VM reset]\r\n")
	return nil
}

// Kill ends QEMU at once.
func (a *Agent) Kill(ctx context.Context, name string) error {
	v, err := a.get(name)
	if err != nil {
		return err
	}
	v.opMu.Lock()
	defer v.opMu.Unlock()
	if v.instance() == nil {
		return fmt.Errorf("VM %q is not running: %w", name, ErrConflict)
	}
	return v.killLocked()
}

// Counters returns a VM's traffic counters, summed over its NICs and kept across restarts.
func (a *Agent) Counters(name string) (hostapi.Counters, error) {
	v, err := a.get(name)
	if err != nil {
		return hostapi.Counters{}, err
	}
	return v.counters(), nil
}

// ConsoleLog returns the recent console output (scrollback) of a VM.
func (a *Agent) ConsoleLog(name string) ([]byte, error) {
	v, err := a.get(name)
	if err != nil {
		return nil, err
	}
	return v.console.scrollback(), nil
}

// writeJSONFile replaces path with x as JSON through a rename; with durable, the data
// is fsynced first (for records a restarted agent needs, such as a new QEMU's pid).
func writeJSONFile(path string, x any, durable bool) error {
	b, err := json.MarshalIndent(x, "", "  ")
	if err != nil {
		return fmt.Errorf("Failed to encode %q: %w", path, err)
	}
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return fmt.Errorf("Failed to write %q: %w", tmp, err)
	}
	if _, err := f.Write(append(b, '\n')); err != nil {
		f.Close()
		return fmt.Errorf("Failed to write %q: %w", tmp, err)
	}
	if durable {
		if err := f.Sync(); err != nil {
			f.Close()
			return fmt.Errorf("Failed to sync %q: %w", tmp, err)
		}
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("Failed to close %q: %w", tmp, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("Failed to replace %q: %w", path, err)
	}
	return nil
}
