package testbed

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// oopsRe matches what a guest kernel or the guest agent prints when something broke.
var oopsRe = regexp.MustCompile(`(Oops|BUG: |Kernel panic|general protection fault|Call Trace|invalid opcode|segfault at|GROW-ERROR)[^\r\n]*`)

// freeLoopbackPort returns a TCP port on 127.0.0.1 that was free a moment ago.
func freeLoopbackPort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("Failed to find a free port: %v", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// migrationLoad is one run of back-and-forth migrations of the test guest.
type migrationLoad struct {
	N         int      // migrations
	Accel     string   // -accel value ("" = Accel())
	MemoryArg string   // verbatim -m value ("" = MemoryArgFor(256, accel))
	Extra     []string // extra QEMU arguments
	CPUs      int      // vCPUs (0 = 1)
	Caps      []string // migration capabilities enabled on both ends
	DirtyMiB  int      // MiB the guest keeps rewriting (0 = none)
}

func (l migrationLoad) String() string {
	return fmt.Sprintf("accel=%s m=%q args=%q smp=%d caps=%q dirty=%dMiB", l.Accel, l.MemoryArg, l.Extra, l.CPUs, l.Caps, l.DirtyMiB)
}

// runMigrationLoad boots the test guest (counter, disk writer, responder, and a dd
// loop rewriting l.DirtyMiB of memory) from qemu-nbd disks and migrates it l.N times
// between two QEMU processes on loopback. After each migration the destination must
// keep counting and acknowledging disk writes and must not print an oops; a guest that
// fails is counted, a fresh one is booted and the run goes on. It returns the number
// of migrations after which the guest failed.
func runMigrationLoad(t *testing.T, l migrationLoad) int {
	dir := t.TempDir()
	root := StartQemuNBD(t, CopyGuestImage(t, dir))
	data := StartQemuNBD(t, BlankImage(t, filepath.Join(dir, "data.raw"), 8<<20))
	seed := guestSeed("tcgmig", 0, "counter", "diskwriter", "responder")
	seed.Network = nil
	iso := SeedISO(t, seed)
	var caps []map[string]any
	for _, c := range l.Caps {
		caps = append(caps, map[string]any{"capability": c, "state": true})
	}
	vmSeq := 0
	config := func(incoming string) VMConfig {
		vmSeq++
		return VMConfig{
			Name:      fmt.Sprintf("tcgmig%d", vmSeq),
			Accel:     l.Accel,
			MemoryArg: l.MemoryArg,
			CPUs:      l.CPUs,
			Disks:     []Disk{root.Disk(), data.Disk()},
			SeedISO:   iso,
			Incoming:  incoming,
			Extra:     l.Extra,
		}
	}
	setCaps := func(vm *VM) {
		if len(caps) == 0 {
			return
		}
		q, err := vm.QMP()
		if err != nil {
			t.Fatal(err)
		}
		if _, err := q.Execute("migrate-set-capabilities", map[string]any{"capabilities": caps}); err != nil {
			t.Fatalf("Failed to set capabilities %v: %v", caps, err)
		}
	}
	boot := func() *VM {
		vm := StartVM(t, config(""))
		if _, err := vm.Console.WaitReady(0, bootTimeout); err != nil {
			t.Fatal(err)
		}
		if _, err := vm.Console.WaitAckAbove(5, 60*time.Second); err != nil {
			t.Fatal(err)
		}
		if l.DirtyMiB > 0 {
			// dd reads /dev/zero into one buffer of DirtyMiB, over and over.
			cmd := fmt.Sprintf("\nwhile :; do dd if=/dev/zero of=/dev/null bs=%d count=50 2>/dev/null; done &\n", l.DirtyMiB<<20)
			if err := vm.Console.Type(cmd); err != nil {
				t.Fatal(err)
			}
			time.Sleep(2 * time.Second)
		}
		return vm
	}

	cur := boot()
	crashes, boots := 0, 1
	var totalMS, downMS []int64
	for i := 0; i < l.N; i++ {
		uri := fmt.Sprintf("tcp:127.0.0.1:%d", freeLoopbackPort(t))
		dst := StartVM(t, config(uri))
		// QMP answers once QEMU listens for the stream.
		if _, err := dst.QMP(); err != nil {
			t.Fatal(err)
		}
		setCaps(dst)
		setCaps(cur)
		counter, _ := cur.Console.Counter()
		lastAck, _ := cur.Console.LastAck()
		res, err := cur.Migrate(uri, 50, 120*time.Second)
		if err != nil {
			t.Fatalf("migration %d: %v", i, err)
		}
		totalMS, downMS = append(totalMS, res.TotalMS), append(downMS, res.DowntimeMS)
		if m := oopsRe.FindString(cur.Console.Output()); m != "" {
			t.Logf("migration %d: the source had already failed before it: %s", i, m)
		}
		cur.Kill()
		// Alive and progressing for a while on the destination (5 counter ticks of
		// 200 ms), not just "completed", and no oops on its console.
		oops, err := watchGuest(dst, counter+5, lastAck+5, 30*time.Second)
		if err == nil && oops == "" {
			t.Logf("migration %d: ok (total %d ms, downtime %d ms)", i, res.TotalMS, res.DowntimeMS)
			cur = dst
			continue
		}
		crashes++
		t.Logf("migration %d: CRASH (total %d ms, downtime %d ms): oops=%q progress=%v\nconsole tail:\n%s",
			i, res.TotalMS, res.DowntimeMS, oops, err, dst.Console.Tail(2500))
		dst.Kill()
		if i+1 < l.N {
			cur = boot()
			boots++
		}
	}
	cur.Kill()
	t.Logf("RESULT %s: %d migrations, %d crashed the guest, %d boots; total ms %v; downtime ms %v",
		l, l.N, crashes, boots, totalMS, downMS)
	return crashes
}

// TestTCGMigrationUnderMemoryLoad migrates a guest that keeps rewriting 48 MiB six
// times with the test bed's QEMU arguments. Under TCG with QEMU 7.2 and a RAM size
// that is a multiple of 256 KiB, 10 of 25 such migrations crashed the guest here (see
// MemoryArgFor), so six in a row pass by chance about 5 % of the time; the test bed's
// arguments must keep it alive (0 of 70 crashed).
func TestTCGMigrationUnderMemoryLoad(t *testing.T) {
	t.Parallel()
	if testing.Short() {
		t.Skip("boots QEMU")
	}
	if n := runMigrationLoad(t, migrationLoad{N: 6, DirtyMiB: 48}); n > 0 {
		t.Fatalf("%d of 6 migrations crashed the guest", n)
	}
}

// TestTCGMigrationExperiment measures how often a guest fails after a live migration
// that QEMU reports completed, under a QEMU setting taken from the environment. It
// runs only with GROW_TCG_MIG_EXPERIMENT=N (N migrations), because it is an
// experiment, not a regression test:
//
//	GROW_TCG_MIG_ACCEL   -accel value (default Accel())
//	GROW_TCG_MIG_MEM     -m value (default MemoryArgFor; "256" reproduces the QEMU 7.2 TCG bug)
//	GROW_TCG_MIG_ARGS    extra QEMU arguments, space separated (e.g. "-cpu Nehalem")
//	GROW_TCG_MIG_SMP     vCPUs (default 1)
//	GROW_TCG_MIG_CAPS    migration capabilities to enable on both ends, comma separated
//	GROW_TCG_MIG_DIRTY   MiB the guest keeps rewriting (a dd loop on its console; default 48)
//
// It fails if any migration crashed the guest.
func TestTCGMigrationExperiment(t *testing.T) {
	n, _ := strconv.Atoi(os.Getenv("GROW_TCG_MIG_EXPERIMENT"))
	if n <= 0 {
		t.Skip("set GROW_TCG_MIG_EXPERIMENT=N to run N migrations")
	}
	l := migrationLoad{N: n, Accel: os.Getenv("GROW_TCG_MIG_ACCEL"), MemoryArg: os.Getenv("GROW_TCG_MIG_MEM"),
		Extra: strings.Fields(os.Getenv("GROW_TCG_MIG_ARGS")), DirtyMiB: 48}
	l.CPUs, _ = strconv.Atoi(os.Getenv("GROW_TCG_MIG_SMP"))
	if d := os.Getenv("GROW_TCG_MIG_DIRTY"); d != "" {
		var err error
		if l.DirtyMiB, err = strconv.Atoi(d); err != nil || l.DirtyMiB < 0 {
			t.Fatalf("GROW_TCG_MIG_DIRTY=%q is not a size in MiB", d)
		}
	}
	for _, c := range strings.Split(os.Getenv("GROW_TCG_MIG_CAPS"), ",") {
		if c = strings.TrimSpace(c); c != "" {
			l.Caps = append(l.Caps, c)
		}
	}
	if crashes := runMigrationLoad(t, l); crashes > 0 {
		t.Errorf("%d of %d migrations crashed the guest under %s", crashes, n, l)
	}
}

// watchGuest waits until vm's counter passes counter and its disk writer passes ack, or
// until it prints an oops (returned), or until timeout.
func watchGuest(vm *VM, counter, ack uint64, timeout time.Duration) (string, error) {
	deadline := time.Now().Add(timeout)
	for {
		out := vm.Console.Output()
		if m := oopsRe.FindString(out); m != "" {
			return m, nil
		}
		c, _ := lastNumber(counterRe, out)
		a, _ := lastNumber(ackRe, out)
		if c > counter && a > ack {
			return "", nil
		}
		if time.Now().After(deadline) {
			return "", fmt.Errorf("no progress within %s: counter %d (want > %d), ack %d (want > %d)", timeout, c, counter, a, ack)
		}
		time.Sleep(200 * time.Millisecond)
	}
}
