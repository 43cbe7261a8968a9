package mirror

import (
	"context"
	"crypto/rand"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/growserver/grow/test/testbed"
)

// TestResyncCopiesOnlyChangedRegions fills part of a volume, kills (SIGKILL) its
// secondary, changes a few scattered regions through the primary while the secondary
// is down, restarts it, and measures the bytes the resync copied
// (mirror_resync_bytes on the primary): at least the bytes changed, and not
// much more than the 1 MiB regions they touch, far below the volume size. Both sides
// must then hold identical data.
func TestResyncCopiesOnlyChangedRegions(t *testing.T) {
	t.Parallel()
	b, p := setup(t, testbed.StoragePairOptions{})
	const vol = "resync"
	const size = 256 << 20
	createVolume(t, p, p.Ctl[0], vol, size)
	pc, sc := primaryOf(t, p, vol)
	ns := b.Hosts[0].Netns

	// 32 MiB of random data at the start, written through the primary.
	fill := filepath.Join(t.TempDir(), "fill.raw")
	data := make([]byte, 32<<20)
	if _, err := rand.Read(data); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(fill, data, 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := testbed.NetnsCommand(ns, "nbdcopy", "--synchronous", "--flush", fill, pc.NBDURI(vol)).CombinedOutput(); err != nil {
		t.Fatalf("nbdcopy to %s: %v: %s", pc.Name, err, out)
	}
	waitSynced(t, p, vol, 60*time.Second)
	// Regions marked while synced (write intent) are cleared once flushed on both.
	if _, err := p.WaitVolume(vol, 30*time.Second, "no dirty bytes on the primary", func(v testbed.PairView) bool {
		for _, x := range v.Vol {
			if x == nil || x.Mirror == nil || x.Mirror.State != "synced" || x.Mirror.DirtyBytes != 0 {
				return false
			}
		}
		return true
	}); err != nil {
		t.Fatal(err)
	}
	// The resync source is the primary, which stays up (a restarted controller's counter starts at 0).
	resyncBytes := func() int64 {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		n, err := pc.ResyncBytes(ctx)
		if err != nil {
			t.Fatal(err)
		}
		return n
	}
	before := resyncBytes()

	sc.Kill()
	// While the secondary is down: six 64 KiB writes in six different 1 MiB regions,
	// 40 MiB apart, and one aligned 2 MiB write (two regions).
	const mib = 1 << 20
	var written, regions int64
	for k := int64(0); k < 6; k++ {
		if err := nbdWrite(ns, pc.NBDURI(vol), k*40*mib+4096, 64<<10, byte(0x30+k), 60*time.Second); err != nil {
			t.Fatalf("write through %s with its secondary down: %v", pc.Name, err)
		}
		written += 64 << 10
		regions++
	}
	if err := nbdWrite(ns, pc.NBDURI(vol), 100*mib, 2*mib, 0x77, 60*time.Second); err != nil {
		t.Fatal(err)
	}
	written += 2 * mib
	regions += 2
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	v := p.View(ctx, vol)
	cancel()
	if m := v.Vol[indexOf(p, pc)]; m == nil || m.Mirror == nil || m.Mirror.State != "degraded" || m.Mirror.DirtyBytes < written {
		t.Errorf("primary %s with its secondary down: want degraded with at least %d dirty bytes: %s", pc.Name, written, v)
	}

	t0 := time.Now()
	if err := sc.Start(); err != nil {
		t.Fatal(err)
	}
	waitSynced(t, p, vol, 90*time.Second)
	took := time.Since(t0)
	copied := resyncBytes() - before
	t.Logf("outage: %d bytes written in %d 1 MiB regions of a %d MiB volume; resync copied %d bytes (restart to synced %s)",
		written, regions, size/mib, copied, took.Round(time.Millisecond))
	if copied < written {
		t.Errorf("the resync copied %d bytes, less than the %d bytes changed during the outage", copied, written)
	}
	if limit := 2*regions*mib + 4*mib; copied > limit {
		t.Errorf("the resync copied %d bytes for %d changed 1 MiB regions (limit %d): not only the changed regions", copied, regions, limit)
	}
	// The same counter for Prometheus.
	ctx, cancel = context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, c := range p.Ctl {
		stat, err := c.ResyncBytes(ctx)
		if err != nil {
			t.Fatal(err)
		}
		metrics, err := c.GetText(ctx, "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		// Summed over any labels the metric has.
		var total float64
		found := false
		for _, line := range strings.Split(metrics, "\n") {
			f := strings.Fields(line)
			if len(f) >= 2 && (f[0] == "grow_mirror_resync_bytes_total" || strings.HasPrefix(f[0], "grow_mirror_resync_bytes_total{")) {
				v, err := strconv.ParseFloat(f[1], 64)
				if err == nil {
					total += v
					found = true
				}
			}
		}
		if !found || int64(total) != stat {
			t.Errorf("%s: grow_mirror_resync_bytes_total in /metrics is %v (found %v), /v1/stats says %d", c.Name, total, found, stat)
		}
	}
	compareSides(t, b, p, vol)
}

func indexOf(p *testbed.StoragePair, c *testbed.PairController) int {
	if p.Ctl[0] == c {
		return 0
	}
	return 1
}
