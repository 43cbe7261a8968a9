package mirror

import (
	"errors"
	"testing"
	"time"

	"github.com/growserver/grow/test/testbed"
)

// TestBothControllersCrash kills (SIGKILL) both controllers at the same moment under a
// running guest, as a power cut of both would, and starts them again a second later:
// the guest must stall and then continue with no I/O error (QEMU reconnects within its
// reconnect-delay), every block it saw acknowledged before and after must verify, and
// the pair must be synced again with both sides identical.
func TestBothControllersCrash(t *testing.T) {
	t.Parallel()
	b, p := setup(t, testbed.StoragePairOptions{})
	const vol = "both"
	createVolume(t, p, p.Ctl[1], vol, guestVolSize)
	g := startGuest(t, b, p, "both", vol)
	for round := 1; round <= 2; round++ {
		before := g.lastAck()
		p.Ctl[0].Kill()
		p.Ctl[1].Kill()
		time.Sleep(time.Second)
		if err := errors.Join(p.Ctl[0].Start(), p.Ctl[1].Start()); err != nil {
			t.Fatal(err)
		}
		stall := g.waitAcks(t, 10, 60*time.Second, "after both controllers crashed")
		g.checkNoIOError(t, "after both controllers crashed")
		waitSynced(t, p, vol, 90*time.Second)
		g.waitAcks(t, 50, 30*time.Second, "once the pair is synced again")
		t.Logf("round %d: both killed at ack %d; 10 more writes within %s of the restart", round, before, stall.Round(time.Millisecond))
	}
	last := g.stop()
	pc, _ := primaryOf(t, p, vol)
	verifyBlocks(t, b, pc, vol, last)
	compareSides(t, b, p, vol)
}
