// Package migration benchmarks live migration as `grow hostd` orchestrates it against
// raw QMP `migrate` between two bare QEMU processes, for the same idle guest on the same
// namespace bed in the same run. It runs only when GROW_BENCH_OUT names the Markdown file
// to write (bench/migration.sh sets it); it never runs in `make test`.
package migration

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/growserver/grow/internal/host/hostapi"
	"github.com/growserver/grow/internal/host/qemu"
	"github.com/growserver/grow/test/testbed"
)

// quietBusy is the machine busy share under which a migration counts as run on a
// machine with CPU to spare.
const quietBusy = 0.75

// rounds is how many migrations each side makes (the medians are over these).
const rounds = 10

// Same migration settings on both sides, so the comparison isolates orchestration.
const (
	downtimeLimitMS = 50
	maxBandwidth    = int64(100) << 30
)

type sample struct {
	total, down int64         // as QEMU reports them (ms)
	wall        time.Duration // request to "destination runs, source gone"
	lost        int           // probes of the 50 ms ping stream lost around this migration
	setup       int64         // QEMU's setup time (ms)
	mib         int64         // RAM sent (MiB)
	syncs       int64         // dirty-bitmap passes
	cpu         cpuUse        // CPU used during the wall time
}

// cpuUse is the CPU spent between two snapshots: by the whole machine, by the two
// agents and by this test process (the orchestrator on the raw side, the API client
// on the agent side; its ping readers count on both).
type cpuUse struct {
	machineBusy float64 // share of all CPUs busy, 0-1
	agents      time.Duration
	self        time.Duration
}

func (c cpuUse) String() string {
	return fmt.Sprintf("machine %.0f %% busy, agents %.1f ms CPU, bench process %.1f ms CPU",
		100*c.machineBusy, float64(c.agents.Microseconds())/1000, float64(c.self.Microseconds())/1000)
}

type cpuSnap struct {
	busy, total  uint64 // jiffies over all CPUs (/proc/stat)
	agents, self time.Duration
}

func takeCPU(agents []*testbed.Agent) cpuSnap {
	var s cpuSnap
	if st, err := os.ReadFile("/proc/stat"); err == nil {
		f := strings.Fields(strings.SplitN(string(st), "\n", 2)[0])
		for i, x := range f[1:min(len(f), 9)] { // user .. steal (guest time is in user already)
			n, _ := strconv.ParseUint(x, 10, 64)
			s.total += n
			if i != 3 && i != 4 { // idle, iowait
				s.busy += n
			}
		}
	}
	for _, a := range agents {
		s.agents += procCPU(a.PID())
	}
	s.self = procCPU(os.Getpid())
	return s
}

// procCPU is the CPU time all threads of process pid have run so far, in
// nanoseconds from the scheduler's statistics (0 if unknown).
func procCPU(pid int) time.Duration {
	if pid == 0 {
		return 0
	}
	tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	if err != nil {
		return 0
	}
	var sum time.Duration
	for _, task := range tasks {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/schedstat", pid, task.Name()))
		if err != nil {
			continue
		}
		f := strings.Fields(string(b))
		if len(f) > 0 {
			ns, _ := strconv.ParseInt(f[0], 10, 64)
			sum += time.Duration(ns)
		}
	}
	return sum
}

func (s cpuSnap) since(o cpuSnap) cpuUse {
	c := cpuUse{agents: s.agents - o.agents, self: s.self - o.self}
	if s.total > o.total {
		c.machineBusy = float64(s.busy-o.busy) / float64(s.total-o.total)
	}
	return c
}

func TestMigrationBench(t *testing.T) {
	out := os.Getenv("GROW_BENCH_OUT")
	if out == "" {
		t.Skip("set GROW_BENCH_OUT=FILE.md to run the migration benchmark")
	}
	loadStart = loadAvg()
	b := testbed.New(t, testbed.Options{Hosts: 2})
	agents := b.StartAgents(t)
	ctx := context.Background()
	g := testbed.NewAgentGuest(t, "bench", 0, false, "responder")
	h0 := agents[0]
	if _, err := h0.API.Define(ctx, g.Spec); err != nil {
		t.Fatal(err)
	}
	if err := h0.API.Start(ctx, "bench"); err != nil {
		t.Fatal(err)
	}
	// The raw side: the same kind of guest (own disk, MAC and address), run by hand.
	rg := testbed.NewAgentGuest(t, "benchraw", 1, false, "responder")
	raw := newRawSide(t, b, rg)
	b.WaitQuery(t, g.Responder(), 180*time.Second)
	b.WaitQuery(t, rg.Responder(), 180*time.Second)
	time.Sleep(3 * time.Second) // let both guests settle to idle
	// What each idle guest's QEMU costs (the same guest and command line: it should
	// be the same), over 2 s.
	if vmi, err := h0.API.Get(ctx, "bench"); err == nil {
		a0, r0 := procCPU(vmi.PID), procCPU(raw.src.cmd.Process.Pid)
		time.Sleep(2 * time.Second)
		t.Logf("idle QEMU CPU over 2 s: agent's guest %s, raw guest %s", procCPU(vmi.PID)-a0, procCPU(raw.src.cmd.Process.Pid)-r0)
	}

	// Interleaved, so that both sides see the same machine load. Each guest is pinged
	// every 50 ms from the client throughout.
	pingOurs, pingRaw := b.StartPing(t, g.IP), b.StartPing(t, rg.IP)
	time.Sleep(time.Second)
	var ours, raws []sample
	for i := 0; i < rounds; i++ {
		src, dst := agents[i%2], agents[(i+1)%2]
		from := pingOurs.Stats().MaxSeq
		c0 := takeCPU(agents)
		op, err := src.API.Migrate(ctx, "bench", hostapi.MigrateRequest{TargetURL: dst.PeerURL, TargetToken: dst.Token,
			ListenHost: dst.Host.StorageIP, DowntimeLimitMS: downtimeLimitMS})
		if err != nil {
			t.Fatal(err)
		}
		// The wall time is the agent's own record (operation created until it
		// succeeded), so how often this client polls changes neither the figure nor,
		// at 100 ms, the machine's load much.
		op, err = src.API.Wait(ctx, op.ID, 100*time.Millisecond)
		if err != nil {
			t.Fatalf("agent migration %d: %v", i, err)
		}
		wall := op.Updated.Sub(op.Created)
		cpu := takeCPU(agents).since(c0)
		b.WaitQuery(t, g.Responder(), 20*time.Second)
		time.Sleep(500 * time.Millisecond)
		ours = append(ours, sample{op.TotalTimeMS, op.DowntimeMS, wall, pingOurs.LostBetween(from, pingOurs.Stats().MaxSeq),
			op.SetupTimeMS, op.TransferredBytes >> 20, op.DirtySyncs, cpu})
		t.Logf("agent %d: total %d ms, downtime %d ms, wall %s, %s", i, op.TotalTimeMS, op.DowntimeMS, wall.Round(time.Millisecond), cpu)

		from = pingRaw.Stats().MaxSeq
		c0 = takeCPU(agents)
		r := raw.migrate(t, i)
		r.cpu = takeCPU(agents).since(c0)
		time.Sleep(500 * time.Millisecond)
		r.lost = pingRaw.LostBetween(from, pingRaw.Stats().MaxSeq)
		raws = append(raws, r)
		t.Logf("raw %d: total %d ms, downtime %d ms, wall %s, %s", i, r.total, r.down, r.wall.Round(time.Millisecond), r.cpu)
	}
	writeReport(t, out, ours, raws)
	// The agents' own phase timings, next to the raw side's above.
	for _, a := range agents {
		for _, l := range strings.Split(a.Log(), "\n") {
			if strings.Contains(l, "Migration timing") || strings.Contains(l, "Announced") ||
				strings.Contains(l, "resumed") || strings.Contains(l, "migration prepared") {
				t.Logf("%s: %s", a.Name, l)
			}
		}
	}
}

// bareQEMU is one QEMU started by hand in a host's namespace.
type bareQEMU struct {
	cmd    *exec.Cmd
	mon    *qemu.Monitor
	done   chan struct{}
	events func(*bareQEMU, qemu.Event)
}

func startBare(t *testing.T, h *testbed.Host, spec hostapi.VMSpec, tap, seedISO string, incoming bool, onEvent func(*bareQEMU, qemu.Event)) *bareQEMU {
	t.Helper()
	dir, err := os.MkdirTemp(b0Dir(t), "raw-")
	if err != nil {
		t.Fatal(err)
	}
	cfg := qemu.Config{Spec: spec, Dir: dir, Accel: qemu.DetectAccel(), Taps: []string{tap}, SeedISO: seedISO, Incoming: incoming}
	args, err := cfg.Args()
	if err != nil {
		t.Fatal(err)
	}
	log, err := os.Create(cfg.LogPath())
	if err != nil {
		t.Fatal(err)
	}
	defer log.Close()
	q := &bareQEMU{done: make(chan struct{})}
	q.events = onEvent
	q.cmd = exec.Command("nsenter", append([]string{"--net=/run/netns/" + h.Netns}, args...)...)
	q.cmd.Stdout, q.cmd.Stderr = log, log
	// A session of its own, as the agent starts QEMU: with the scheduler's autogroups,
	// the session decides how much CPU a process gets on a busy machine.
	q.cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := q.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { _ = q.cmd.Wait(); close(q.done) }()
	t.Cleanup(func() { _ = q.cmd.Process.Kill(); <-q.done })
	qctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	q.mon, err = qemu.DialQMP(qctx, cfg.QMPPath(), func(ev qemu.Event) { q.events(q, ev) })
	if err != nil {
		b, _ := os.ReadFile(cfg.LogPath())
		t.Fatalf("bare QEMU: %v: %s", err, b)
	}
	return q
}

var benchDir string

func b0Dir(t *testing.T) string {
	if benchDir == "" {
		benchDir = t.TempDir()
	}
	return benchDir
}

// rawSide is a guest run by bare QEMU processes, migrated with raw QMP commands.
type rawSide struct {
	b       *testbed.Bed
	spec    hostapi.VMSpec
	ip      string
	tap     string
	seedISO string
	mu      sync.Mutex
	src     *bareQEMU
	ph      *phases
	// ended receives the source's terminal MIGRATION states, as the agent's loop does.
	ended chan string
}

// onEvent records when QEMU stopped and resumed a guest, for the phase log, and passes
// the source's terminal migration states on.
func (r *rawSide) onEvent(q *bareQEMU, ev qemu.Event) {
	r.mu.Lock()
	ph, src := r.ph, r.src
	r.mu.Unlock()
	if ph != nil && (ev.Event == "STOP" || ev.Event == "RESUME") {
		ph.markAt("qemu_"+strings.ToLower(ev.Event), time.Unix(ev.Timestamp.Seconds, ev.Timestamp.Microseconds*1000))
	}
	if st, _ := ev.Data["status"].(string); ev.Event == "MIGRATION" && q == src && (st == "completed" || st == "failed" || st == "cancelled") {
		select {
		case r.ended <- st:
		default:
		}
	}
}

// phases records when each step of a raw migration happened (as the agent logs its own).
type phases struct {
	mu    sync.Mutex
	t0    time.Time
	parts []string
}

func (p *phases) mark(name string) { p.markAt(name, time.Now()) }

func (p *phases) markAt(name string, at time.Time) {
	p.mu.Lock()
	p.parts = append(p.parts, fmt.Sprintf("%s=%.1f", name, float64(at.Sub(p.t0).Microseconds())/1000))
	p.mu.Unlock()
}

func (p *phases) String() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return strings.Join(p.parts, " ")
}

func newRawSide(t *testing.T, b *testbed.Bed, g *testbed.AgentGuest) *rawSide {
	spec := g.Spec
	r := &rawSide{b: b, spec: spec, ip: g.IP, tap: "rawtap0", ended: make(chan string, 4)}
	// The same seed, as an ISO the bare QEMUs share.
	r.seedISO = filepath.Join(b0Dir(t), "seed.iso")
	dir := filepath.Join(b0Dir(t), "seed")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	for name, body := range map[string]string{"meta-data": spec.Seed.MetaData, "user-data": spec.Seed.UserData, "network-config": spec.Seed.NetworkConfig} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if out, err := exec.Command("genisoimage", "-quiet", "-output", r.seedISO, "-volid", "cidata", "-joliet", "-rock", dir).CombinedOutput(); err != nil {
		t.Fatalf("genisoimage: %v: %s", err, out)
	}
	for _, h := range b.Hosts {
		for _, c := range [][]string{
			{"-n", h.Netns, "tuntap", "add", "dev", r.tap, "mode", "tap", "vnet_hdr"},
			{"-n", h.Netns, "link", "set", r.tap, "address", "fe" + spec.NICs[0].MAC[2:]},
			{"-n", h.Netns, "link", "set", r.tap, "master", h.Bridge, "up"},
		} {
			if out, err := exec.Command("ip", c...).CombinedOutput(); err != nil {
				t.Fatalf("ip %v: %v: %s", c, err, out)
			}
		}
	}
	src := startBare(t, b.Hosts[0], spec, r.tap, r.seedISO, false, r.onEvent)
	r.mu.Lock()
	r.src = src
	r.mu.Unlock()
	return r
}

// migrate moves the raw guest to the other host: start the destination QEMU, migrate,
// wait until it runs, quit the source (what the agent does, minus its bookkeeping).
func (r *rawSide) migrate(t *testing.T, i int) sample {
	ctx := context.Background()
	dh := r.b.Hosts[(i+1)%2]
	r.mu.Lock()
	src := r.src
	t0 := time.Now()
	ph := &phases{t0: t0}
	r.ph = ph
	r.mu.Unlock()
	dst := startBare(t, dh, r.spec, r.tap, r.seedISO, true, r.onEvent)
	ph.mark("started")
	if err := dst.mon.Execute(ctx, "migrate-set-capabilities", map[string]any{"capabilities": []map[string]any{{"capability": "events", "state": true}}}, nil); err != nil {
		t.Fatal(err)
	}
	l, err := testbed.Listen(dh.Netns, dh.StorageIP+":0")
	if err != nil {
		t.Fatal(err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	l.Close()
	uri := "tcp:" + net.JoinHostPort(dh.StorageIP, strconv.Itoa(port))
	if err := dst.mon.Execute(ctx, "migrate-incoming", map[string]any{"uri": uri}, nil); err != nil {
		t.Fatal(err)
	}
	ph.mark("listening")
	// The capabilities the agent sets on its source.
	if err := src.mon.Execute(ctx, "migrate-set-capabilities", map[string]any{"capabilities": []map[string]any{{"capability": "events", "state": true}}}, nil); err != nil {
		t.Fatal(err)
	}
	if err := src.mon.Execute(ctx, "migrate-set-capabilities", map[string]any{"capabilities": []map[string]any{{"capability": "auto-converge", "state": true}}}, nil); err != nil {
		t.Fatal(err)
	}
	if err := src.mon.Execute(ctx, "migrate-set-parameters", map[string]any{"downtime-limit": downtimeLimitMS, "max-bandwidth": maxBandwidth}, nil); err != nil {
		t.Fatal(err)
	}
	ph.mark("params")
	if err := src.mon.Execute(ctx, "migrate", map[string]any{"uri": uri}, nil); err != nil {
		t.Fatal(err)
	}
	ph.mark("migrate")
	var info qemu.MigrationInfo
	seen := false
	for {
		// The agent's loop: query every 100 ms, and at once on an end state's event.
		select {
		case <-r.ended:
		case <-time.After(100 * time.Millisecond):
		}
		if info, err = src.mon.QueryMigrate(ctx); err != nil {
			t.Fatal(err)
		}
		switch info.Status {
		case "setup", "active", "device", "pre-switchover":
			seen = true
		}
		if info.Status == "completed" && info.TotalTime == 0 {
			// As the agent: before this migration shows up, QEMU may still report the
			// one that brought the guest here; and it flags completion a moment
			// before it records the times.
			if seen {
				time.Sleep(2 * time.Millisecond)
			}
			continue
		}
		if info.Status == "completed" && info.TotalTime > 0 {
			ph.mark("completed")
			break // (a QEMU that came in by migration reports that one as completed, without times)
		}
		if info.Status == "failed" || info.Status == "cancelled" {
			t.Fatalf("raw migration %d %s: %s", i, info.Status, info.ErrorDesc)
		}
	}
	for {
		st, err := dst.mon.Status(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if st == "running" {
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	ph.mark("dest_running")
	_ = src.mon.Execute(ctx, "quit", nil, nil)
	<-src.done
	wall := time.Since(t0)
	ph.mark("source_gone")
	t.Logf("raw %d phases: t0=%s %s qemu total=%d setup=%d down=%d", i, t0.Format("15:04:05.000000"), ph.String(), info.TotalTime, info.SetupTime, info.Downtime)
	r.b.WaitQuery(t, r.ip+":7777", 20*time.Second)
	r.mu.Lock()
	r.src = dst
	r.mu.Unlock()
	smp := sample{total: info.TotalTime, down: info.Downtime, wall: wall, setup: info.SetupTime}
	if info.RAM != nil {
		smp.mib, smp.syncs = info.RAM.Transferred>>20, info.RAM.DirtySync
	}
	return smp
}

func median[T int64 | time.Duration](xs []T) T {
	s := append([]T(nil), xs...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func writeReport(t *testing.T, path string, ours, raw []sample) {
	col := func(s []sample, f func(sample) int64) []int64 {
		var out []int64
		for _, x := range s {
			out = append(out, f(x))
		}
		return out
	}
	total := func(x sample) int64 { return x.total }
	down := func(x sample) int64 { return x.down }
	wall := func(x sample) int64 { return x.wall.Milliseconds() }
	oT, rT := median(col(ours, total)), median(col(raw, total))
	oD, rD := median(col(ours, down)), median(col(raw, down))
	oW, rW := median(col(ours, wall)), median(col(raw, wall))
	orch := func(x sample) int64 { return (x.cpu.agents + x.cpu.self).Microseconds() }
	busy := func(x sample) int64 { return int64(100 * x.cpu.machineBusy) }
	oC, rC := median(col(ours, orch)), median(col(raw, orch))
	oB, rB := median(col(ours, busy)), median(col(raw, busy))
	pct := func(a, b int64) string {
		if b == 0 {
			return "n/a"
		}
		return fmt.Sprintf("%+.1f %%", 100*float64(a-b)/float64(b))
	}
	verdict := func(ok bool) string {
		if ok {
			return "met"
		}
		return "NOT met"
	}
	var sb strings.Builder
	fmt.Fprintf(&sb, "# Live migration: grow hostd vs raw QMP\n\n")
	fmt.Fprintf(&sb, "Run %s on %s (load average %s at the start, %s at the end), accelerator %s, QEMU as installed.\n", time.Now().UTC().Format(time.RFC3339), hostname(), loadStart, loadAvg(), qemu.DetectAccel())
	fmt.Fprintf(&sb, "Two identical idle guests (256 MiB, 1 vCPU, the tiny\n")
	fmt.Fprintf(&sb, "test guest with its responder, NBD root disk, same QEMU command line), one run by the agents, one by\n")
	fmt.Fprintf(&sb, "bare QEMU processes, on the same two network-namespace hosts of the test bed; migrations interleaved\n")
	fmt.Fprintf(&sb, "(agent, raw, agent, ...) so both see the same load; same\n")
	fmt.Fprintf(&sb, "migration settings (auto-converge, downtime limit %d ms, bandwidth unlimited). %d migrations each,\n", downtimeLimitMS, rounds)
	fmt.Fprintf(&sb, "back and forth; medians. *QEMU total* and *downtime* are QEMU's own query-migrate figures. *Wall*\n")
	fmt.Fprintf(&sb, "is from the request until the destination runs and the source QEMU is gone: for the agent, its\n")
	fmt.Fprintf(&sb, "operation's own record from created to succeeded (it defines the VM on the destination, makes its\n")
	fmt.Fprintf(&sb, "taps, filters and seed, starts QEMU, migrates, checks the guest runs there, quits the source and\n")
	fmt.Fprintf(&sb, "removes its taps and filters); for raw QMP, starting the destination QEMU by hand until the source\n")
	fmt.Fprintf(&sb, "has quit (taps made once, beforehand). Both loops read query-migrate every 100 ms and at once on\n")
	fmt.Fprintf(&sb, "QEMU's end-state MIGRATION event. *Orchestration CPU* is what the agents plus this benchmark\n")
	fmt.Fprintf(&sb, "process (raw side: this process alone; its ping readers count on both sides) ran during the\n")
	fmt.Fprintf(&sb, "wall time; *machine busy* is the share of both CPUs busy then, everything included.\n\n")
	fmt.Fprintf(&sb, "| | grow hostd | raw QMP | overhead |\n|---|---:|---:|---:|\n")
	fmt.Fprintf(&sb, "| QEMU total time (ms), median | %d | %d | %s |\n", oT, rT, pct(oT, rT))
	fmt.Fprintf(&sb, "| QEMU downtime (ms), median | %d | %d | %s |\n", oD, rD, pct(oD, rD))
	fmt.Fprintf(&sb, "| wall time (ms), median | %d | %d | %s |\n", oW, rW, pct(oW, rW))
	fmt.Fprintf(&sb, "| orchestration CPU per migration (ms), median | %.1f | %.1f | |\n", float64(oC)/1000, float64(rC)/1000)
	fmt.Fprintf(&sb, "| machine busy during the migration (%%), median | %d | %d | |\n", oB, rB)
	lost := func(s []sample) (sum, worst int) {
		for _, x := range s {
			sum += x.lost
			worst = max(worst, x.lost)
		}
		return sum, worst
	}
	oL, oM := lost(ours)
	rL, rM := lost(raw)
	fmt.Fprintf(&sb, "| 50 ms pings lost, total (worst migration) | %d (%d) | %d (%d) | |\n\n", oL, oM, rL, rM)
	// The medians move with other sessions' load; the migrations that ran while the
	// machine had CPU to spare show the orchestration's own effect.
	quiet := func(s []sample) (tot []int64) {
		for _, x := range s {
			if x.cpu.machineBusy < quietBusy {
				tot = append(tot, x.total)
			}
		}
		return tot
	}
	if oq, rq := quiet(ours), quiet(raw); len(oq) > 0 && len(rq) > 0 {
		fmt.Fprintf(&sb, "Migrations while the whole machine was under %.0f %% busy: QEMU total median %d ms (%d migrations) through the agents, %d ms (%d) raw: %s.\n\n",
			100*quietBusy, median(oq), len(oq), median(rq), len(rq), pct(median(oq), median(rq)))
	} else {
		fmt.Fprintf(&sb, "No migration of one side or the other ran while the whole machine was under %.0f %% busy.\n\n", 100*quietBusy)
	}
	fmt.Fprintf(&sb, "Targets: overhead on total time at most 10 %% (QEMU total: %s, %s; wall: %s, %s); downtime median at most 50 ms (%d ms: %s).\n\n",
		pct(oT, rT), verdict(float64(oT) <= 1.1*float64(rT)), pct(oW, rW), verdict(float64(oW) <= 1.1*float64(rW)), oD, verdict(oD <= 50))
	fmt.Fprintf(&sb, "Samples (total ms / downtime ms / wall ms / pings lost / setup ms / MiB sent / dirty passes / orchestration CPU ms / machine busy %%):\n\n")
	for i := range ours {
		o, r := ours[i], raw[i]
		fmt.Fprintf(&sb, "- %d: agent %d/%d/%d/%d/%d/%d/%d/%.1f/%d, raw %d/%d/%d/%d/%d/%d/%d/%.1f/%d\n", i,
			o.total, o.down, o.wall.Milliseconds(), o.lost, o.setup, o.mib, o.syncs, float64(orch(o))/1000, busy(o),
			r.total, r.down, r.wall.Milliseconds(), r.lost, r.setup, r.mib, r.syncs, float64(orch(r))/1000, busy(r))
	}
	fmt.Fprintf(&sb, "\nThe machine is shared (2 cores, other builds running): compare the two columns of one run, not runs.\n")
	fmt.Fprintf(&sb, "How the two sides are kept comparable, where the time goes and the switch-over announce: bench/migration/README.md.\n")
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(sb.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Logf("\n%s", sb.String())
}

// loadStart is the load average when the benchmark started.
var loadStart string

// loadAvg is the 1-minute load average.
func loadAvg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	return strings.Fields(string(b))[0]
}

func hostname() string {
	h, _ := os.Hostname()
	return h
}
