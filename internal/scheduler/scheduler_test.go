package scheduler

import (
	"errors"
	"fmt"
	"math/rand"
	"testing"
)

const gib = int64(1) << 30

// planSizes are the S–E grades: vCPUs and memory.
var planSizes = []Request{
	{VCPUs: 4, MemoryBytes: 8 * gib}, {VCPUs: 4, MemoryBytes: 4 * gib}, {VCPUs: 2, MemoryBytes: 2 * gib},
	{VCPUs: 2, MemoryBytes: 1 * gib}, {VCPUs: 1, MemoryBytes: gib / 2}, {VCPUs: 1, MemoryBytes: gib / 4},
}

func randomCluster(r *rand.Rand) *Snapshot {
	n := 1 + r.Intn(12)
	s := &Snapshot{}
	for i := 0; i < n; i++ {
		s.Hosts = append(s.Hosts, Host{
			ID:          fmt.Sprintf("h%d", i),
			CPUs:        2 + r.Intn(31),
			MemoryBytes: int64(4+r.Intn(60)) * gib,
			Maintenance: r.Intn(6) == 0,
		})
	}
	return s
}

// check verifies the invariants every placement must keep.
func check(t *testing.T, s *Snapshot, pol Policy, maint map[int]int64) {
	t.Helper()
	active := 0
	for i := range s.Hosts {
		h := &s.Hosts[i]
		if h.UsedMemory > h.MemoryBytes {
			t.Fatalf("host %s memory overcommitted: %d > %d", h.ID, h.UsedMemory, h.MemoryBytes)
		}
		if float64(h.UsedVCPUs) > float64(h.CPUs)*pol.CPUOvercommit {
			t.Fatalf("host %s CPU beyond ratio: %d vCPUs on %d CPUs", h.ID, h.UsedVCPUs, h.CPUs)
		}
		for g, n := range h.Groups {
			if n > 1 {
				t.Fatalf("host %s carries %d servers of group %s", h.ID, n, g)
			}
		}
		if h.Maintenance && h.UsedMemory != maint[i] {
			t.Fatalf("host %s in maintenance received a server", h.ID)
		}
		if !h.Maintenance {
			active++
		}
	}
	if pol.NPlusOne && (active > 1 || len(maint) > 0) {
		if short := EvacuationShortfall(s); short > 0 {
			t.Fatalf("N+1 broken: a host's servers exceed the others' free memory by %d bytes", short)
		}
	}
}

// feasibleAnywhere is the brute-force answer to "could any host take req?".
func feasibleAnywhere(s *Snapshot, req Request, pol Policy) bool {
	for i := range s.Hosts {
		c := *s
		c.Hosts = append([]Host(nil), s.Hosts...)
		c.Hosts[i].Groups = map[string]int{}
		for k, v := range s.Hosts[i].Groups {
			c.Hosts[i].Groups[k] = v
		}
		h := &c.Hosts[i]
		if h.Maintenance || h.ID == req.Exclude || h.FreeMemory() < req.MemoryBytes ||
			float64(h.UsedVCPUs+req.VCPUs) > float64(h.CPUs)*pol.CPUOvercommit || (req.Group != "" && h.Groups[req.Group] > 0) {
			continue
		}
		c.Assign(i, req)
		active := 0
		for j := range c.Hosts {
			if !c.Hosts[j].Maintenance {
				active++
			}
		}
		inMaint := len(c.Hosts) - active
		if pol.NPlusOne && (active > 1 || inMaint > 0) && EvacuationShortfall(&c) > 0 {
			continue
		}
		return true
	}
	return false
}

// TestPlaceProperties places random requests on random clusters and checks, after every
// decision, that no invariant broke and that a refusal was justified.
func TestPlaceProperties(t *testing.T) {
	for seed := int64(1); seed <= 300; seed++ {
		r := rand.New(rand.NewSource(seed))
		s := randomCluster(r)
		pol := Policy{CPUOvercommit: 1 + float64(r.Intn(8))/2, NPlusOne: r.Intn(4) != 0}
		maint := map[int]int64{}
		// Pre-load maintenance hosts: their servers must stay evacuable too.
		for i := range s.Hosts {
			if s.Hosts[i].Maintenance {
				s.Hosts[i].UsedMemory = int64(r.Intn(3)) * gib
				maint[i] = s.Hosts[i].UsedMemory
			}
		}
		placed := 0
		for k := 0; k < 200; k++ {
			req := planSizes[r.Intn(len(planSizes))]
			if r.Intn(3) == 0 {
				req.Group = fmt.Sprintf("g%d", r.Intn(3))
			}
			if r.Intn(10) == 0 && len(s.Hosts) > 0 {
				req.Exclude = s.Hosts[r.Intn(len(s.Hosts))].ID
			}
			before := fmt.Sprint(s.Hosts)
			i, err := Place(s, req, pol)
			if fmt.Sprint(s.Hosts) != before {
				t.Fatalf("seed %d: Place mutated the snapshot", seed)
			}
			if err != nil {
				if !errors.Is(err, ErrNoCapacity) {
					t.Fatalf("seed %d: unexpected error %v", seed, err)
				}
				if feasibleAnywhere(s, req, pol) {
					t.Fatalf("seed %d: refused %+v (%v) though a host could take it", seed, req, err)
				}
				continue
			}
			if s.Hosts[i].ID == req.Exclude {
				t.Fatalf("seed %d: placed on the excluded host", seed)
			}
			s.Assign(i, req)
			placed++
			check(t, s, pol, maint)
		}
		if placed == 0 && len(s.Hosts) > 2 {
			t.Logf("seed %d: nothing placed on %d hosts", seed, len(s.Hosts))
		}
	}
}

func TestGroupsSpread(t *testing.T) {
	s := &Snapshot{}
	for i := 0; i < 3; i++ {
		s.Hosts = append(s.Hosts, Host{ID: fmt.Sprintf("h%d", i), CPUs: 16, MemoryBytes: 64 * gib})
	}
	req := Request{VCPUs: 1, MemoryBytes: gib, Group: "cust/db"}
	seen := map[int]bool{}
	for k := 0; k < 3; k++ {
		i, err := Place(s, req, Policy{CPUOvercommit: 1})
		if err != nil {
			t.Fatal(err)
		}
		if seen[i] {
			t.Fatalf("group member %d placed on host %d again", k, i)
		}
		seen[i] = true
		s.Assign(i, req)
	}
	if _, err := Place(s, req, Policy{CPUOvercommit: 1}); !errors.Is(err, ErrNoCapacity) {
		t.Fatalf("a fourth member on three hosts: err = %v, want ErrNoCapacity", err)
	}
}

func TestBestFitAndMaintenance(t *testing.T) {
	s := &Snapshot{Hosts: []Host{
		{ID: "roomy", CPUs: 8, MemoryBytes: 64 * gib},
		{ID: "tight", CPUs: 8, MemoryBytes: 64 * gib, UsedMemory: 62 * gib},
		{ID: "tighter-but-maint", CPUs: 8, MemoryBytes: 64 * gib, UsedMemory: 63 * gib, Maintenance: true},
	}}
	i, err := Place(s, Request{VCPUs: 1, MemoryBytes: gib}, Policy{CPUOvercommit: 2})
	if err != nil || s.Hosts[i].ID != "tight" {
		t.Fatalf("placed on %v (%v), want tight (best fit, maintenance skipped)", i, err)
	}
	// N+1: with two 64 GiB hosts, at most 64 GiB may be used in all.
	s = &Snapshot{Hosts: []Host{{ID: "a", CPUs: 64, MemoryBytes: 64 * gib}, {ID: "b", CPUs: 64, MemoryBytes: 64 * gib}}}
	placed := int64(0)
	for {
		i, err := Place(s, Request{VCPUs: 1, MemoryBytes: 8 * gib}, DefaultPolicy)
		if err != nil {
			break
		}
		s.Assign(i, Request{VCPUs: 1, MemoryBytes: 8 * gib})
		placed += 8 * gib
	}
	if placed != 64*gib {
		t.Fatalf("N+1 on two 64 GiB hosts admitted %d GiB, want 64", placed/gib)
	}
	// A single host with N+1 on still takes servers (nowhere to evacuate to).
	s = &Snapshot{Hosts: []Host{{ID: "solo", CPUs: 2, MemoryBytes: 2 * gib}}}
	if _, err := Place(s, Request{VCPUs: 1, MemoryBytes: gib}, DefaultPolicy); err != nil {
		t.Fatalf("single host refused: %v", err)
	}
	if _, err := Place(s, Request{VCPUs: 0, MemoryBytes: gib}, DefaultPolicy); err == nil || errors.Is(err, ErrNoCapacity) {
		t.Fatalf("0 vCPUs: err = %v, want invalid request", err)
	}
}
