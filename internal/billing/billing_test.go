package billing

import (
	"testing"
	"time"
)

func TestDefaultPlans(t *testing.T) {
	want := map[string][3]int64{ // vCPUs, memory MiB, price
		"S": {4, 8192, 300000}, "A": {4, 4096, 180000}, "B": {2, 2048, 100000},
		"C": {2, 1024, 60000}, "D": {1, 512, 40000}, "E": {1, 256, 30000},
	}
	for _, p := range DefaultPlans() {
		w, ok := want[p.Name]
		if !ok || int64(p.VCPUs) != w[0] || p.MemoryBytes != w[1]*mib || p.PriceYen != w[2] {
			t.Errorf("plan %s = %+v, want %v", p.Name, p, w)
		}
		delete(want, p.Name)
	}
	if len(want) != 0 {
		t.Errorf("missing plans %v", want)
	}
}

func TestCompute(t *testing.T) {
	nov := func(d, h int) time.Time { return time.Date(2026, 11, d, h, 0, 0, 0, time.UTC) }
	segs := []Segment{
		// A full month on B.
		{ServerID: "s1", ServerName: "web", Plan: "B", PriceYen: 100000, TrafficBytes: 500 * gb, From: nov(1, 0).AddDate(0, -2, 0)},
		// E for the first half, then resized to C for the rest (30-day month).
		{ServerID: "s2", ServerName: "db", Plan: "E", PriceYen: 30000, TrafficBytes: 100 * gb, From: nov(1, 0), To: nov(16, 0)},
		{ServerID: "s2", ServerName: "db", Plan: "C", PriceYen: 60000, TrafficBytes: 300 * gb, From: nov(16, 0)},
		// Deleted before the month: nothing.
		{ServerID: "s3", ServerName: "old", Plan: "S", PriceYen: 300000, From: nov(1, 0).AddDate(0, -1, 0), To: nov(1, 0)},
	}
	traffic := map[string]int64{"s1": 500*gb + 1, "s2": 250 * gb}
	inv, err := Compute("cus-1", "2026-11", segs, traffic, DefaultRates)
	if err != nil {
		t.Fatal(err)
	}
	// 100000 + 15000 + 30000 + one started GB of overage for s1 (s2's allowance is C's 300 GB).
	if inv.TotalYen != 100000+15000+30000+100 {
		t.Fatalf("total = %d, lines %+v", inv.TotalYen, inv.Lines)
	}
	if len(inv.Lines) != 4 {
		t.Fatalf("lines = %+v", inv.Lines)
	}
	if _, err := Compute("c", "2026-13", nil, nil, DefaultRates); err == nil {
		t.Fatal("month 13 accepted")
	}
	if _, err := Compute("c", "2026-11", []Segment{{From: nov(2, 0), To: nov(1, 0)}}, nil, DefaultRates); err == nil {
		t.Fatal("segment ending before it starts accepted")
	}
	// Proration never rounds up: one second of plan S.
	inv, _ = Compute("c", "2026-11", []Segment{{ServerID: "x", Plan: "S", PriceYen: 300000, From: nov(1, 0), To: nov(1, 0).Add(time.Second)}}, nil, DefaultRates)
	if inv.TotalYen != 0 {
		t.Fatalf("one second of S cost ¥%d, want ¥0 (rounded down)", inv.TotalYen)
	}
}
