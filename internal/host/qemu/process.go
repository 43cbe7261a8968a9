// Package qemu is the host agent's QEMU driver: it builds a command line from a VM spec,
// starts QEMU in its own session so that it outlives the agent, drives it over QMP,
// reattaches to a running QEMU by its QMP socket, and notices its death with a reason.
// It must never decide policy (placement, limits, networking): the agent does that.
package qemu

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Instance is one running QEMU process and its QMP connection.
type Instance struct {
	PID     int
	Monitor *Monitor
	cfg     Config

	child    *exec.Cmd // nil when reattached
	exited   chan struct{}
	mu       sync.Mutex
	reason   string // last SHUTDOWN event reason
	exitDesc string
	logFrom  int64 // where this run's output starts in QEMU's log
}

// DetectAccel returns "kvm" when the CPU advertises hardware virtualisation (vmx or
// svm in /proc/cpuinfo) and /dev/kvm opens and answers, else "tcg". Both checks are
// needed: some nested setups expose a /dev/kvm that cannot run a guest.
func DetectAccel() string {
	info, err := os.ReadFile("/proc/cpuinfo")
	if err != nil || !cpuHasVirt(string(info)) {
		return "tcg"
	}
	fd, err := unix.Open("/dev/kvm", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return "tcg"
	}
	defer unix.Close(fd)
	const kvmGetAPIVersion = 0xAE00
	v, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), kvmGetAPIVersion, 0)
	if errno != 0 || v != 12 {
		return "tcg"
	}
	return "kvm"
}

// cpuHasVirt reports whether a /proc/cpuinfo text lists the vmx or svm flag.
func cpuHasVirt(cpuinfo string) bool {
	for _, line := range strings.Split(cpuinfo, "\n") {
		k, v, ok := strings.Cut(line, ":")
		if !ok || strings.TrimSpace(k) != "flags" {
			continue
		}
		for _, f := range strings.Fields(v) {
			if f == "vmx" || f == "svm" {
				return true
			}
		}
		return false
	}
	return false
}

// Start launches QEMU for cfg in a new session, waits for its QMP socket and returns
// the instance. onEvent receives every QMP event (it must not block).
func Start(ctx context.Context, cfg Config, onEvent func(Event)) (*Instance, error) {
	args, err := cfg.Args()
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(cfg.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("Failed to create VM directory %q: %w", cfg.Dir, err)
	}
	for _, p := range []string{cfg.QMPPath(), cfg.ConsolePath()} {
		if err := os.Remove(p); err != nil && !os.IsNotExist(err) {
			return nil, fmt.Errorf("Failed to remove stale socket %q: %w", p, err)
		}
	}
	logf, err := os.OpenFile(cfg.LogPath(), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, fmt.Errorf("Failed to open QEMU log %q: %w", cfg.LogPath(), err)
	}
	defer logf.Close()
	fmt.Fprintf(logf, "--- %s starting: %s\n", time.Now().UTC().Format(time.RFC3339), strings.Join(args, " "))
	var logFrom int64
	if st, err := logf.Stat(); err == nil {
		logFrom = st.Size()
	}
	cmd := exec.Command(args[0], args[1:]...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Dir = cfg.Dir
	// A session of its own: the agent's death, restart or signals never reach QEMU.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("Failed to start QEMU for %q: %w", cfg.Spec.Name, err)
	}
	inst := &Instance{PID: cmd.Process.Pid, cfg: cfg, child: cmd, exited: make(chan struct{}), logFrom: logFrom}
	waited := make(chan struct{})
	go func() {
		err := cmd.Wait()
		inst.mu.Lock()
		if err != nil {
			inst.exitDesc = err.Error()
		} else {
			inst.exitDesc = "exit status 0"
		}
		inst.mu.Unlock()
		close(waited)
	}()
	qctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	go func() {
		select {
		case <-waited:
			cancel()
		case <-qctx.Done():
		}
	}()
	mon, err := DialQMP(qctx, cfg.QMPPath(), inst.handleEvent(onEvent))
	if err != nil {
		_ = cmd.Process.Kill()
		<-waited
		return nil, fmt.Errorf("QEMU for %q did not come up (%s): %w; log: %s", cfg.Spec.Name, inst.exitDesc, err, tail(cfg.LogPath(), logFrom, 600))
	}
	inst.Monitor = mon
	go func() {
		<-mon.Done()
		select {
		case <-waited:
		case <-time.After(2 * time.Second):
			// QMP closed but QEMU lives on (someone closed our socket): treat as alive
			// until the process really exits.
			<-waited
		}
		close(inst.exited)
	}()
	return inst, nil
}

// Attach reconnects to a QEMU started earlier (by this or a previous agent) for cfg.
// It refuses a pid that is not that VM's QEMU, so a recycled pid is never adopted.
func Attach(ctx context.Context, cfg Config, pid int, onEvent func(Event)) (*Instance, error) {
	if !IsQEMUFor(pid, cfg.QMPPath()) {
		return nil, fmt.Errorf("Process %d is not the QEMU of %q", pid, cfg.Spec.Name)
	}
	inst := &Instance{PID: pid, cfg: cfg, exited: make(chan struct{})}
	if st, err := os.Stat(cfg.LogPath()); err == nil {
		inst.logFrom = st.Size()
	}
	qctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	mon, err := DialQMP(qctx, cfg.QMPPath(), inst.handleEvent(onEvent))
	if err != nil {
		return nil, fmt.Errorf("Failed to reattach to QEMU %d of %q: %w", pid, cfg.Spec.Name, err)
	}
	inst.Monitor = mon
	go func() {
		<-mon.Done()
		// Not our child: poll until the process is gone (QEMU closes QMP as it exits).
		for i := 0; i < 200 && processAlive(pid); i++ {
			time.Sleep(10 * time.Millisecond)
		}
		inst.mu.Lock()
		if processAlive(pid) {
			inst.exitDesc = "QMP connection lost"
		} else {
			inst.exitDesc = "process exited"
		}
		inst.mu.Unlock()
		close(inst.exited)
	}()
	return inst, nil
}

func (inst *Instance) handleEvent(next func(Event)) func(Event) {
	return func(ev Event) {
		if ev.Event == "SHUTDOWN" {
			inst.mu.Lock()
			if r, ok := ev.Data["reason"].(string); ok {
				inst.reason = r
			}
			inst.mu.Unlock()
		}
		if next != nil {
			next(ev)
		}
	}
}

// Exited is closed once QEMU has exited (noticed within a second).
func (inst *Instance) Exited() <-chan struct{} { return inst.exited }

// ExitReason describes why QEMU exited: the SHUTDOWN reason QEMU gave, else how the
// process ended, with the last lines of QEMU's log when it failed.
func (inst *Instance) ExitReason() string {
	inst.mu.Lock()
	defer inst.mu.Unlock()
	switch {
	case inst.reason != "":
		return inst.reason
	case inst.exitDesc == "exit status 0":
		return "exited"
	default:
		t := tail(inst.cfg.LogPath(), inst.logFrom, 300)
		if t == "" {
			return inst.exitDesc
		}
		return inst.exitDesc + ": " + t
	}
}

// Kill sends SIGKILL to QEMU and waits (up to 5 s) for it to be gone.
func (inst *Instance) Kill() error {
	if err := syscall.Kill(inst.PID, syscall.SIGKILL); err != nil && err != syscall.ESRCH {
		return fmt.Errorf("Failed to kill QEMU %d: %w", inst.PID, err)
	}
	select {
	case <-inst.exited:
		return nil
	case <-time.After(5 * time.Second):
		return fmt.Errorf("QEMU %d did not exit after SIGKILL", inst.PID)
	}
}

// Quit asks QEMU to exit at once (no guest shutdown) and waits for it; it kills on timeout.
func (inst *Instance) Quit(ctx context.Context) error {
	qctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	_ = inst.Monitor.Execute(qctx, "quit", nil, nil)
	select {
	case <-inst.exited:
		return nil
	case <-time.After(3 * time.Second):
		return inst.Kill()
	}
}

// IsQEMUFor reports whether pid is alive and is a QEMU using qmpPath.
func IsQEMUFor(pid int, qmpPath string) bool {
	if pid <= 0 {
		return false
	}
	b, err := os.ReadFile(filepath.Join("/proc", fmt.Sprint(pid), "cmdline"))
	if err != nil {
		return false
	}
	if !processAlive(pid) {
		return false
	}
	return bytes.Contains(b, []byte("path="+optValue(qmpPath)+","))
}

// processAlive reports whether pid exists and is not a zombie.
func processAlive(pid int) bool {
	b, err := os.ReadFile(filepath.Join("/proc", fmt.Sprint(pid), "stat"))
	if err != nil {
		return false
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 || i+2 >= len(b) {
		return false
	}
	return b[i+2] != 'Z' && b[i+2] != 'X'
}

// tail returns up to n bytes of the end of a file after offset from, on one line.
func tail(path string, from, n int64) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return ""
	}
	off := max(st.Size()-n, from, 0)
	if off >= st.Size() {
		return ""
	}
	buf := make([]byte, st.Size()-off)
	_, _ = f.ReadAt(buf, off)
	return strings.TrimSpace(strings.ReplaceAll(strings.TrimSpace(string(buf)), "\n", " | "))
}
