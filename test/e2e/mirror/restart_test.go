package mirror

import (
	"context"
	"regexp"
	"strconv"
	"testing"
	"time"

	"github.com/growserver/grow/test/testbed"
)

var poolRecoveredRe = regexp.MustCompile(`Resynced the chunks being written when the pool last stopped uncleanly.* chunks=(\d+)`)

// TestRestartBesideFullyWrittenVolume (issue 5): next to a guest's volume, a 512 MiB
// volume written in full (without a final flush, so its write intent covers all of
// it); the guest's primary is killed (SIGKILL) and restarted four times. Each time the
// restarted controller's API answers at once, both volumes are synced again within a
// minute, and the restarted controller's pool recovery recopies only the chunks being
// written at the kill, not the hundreds the last resync wrote. Before the fix the
// restarted controller's API could hang for good (a volume waiting for the witness
// deadlocked with GET /v1/mirror), and its pool recopied every chunk written in the
// last 5-10 s.
func TestRestartBesideFullyWrittenVolume(t *testing.T) {
	b, p := setup(t, testbed.StoragePairOptions{})
	needTools(t, "fio")
	const big, vol = "big", "g"
	createVolume(t, p, p.Ctl[0], big, 512<<20)
	bp, _ := primaryOf(t, p, big)
	out, err := testbed.NetnsCommand(b.Hosts[0].Netns, "fio", "--name=fill", "--ioengine=nbd", "--uri="+bp.NBDURI(big),
		"--rw=write", "--bs=1m", "--iodepth=32", "--size=512m", "--output-format=terse").CombinedOutput()
	if err != nil {
		t.Fatalf("fio: %v: %s", err, out)
	}
	waitSynced(t, p, big, 60*time.Second)
	createVolume(t, p, p.Ctl[1], vol, guestVolSize)
	g := startGuest(t, b, p, "restart", vol)
	for i := 0; i < 4; i++ {
		pc, _ := primaryOf(t, p, vol)
		time.Sleep(time.Second)
		pc.Kill()
		g.waitAcks(t, 10, 60*time.Second, "after kill -9 of the primary "+pc.Name)
		logged := len(pc.Log())
		restarted := time.Now()
		if err := pc.Start(); err != nil {
			t.Fatalf("kill %d: restarting %s: %v", i+1, pc.Name, err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_, err := pc.Volume(ctx, vol)
		cancel()
		if err != nil {
			t.Fatalf("kill %d: the restarted %s does not answer GET /v1/volumes/%s: %v", i+1, pc.Name, vol, err)
		}
		for _, name := range []string{vol, big} {
			waitSynced(t, p, name, 60*time.Second)
		}
		chunks := 0
		if m := poolRecoveredRe.FindStringSubmatch(pc.Log()[logged:]); m != nil {
			chunks, _ = strconv.Atoi(m[1])
		}
		t.Logf("kill %d: %s restarted, its pool recopied %d chunks, both volumes synced %s after the restart",
			i+1, pc.Name, chunks, time.Since(restarted).Round(time.Millisecond))
		// The guest writes 4 KiB every 20 ms: a few chunks at most are being written.
		if chunks > 16 {
			t.Errorf("kill %d: the pool of %s recopied %d chunks (1 MiB each) after the kill", i+1, pc.Name, chunks)
		}
		g.checkNoIOError(t, "after the restart")
	}
	last := g.stop()
	pc, _ := primaryOf(t, p, vol)
	verifyBlocks(t, b, pc, vol, last)
	compareSides(t, b, p, big)
}
