package controller

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/growserver/grow/internal/storage/adminclient"
)

// envInt reads a positive integer from the environment, or def.
func envInt(t *testing.T, name string, def int) int {
	t.Helper()
	s := os.Getenv(name)
	if s == "" {
		return def
	}
	n, err := strconv.Atoi(s)
	if err != nil || n <= 0 {
		t.Fatalf("%s=%q: want a positive integer", name, s)
	}
	return n
}

// cpuTime is the user+system CPU a process used so far (from /proc/PID/stat).
func cpuTime(t *testing.T, pid int) time.Duration {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		t.Fatal(err)
	}
	// The command name may hold spaces: fields count from after its closing parenthesis.
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+2:]))
	ut, _ := strconv.ParseInt(f[11], 10, 64) // utime, field 14
	st, _ := strconv.ParseInt(f[12], 10, 64) // stime, field 15
	const hz = 100                           // USER_HZ on Linux
	return time.Duration(ut+st) * time.Second / hz
}

// An idle pair with many synced volumes costs little CPU: the heartbeat and the
// reconcile passes do not grow with the number of volumes that need nothing.
// GROW_IDLE_VOLUMES (default 100) and GROW_IDLE_SECONDS (default 3) size the run;
// GROW_IDLE_MAX_MS, if set, fails the test when either controller used more CPU per
// 10 s idle than that; GROW_TEST_CPUPROFILE=PATH writes each controller's CPU profile
// of the idle window to PATH.NAME. The measurement is logged (go test -v -run TestMirrorIdleCPU).
func TestMirrorIdleCPU(t *testing.T) {
	if testing.Short() {
		t.Skip("runs controller processes")
	}
	n := envInt(t, "GROW_IDLE_VOLUMES", 100)
	secs := envInt(t, "GROW_IDLE_SECONDS", 3)
	a, b, _ := testPair(t)
	// Room for the volumes' metadata; they are thin and never written.
	a.cfg.PoolSize, b.cfg.PoolSize = 1<<30, 1<<30
	a.start()
	b.start()
	pairUp(t, a, b)

	start := time.Now()
	var next atomic.Int64
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1)) - 1
				if i >= n {
					return
				}
				c := []*node{a, b}[i%2]
				if _, err := c.cl.CreateVolume(context.Background(), fmt.Sprintf("idle%05d", i), 1<<20); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	t.Logf("%d volumes made in %v", n, time.Since(start).Round(time.Millisecond))
	for _, c := range []*node{a, b} {
		waitFor(t, 2*time.Minute, fmt.Sprintf("%d synced volumes on %s", n, c.name), func() (bool, string) {
			s, err := c.cl.MirrorStatus(context.Background())
			if err != nil {
				return false, err.Error()
			}
			return s.States[adminclient.MirrorSynced] == n, fmt.Sprintf("%v", s.States)
		})
	}
	// Let the kicks of the last creations and resyncs settle.
	time.Sleep(2 * time.Second)

	window := time.Duration(secs) * time.Second
	pa, pb := a.cmd.Process.Pid, b.cmd.Process.Pid
	profile := os.Getenv("GROW_TEST_CPUPROFILE") != ""
	if profile {
		_ = a.cmd.Process.Signal(syscall.SIGUSR1)
		_ = b.cmd.Process.Signal(syscall.SIGUSR1)
	}
	ca0, cb0 := cpuTime(t, pa), cpuTime(t, pb)
	t0 := time.Now()
	time.Sleep(window)
	ca1, cb1 := cpuTime(t, pa), cpuTime(t, pb)
	el := time.Since(t0)
	if profile {
		_ = a.cmd.Process.Signal(syscall.SIGUSR2)
		_ = b.cmd.Process.Signal(syscall.SIGUSR2)
	}
	per10 := func(d time.Duration) time.Duration {
		return time.Duration(float64(d) * float64(10*time.Second) / float64(el))
	}
	ra, rb := per10(ca1-ca0), per10(cb1-cb0)
	t.Logf("idle CPU with %d volumes over %v: %s %v, %s %v (per 10 s: %v, %v)",
		n, el.Round(time.Millisecond), a.name, ca1-ca0, b.name, cb1-cb0, ra.Round(time.Millisecond), rb.Round(time.Millisecond))

	// Still a working pair: every volume is synced on both sides after the idle time.
	for _, c := range []*node{a, b} {
		s, err := c.cl.MirrorStatus(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		if s.States[adminclient.MirrorSynced] != n {
			t.Fatalf("%s after idling: %v", c.name, s.States)
		}
	}
	if s := os.Getenv("GROW_IDLE_MAX_MS"); s != "" {
		lim, err := strconv.Atoi(s)
		if err != nil {
			t.Fatalf("GROW_IDLE_MAX_MS=%q", s)
		}
		for _, r := range []time.Duration{ra, rb} {
			if r > time.Duration(lim)*time.Millisecond {
				t.Fatalf("idle CPU %v per 10 s, more than GROW_IDLE_MAX_MS=%d", r, lim)
			}
		}
	}
}

// The heartbeat leaves out the volume states the partner already has (same generation)
// and sends them in full otherwise; GET /v1/mirror without the generation (an older
// partner, or a person) always has them.
func TestMirrorHeartbeatUnchangedVolumes(t *testing.T) {
	if testing.Short() {
		t.Skip("runs controller processes")
	}
	a, b, _ := startedPair(t)
	syncedVolume(t, a, a, b, "hb1", 4<<20)
	ctx := context.Background()
	full, err := a.cl.MirrorStatus(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if full.VolumesGen == "" || full.VolumesSame || len(full.Volumes) != 1 {
		t.Fatalf("full status: gen %q same %v volumes %v", full.VolumesGen, full.VolumesSame, full.Volumes)
	}
	hb, err := a.cl.MirrorHeartbeat(ctx, full.VolumesGen)
	if err != nil {
		t.Fatal(err)
	}
	if !hb.VolumesSame || hb.Volumes != nil || hb.VolumesGen != full.VolumesGen || hb.States[adminclient.MirrorSynced] != 1 {
		t.Fatalf("heartbeat with the current generation: gen %q same %v volumes %v states %v", hb.VolumesGen, hb.VolumesSame, hb.Volumes, hb.States)
	}
	hb, err = a.cl.MirrorHeartbeat(ctx, full.VolumesGen+"0")
	if err != nil {
		t.Fatal(err)
	}
	if hb.VolumesSame || len(hb.Volumes) != 1 {
		t.Fatalf("heartbeat with another generation: same %v volumes %v", hb.VolumesSame, hb.Volumes)
	}
	// A new volume is a new generation, which both sides then use.
	syncedVolume(t, b, a, b, "hb2", 4<<20)
	hb, err = a.cl.MirrorHeartbeat(ctx, full.VolumesGen)
	if err != nil {
		t.Fatal(err)
	}
	if hb.VolumesSame || len(hb.Volumes) != 2 || hb.VolumesGen == full.VolumesGen {
		t.Fatalf("heartbeat after a creation: gen %q same %v volumes %v", hb.VolumesGen, hb.VolumesSame, hb.Volumes)
	}
	if st, _ := b.cl.MirrorStatus(ctx); st == nil || !st.PartnerReachable || st.States[adminclient.MirrorSynced] != 2 {
		t.Fatalf("partner's view: %+v", st)
	}
}
