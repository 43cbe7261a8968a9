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
