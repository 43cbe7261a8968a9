package pool

import "testing"

func TestLayoutLocate(t *testing.T) {
	const unit = 64 << 10
	const off0 = 1 << 20
	cases := []struct {
		name               string
		pairs              int64
		off, n             int64
		pair               int
		diskOff, length, u int64
	}{
		{"first byte, one pair", 1, 0, 4096, 0, off0, 4096, 0},
		{"one pair is one contiguous run", 1, unit - 10, 3 * unit, 0, off0 + unit - 10, 3 * unit, 0},
		{"unit 0 on pair 0", 2, 100, 50, 0, off0 + 100, 50, 0},
		{"unit 1 on pair 1", 2, unit + 5, 4096, 1, off0 + 5, 4096, 0},
		{"unit 2 back on pair 0, second unit of the disk", 2, 2 * unit, unit, 0, off0 + unit, unit, 1},
		{"a request crossing units stops at the boundary", 2, unit - 100, 300, 0, off0 + unit - 100, 100, 0},
		{"three pairs: unit 7 is pair 1, disk unit 2", 3, 7*unit + 1, 10, 1, off0 + 2*unit + 1, 10, 2},
		{"three pairs: unit 5 is pair 2, disk unit 1", 3, 5 * unit, 2 * unit, 2, off0 + unit, unit, 1},
	}
	for _, c := range cases {
		l := layout{unit: unit, pairs: c.pairs, unitsPerDisk: 100, dataOff: off0}
		pair, doff, n, u := l.locate(c.off, c.n)
		if pair != c.pair || doff != c.diskOff || n != c.length || u != c.u {
			t.Errorf("%s: locate(%d, %d) = pair %d, disk offset %d, length %d, disk unit %d; want %d, %d, %d, %d",
				c.name, c.off, c.n, pair, doff, n, u, c.pair, c.diskOff, c.length, c.u)
		}
	}
}

// TestLayoutBijective checks that every pool byte maps to a distinct disk byte inside the data area.
func TestLayoutBijective(t *testing.T) {
	for _, pairs := range []int64{1, 2, 3} {
		l := layout{unit: 4096, pairs: pairs, unitsPerDisk: 7, dataOff: dataOffsetFor(4096)}
		if l.size() != pairs*7*4096 {
			t.Fatalf("size = %d", l.size())
		}
		seen := map[[2]int64]bool{}
		for off := int64(0); off < l.size(); off += 512 {
			pair, doff, n, _ := l.locate(off, 512)
			if n != 512 {
				t.Fatalf("pairs %d off %d: length %d", pairs, off, n)
			}
			if doff < l.dataOff || doff+n > l.diskBytes() {
				t.Fatalf("pairs %d off %d: disk offset %d outside data area", pairs, off, doff)
			}
			k := [2]int64{int64(pair), doff}
			if seen[k] {
				t.Fatalf("pairs %d off %d: disk byte %v used twice", pairs, off, k)
			}
			seen[k] = true
		}
	}
}

func TestDataOffset(t *testing.T) {
	if got := dataOffsetFor(64 << 10); got != 1<<20 {
		t.Errorf("dataOffsetFor(64 KiB) = %d", got)
	}
	if got := dataOffsetFor(4 << 20); got != 4<<20 {
		t.Errorf("dataOffsetFor(4 MiB) = %d", got)
	}
}

func TestSplitRuns(t *testing.T) {
	const unit = 4096
	p := &Pool{l: layout{unit: unit, pairs: 3, unitsPerDisk: 100, dataOff: 1 << 20}}
	b := make([]byte, 10*unit)
	// From the middle of unit 1 to the middle of unit 11: pair 1 gets units 1, 4, 7, 10.
	runs := p.split(nil, b, unit+100, int64(len(b)))
	if len(runs) != 3 {
		t.Fatalf("%d runs, want 3", len(runs))
	}
	var total int64
	for _, r := range runs {
		var n int64
		for _, iov := range r.iovs {
			n += int64(len(iov))
		}
		if n != r.n {
			t.Fatalf("run %+v: iovecs hold %d bytes", r, n)
		}
		total += r.n
	}
	if total != int64(len(b)) {
		t.Fatalf("runs cover %d bytes, want %d", total, len(b))
	}
	r1 := runs[0]
	if r1.pair != 1 || r1.doff != 1<<20+100 || r1.n != 4*unit-100 || len(r1.iovs) != 4 {
		t.Fatalf("first run %+v", r1)
	}
	// A discard has runs without buffers.
	for _, r := range p.split(nil, nil, 0, 30*unit) {
		if r.iovs != nil || r.n != 10*unit {
			t.Fatalf("discard run %+v", r)
		}
	}
}

func TestAdvance(t *testing.T) {
	iovs := [][]byte{make([]byte, 3), make([]byte, 5), make([]byte, 2)}
	cases := []struct{ n, left, first int }{{0, 3, 3}, {2, 3, 1}, {3, 2, 5}, {4, 2, 4}, {8, 1, 2}, {10, 0, 0}}
	for _, c := range cases {
		got := advance(iovs, c.n)
		if len(got) != c.left || (c.left > 0 && len(got[0]) != c.first) {
			t.Errorf("advance(%d): %d iovecs, first %d", c.n, len(got), len(got[0]))
		}
	}
	if len(iovs[0]) != 3 {
		t.Fatal("advance changed its input")
	}
}
