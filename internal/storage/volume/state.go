package volume

import (
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// object is a named volume, image or snapshot. Each object owns exactly one layer:
// a volume its writable top, an image or a snapshot its frozen layer.
type object struct {
	name      string
	kind      string
	size      atomic.Int64
	created   int64 // unix nanoseconds
	layer     *layer
	importing bool

	// io is held shared by every I/O request and exclusively by operations that change
	// the layer structure under the volume (snapshot, resize, merge, checkpoint).
	io sync.RWMutex
	// tab guards the top layer's table and inflight while the object is writable; it
	// is never held across device I/O.
	tab      sync.RWMutex
	inflight map[uint64]chan struct{}
	// busy stripes (by virtual cluster) are held shared across device I/O on a
	// top-layer cluster and exclusively to unmap one, so a cluster cannot be freed
	// (and later reused) under a request that is using it.
	busy [busyStripes]paddedRWMutex

	opens int // open handles, under Manager.mu
}

const busyStripes = 64

// paddedRWMutex keeps each stripe on its own cache line.
type paddedRWMutex struct {
	sync.RWMutex
	_ [64 - 24]byte
}

func (o *object) busyLock(vc uint64) *paddedRWMutex { return &o.busy[vc%busyStripes] }

func newObject(name, kind string, size, created int64, l *layer) *object {
	o := &object{name: name, kind: kind, created: created, layer: l, inflight: make(map[uint64]chan struct{})}
	o.size.Store(size)
	l.owner = o
	return o
}

func (o *object) readOnly() bool { return o.kind != KindVolume }

func (o *object) kindByte() byte {
	switch o.kind {
	case KindImage:
		return kImage
	case KindSnapshot:
		return kSnapshot
	}
	return kVolume
}

func kindName(k byte) string {
	switch k {
	case kImage:
		return KindImage
	case kSnapshot:
		return KindSnapshot
	}
	return KindVolume
}

func (o *object) info() Info {
	i := Info{
		Name:      o.name,
		Kind:      o.kind,
		Size:      o.size.Load(),
		Allocated: o.layer.tab.phys * ClusterSize,
		ReadOnly:  o.readOnly(),
		Created:   time.Unix(0, o.created).UTC(),
	}
	if p := o.layer.parent; p != nil && p.owner != nil {
		i.Parent = p.owner.name
	}
	return i
}

// state is the metadata: named objects and their layers. Replay and the live Manager
// change it only through apply, so both always agree.
type state struct {
	objects   map[string]*object
	layers    map[uint64]*layer
	nextLayer uint64
}

func newState() *state {
	return &state{objects: make(map[string]*object), layers: make(map[uint64]*layer), nextLayer: 1}
}

func (st *state) mappedEntries() int64 {
	var n int64
	for _, l := range st.layers {
		n += l.tab.count
	}
	return n
}

// canParent reports whether clones may stack on l: it must be frozen.
func canParent(l *layer) bool {
	o := l.owner
	return o != nil && !o.importing && (o.kind == KindImage || o.kind == KindSnapshot)
}

func (st *state) newLayer(id uint64, parent *layer) (*layer, error) {
	if id == 0 || st.layers[id] != nil || id < st.nextLayer {
		return nil, fmt.Errorf("layer id %d reused or invalid (next %d): %w", id, st.nextLayer, ErrCorrupt)
	}
	l := &layer{id: id, parent: parent, tab: newTable()}
	if parent != nil {
		parent.children++
	}
	st.layers[id] = l
	st.nextLayer = id + 1
	return l, nil
}

// dropLayer removes a childless layer and frees its physical clusters.
func (st *state) dropLayer(l *layer, free func(uint64)) {
	l.tab.each(func(_, e uint64) {
		if isPhys(e) {
			free(e - entPhys)
		}
	})
	if l.parent != nil {
		l.parent.children--
	}
	delete(st.layers, l.id)
}

// childOf returns the only child layer of l, or nil.
func (st *state) childOf(l *layer) *layer {
	for _, c := range st.layers {
		if c.parent == l {
			return c
		}
	}
	return nil
}

// apply performs one record on the state, calling free for every physical cluster it
// releases. It checks the record against the state and changes nothing when invalid.
func (st *state) apply(r *record, free func(uint64)) error {
	switch r.typ {
	case recCreate:
		if st.objects[r.name] != nil {
			return fmt.Errorf("create %q: name exists: %w", r.name, ErrCorrupt)
		}
		if strings.Contains(r.name, "@") || r.kind == kSnapshot || (r.flags&flagImporting != 0 && r.kind != kImage) {
			return fmt.Errorf("create %q: bad kind or flags: %w", r.name, ErrCorrupt)
		}
		var parent *layer
		if r.parent != 0 {
			parent = st.layers[r.parent]
			if parent == nil || !canParent(parent) || r.kind != kVolume {
				return fmt.Errorf("create %q: bad parent layer %d: %w", r.name, r.parent, ErrCorrupt)
			}
		}
		l, err := st.newLayer(r.layer, parent)
		if err != nil {
			return fmt.Errorf("create %q: %w", r.name, err)
		}
		o := newObject(r.name, kindName(r.kind), r.size, r.created, l)
		o.importing = r.flags&flagImporting != 0
		st.objects[r.name] = o
	case recSnapshot:
		v := st.objects[r.name]
		if v == nil || v.kind != KindVolume {
			return fmt.Errorf("snapshot of %q: no such volume: %w", r.name, ErrCorrupt)
		}
		if st.objects[r.name2] != nil || !strings.HasPrefix(r.name2, r.name+"@") {
			return fmt.Errorf("snapshot %q: bad or existing name: %w", r.name2, ErrCorrupt)
		}
		old := v.layer
		l, err := st.newLayer(r.layer, old)
		if err != nil {
			return fmt.Errorf("snapshot %q: %w", r.name2, err)
		}
		s := newObject(r.name2, KindSnapshot, v.size.Load(), r.created, old)
		st.objects[r.name2] = s
		v.layer = l
		l.owner = v
	case recResize:
		o := st.objects[r.name]
		if o == nil || o.kind != KindVolume || r.size < o.size.Load() {
			return fmt.Errorf("resize %q: no such volume or shrinking: %w", r.name, ErrCorrupt)
		}
		o.size.Store(r.size)
	case recDelete:
		o := st.objects[r.name]
		if o == nil || o.layer.children != 0 {
			return fmt.Errorf("delete %q: missing or has dependents: %w", r.name, ErrCorrupt)
		}
		st.dropLayer(o.layer, free)
		delete(st.objects, r.name)
	case recMerge:
		s := st.objects[r.name]
		if s == nil || s.kind != KindSnapshot || s.layer.children != 1 {
			return fmt.Errorf("merge %q: not a snapshot with exactly one dependent: %w", r.name, ErrCorrupt)
		}
		sl := s.layer
		c := st.childOf(sl)
		if c == nil {
			return fmt.Errorf("merge %q: dependent layer missing: %w", r.name, ErrCorrupt)
		}
		sl.tab.each(func(vc, e uint64) {
			if c.tab.get(vc) == entNone {
				c.tab.set(vc, e)
			} else if isPhys(e) {
				free(e - entPhys)
			}
		})
		c.parent = sl.parent
		delete(st.layers, sl.id)
		delete(st.objects, r.name)
	case recSeal:
		o := st.objects[r.name]
		if o == nil || !o.importing {
			return fmt.Errorf("seal %q: not an import in progress: %w", r.name, ErrCorrupt)
		}
		o.importing = false
	case recMap:
		l := st.layers[r.layer]
		if l == nil {
			return fmt.Errorf("map in missing layer %d: %w", r.layer, ErrCorrupt)
		}
		o := l.owner
		if l.children != 0 || (o.readOnly() && !o.importing) {
			return fmt.Errorf("map in frozen layer %d: %w", r.layer, ErrCorrupt)
		}
		old := l.tab.set(r.vc, r.entry)
		if isPhys(old) && old != r.entry {
			free(old - entPhys)
		}
	default:
		return fmt.Errorf("unknown record type %d: %w", r.typ, ErrCorrupt)
	}
	return nil
}

// checkChains verifies parent chains: no cycles, parents frozen, tops childless.
func (st *state) checkChains() error {
	for id, l := range st.layers {
		n := 0
		for p := l.parent; p != nil; p = p.parent {
			n++
			if n > len(st.layers) {
				return fmt.Errorf("layer %d: parent chain has a cycle: %w", id, ErrCorrupt)
			}
		}
		if l.parent != nil && !canParent(l.parent) {
			return fmt.Errorf("layer %d: parent %d is not a frozen image or snapshot: %w", id, l.parent.id, ErrCorrupt)
		}
	}
	return nil
}

// clone returns a deep copy of st's metadata (objects, layers, tables; not the locks
// or in-flight writes). Pointers that lead outside the maps are copied as such, so a
// damaged state stays damaged in the copy.
func (st *state) clone() *state {
	c := &state{
		objects:   make(map[string]*object, len(st.objects)),
		layers:    make(map[uint64]*layer, len(st.layers)),
		nextLayer: st.nextLayer,
	}
	layers := make(map[*layer]*layer, len(st.layers))
	objects := make(map[*object]*object, len(st.objects))
	var cloneObject func(*object) *object
	var cloneLayer func(*layer) *layer
	cloneLayer = func(l *layer) *layer {
		if l == nil {
			return nil
		}
		if n, ok := layers[l]; ok {
			return n
		}
		n := &layer{id: l.id, children: l.children, tab: l.tab.clone()}
		layers[l] = n
		n.parent = cloneLayer(l.parent)
		n.owner = cloneObject(l.owner)
		return n
	}
	cloneObject = func(o *object) *object {
		if o == nil {
			return nil
		}
		if n, ok := objects[o]; ok {
			return n
		}
		n := &object{name: o.name, kind: o.kind, created: o.created, importing: o.importing}
		n.size.Store(o.size.Load())
		objects[o] = n
		n.layer = cloneLayer(o.layer)
		return n
	}
	for id, l := range st.layers {
		c.layers[id] = cloneLayer(l)
	}
	for name, o := range st.objects {
		c.objects[name] = cloneObject(o)
	}
	return c
}
