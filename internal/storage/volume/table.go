package volume

// A table maps a layer's virtual clusters to entries. It is a sparse two-level table:
// a map of leaves of leafSize entries each, so memory follows allocated clusters, never
// the virtual size.

const (
	leafShift = 9
	leafSize  = 1 << leafShift
	leafMask  = leafSize - 1
)

// Entry values: entNone falls through to the parent, entZero reads as zeroes, and
// any other value v maps physical cluster v-entPhys.
const (
	entNone  uint64 = 0
	entZero  uint64 = 1
	entPhys  uint64 = 2
	maxEntry uint64 = 1<<62 - 1
)

func physEntry(p uint64) uint64 { return p + entPhys }

func isPhys(e uint64) bool { return e >= entPhys }

type leaf struct {
	e [leafSize]uint64
	n int // entries that are not entNone
}

type table struct {
	leaves map[uint64]*leaf
	count  int64 // entries that are not entNone
	phys   int64 // entries that map a physical cluster
}

func newTable() table { return table{leaves: make(map[uint64]*leaf)} }

func (t *table) get(vc uint64) uint64 {
	l := t.leaves[vc>>leafShift]
	if l == nil {
		return entNone
	}
	return l.e[vc&leafMask]
}

// hasLeaf reports whether any entry of the leaf holding vc is set.
func (t *table) hasLeaf(vc uint64) bool { return t.leaves[vc>>leafShift] != nil }

// set stores e for vc and returns the previous entry.
func (t *table) set(vc, e uint64) uint64 {
	k := vc >> leafShift
	l := t.leaves[k]
	if l == nil {
		if e == entNone {
			return entNone
		}
		l = new(leaf)
		t.leaves[k] = l
	}
	old := l.e[vc&leafMask]
	if old == e {
		return old
	}
	l.e[vc&leafMask] = e
	switch {
	case old == entNone:
		l.n++
		t.count++
	case e == entNone:
		l.n--
		t.count--
	}
	if isPhys(old) {
		t.phys--
	}
	if isPhys(e) {
		t.phys++
	}
	if l.n == 0 {
		delete(t.leaves, k)
	}
	return old
}

// each calls f for every entry that is set, in no particular order.
func (t *table) each(f func(vc, e uint64)) {
	for k, l := range t.leaves {
		base := k << leafShift
		for i, e := range l.e {
			if e != entNone {
				f(base+uint64(i), e)
			}
		}
	}
}

// layer is one level of a chain. Its table is guarded by the owning object's tab lock
// while it is a writable top; once frozen (image, snapshot) it changes only while the
// I/O of every object that reads through it is stopped.
type layer struct {
	id       uint64
	parent   *layer
	children int
	owner    *object
	tab      table
}

// resolve finds the effective entry of vc in the chain starting at l (no locking).
func resolve(l *layer, vc uint64) uint64 {
	for ; l != nil; l = l.parent {
		if e := l.tab.get(vc); e != entNone {
			return e
		}
	}
	return entNone
}

// clone returns a deep copy of t.
func (t *table) clone() table {
	c := table{leaves: make(map[uint64]*leaf, len(t.leaves)), count: t.count, phys: t.phys}
	for k, l := range t.leaves {
		n := *l
		c.leaves[k] = &n
	}
	return c
}
