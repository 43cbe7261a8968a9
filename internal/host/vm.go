package host

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"github.com/growserver/grow/internal/host/agentclient"
	"github.com/growserver/grow/internal/host/hostapi"
	"github.com/growserver/grow/internal/host/qemu"
	"github.com/growserver/grow/internal/network"
	"github.com/growserver/grow/internal/revert"
)

// record is what the agent persists per VM in DATA/vms/NAME/vm.json.
type record struct {
	Spec       hostapi.VMSpec `json:"spec"`
	State      string         `json:"state"`
	PID        int            `json:"pid,omitempty"`
	Accel      string         `json:"accel,omitempty"`
	Incoming   bool           `json:"incoming,omitempty"`
	ExitReason string         `json:"exit_reason,omitempty"`
	StartedAt  time.Time      `json:"started_at,omitempty"`
	Taps       []string       `json:"taps,omitempty"`
	// Counters holds the traffic of taps that no longer exist; TapSeen the last values
	// read from the live taps (to notice a tap recreated behind our back).
	Counters hostapi.Counters   `json:"counters"`
	TapSeen  []hostapi.Counters `json:"tap_seen,omitempty"`
	// MigratingTo names the destination while the VM migrates out (the file is 0600).
	MigratingTo *migrationTarget `json:"migrating_to,omitempty"`
}

// migrationTarget is the destination agent of a migration in flight.
type migrationTarget struct {
	URL    string `json:"url"`
	Token  string `json:"token"`
	CACert string `json:"ca_cert,omitempty"`
}

// vm is one VM of the agent. opMu serialises lifecycle operations; mu guards rec and inst.
type vm struct {
	a       *Agent
	name    string
	dir     string
	opMu    sync.Mutex
	mu      sync.Mutex
	rec     record
	inst    *qemu.Instance
	console *console
	// expectExit is set while the agent itself ends QEMU (kill, quit after migration).
	expectExit string
	// hotplugged is set once memory or vCPUs were added to the running QEMU.
	hotplugged bool
	// migEvents, while this VM migrates out, receives QEMU's migration states.
	migEvents chan migEvent
	// onSwitchover, while this VM migrates out, signals the destination at the STOP.
	onSwitchover func()
	// arrival, while this VM migrates in, is its prepared announcement.
	arrival *arrival
}

// migEvent is a migration state (or "stop") with the time QEMU stamped on its event.
type migEvent struct {
	state string
	at    time.Time
}

// eventTime is the time QEMU stamped on ev.
func eventTime(ev qemu.Event) time.Time {
	return time.Unix(ev.Timestamp.Seconds, ev.Timestamp.Microseconds*1000)
}

func (v *vm) markHotplugged() {
	v.mu.Lock()
	v.hotplugged = true
	v.mu.Unlock()
}

func (a *Agent) loadVM(name string) (*vm, error) {
	dir := a.vmDir(name)
	b, err := os.ReadFile(filepath.Join(dir, "vm.json"))
	if err != nil {
		return nil, fmt.Errorf("Failed to read record of VM %q: %w", name, err)
	}
	v := &vm{a: a, name: name, dir: dir}
	if err := json.Unmarshal(b, &v.rec); err != nil {
		return nil, fmt.Errorf("Failed to decode record of VM %q: %w", name, err)
	}
	if v.rec.Spec.Name != name {
		return nil, fmt.Errorf("Record in %q names VM %q", dir, v.rec.Spec.Name)
	}
	return v, nil
}

// persistLocked writes the record (without fsync: for state changes that QEMU itself
// can tell again after a crash); persistDurableLocked also fsyncs it.
func (v *vm) persistLocked() error {
	return writeJSONFile(filepath.Join(v.dir, "vm.json"), v.rec, false)
}

func (v *vm) persistDurableLocked() error {
	return writeJSONFile(filepath.Join(v.dir, "vm.json"), v.rec, true)
}

func (v *vm) persist() error {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.persistLocked()
}

func (v *vm) instance() *qemu.Instance {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.inst
}

func (v *vm) state() string {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.rec.State
}

func (v *vm) setState(s string) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.rec.State != s {
		v.rec.State = s
		_ = v.persistLocked()
	}
}

func (v *vm) info() hostapi.VM {
	v.mu.Lock()
	defer v.mu.Unlock()
	return hostapi.VM{Spec: v.rec.Spec, State: v.rec.State, PID: v.rec.PID, Accel: v.rec.Accel,
		ExitReason: v.rec.ExitReason, StartedAt: v.rec.StartedAt, Taps: append([]string(nil), v.rec.Taps...)}
}

func (v *vm) qemuConfig(taps []string, incoming bool) qemu.Config {
	seed := ""
	if v.rec.Spec.Seed != nil {
		seed = filepath.Join(v.dir, "seed.iso")
	}
	return qemu.Config{Spec: v.rec.Spec, Dir: v.dir, Accel: v.a.accel, Taps: taps, SeedISO: seed,
		Incoming: incoming, Binary: v.a.cfg.QEMUBinary}
}

// startLocked starts QEMU with taps, filters, shaping and limits; with incoming it waits
// for a migration instead of booting. On any error nothing is left behind.
func (v *vm) startLocked(ctx context.Context, incoming bool) error {
	return v.startLockedTraced(ctx, incoming, nil)
}

// startLockedTraced is startLocked with its steps recorded in ph (may be nil).
func (v *vm) startLockedTraced(ctx context.Context, incoming bool, ph *phases) error {
	if v.instance() != nil {
		return fmt.Errorf("VM %q is already %s: %w", v.name, v.state(), ErrConflict)
	}
	spec := v.rec.Spec
	r := revert.New()
	defer r.Fail()
	// The seed ISO is written while the taps are made.
	seedErr := make(chan error, 1)
	if spec.Seed != nil {
		go func() { seedErr <- writeSeedISO(filepath.Join(v.dir, "seed.iso"), *spec.Seed) }()
	} else {
		seedErr <- nil
	}
	taps := make([]string, len(spec.NICs))
	for i, n := range spec.NICs {
		tap := network.TapName(v.name, i)
		taps[i] = tap
		if err := network.EnsureBridge(n.Bridge); err != nil {
			<-seedErr
			return err
		}
		if err := network.CreateTap(tap, n.Bridge, n.MAC); err != nil {
			<-seedErr
			return err
		}
		r.Add(func() { _ = network.DeleteTap(tap) })
		r.Add(func() { _ = network.RemoveFilter(tap) })
	}
	ph.mark("taps")
	if err := <-seedErr; err != nil {
		return fmt.Errorf("Failed to write cloud-init seed of VM %q: %w", v.name, err)
	}
	ph.mark("seed")
	// Filters and shaping: before QEMU for a booting guest; for an incoming one (whose
	// guest cannot send before the migration that only starts after we return) while
	// QEMU starts.
	netErr := make(chan error, 1)
	applyNet := func() {
		for i, n := range spec.NICs {
			if err := network.ApplyFilter(network.FilterSpec{Tap: taps[i], MAC: n.MAC, IPv4: n.IPv4, IPv6: n.IPv6}); err != nil {
				netErr <- err
				return
			}
			if n.InRate > 0 || n.OutRate > 0 {
				if err := network.Shape(taps[i], n.InRate, n.OutRate); err != nil {
					netErr <- err
					return
				}
			}
		}
		netErr <- nil
	}
	if incoming {
		go applyNet()
	} else {
		applyNet()
		if err := <-netErr; err != nil {
			return err
		}
		netErr <- nil
	}
	cfg := v.qemuConfig(taps, incoming)
	if v.console == nil {
		v.console = newConsole(cfg.ConsolePath(), cfg.ConsoleLog())
	}
	inst, err := qemu.Start(ctx, cfg, v.onEvent)
	ph.mark("qemu")
	if nerr := <-netErr; err == nil && nerr != nil {
		_ = inst.Kill()
		return nerr
	}
	if err != nil {
		return err
	}
	r.Add(func() { _ = inst.Kill() })
	ph.mark("filters")
	if err := v.a.cg.apply(v.name, inst.PID, spec.Limits); err != nil {
		return fmt.Errorf("Failed to apply limits to VM %q: %w", v.name, err)
	}
	v.mu.Lock()
	v.inst = inst
	v.expectExit = ""
	v.hotplugged = false
	v.rec.PID = inst.PID
	v.rec.Accel = v.a.accel
	v.rec.Taps = taps
	v.rec.TapSeen = make([]hostapi.Counters, len(taps))
	v.rec.Incoming = incoming
	v.rec.ExitReason = ""
	v.rec.StartedAt = time.Now().UTC()
	if incoming {
		v.rec.State = hostapi.StateIncoming
	} else {
		v.rec.State = hostapi.StateRunning
	}
	// No fsync: the pid only matters while QEMU runs, which a power loss ends too.
	err = v.persistLocked()
	v.mu.Unlock()
	if err != nil {
		v.mu.Lock()
		v.inst = nil
		v.mu.Unlock()
		return err
	}
	r.Success()
	v.console.attach(inst.Exited())
	go v.watch(inst)
	return nil
}

// notifyMigration passes a migration state to the migration in progress, if any.
func (v *vm) notifyMigration(st string, at time.Time) {
	v.mu.Lock()
	ch := v.migEvents
	v.mu.Unlock()
	if ch != nil {
		select {
		case ch <- migEvent{st, at}:
		default:
		}
	}
}

// onEvent follows QEMU's run state from QMP events.
func (v *vm) onEvent(ev qemu.Event) {
	switch ev.Event {
	case "MIGRATION":
		st, _ := ev.Data["status"].(string)
		v.notifyMigration(st, eventTime(ev))
	case "STOP":
		// While migrating out, the guest stops here for the switch-over (QEMU 7.2 emits
		// no "device" state unless pause-before-switchover is on): signal the
		// destination first, from this event reader, since every millisecond before
		// it announces the guest loses frames.
		v.mu.Lock()
		signal := v.onSwitchover
		v.mu.Unlock()
		if signal != nil {
			signal()
		}
		v.notifyMigration("stop", eventTime(ev))
		v.mu.Lock()
		if v.rec.State == hostapi.StateRunning {
			v.rec.State = hostapi.StatePaused
			_ = v.persistLocked()
		}
		v.mu.Unlock()
	case "RESUME":
		v.mu.Lock()
		cameIn := v.rec.State == hostapi.StateIncoming
		if v.rec.State != hostapi.StateMigrating {
			v.rec.State = hostapi.StateRunning
			v.rec.Incoming = false
			_ = v.persistLocked()
		}
		nics, taps := v.rec.Spec.NICs, v.rec.Taps
		v.mu.Unlock()
		if cameIn {
			// The guest now runs here: say so on the network at once rather than
			// when the (possibly slow) guest gets to it, then tell the source.
			if arr := v.takeArrival(); arr != nil {
				arr.announce()
				arr.resumed()
				arr.close()
			} else {
				v.announce(nics, taps)
			}
			v.a.log.Info("Migrated-in VM resumed", "vm", v.name, "qemu_at", eventTime(ev).Format("15:04:05.000000"))
		}
	}
}

// announce points the network at this host's taps for the VM's NICs.
func (v *vm) announce(nics []hostapi.NIC, taps []string) {
	for i, n := range nics {
		if i < len(taps) {
			if err := network.Announce(n.Bridge, taps[i], n.MAC); err != nil {
				v.a.log.Warn("Failed to announce a NIC", "vm", v.name, "tap", taps[i], "err", err)
			}
		}
	}
}

// watch waits for QEMU to exit and cleans up its host side.
func (v *vm) watch(inst *qemu.Instance) {
	<-inst.Exited()
	v.mu.Lock()
	if v.inst != inst {
		v.mu.Unlock()
		return
	}
	if arr := v.arrival; arr != nil {
		v.arrival = nil
		defer arr.close()
	}
	reason := inst.ExitReason()
	if v.expectExit != "" {
		reason = v.expectExit
	}
	v.mu.Unlock()
	v.cleanupHost()
	v.mu.Lock()
	v.inst = nil
	v.rec.State = hostapi.StateStopped
	v.rec.PID = 0
	v.rec.Incoming = false
	v.rec.ExitReason = reason
	_ = v.persistLocked()
	v.mu.Unlock()
	v.a.log.Info("VM stopped", "vm", v.name, "reason", reason)
}

// cleanupHost folds the taps' counters into the record and removes taps, rules and cgroup.
func (v *vm) cleanupHost() {
	v.mu.Lock()
	v.foldCountersLocked(true)
	taps := v.rec.Taps
	v.rec.Taps = nil
	v.rec.TapSeen = nil
	if v.expectExit == exitMigratedAway {
		_ = v.persistLocked() // the record goes next; the destination counts on
	} else {
		_ = v.persistDurableLocked() // the folded counters must survive
	}
	v.mu.Unlock()
	for _, t := range taps {
		if err := network.RemoveFilter(t); err != nil {
			v.a.log.Warn("Failed to remove filter", "vm", v.name, "tap", t, "err", err)
		}
		if err := network.DeleteTap(t); err != nil {
			v.a.log.Warn("Failed to delete tap", "vm", v.name, "tap", t, "err", err)
		}
	}
	v.a.cg.remove(v.name)
}

// foldCountersLocked reads the live taps; with final, their counts move into the base.
func (v *vm) foldCountersLocked(final bool) hostapi.Counters {
	total := v.rec.Counters
	for i, t := range v.rec.Taps {
		rx, tx, err := network.ReadCounters(t)
		if err != nil {
			continue
		}
		if i < len(v.rec.TapSeen) {
			seen := &v.rec.TapSeen[i]
			if rx < seen.RxBytes || tx < seen.TxBytes { // the tap was recreated
				v.rec.Counters.RxBytes += seen.RxBytes
				v.rec.Counters.TxBytes += seen.TxBytes
				total = v.rec.Counters
			}
			seen.RxBytes, seen.TxBytes = rx, tx
		}
		total.RxBytes += rx
		total.TxBytes += tx
	}
	if final {
		v.rec.Counters = total
		for i := range v.rec.TapSeen {
			v.rec.TapSeen[i] = hostapi.Counters{}
		}
	}
	return total
}

func (v *vm) counters() hostapi.Counters {
	v.mu.Lock()
	defer v.mu.Unlock()
	c := v.foldCountersLocked(false)
	_ = v.persistLocked()
	return c
}

// killLocked SIGKILLs QEMU and waits for the cleanup.
func (v *vm) killLocked() error {
	inst := v.instance()
	if inst == nil {
		return nil
	}
	v.mu.Lock()
	v.expectExit = "killed by the agent"
	v.mu.Unlock()
	if err := inst.Kill(); err != nil {
		return fmt.Errorf("Failed to kill VM %q: %w", v.name, err)
	}
	v.waitGone(inst, 5*time.Second)
	return nil
}

// waitGone waits until the watcher has recorded inst's exit.
func (v *vm) waitGone(inst *qemu.Instance, d time.Duration) {
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		if v.instance() != inst {
			return
		}
		time.Sleep(2 * time.Millisecond)
	}
}

func (v *vm) stopLocked(ctx context.Context, timeout time.Duration) error {
	inst := v.instance()
	if inst == nil {
		return fmt.Errorf("VM %q is not running: %w", v.name, ErrConflict)
	}
	if v.state() == hostapi.StateRunning {
		if err := inst.Monitor.Execute(ctx, "system_powerdown", nil, nil); err != nil {
			v.a.log.Warn("ACPI powerdown failed, killing", "vm", v.name, "err", err)
		} else {
			select {
			case <-inst.Exited():
				v.waitGone(inst, 5*time.Second)
				return nil
			case <-time.After(timeout):
			case <-ctx.Done():
			}
		}
	}
	v.mu.Lock()
	v.expectExit = fmt.Sprintf("forced off after %s without ACPI shutdown", timeout)
	v.mu.Unlock()
	if err := inst.Kill(); err != nil {
		return fmt.Errorf("Failed to force VM %q off: %w", v.name, err)
	}
	v.waitGone(inst, 5*time.Second)
	return nil
}

// recover reattaches to the QEMU a previous agent left running, or records that it is gone.
func (v *vm) recover(ctx context.Context) {
	v.mu.Lock()
	pid, taps := v.rec.PID, v.rec.Taps
	incoming := v.rec.Incoming
	v.mu.Unlock()
	if pid == 0 {
		return
	}
	cfg := v.qemuConfig(taps, incoming)
	v.console = newConsole(cfg.ConsolePath(), cfg.ConsoleLog())
	inst, err := qemu.Attach(ctx, cfg, pid, v.onEvent)
	if err != nil {
		v.a.log.Warn("QEMU of VM gone while the agent was down", "vm", v.name, "err", err)
		if mt := v.rec.MigratingTo; mt != nil {
			// It may have gone because the migration completed: the VM then lives on.
			go v.forgetIfMigrated(*mt)
		}
		v.cleanupHost()
		v.mu.Lock()
		v.rec.State, v.rec.PID, v.rec.Incoming = hostapi.StateStopped, 0, false
		v.rec.ExitReason = "QEMU exited while the agent was not running"
		_ = v.persistLocked()
		v.mu.Unlock()
		return
	}
	st, err := inst.Monitor.Status(ctx)
	state := hostapi.StateRunning
	switch {
	case err != nil:
	case st == "inmigrate":
		state = hostapi.StateIncoming
	case st == "running":
		state = hostapi.StateRunning
	default:
		state = hostapi.StatePaused
	}
	v.mu.Lock()
	v.inst = inst
	v.rec.State = state
	_ = v.persistLocked()
	v.mu.Unlock()
	v.console.attach(inst.Exited())
	go v.watch(inst)
	v.a.log.Info("Reattached to running VM", "vm", v.name, "pid", pid, "status", st)
	v.mu.Lock()
	migrating := v.rec.MigratingTo != nil
	v.mu.Unlock()
	if migrating {
		// Settled in the background, holding the VM's operation lock.
		go func() {
			v.opMu.Lock()
			defer v.opMu.Unlock()
			v.recoverMigration()
		}()
	}
}

// forgetIfMigrated drops the record of a VM whose QEMU vanished while it migrated out,
// if the destination reports that it runs the guest.
func (v *vm) forgetIfMigrated(mt migrationTarget) {
	target, err := agentclient.NewWithCAPEM(mt.URL, mt.Token, mt.CACert)
	if err != nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	vmi, err := target.Get(ctx, v.name)
	if err != nil || vmi.State != hostapi.StateRunning {
		v.a.log.Warn("VM stopped during a migration and the destination does not run it", "vm", v.name, "err", err)
		return
	}
	v.opMu.Lock()
	defer v.opMu.Unlock()
	v.a.log.Info("VM migrated while the agent was down; forgetting it here", "vm", v.name, "target", mt.URL)
	v.dropMigrated(ctx, nil)
}

// detach drops the agent's connections to QEMU without touching the process.
func (v *vm) detach() {
	v.mu.Lock()
	inst := v.inst
	v.inst = nil // the watcher then leaves the record alone
	c := v.console
	arr := v.arrival
	v.arrival = nil
	v.mu.Unlock()
	if arr != nil {
		arr.close()
	}
	if inst != nil {
		_ = inst.Monitor.Close()
	}
	if c != nil {
		c.close()
	}
}

// freePort returns a TCP port that is free on host right now.
func freePort(host string) (int, error) {
	l, err := net.Listen("tcp", net.JoinHostPort(host, "0"))
	if err != nil {
		return 0, fmt.Errorf("Failed to find a free port on %q: %w", host, err)
	}
	defer l.Close()
	_, p, _ := net.SplitHostPort(l.Addr().String())
	return strconv.Atoi(p)
}
