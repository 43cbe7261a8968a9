package host_test

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/growserver/grow/internal/host/agentclient"
	"github.com/growserver/grow/internal/host/hostapi"
	"github.com/growserver/grow/test/e2e/host/hostbed"
	"github.com/growserver/grow/test/testbed"
)

// pinger is a 50 ms ping stream from the client namespace.
type pinger struct {
	cmd   *exec.Cmd
	mu    sync.Mutex
	got   map[int]time.Time // when each answered probe's reply was read
	start time.Time
	done  chan struct{}
}

var pingSeqRe = regexp.MustCompile(`seq=(\d+)`)

func startPing(t *testing.T, ns, ip string) *pinger {
	t.Helper()
	p := &pinger{got: map[int]time.Time{}, done: make(chan struct{})}
	p.cmd = exec.Command("ip", "netns", "exec", ns, "busybox", "ping", "-i", "0.05", ip)
	out, err := p.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("Failed to start ping: %v", err)
	}
	p.start = time.Now()
	t.Cleanup(p.stop)
	go func() {
		defer close(p.done)
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			if m := pingSeqRe.FindStringSubmatch(sc.Text()); m != nil {
				n, _ := strconv.Atoi(m[1])
				p.mu.Lock()
				p.got[n] = time.Now()
				p.mu.Unlock()
			}
		}
	}()
	return p
}

func (p *pinger) stop() {
	if p.cmd.Process != nil {
		_ = p.cmd.Process.Kill()
		<-p.done
		_ = p.cmd.Wait()
		p.cmd.Process = nil
	}
}

// maxSeq returns the highest sequence number answered so far.
func (p *pinger) maxSeq() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	m := -1
	for s := range p.got {
		m = max(m, s)
	}
	return m
}

// lost returns the sequence numbers missing between the first and last answered probe.
func (p *pinger) lost() (missing []int, answered int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	var seqs []int
	for s := range p.got {
		seqs = append(seqs, s)
	}
	sort.Ints(seqs)
	for i := 1; i < len(seqs); i++ {
		for s := seqs[i-1] + 1; s < seqs[i]; s++ {
			missing = append(missing, s)
		}
	}
	return missing, len(seqs)
}

// clock formats a time as the agents' logs do.
func clock(t time.Time) string { return t.Format("15:04:05.000000") }

// sentAround estimates when unanswered probe seq was sent: 50 ms after each probe
// since the last answered one before it.
func (p *pinger) sentAround(seq int) time.Time {
	p.mu.Lock()
	defer p.mu.Unlock()
	for s := seq - 1; s >= 0; s-- {
		if at, ok := p.got[s]; ok {
			return at.Add(time.Duration(seq-s) * 50 * time.Millisecond)
		}
	}
	return p.start.Add(time.Duration(seq) * 50 * time.Millisecond)
}

var writerRe = regexp.MustCompile(`GROW-WRITER disk=\S+ slots=(\d+) start=\d+\r?\n`)

// TestMigration moves a guest running the counter, the disk writer and the responder
// between two hosts 20 times while a client pings it every 50 ms; after each move the
// guest must progress on the destination, every acknowledged block must verify and at
// most one probe may be lost. Then a migration cancelled half-way must leave the
// guest running on its source, and a migration to an agent that refuses us must too.
func TestMigration(t *testing.T) {
	// Not parallel: it runs alone before the other tests, since the ping criterion
	// depends on how quickly the destination guest gets CPU.
	b := hostbed.New(t, 2)
	ctx := context.Background()
	g := hostbed.NewGuest(t, "mover", 30, true, "counter", "diskwriter", "responder")
	h0 := b.Hosts[0]
	if _, err := h0.API.Define(ctx, g.Spec); err != nil {
		t.Fatal(err)
	}
	if err := h0.API.Start(ctx, "mover"); err != nil {
		t.Fatal(err)
	}
	con := hostbed.AttachConsole(t, h0, "mover")
	if _, err := hostbed.WaitReady(con, 0, 120*time.Second); err != nil {
		t.Fatalf("guest not ready: %v\n%s", err, con.Tail(1500))
	}
	m, _, err := con.WaitFrom(0, writerRe, 30*time.Second)
	if err != nil {
		t.Fatalf("disk writer did not start: %v\n%s", err, con.Tail(1500))
	}
	slots, _ := strconv.ParseUint(m[1], 10, 64)
	_, _, _ = b.WaitProbe(t, g.IP, 30*time.Second)

	ping := startPing(t, b.Client, g.IP)
	time.Sleep(time.Second)
	// A migration's probes are those after the last answered one before it starts,
	// up to the last answered one once the guest has shown progress afterwards.
	type window struct{ from, to int }
	var windows []window
	var totals, downs []int64
	const rounds = 20
	for i := 0; i < rounds; i++ {
		src, dst := b.Hosts[i%2], b.Hosts[(i+1)%2]
		_, c0, s0 := b.WaitProbe(t, g.IP, 10*time.Second)
		begin := ping.maxSeq()
		op, err := src.API.Migrate(ctx, "mover", hostapi.MigrateRequest{TargetURL: dst.URL, TargetToken: dst.Token, ListenHost: dst.IP})
		if err != nil {
			t.Fatalf("round %d: migrate: %v", i, err)
		}
		op, err = src.API.Wait(ctx, op.ID, 50*time.Millisecond)
		if err != nil {
			t.Fatalf("round %d: %v", i, err)
		}
		totals, downs = append(totals, op.TotalTimeMS), append(downs, op.DowntimeMS)
		// The destination owns the VM; the source has neither record nor QEMU.
		if _, err := src.API.Get(ctx, "mover"); err == nil {
			t.Fatalf("round %d: the source still lists the VM", i)
		}
		if pids := hostbed.QEMUPIDsUnder(src.Data); len(pids) != 0 {
			t.Fatalf("round %d: QEMU left on the source: %v", i, pids)
		}
		if vm, err := dst.API.Get(ctx, "mover"); err != nil || vm.State != hostapi.StateRunning {
			t.Fatalf("round %d: destination VM %+v %v", i, vm.State, err)
		}
		// The guest progresses on the destination.
		if _, _, _, err := b.Probe(g.IP, 10*time.Second); err != nil {
			sb, _ := dst.API.ConsoleLog(ctx, "mover")
			if len(sb) > 1500 {
				sb = sb[len(sb)-1500:]
			}
			fdb0, _ := hostbed.InNS(b.Hosts[0].NS, 5*time.Second, "bridge", "fdb", "show", "br", "br0")
			fdb1, _ := hostbed.InNS(b.Hosts[1].NS, 5*time.Second, "bridge", "fdb", "show", "br", "br0")
			what := "responder unreachable after the migration"
			if strings.Contains(string(sb), "Kernel panic") || strings.Contains(string(sb), "end trace") || strings.Contains(string(sb), "Oops") {
				// Seen with QEMU 7.2 under TCG (see MACHINE.md): the guest crashes on
				// the destination although QEMU reported the migration completed.
				what = "the guest kernel crashed on the destination after a completed migration"
			}
			t.Fatalf("round %d: %s: %v\nconsole:\n%s\nfdb0:\n%s\nfdb1:\n%s", i, what, err, sb, fdb0, fdb1)
		}
		_, c1, s1 := b.WaitProbe(t, g.IP, 10*time.Second)
		deadline := time.Now().Add(20 * time.Second)
		c2, s2 := c1, s1
		for (c2 <= c1 || s2 <= s1) && time.Now().Before(deadline) {
			time.Sleep(300 * time.Millisecond)
			_, c2, s2 = b.WaitProbe(t, g.IP, 5*time.Second)
		}
		if c1 < c0 || c2 <= c1 || s1 < s0 || s2 <= s1 {
			sb, _ := dst.API.ConsoleLog(ctx, "mover")
			var keep []string
			for _, l := range strings.Split(string(sb), "\n") {
				if !strings.Contains(l, "GROW-COUNTER") && !strings.Contains(l, "GROW-ACK") {
					keep = append(keep, l)
				}
			}
			if len(keep) > 30 {
				keep = keep[len(keep)-30:]
			}
			t.Fatalf("round %d: guest not progressing after migration: counter %d -> %d -> %d, acked %d -> %d -> %d\nconsole (without counter and ack lines):\n%s",
				i, c0, c1, c2, s0, s1, s2, strings.Join(keep, "\n"))
		}
		// Every block acknowledged so far verifies on the shared disk.
		rep, err := testbed.VerifyBlocksFile(g.DataFile, slots, s2)
		if err != nil {
			t.Fatalf("round %d: acknowledged blocks up to %d do not verify: %v", i, s2, err)
		}
		windows = append(windows, window{begin, ping.maxSeq()})
		missing, _ := ping.lost()
		t.Logf("round %d %s -> %s: total %d ms, downtime %d ms, counter %d, acked %d (verified %d), ping lost so far %d",
			i, src.NS, dst.NS, op.TotalTimeMS, op.DowntimeMS, c2, s2, rep.Checked, len(missing))
	}
	time.Sleep(500 * time.Millisecond)
	ping.stop()
	missing, answered := ping.lost()
	perWindow := make([]int, len(windows))
	outside := 0
	for _, s := range missing {
		found := false
		for i, w := range windows {
			if s > w.from && s <= w.to {
				perWindow[i]++
				found = true
				break
			}
		}
		if !found {
			outside++
		}
	}
	t.Logf("ping: %d answered, %d lost %v; per migration %v; outside migrations %d", answered, len(missing), missing, perWindow, outside)
	for i, n := range perWindow {
		if n > 1 {
			t.Errorf("migration %d lost %d probes of the 50 ms ping stream (at most 1 allowed)", i, n)
		}
	}
	if t.Failed() {
		// To line the losses up with the agents' migration steps.
		for _, s := range missing {
			t.Logf("probe %d unanswered, sent about %s", s, clock(ping.sentAround(s)))
		}
		for _, h := range b.Hosts {
			log, _ := os.ReadFile(filepath.Join(b.Dir, fmt.Sprintf("hostd%d.log", h.Idx)))
			for _, l := range strings.Split(string(log), "\n") {
				if strings.Contains(l, "Migration timing") || strings.Contains(l, "Announced") || strings.Contains(l, "resumed") {
					t.Logf("hostd %d: %s", h.Idx, l)
				}
			}
		}
	}
	if len(missing) > rounds {
		t.Errorf("%d probes lost in %d migrations", len(missing), rounds)
	}
	t.Logf("QEMU total times (ms): %v", totals)
	t.Logf("QEMU downtimes (ms): %v", downs)

	// The destinations announced at the source's switch-over signal (a datagram sent
	// at the source's STOP), not only once the guest resumed there. A signal handled
	// after the resume (a very busy machine) is not counted, hence the margin.
	signalled, replied := 0, 0
	for _, h := range b.Hosts {
		log, err := os.ReadFile(filepath.Join(b.Dir, fmt.Sprintf("hostd%d.log", h.Idx)))
		if err != nil {
			t.Fatal(err)
		}
		signalled += strings.Count(string(log), "Announced arriving VM at the source's switch-over")
		replied += strings.Count(string(log), " resumed_signal=")
	}
	t.Logf("announced at the switch-over signal in %d of %d migrations; the destination's reply ended %d", signalled, rounds, replied)
	if signalled < rounds/2 || replied < rounds/2 {
		t.Errorf("only %d of %d migrations announced at the switch-over signal, %d ended with the destination's reply", signalled, rounds, replied)
	}

	// A migration to an agent that refuses our token fails and changes nothing.
	h0, h1 := b.Hosts[0], b.Hosts[1]
	op, err := h0.API.Migrate(ctx, "mover", hostapi.MigrateRequest{TargetURL: h1.URL, TargetToken: "wrong", ListenHost: h1.IP})
	if err != nil {
		t.Fatal(err)
	}
	if op, err = h0.API.Wait(ctx, op.ID, 50*time.Millisecond); err == nil || op.Status != hostapi.OpFailed {
		t.Fatalf("migration with a bad token: %+v %v", op, err)
	}
	if vm, err := h0.API.Get(ctx, "mover"); err != nil || vm.State != hostapi.StateRunning {
		t.Fatalf("after a refused migration the source VM is %+v %v", vm.State, err)
	}

	// Cancel half-way: throttle the stream so the migration is long, cancel it once it
	// has moved some memory; the guest keeps running on the source.
	_, c0, _ := b.WaitProbe(t, g.IP, 10*time.Second)
	op, err = h0.API.Migrate(ctx, "mover", hostapi.MigrateRequest{TargetURL: h1.URL, TargetToken: h1.Token, ListenHost: h1.IP, BandwidthMiBps: 1})
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		cur, err := h0.API.Operation(ctx, op.ID)
		if err != nil {
			t.Fatal(err)
		}
		if cur.Status != hostapi.OpRunning {
			t.Fatalf("throttled migration ended before the cancel: %+v", cur)
		}
		if cur.Progress > 0.02 {
			t.Logf("cancelling at %.1f %%", 100*cur.Progress)
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("throttled migration made no progress: %+v", cur)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err := h0.API.CancelOperation(ctx, op.ID); err != nil {
		t.Fatal(err)
	}
	op, err = h0.API.Wait(ctx, op.ID, 50*time.Millisecond)
	if op.Status != hostapi.OpCancelled {
		t.Fatalf("cancelled migration ended as %+v (%v)", op, err)
	}
	if vm, err := h0.API.Get(ctx, "mover"); err != nil || vm.State != hostapi.StateRunning {
		t.Fatalf("after the cancel the source VM is %+v %v", vm.State, err)
	}
	if _, err := h1.API.Get(ctx, "mover"); err == nil {
		t.Fatal("the destination still lists the VM after the cancel")
	}
	if pids := hostbed.QEMUPIDsUnder(h1.Data); len(pids) != 0 {
		t.Fatalf("QEMU left on the destination after the cancel: %v", pids)
	}
	_, c1, s1 := b.WaitProbe(t, g.IP, 10*time.Second)
	time.Sleep(time.Second)
	_, c2, s2 := b.WaitProbe(t, g.IP, 10*time.Second)
	if c1 <= c0 || c2 <= c1 || s2 <= s1 {
		t.Fatalf("guest not progressing on the source after the cancel: counter %d -> %d -> %d, acked %d -> %d", c0, c1, c2, s1, s2)
	}
	// Finally: stop the guest hard and check every acknowledged block once more.
	if err := h0.API.Kill(ctx, "mover"); err != nil {
		t.Fatal(err)
	}
	if _, err := testbed.VerifyBlocksFile(g.DataFile, slots, s2); err != nil {
		t.Fatalf("acknowledged blocks up to %d do not verify after the kill: %v", s2, err)
	}
}

// TestMigrationAgentRestart kills the source agent half-way through a migration: the
// restarted agent finds the migration in its record, rolls it back, and the guest keeps
// running on the source with nothing left on the destination.
func TestMigrationAgentRestart(t *testing.T) {
	t.Parallel()
	b := hostbed.New(t, 2)
	ctx := context.Background()
	g := hostbed.NewGuest(t, "restarter", 31, false, "counter", "responder")
	h0, h1 := b.Hosts[0], b.Hosts[1]
	if _, err := h0.API.Define(ctx, g.Spec); err != nil {
		t.Fatal(err)
	}
	if err := h0.API.Start(ctx, "restarter"); err != nil {
		t.Fatal(err)
	}
	b.WaitProbe(t, g.IP, 180*time.Second)
	// The source agent dies half-way through a migration and comes back: it settles the
	// migration it left (here: rolls it back), the guest runs on the source, nothing is
	// left on the destination.
	op, err := h0.API.Migrate(ctx, "restarter", hostapi.MigrateRequest{TargetURL: h1.URL, TargetToken: h1.Token, ListenHost: h1.IP, BandwidthMiBps: 1})
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		cur, err := h0.API.Operation(ctx, op.ID)
		if err != nil || cur.Status != hostapi.OpRunning {
			t.Fatalf("throttled migration: %+v %v", cur, err)
		}
		if cur.Progress > 0.02 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("throttled migration made no progress: %+v", cur)
		}
		time.Sleep(100 * time.Millisecond)
	}
	h0.Stop(syscall.SIGKILL)
	h0.Start(t)
	hostbed.WaitState(t, h0, "restarter", hostapi.StateRunning, 60*time.Second)
	deadline = time.Now().Add(30 * time.Second)
	for {
		_, err := h1.API.Get(ctx, "restarter")
		if agentclient.IsNotFound(err) && len(hostbed.QEMUPIDsUnder(h1.Data)) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the destination still has the VM after the source agent settled the migration: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	_, c3, s3 := b.WaitProbe(t, g.IP, 20*time.Second)
	time.Sleep(time.Second)
	_, c4, s4 := b.WaitProbe(t, g.IP, 10*time.Second)
	if c4 <= c3 || s4 < s3 {
		t.Fatalf("guest not progressing on the source after the agent restart: counter %d -> %d, acked %d -> %d", c3, c4, s3, s4)
	}

}
