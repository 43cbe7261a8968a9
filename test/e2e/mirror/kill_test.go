package mirror

import (
	"math/rand/v2"
	"os"
	"strconv"
	"testing"
	"time"

	"github.com/growserver/grow/test/testbed"
)

// killsPerRole is how many times each role is killed (GROW_MIRROR_KILLS overrides it).
func killsPerRole(t *testing.T) int {
	if s := os.Getenv("GROW_MIRROR_KILLS"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 {
			t.Fatalf("bad GROW_MIRROR_KILLS=%q", s)
		}
		return n
	}
	return 20
}

// TestKillPrimaryAndSecondary runs one guest writing sequence-numbered blocks to a
// mirrored volume and kills (SIGKILL) the volume's current primary controller at a
// random moment at least 20 times, and its secondary as often, in random order. After
// each kill the guest must keep writing with no I/O error (a killed primary's volume
// fails over to the partner, whose service address QEMU reconnects to); the killed
// controller is restarted and the pair must be synced again before the next kill. At
// the end every block the guest saw acknowledged must read back from the primary, and
// both controllers must hold the same data.
func TestKillPrimaryAndSecondary(t *testing.T) {
	t.Parallel()
	b, p := setup(t, testbed.StoragePairOptions{})
	n := killsPerRole(t)
	const vol = "kill"
	createVolume(t, p, p.Ctl[0], vol, guestVolSize)
	g := startGuest(t, b, p, "kill", vol)

	roles := make([]bool, 0, 2*n) // true: kill the primary
	for i := 0; i < n; i++ {
		roles = append(roles, true, false)
	}
	rand.Shuffle(len(roles), func(i, j int) { roles[i], roles[j] = roles[j], roles[i] })
	var worst [2]time.Duration
	t0 := time.Now()
	for i, primary := range roles {
		pc, sc := primaryOf(t, p, vol)
		victim, role := sc, "secondary"
		if primary {
			victim, role = pc, "primary"
		}
		// A random moment within the guest's steady writes.
		time.Sleep(time.Duration(200+rand.IntN(1300)) * time.Millisecond)
		before := g.lastAck()
		victim.Kill()
		stall := g.waitAcks(t, 10, 40*time.Second, "after kill -9 of the "+role+" "+victim.Name)
		k := 1
		if primary {
			k = 0
		}
		worst[k] = max(worst[k], stall)
		g.checkNoIOError(t, "after kill -9 of the "+role)
		if primary {
			np, _ := primaryOf(t, p, vol)
			if np == victim {
				t.Fatalf("kill %d: %s is still reported primary after its kill", i+1, victim.Name)
			}
		}
		if err := victim.Start(); err != nil {
			t.Fatalf("kill %d: restarting %s: %v", i+1, victim.Name, err)
		}
		waitSynced(t, p, vol, 90*time.Second)
		g.checkNoIOError(t, "during the resync after kill of the "+role)
		t.Logf("kill %d/%d: %s %s at ack %d; 10 more writes within %s; synced again at ack %d",
			i+1, len(roles), role, victim.Name, before, stall.Round(time.Millisecond), g.lastAck())
		if t.Failed() {
			break
		}
	}
	t.Logf("%d kills in %s; slowest 10 writes after a kill: primary %s, secondary %s",
		len(roles), time.Since(t0).Round(time.Second), worst[0].Round(time.Millisecond), worst[1].Round(time.Millisecond))
	last := g.stop()
	pc, _ := primaryOf(t, p, vol)
	verifyBlocks(t, b, pc, vol, last)
	compareSides(t, b, p, vol)
	pc, _ = primaryOf(t, p, vol)
	verifyBlocks(t, b, pc, vol, last)
}
