package mirror

import (
	"bytes"
	"context"
	"crypto/sha256"
	"testing"
	"time"

	"github.com/growserver/grow/test/testbed"
)

// TestResyncResumesAfterInterruption slows resync down (grow storage mirror rate),
// changes 64 MiB while the secondary is stopped, restarts it, and kills it (SIGKILL)
// once part of the resync is done. After it is back, the resync must go on from where
// it stopped rather than start again (the primary's mirror_resync_bytes over both
// attempts stays within one batch of regions of 64 MiB), its source must be the side with the new data
// (the volume reads back as written), and both sides must end identical.
func TestResyncResumesAfterInterruption(t *testing.T) {
	t.Parallel()
	b, p := setup(t, testbed.StoragePairOptions{})
	const vol = "resume"
	const mib = 1 << 20
	const changed = 64 * mib
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	if _, err := p.Ctl[0].CLI(ctx, "mirror", "rate", "16MiB"); err != nil {
		t.Fatal(err)
	}
	createVolume(t, p, p.Ctl[0], vol, 256*mib)
	pc, sc := primaryOf(t, p, vol)
	ns := b.Hosts[0].Netns
	counter := func() int64 {
		t.Helper()
		n, err := pc.ResyncBytes(ctx)
		if err != nil {
			t.Fatal(err)
		}
		return n
	}
	before := counter()
	if err := sc.Stop(30 * time.Second); err != nil {
		t.Fatal(err)
	}
	if err := nbdWrite(ns, pc.NBDURI(vol), 0, changed, 0x5a, 2*time.Minute); err != nil {
		t.Fatalf("writing %d bytes through %s with its secondary stopped: %v", changed, pc.Name, err)
	}
	if err := sc.Start(); err != nil {
		t.Fatal(err)
	}
	// Interrupt the resync once 40 of the 64 MiB are copied: past two batches of 16
	// regions (progress is made durable per batch, after a FLUSH on the peer).
	deadline := time.Now().Add(60 * time.Second)
	var mid int64
	for {
		mid = counter() - before
		if mid >= changed*5/8 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the resync copied only %d of %d bytes in 60 s", mid, changed)
		}
		time.Sleep(20 * time.Millisecond)
	}
	sc.Kill()
	if mid >= changed {
		t.Fatalf("the resync was already complete (%d bytes) when it was to be interrupted: the rate limit did not hold", mid)
	}
	if err := sc.Start(); err != nil {
		t.Fatal(err)
	}
	waitSynced(t, p, vol, 2*time.Minute)
	total := counter() - before
	t.Logf("resync of %d MiB interrupted after %d bytes; %d bytes copied in all", changed/mib, mid, total)
	if total < changed {
		t.Errorf("the resync copied %d bytes in all, less than the %d changed", total, changed)
	}
	// Regions copied since the last durable batch are copied again (at most one batch);
	// a restart from zero would copy mid + changed.
	if limit := int64(changed + 16*mib); total > limit {
		t.Errorf("the resync copied %d bytes in all for %d changed (interrupted after %d): it did not resume where it stopped", total, changed, mid)
	}
	pc2, _ := primaryOf(t, p, vol)
	sums, err := chunkHashes(ns, pc2.NBDURI(vol))
	if err != nil {
		t.Fatal(err)
	}
	want := sha256.Sum256(bytes.Repeat([]byte{0x5a}, mib))
	for i := 0; i < changed/mib; i++ {
		if sums[i] != want {
			t.Fatalf("MiB %d of the volume on %s is not what was written during the outage: the stale side was a resync source", i, pc2.Name)
		}
	}
	compareSides(t, b, p, vol)
}
