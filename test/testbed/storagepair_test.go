package testbed

import (
	"context"
	"net/http"
	"strings"
	"testing"
	"time"
)

// TestStoragePairBed checks the bed of a controller pair without the pair flags: both
// controllers come up with their four-disk pools, the hosts reach both, a partition
// cuts the controllers off from each other and from nothing else, and a controller
// killed with SIGKILL starts again with its volumes.
func TestStoragePairBed(t *testing.T) {
	b := New(t, Options{Hosts: 1})
	p := b.StartStoragePair(t, StoragePairOptions{Unpaired: true, DiskSize: "256MiB"})
	a, c := p.Ctl[0], p.Ctl[1]
	ctx := context.Background()
	for _, x := range p.Ctl {
		var pool struct {
			State string `json:"state"`
			Disks []any  `json:"disks"`
		}
		if err := x.Get(ctx, "/v1/pool", &pool); err != nil {
			t.Fatal(err)
		}
		if pool.State != "ok" || len(pool.Disks) != 4 {
			t.Fatalf("%s pool: state %q with %d disks, want ok with 4", x.Name, pool.State, len(pool.Disks))
		}
	}
	if err := a.Post(ctx, "/v1/volumes", map[string]any{"name": "v1", "size": 16 << 20}, nil); err != nil {
		t.Fatal(err)
	}
	reach := func(ns, addr string) bool {
		ctx, cancel := context.WithTimeout(context.Background(), 700*time.Millisecond)
		defer cancel()
		conn, err := DialContext(ctx, ns, "tcp", addr)
		if err == nil {
			conn.Close()
		}
		return err == nil
	}
	host := b.Hosts[0].Netns
	check := func(state string, aToB bool) {
		t.Helper()
		if got := reach(a.Netns, c.Addr); got != aToB {
			t.Errorf("%s: %s reaches %s: %v, want %v", state, a.Name, c.Name, got, aToB)
		}
		if got := reach(c.Netns, a.Addr); got != aToB {
			t.Errorf("%s: %s reaches %s: %v, want %v", state, c.Name, a.Name, got, aToB)
		}
		for _, x := range p.Ctl {
			if !reach(host, x.Addr) || !reach(host, x.NBDAddr) {
				t.Errorf("%s: host 0 does not reach %s", state, x.Name)
			}
		}
	}
	check("before the partition", true)
	if err := p.Partition(); err != nil {
		t.Fatal(err)
	}
	check("partitioned", false)
	if err := p.Heal(); err != nil {
		t.Fatal(err)
	}
	check("healed", true)

	a.Kill()
	if a.Running() {
		t.Fatal("the controller still runs after Kill")
	}
	if err := a.Start(); err != nil {
		t.Fatal(err)
	}
	v, err := a.Volume(ctx, "v1")
	if err != nil {
		t.Fatalf("the volume is gone after a crash and restart: %v", err)
	}
	if v.Size != 16<<20 || v.Mirror != nil {
		t.Errorf("unpaired volume after restart: %+v", v)
	}
	if _, err := a.CLI(ctx, "volume", "show", "v1"); err != nil {
		t.Error(err)
	}
	// The partner cannot serve a volume it never heard of.
	if err := c.Get(ctx, "/v1/volumes/v1", nil); err == nil || !strings.Contains(err.Error(), http.StatusText(http.StatusNotFound)) {
		t.Errorf("the unpaired partner answers for v1: %v", err)
	}
}
