package mirror

import (
	"context"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/growserver/grow/test/testbed"
)

// TestPairNamespaceAndRoles checks what an operator sees of a pair without any fault:
// a volume, snapshot or clone created on either controller exists on both with the same
// size; homes (and so primaries) are spread over both controllers; each volume's
// nbd_address is its home's service address, identical in both controllers' answers;
// the primary serves the volume over NBD and the secondary refuses to open it.
func TestPairNamespaceAndRoles(t *testing.T) {
	t.Parallel()
	b, p := setup(t, testbed.StoragePairOptions{})
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	a, c := p.Ctl[0], p.Ctl[1]
	homes := map[string]int{}
	for i := 0; i < 4; i++ {
		name := fmt.Sprintf("lay%d", i)
		v := createVolume(t, p, p.Ctl[i%2], name, 8<<20)
		homes[v.Vol[0].Mirror.Home]++
	}
	if homes[a.Name] == 0 || homes[c.Name] == 0 {
		t.Errorf("homes of four volumes are not spread over both controllers: %v", homes)
	}
	if err := c.Post(ctx, "/v1/volumes/lay0/snapshots", map[string]any{"name": "s1"}, nil); err != nil {
		t.Fatalf("snapshot on %s: %v", c.Name, err)
	}
	if err := a.Post(ctx, "/v1/volumes/lay0@s1/clone", map[string]any{"name": "lay0c"}, nil); err != nil {
		t.Fatalf("clone on %s: %v", a.Name, err)
	}
	for _, name := range []string{"lay0", "lay1", "lay2", "lay3", "lay0@s1", "lay0c"} {
		var got [2]*testbed.PairVolume
		for k, x := range p.Ctl {
			v, err := x.Volume(ctx, name)
			if err != nil {
				t.Errorf("%s does not exist on %s: %v", name, x.Name, err)
				continue
			}
			got[k] = v
		}
		if got[0] == nil || got[1] == nil {
			continue
		}
		if got[0].Size != got[1].Size || got[0].Kind != got[1].Kind {
			t.Errorf("%s differs: %+v on %s, %+v on %s", name, got[0], a.Name, got[1], c.Name)
		}
		if got[0].Kind != "volume" {
			continue
		}
		if got[0].NBDAddress != got[1].NBDAddress {
			t.Errorf("%s: nbd_address %q on %s, %q on %s", name, got[0].NBDAddress, a.Name, got[1].NBDAddress, c.Name)
		}
		if m := got[0].Mirror; m != nil {
			home := p.ByName(m.Home)
			if home == nil {
				t.Errorf("%s: home %q is neither controller", name, m.Home)
				continue
			}
			if want := net.JoinHostPort(home.ServiceIP, fmt.Sprint(testbed.PairNBDPort)); got[0].NBDAddress != want {
				t.Errorf("%s: nbd_address %q, want its home's service address %s", name, got[0].NBDAddress, want)
			}
		}
	}
	v := waitSynced(t, p, "lay0c", 30*time.Second)
	pc, err := v.Primary(p)
	if err != nil {
		t.Fatal(err)
	}
	ns := b.Hosts[0].Netns
	if out, err := testbed.NetnsCommand(ns, "nbdinfo", "--size", pc.NBDURI("lay0c")).CombinedOutput(); err != nil {
		t.Errorf("the primary %s does not serve lay0c: %v: %s", pc.Name, err, out)
	} else if strings.TrimSpace(string(out)) != fmt.Sprint(8<<20) {
		t.Errorf("lay0c through %s: size %s", pc.Name, out)
	}
	if out, err := testbed.NetnsCommand(ns, "nbdinfo", "--size", pc.Other().NBDURI("lay0c")).CombinedOutput(); err == nil {
		t.Errorf("the secondary %s opened lay0c over NBD: %s", pc.Other().Name, out)
	}

	// The operator's view: mirror status names both controllers; the resync rate set
	// through one controller applies to both.
	for _, x := range p.Ctl {
		out, err := x.CLI(ctx, "mirror", "status")
		if err != nil {
			t.Error(err)
		} else if !strings.Contains(out, a.Name) || !strings.Contains(out, c.Name) {
			t.Errorf("grow storage mirror status on %s does not name both controllers:\n%s", x.Name, out)
		}
	}
	if _, err := a.CLI(ctx, "mirror", "rate", "123MiB"); err != nil {
		t.Fatal(err)
	}
	for _, x := range p.Ctl {
		v, err := x.Volume(ctx, "lay1")
		if err != nil {
			t.Fatal(err)
		}
		if v.Mirror == nil || v.Mirror.Resync.Rate != 123<<20 {
			t.Errorf("after mirror rate 123MiB through %s, %s reports lay1 %s", a.Name, x.Name, v.Mirror.Raw)
		}
	}
}
