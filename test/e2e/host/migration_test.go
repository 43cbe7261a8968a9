package host_test

import (
	"context"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/growserver/grow/internal/host/agentclient"
	"github.com/growserver/grow/internal/host/hostapi"
	"github.com/growserver/grow/test/testbed"
)

// clock formats a time as the agents' logs do.
func clock(t time.Time) string { return t.Format("15:04:05.000000") }

var writerRe = regexp.MustCompile(`GROW-WRITER disk=\S+ slots=(\d+) start=\d+\r?\n`)

// TestMigration moves a guest running the counter, the disk writer and the responder
// between two hosts 20 times while a client pings it every 50 ms; after each move the
// guest must progress on the destination, every acknowledged block must verify and at
// most one probe may be lost. Then a migration cancelled half-way must leave the
// guest running on its source, and a migration to an agent that refuses us must too.
func TestMigration(t *testing.T) {
	// Not parallel: it runs alone before the other tests, since the ping criterion
	// depends on how quickly the destination guest gets CPU.
	b := testbed.New(t, testbed.Options{Hosts: 2})
	hosts := b.StartAgents(t)
	ctx := context.Background()
	g := testbed.NewAgentGuest(t, "mover", 0, true, "counter", "diskwriter", "responder")
	h0 := hosts[0]
	if _, err := h0.API.Define(ctx, g.Spec); err != nil {
		t.Fatal(err)
	}
	if err := h0.API.Start(ctx, "mover"); err != nil {
		t.Fatal(err)
	}
	con := h0.AttachConsole(t, "mover")
	if _, err := con.WaitReady(0, 120*time.Second); err != nil {
		t.Fatalf("guest not ready: %v\n%s", err, con.Tail(1500))
	}
	m, _, err := con.WaitFrom(0, writerRe, 30*time.Second)
	if err != nil {
		t.Fatalf("disk writer did not start: %v\n%s", err, con.Tail(1500))
	}
	slots, _ := strconv.ParseUint(m[1], 10, 64)
	b.WaitQuery(t, g.Responder(), 30*time.Second)

	ping := b.StartPing(t, g.IP)
	time.Sleep(time.Second)
	// A migration's probes are those after the last answered one before it starts,
	// up to the last answered one once the guest has shown progress afterwards.
	type window struct{ from, to int }
	var windows []window
	var totals, downs []int64
	const rounds = 20
	for i := 0; i < rounds; i++ {
		src, dst := hosts[i%2], hosts[(i+1)%2]
		r0 := b.WaitQuery(t, g.Responder(), 10*time.Second)
		c0, s0 := r0.Counter, r0.Seq
		begin := ping.Stats().MaxSeq
		op, err := src.API.Migrate(ctx, "mover", hostapi.MigrateRequest{TargetURL: dst.PeerURL, TargetToken: dst.Token, ListenHost: dst.Host.StorageIP})
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
		if pids := src.QEMUPIDs(); len(pids) != 0 {
			t.Fatalf("round %d: QEMU left on the source: %v", i, pids)
		}
		if vm, err := dst.API.Get(ctx, "mover"); err != nil || vm.State != hostapi.StateRunning {
			t.Fatalf("round %d: destination VM %+v %v", i, vm.State, err)
		}
		// The guest progresses on the destination.
		if _, err := b.Query(g.Responder(), 10*time.Second); err != nil {
			sb, _ := dst.API.ConsoleLog(ctx, "mover")
			if len(sb) > 1500 {
				sb = sb[len(sb)-1500:]
			}
			fdb0, _ := b.Hosts[0].Exec("bridge", "fdb", "show", "br", "br0")
			fdb1, _ := b.Hosts[1].Exec("bridge", "fdb", "show", "br", "br0")
			what := "responder unreachable after the migration"
			if strings.Contains(string(sb), "Kernel panic") || strings.Contains(string(sb), "end trace") || strings.Contains(string(sb), "Oops") {
				// Seen with QEMU 7.2 under TCG (see MACHINE.md): the guest crashes on
				// the destination although QEMU reported the migration completed.
				what = "the guest kernel crashed on the destination after a completed migration"
			}
			t.Fatalf("round %d: %s: %v\nconsole:\n%s\nfdb0:\n%s\nfdb1:\n%s", i, what, err, sb, fdb0, fdb1)
		}
		r1 := b.WaitQuery(t, g.Responder(), 10*time.Second)
		c1, s1 := r1.Counter, r1.Seq
		deadline := time.Now().Add(20 * time.Second)
		c2, s2 := c1, s1
		for (c2 <= c1 || s2 <= s1) && time.Now().Before(deadline) {
			time.Sleep(300 * time.Millisecond)
			r2 := b.WaitQuery(t, g.Responder(), 5*time.Second)
			c2, s2 = r2.Counter, r2.Seq
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
		windows = append(windows, window{begin, ping.Stats().MaxSeq})
		t.Logf("round %d %s -> %s: total %d ms, downtime %d ms, counter %d, acked %d (verified %d), ping lost so far %d",
			i, src.Name, dst.Name, op.TotalTimeMS, op.DowntimeMS, c2, s2, rep.Checked, len(ping.Missing()))
	}
	time.Sleep(500 * time.Millisecond)
	answered := ping.Stop().Received
	missing := ping.Missing()
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
			t.Logf("probe %d unanswered, sent about %s", s, clock(ping.SentAround(s)))
		}
		for _, h := range hosts {
			for _, l := range strings.Split(h.Log(), "\n") {
				if strings.Contains(l, "Migration timing") || strings.Contains(l, "Announced") || strings.Contains(l, "resumed") {
					t.Logf("%s: %s", h.Name, l)
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
	for _, h := range hosts {
		log := h.Log()
		signalled += strings.Count(log, "Announced arriving VM at the source's switch-over")
		replied += strings.Count(log, " resumed_signal=")
	}
	t.Logf("announced at the switch-over signal in %d of %d migrations; the destination's reply ended %d", signalled, rounds, replied)
	if signalled < rounds/2 || replied < rounds/2 {
		t.Errorf("only %d of %d migrations announced at the switch-over signal, %d ended with the destination's reply", signalled, rounds, replied)
	}

	// A migration to an agent that refuses our token fails and changes nothing.
	h1 := hosts[1]
	op, err := h0.API.Migrate(ctx, "mover", hostapi.MigrateRequest{TargetURL: h1.PeerURL, TargetToken: "wrong", ListenHost: h1.Host.StorageIP})
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
	c0 := b.WaitQuery(t, g.Responder(), 10*time.Second).Counter
	op, err = h0.API.Migrate(ctx, "mover", hostapi.MigrateRequest{TargetURL: h1.PeerURL, TargetToken: h1.Token, ListenHost: h1.Host.StorageIP, BandwidthMiBps: 1})
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
	if pids := h1.QEMUPIDs(); len(pids) != 0 {
		t.Fatalf("QEMU left on the destination after the cancel: %v", pids)
	}
	r1 := b.WaitQuery(t, g.Responder(), 10*time.Second)
	time.Sleep(time.Second)
	r2 := b.WaitQuery(t, g.Responder(), 10*time.Second)
	c1, s1, c2, s2 := r1.Counter, r1.Seq, r2.Counter, r2.Seq
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
	b := testbed.New(t, testbed.Options{Hosts: 2})
	hosts := b.StartAgents(t)
	ctx := context.Background()
	g := testbed.NewAgentGuest(t, "restarter", 1, false, "counter", "responder")
	h0, h1 := hosts[0], hosts[1]
	if _, err := h0.API.Define(ctx, g.Spec); err != nil {
		t.Fatal(err)
	}
	if err := h0.API.Start(ctx, "restarter"); err != nil {
		t.Fatal(err)
	}
	b.WaitQuery(t, g.Responder(), 180*time.Second)
	// The source agent dies half-way through a migration and comes back: it settles the
	// migration it left (here: rolls it back), the guest runs on the source, nothing is
	// left on the destination.
	op, err := h0.API.Migrate(ctx, "restarter", hostapi.MigrateRequest{TargetURL: h1.PeerURL, TargetToken: h1.Token, ListenHost: h1.Host.StorageIP, BandwidthMiBps: 1})
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
	h0.Kill()
	if err := h0.Start(); err != nil {
		t.Fatal(err)
	}
	h0.WaitState(t, "restarter", hostapi.StateRunning, 60*time.Second)
	deadline = time.Now().Add(30 * time.Second)
	for {
		_, err := h1.API.Get(ctx, "restarter")
		if agentclient.IsNotFound(err) && len(h1.QEMUPIDs()) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the destination still has the VM after the source agent settled the migration: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	r3 := b.WaitQuery(t, g.Responder(), 20*time.Second)
	time.Sleep(time.Second)
	r4 := b.WaitQuery(t, g.Responder(), 10*time.Second)
	c3, s3, c4, s4 := r3.Counter, r3.Seq, r4.Counter, r4.Seq
	if c4 <= c3 || s4 < s3 {
		t.Fatalf("guest not progressing on the source after the agent restart: counter %d -> %d, acked %d -> %d", c3, c4, s3, s4)
	}

}
