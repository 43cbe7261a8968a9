// Command growguest is the agent of the tiny test guest. Started by the guest's init,
// it applies the cloud-init NoCloud seed (hostname, network-config v2, SSH keys),
// prints the machine-readable ready line on the console and runs the test workloads
// chosen on the kernel command line or in user-data: a serial counter, a disk writer
// of self-checking blocks and a network responder. It runs only inside the test
// guest and must never be installed on a host: it reconfigures the network and
// writes raw blocks to the data disk.
package main

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/growserver/grow/guest/seed"
)

// console serialises whole lines onto the serial console.
type console struct{ mu sync.Mutex }

func (c *console) printf(format string, args ...any) {
	line := fmt.Sprintf(format, args...)
	if !strings.HasSuffix(line, "\n") {
		line += "\n"
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	_, _ = os.Stdout.WriteString(line)
}

var out console

// state is what the responder reports.
type state struct {
	hostname string
	counter  atomic.Uint64
	acked    atomic.Uint64
}

// config is the merged workload configuration.
type config struct {
	run             map[string]bool
	disk            string
	slots           uint64
	port            int
	httpPort        int
	counterInterval time.Duration
	writeInterval   time.Duration
}

func main() {
	_ = os.WriteFile("/proc/sys/kernel/printk", []byte("1 4 1 7"), 0o644)
	go watchPowerButton()

	st := &state{}
	cmdline, _ := os.ReadFile("/proc/cmdline")
	cfg := defaultConfig()
	applyCmdline(&cfg, string(cmdline))

	sd, err := loadSeed()
	if err != nil {
		out.printf("GROW-ERROR %v", err)
	}
	if sd.user.GrowTest != nil {
		if err := applyGrowTest(&cfg, sd.user.GrowTest); err != nil {
			out.printf("GROW-ERROR %v", err)
		}
	}

	st.hostname = sd.hostname()
	if err := setHostname(st.hostname); err != nil {
		out.printf("GROW-ERROR %v", err)
	}
	ips, err := configureNetwork(sd.network)
	if err != nil {
		out.printf("GROW-ERROR %v", err)
	}
	if err := installKeys(sd.user.AuthorizedKeys()); err != nil {
		out.printf("GROW-ERROR %v", err)
	}
	if sd.script != nil {
		runScript(sd.script)
	}

	ipList := "none"
	if len(ips) > 0 {
		ipList = strings.Join(ips, ",")
	}
	var runs []string
	for _, w := range []string{"counter", "diskwriter", "responder"} {
		if cfg.run[w] {
			runs = append(runs, w)
		}
	}
	runList := "none"
	if len(runs) > 0 {
		runList = strings.Join(runs, ",")
	}
	root := rootDisk()
	if root == "" {
		root = "initramfs"
	}
	out.printf("GROW-READY hostname=%s ip=%s instance-id=%s seed=%t keys=%d run=%s root=%s",
		st.hostname, ipList, orNone(sd.meta.InstanceID), sd.found, len(sd.user.AuthorizedKeys()), runList, root)

	if cfg.run["counter"] {
		go runCounter(st, cfg.counterInterval)
	}
	if cfg.run["responder"] {
		if err := startResponder(st, cfg.port, cfg.httpPort); err != nil {
			out.printf("GROW-ERROR %v", err)
		}
	}
	if cfg.run["diskwriter"] || cfg.run["verify"] {
		// verify reports what is on the disk before the writer adds to it.
		go func() {
			if cfg.run["verify"] {
				if err := runVerify(cfg, sd.seedDisk); err != nil {
					out.printf("GROW-VERIFY-ERROR %v", err)
				}
			}
			if cfg.run["diskwriter"] {
				if err := runWriter(st, cfg, sd.seedDisk); err != nil {
					out.printf("GROW-WRITER-ERROR %v", err)
				}
			}
		}()
	}

	// Stay alive: init respawns the agent if it ever exits.
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	<-sig
}

func orNone(s string) string {
	if s == "" {
		return "none"
	}
	return s
}

func defaultConfig() config {
	return config{
		run:             map[string]bool{},
		slots:           4096,
		port:            7777,
		httpPort:        80,
		counterInterval: 500 * time.Millisecond,
		writeInterval:   100 * time.Millisecond,
	}
}

// applyCmdline reads grow.* parameters from the kernel command line.
func applyCmdline(cfg *config, cmdline string) {
	gt := &seed.GrowTest{}
	for _, f := range strings.Fields(cmdline) {
		k, v, ok := strings.Cut(f, "=")
		if !ok || !strings.HasPrefix(k, "grow.") {
			continue
		}
		switch strings.TrimPrefix(k, "grow.") {
		case "run":
			gt.Run = append(gt.Run, strings.Split(v, ",")...)
		case "disk":
			gt.Disk = v
		case "slots":
			var n uint64
			if _, err := fmt.Sscan(v, &n); err != nil {
				out.printf("GROW-ERROR bad grow.slots=%q", v)
				continue
			}
			gt.Slots = n
		case "port":
			_, _ = fmt.Sscan(v, &gt.Port)
		case "http_port":
			_, _ = fmt.Sscan(v, &gt.HTTPPort)
		case "counter_interval":
			gt.CounterInterval = v
		case "write_interval":
			gt.WriteInterval = v
		}
	}
	if err := applyGrowTest(cfg, gt); err != nil {
		out.printf("GROW-ERROR %v", err)
	}
}

// applyGrowTest merges one grow_test section into cfg (workloads add up).
func applyGrowTest(cfg *config, gt *seed.GrowTest) error {
	var errs []error
	for _, r := range gt.Run {
		r = strings.TrimSpace(r)
		switch r {
		case "":
		case "counter", "diskwriter", "responder", "verify":
			cfg.run[r] = true
		default:
			errs = append(errs, fmt.Errorf("unknown workload %q", r))
		}
	}
	if gt.Disk != "" {
		cfg.disk = gt.Disk
	}
	if gt.Slots > 0 {
		cfg.slots = gt.Slots
	}
	if gt.Port > 0 {
		cfg.port = gt.Port
	}
	if gt.HTTPPort > 0 {
		cfg.httpPort = gt.HTTPPort
	}
	for _, d := range []struct {
		s   string
		dst *time.Duration
	}{{gt.CounterInterval, &cfg.counterInterval}, {gt.WriteInterval, &cfg.writeInterval}} {
		if d.s == "" {
			continue
		}
		v, err := time.ParseDuration(d.s)
		if err != nil || v < 0 {
			errs = append(errs, fmt.Errorf("bad interval %q", d.s))
			continue
		}
		*d.dst = v
	}
	return errors.Join(errs...)
}

func setHostname(name string) error {
	if err := syscall.Sethostname([]byte(name)); err != nil {
		return fmt.Errorf("Failed to set hostname %q: %w", name, err)
	}
	_ = os.WriteFile("/etc/hostname", []byte(name+"\n"), 0o644)
	hosts := fmt.Sprintf("127.0.0.1 localhost\n127.0.1.1 %s\n::1 localhost ip6-localhost\n", name)
	_ = os.WriteFile("/etc/hosts", []byte(hosts), 0o644)
	return nil
}

func installKeys(keys []string) error {
	if len(keys) == 0 {
		return nil
	}
	if err := os.MkdirAll("/root/.ssh", 0o700); err != nil {
		return fmt.Errorf("Failed to create /root/.ssh: %w", err)
	}
	data := strings.Join(keys, "\n") + "\n"
	if err := os.WriteFile("/root/.ssh/authorized_keys", []byte(data), 0o600); err != nil {
		return fmt.Errorf("Failed to write authorized_keys: %w", err)
	}
	return nil
}

// runScript runs non-cloud-config user-data that starts with "#!".
func runScript(script []byte) {
	if !strings.HasPrefix(string(script), "#!") {
		return
	}
	if err := os.WriteFile("/run/user-data", script, 0o700); err != nil {
		out.printf("GROW-ERROR Failed to write user-data script: %v", err)
		return
	}
	cmd := exec.Command("/run/user-data")
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stdout
	if err := cmd.Start(); err != nil {
		out.printf("GROW-ERROR Failed to run user-data script: %v", err)
		return
	}
	go func() { _ = cmd.Wait() }()
}

func runCounter(st *state, every time.Duration) {
	if every <= 0 {
		every = 500 * time.Millisecond
	}
	t := time.NewTicker(every)
	defer t.Stop()
	for range t.C {
		n := st.counter.Add(1)
		out.printf("GROW-COUNTER n=%d", n)
	}
}
