package mirror

import (
	"bytes"
	"context"
	"sync"
	"testing"
	"time"

	"github.com/growserver/grow/test/testbed"
)

// TestPartitionAtMostOneSideAccepts cuts the controllers apart while a client on a
// host writes to the volume through each controller's own address at the same time,
// again and again, for several seconds: at most one side may acknowledge writes. Two
// cuts: the link between the controllers only (both still reach the hosts and the
// witness), and the primary isolated from both its partner and the witness (it must
// fence itself; the partner may take over). After the cut is healed (and, if the pair
// reports a split, after the operator resolves it in favour of the side that
// accepted), the volume holds every acknowledged write of the accepting side and none
// of the other's, and both controllers hold the same data.
func TestPartitionAtMostOneSideAccepts(t *testing.T) {
	t.Parallel()
	t.Run("link", func(t *testing.T) {
		partitionCase(t, func(p *testbed.StoragePair, primary *testbed.PairController) error { return p.Partition() })
	})
	t.Run("primary-isolated", func(t *testing.T) {
		partitionCase(t, func(p *testbed.StoragePair, primary *testbed.PairController) error { return p.Isolate(primary) })
	})
}

func partitionCase(t *testing.T, cut func(p *testbed.StoragePair, primary *testbed.PairController) error) {
	b, p := setup(t, testbed.StoragePairOptions{})
	const vol = "part"
	const size = 16 << 20
	createVolume(t, p, p.Ctl[0], vol, size)
	pc, sc := primaryOf(t, p, vol)
	ns := b.Hosts[0].Netns
	if err := nbdWrite(ns, pc.NBDURI(vol), 0, size, 0x11, 30*time.Second); err != nil {
		t.Fatalf("writing the volume through its primary %s before the partition: %v", pc.Name, err)
	}
	waitSynced(t, p, vol, 30*time.Second)

	if err := cut(p, pc); err != nil {
		t.Fatal(err)
	}
	// Each side gets its own byte pattern and its own 4 KiB blocks: block 2i+k for
	// attempt i on side k, so every acknowledged write can be found afterwards.
	pats := [2]byte{0xa0, 0xb0}
	sides := [2]*testbed.PairController{pc, sc}
	var mu sync.Mutex
	accepted := [2][]int64{}
	refused := [2]int{}
	var lastErr [2]error
	var wg sync.WaitGroup
	stop := time.Now().Add(12 * time.Second)
	for k, c := range sides {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := int64(0); time.Now().Before(stop) && (2*i+1)*4096 < size; i++ {
				off := (2*i + int64(k)) * 4096
				err := nbdWrite(ns, c.NBDURI(vol), off, 4096, pats[k], 4*time.Second)
				mu.Lock()
				if err == nil {
					accepted[k] = append(accepted[k], off)
				} else {
					refused[k]++
					lastErr[k] = err
				}
				mu.Unlock()
				time.Sleep(100 * time.Millisecond)
			}
		}()
	}
	wg.Wait()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	during := p.View(ctx, vol)
	cancel()
	for k, c := range sides {
		t.Logf("during the partition, %s (primary before it: %v) accepted %d writes, refused or stalled %d (last: %v)",
			c.Name, k == 0, len(accepted[k]), refused[k], lastErr[k])
	}
	t.Logf("state during the partition: %s", during)
	if len(accepted[0]) > 0 && len(accepted[1]) > 0 {
		t.Errorf("both sides accepted writes during the partition: %s %d, %s %d",
			pc.Name, len(accepted[0]), sc.Name, len(accepted[1]))
	}
	if err := p.Heal(); err != nil {
		t.Fatal(err)
	}

	// The side that accepted writes is the one to keep; with none, the former primary.
	winner, loser := 0, 1
	if len(accepted[1]) > 0 {
		winner, loser = 1, 0
	}
	// Frozen (a fenced or held side) is no end state: it lasts until the sides see
	// each other again, and only a split waits for the operator.
	v, err := p.WaitVolume(vol, 60*time.Second, "synced or split after the heal", func(v testbed.PairView) bool {
		if v.Synced() {
			return true
		}
		for _, x := range v.Vol {
			if x != nil && x.Mirror != nil && x.Mirror.State == "split" {
				return true
			}
		}
		return false
	})
	if err != nil {
		t.Fatal(err)
	}
	if !v.Synced() {
		t.Logf("after the heal the pair reports %s: resolving, keeping %s", v, sides[winner].Name)
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		_, err := sides[winner].CLI(ctx, "volume", "resolve", vol, "--keep", sides[winner].Name)
		cancel()
		if err != nil {
			t.Fatal(err)
		}
	}
	waitSynced(t, p, vol, 90*time.Second)
	np, _ := primaryOf(t, p, vol)
	data, err := testbed.ReadNBD(ns, np.NBDURI(vol), size)
	if err != nil {
		t.Fatal(err)
	}
	block := func(off int64) []byte { return data[off : off+4096] }
	for _, off := range accepted[winner] {
		if !bytes.Equal(block(off), bytes.Repeat([]byte{pats[winner]}, 4096)) {
			t.Errorf("a write %s acknowledged during the partition (offset %d) is not on the volume", sides[winner].Name, off)
		}
	}
	for i := int64(0); (2*i+int64(loser))*4096 < size; i++ {
		off := (2*i + int64(loser)) * 4096
		if b := block(off); b[0] == pats[loser] {
			t.Errorf("a write refused by %s during the partition (offset %d) is on the volume", sides[loser].Name, off)
			break
		}
	}
	compareSides(t, b, p, vol)
}
