package mirror

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/growserver/grow/test/testbed"
)

// volumesHomedOnBoth creates volumes until one has its home on each controller and
// returns their names, index k homed on p.Ctl[k].
func volumesHomedOnBoth(t *testing.T, p *testbed.StoragePair, prefix string, size int64) [2]string {
	t.Helper()
	var names [2]string
	for i := 0; i < 6 && (names[0] == "" || names[1] == ""); i++ {
		name := fmt.Sprintf("%s%d", prefix, i)
		v := createVolume(t, p, p.Ctl[i%2], name, size)
		home := p.ByName(v.Vol[0].Mirror.Home)
		if home == nil {
			t.Fatalf("volume %s: home %q is neither controller", name, v.Vol[0].Mirror.Home)
		}
		k := 0
		if home == p.Ctl[1] {
			k = 1
		}
		if names[k] == "" {
			names[k] = name
		}
	}
	if names[0] == "" || names[1] == "" {
		t.Fatalf("six new volumes did not get homes on both controllers: %q", names)
	}
	return names
}

// TestDrainAndResume runs a guest on a volume homed on each controller, then for each
// controller in turn, twice: drains it (every primary moves to the partner), stops it as for
// maintenance, starts it again and resumes it (it resyncs and takes its primaries
// back). Neither guest may see an I/O error, and every acknowledged block verifies.
func TestDrainAndResume(t *testing.T) {
	t.Parallel()
	b, p := setup(t, testbed.StoragePairOptions{})
	vols := volumesHomedOnBoth(t, p, "drain", guestVolSize)
	var guests [2]*guest
	for k, vol := range vols {
		guests[k] = startGuest(t, b, p, fmt.Sprintf("drain%d", k), vol)
	}
	progress := func(what string) {
		t.Helper()
		for _, g := range guests {
			g.waitAcks(t, 10, 40*time.Second, what)
			g.checkNoIOError(t, what)
		}
	}
	// Two rounds: each hand-over is a chance for a reconnecting client to be caught
	// between the old and the new holder of a service address.
	for _, c := range []*testbed.PairController{p.Ctl[0], p.Ctl[1], p.Ctl[0], p.Ctl[1]} {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		out, err := c.CLI(ctx, "controller", "drain", c.Name)
		cancel()
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("drain %s: %s", c.Name, out)
		for _, vol := range vols {
			if _, err := p.WaitVolume(vol, 30*time.Second, "no primary on "+c.Name, func(v testbed.PairView) bool {
				np, err := v.Primary(p)
				return err == nil && np != c
			}); err != nil {
				t.Fatal(err)
			}
		}
		progress("after draining " + c.Name)
		if err := c.Stop(30 * time.Second); err != nil {
			t.Fatal(err)
		}
		progress("while " + c.Name + " is stopped for maintenance")
		if err := c.Start(); err != nil {
			t.Fatal(err)
		}
		ctx, cancel = context.WithTimeout(context.Background(), 2*time.Minute)
		out, err = c.CLI(ctx, "controller", "resume", c.Name)
		cancel()
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("resume %s: %s", c.Name, out)
		for k, vol := range vols {
			home := p.Ctl[k]
			if _, err := p.WaitVolume(vol, 90*time.Second, "synced with its primary home", func(v testbed.PairView) bool {
				np, err := v.Primary(p)
				return err == nil && np == home && v.Synced()
			}); err != nil {
				t.Fatal(err)
			}
		}
		progress("after resuming " + c.Name)
	}
	for k, g := range guests {
		last := g.stop()
		pc, _ := primaryOf(t, p, vols[k])
		verifyBlocks(t, b, pc, vols[k], last)
	}
}
