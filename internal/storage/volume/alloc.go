package volume

import (
	"maps"
	"math/bits"
	"slices"
)

// The allocator of physical clusters places data so that what is contiguous in a
// volume tends to be contiguous on the device, because the data path does one device
// call per run of physically consecutive clusters (and the file system under a file
// disk does far less work for one large write than for many small ones).
//
// The device is cut into groups of groupSize clusters, and a volume's virtual space
// into chunks of the same size. A cluster of chunk c is placed at the same offset in
// one physical group: the group its chunk already uses (a mapped neighbour in the
// chunk tells which, and an in-memory reservation covers clusters still being
// written), or, for a chunk's first cluster, a group that is entirely free. Only when
// no such cluster is free does it take any free cluster. Placement is a hint and never
// a rule: nothing on disk depends on it, and reservations are forgotten on restart.

const (
	groupShift = 6
	groupSize  = 1 << groupShift // clusters per group: 4 MiB, the most one device call covers; one bitmap word
	groupMask  = groupSize - 1

	// maxReservations bounds the reservation map; it is cleared when full (the
	// neighbour rule still finds the group of any chunk with a mapped cluster).
	maxReservations = 1 << 14
)

// A group is exactly one word of the allocator's bitmaps.
const _ = uint(groupSize-64) + uint(64-groupSize)

// noGoal means the caller knows no preferred cluster.
const noGoal = ^uint64(0)

type resvKey struct{ layer, chunk uint64 }

// allocator is the set of free physical clusters (their freeing record is durable),
// with which of them are known to read as zeroes; guarded by Manager.amu.
type allocator struct {
	total     uint64
	free      bitmap  // clusters that can be handed out
	zero      bitmap  // free clusters known to read as zeroes (discarded)
	groupFree []uint8 // free clusters per group
	fullMap   bitmap  // groups of groupSize clusters that are entirely free
	nfree     uint64
	fullFree  uint64 // groups in fullMap
	groupHand uint64 // where the search for an entirely free group resumes
	wordHand  uint64 // where the search for any free cluster resumes
	resv      map[resvKey]uint64
}

// newAllocator returns the allocator of total clusters whose free clusters are those
// not in used, none of them known to read as zeroes.
func newAllocator(total uint64, used bitmap) allocator {
	a := allocator{
		total:     total,
		free:      newBitmap(total),
		zero:      newBitmap(total),
		groupFree: make([]uint8, len(used)), // a group is one word of the bitmap
		fullMap:   newBitmap(uint64(len(used))),
		resv:      make(map[resvKey]uint64),
	}
	for w := range a.free {
		v := ^used[w]
		if tail := total - uint64(w)*64; tail < 64 {
			v &= 1<<tail - 1
		}
		a.free[w] = v
		n := uint8(bits.OnesCount64(v))
		a.groupFree[w] = n
		a.nfree += uint64(n)
		if n == groupSize {
			a.fullFree++
			a.fullMap.set(uint64(w))
		}
	}
	return a
}

func (b bitmap) clear(p uint64) { b[p/64] &^= 1 << (p % 64) }

// put makes p free; zero tells whether it reads as zeroes.
func (a *allocator) put(p uint64, zero bool) {
	if a.free.has(p) {
		return
	}
	a.free.set(p)
	if zero {
		a.zero.set(p)
	} else {
		a.zero.clear(p)
	}
	a.nfree++
	g := p >> groupShift
	a.groupFree[g]++
	if a.groupFree[g] == groupSize {
		a.fullFree++
		a.fullMap.set(g)
	}
}

// take removes the free cluster p and reports whether it reads as zeroes.
func (a *allocator) take(p uint64) bool {
	g := p >> groupShift
	if a.groupFree[g] == groupSize {
		a.fullFree--
		a.fullMap.clear(g)
	}
	a.groupFree[g]--
	a.nfree--
	a.free.clear(p)
	zero := a.zero.has(p)
	a.zero.clear(p)
	return zero
}

// get hands out a free cluster for virtual cluster vc of layer; goal is the cluster a
// mapped neighbour in vc's chunk implies (noGoal if none). ok is false when nothing is free.
func (a *allocator) get(layer, vc, goal uint64) (p uint64, zero, ok bool) {
	if a.nfree == 0 {
		return 0, false, false
	}
	key := resvKey{layer, vc >> groupShift}
	g, reserved := a.resv[key]
	switch {
	case reserved:
	case goal != noGoal:
		g = goal >> groupShift
		a.reserve(key, g)
	default:
		g, reserved = a.fullGroup()
		if !reserved {
			g = noGoal
			break
		}
		a.reserve(key, g)
	}
	if g != noGoal {
		if p = g<<groupShift | vc&groupMask; p < a.total && a.free.has(p) {
			return p, a.take(p), true
		}
	}
	if p, ok = a.anyFree(); !ok {
		return 0, false, false
	}
	return p, a.take(p), true
}

func (a *allocator) reserve(key resvKey, g uint64) {
	if len(a.resv) >= maxReservations {
		clear(a.resv)
	}
	a.resv[key] = g
}

// fullGroup finds an entirely free group, resuming where the last search stopped.
func (a *allocator) fullGroup() (uint64, bool) {
	if a.fullFree == 0 {
		return 0, false
	}
	n := uint64(len(a.fullMap))
	for i := uint64(0); i <= n; i++ {
		w := (a.groupHand/64 + i) % n
		v := a.fullMap[w]
		if i == 0 {
			v &^= 1<<(a.groupHand%64) - 1 // groups before the hand come last
		}
		if v != 0 {
			a.groupHand = w*64 + uint64(bits.TrailingZeros64(v))
			return a.groupHand, true
		}
	}
	return 0, false
}

// anyFree finds a free cluster, resuming where the last search stopped.
func (a *allocator) anyFree() (uint64, bool) {
	n := uint64(len(a.free))
	for i := uint64(0); i < n; i++ {
		w := (a.wordHand + i) % n
		if v := a.free[w]; v != 0 {
			a.wordHand = w
			return w*64 + uint64(bits.TrailingZeros64(v)), true
		}
	}
	return 0, false
}

// markZero records that the free clusters [start, start+n) read as zeroes.
func (a *allocator) markZero(start, n uint64) {
	for p, end := start, start+n; p < end; {
		if p%64 == 0 && end-p >= 64 {
			a.zero[p/64] |= a.free[p/64]
			p += 64
			continue
		}
		if a.free.has(p) {
			a.zero.set(p)
		}
		p++
	}
}

// freeRuns calls f for every run of consecutive free clusters, in order.
func (a *allocator) freeRuns(f func(start, n uint64)) {
	var start, n uint64
	for p := uint64(0); p < a.total; {
		if p%64 == 0 && p+64 <= a.total {
			switch a.free[p/64] {
			case 0:
				if n > 0 {
					f(start, n)
					n = 0
				}
				p += 64
				continue
			case ^uint64(0):
				if n == 0 {
					start = p
				}
				n += 64
				p += 64
				continue
			}
		}
		if a.free.has(p) {
			if n == 0 {
				start = p
			}
			n++
		} else if n > 0 {
			f(start, n)
			n = 0
		}
		p++
	}
	if n > 0 {
		f(start, n)
	}
}

// neighbourGoal returns the physical cluster that a mapped neighbour of vc in its
// chunk implies for vc (noGoal if no cluster of the chunk is mapped in t).
func (t *table) neighbourGoal(vc uint64) uint64 {
	l := t.leaves[vc>>leafShift]
	if l == nil {
		return noGoal
	}
	// A chunk lies within one leaf (groupSize divides leafSize). Only a neighbour at
	// the same place in its group as in its chunk was placed by the chunk rule and
	// names the chunk's group.
	i := int(vc & leafMask)
	lo := i &^ groupMask
	for d := 1; d < groupSize; d++ {
		for _, j := range [2]int{i - d, i + d} {
			if j < lo || j >= lo+groupSize {
				continue
			}
			if e := l.e[j]; isPhys(e) && (e-entPhys)&groupMask == uint64(j)&groupMask {
				return (e-entPhys)&^groupMask | vc&groupMask
			}
		}
	}
	return noGoal
}

// clone returns a deep copy of a.
func (a *allocator) clone() allocator {
	c := *a
	c.free = slices.Clone(a.free)
	c.zero = slices.Clone(a.zero)
	c.groupFree = slices.Clone(a.groupFree)
	c.fullMap = slices.Clone(a.fullMap)
	c.resv = maps.Clone(a.resv)
	return c
}
