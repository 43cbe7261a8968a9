package volume

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/growserver/grow/internal/storage/dev"
)

// TestRandomizedModel runs random operations on volumes, images, snapshots and clones,
// compares every object with an in-memory byte model after each step, runs Check after
// each step and reopens the Manager (with and without a checkpoint) now and then.
func TestRandomizedModel(t *testing.T) {
	t.Run("discard", func(t *testing.T) { runModel(t, nil) })
	// Without a Discarder no cluster is known to read as zeroes.
	t.Run("no-discard", func(t *testing.T) {
		runModel(t, func(f *dev.File) dev.Device { return plainDevice{f} })
	})
}

func runModel(t *testing.T, wrap func(*dev.File) dev.Device) {
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	rng := rand.New(rand.NewPCG(seed, 2))
	b := newBedWith(t, 128*MiB, wrap)
	model := map[string][]byte{}
	parent := map[string]string{}
	steps := 300
	if testing.Short() {
		steps = 100
	}
	names := func(pred func(string) bool) []string {
		var s []string
		for n := range model {
			if pred(n) {
				s = append(s, n)
			}
		}
		sort.Strings(s)
		return s
	}
	pick := func(s []string) string { return s[rng.IntN(len(s))] }
	isVol := func(n string) bool {
		i, _ := b.m.Get(n)
		return i.Kind == KindVolume
	}
	cloneable := func(n string) bool {
		i, _ := b.m.Get(n)
		return i.Kind == KindImage || i.Kind == KindSnapshot
	}
	counter := 0
	newName := func(p string) string { counter++; return fmt.Sprintf("%s%d", p, counter) }
	randRange := func(size int64) (int64, int64) {
		var off, n int64
		switch rng.IntN(3) {
		case 0: // cluster aligned
			c := size / ClusterSize
			if c == 0 {
				return 0, size
			}
			off = rng.Int64N(c) * ClusterSize
			n = min(int64(1+rng.IntN(3))*ClusterSize, size-off)
		default:
			off = rng.Int64N(size)
			n = 1 + rng.Int64N(min(size-off, 3*ClusterSize))
		}
		return off, n
	}
	for step := 0; step < steps; step++ {
		vols := names(isVol)
		var desc string
		var touched []string // nil: compare everything
		switch op := rng.IntN(100); {
		case op < 8 || len(model) == 0:
			n := newName("v")
			size := int64(1+rng.IntN(16)) * 64 * 1024
			if rng.IntN(2) == 0 {
				size += int64(rng.IntN(128)) * 512
			}
			desc = fmt.Sprintf("create %s %d", n, size)
			if _, err := b.m.Create(n, size); err != nil {
				t.Fatalf("step %d %s: %v", step, desc, err)
			}
			model[n] = make([]byte, size)
		case op < 13:
			n := newName("img")
			size := int64(1+rng.IntN(12)) * 64 * 1024
			data := make([]byte, size)
			for c := int64(0); c < size; c += ClusterSize {
				if rng.IntN(3) > 0 {
					copy(data[c:], pattern(ClusterSize, byte(rng.IntN(256))))
				}
			}
			short := int64(0)
			if rng.IntN(4) == 0 {
				short = rng.Int64N(size)
				clear(data[size-short:])
			}
			desc = fmt.Sprintf("import %s %d (short by %d)", n, size, short)
			if _, err := b.m.ImportImage(n, size, bytes.NewReader(data[:size-short]), nil); err != nil {
				t.Fatalf("step %d %s: %v", step, desc, err)
			}
			model[n] = data
		case op < 50 && len(vols) > 0:
			v := pick(vols)
			off, n := randRange(int64(len(model[v])))
			p := pattern(int(n), byte(rng.IntN(256)))
			fua := rng.IntN(5) == 0
			desc = fmt.Sprintf("write %s %d+%d fua=%v", v, off, n, fua)
			touched = []string{v}
			if err := withHandle(b.m, v, func(h *Handle) error { return h.WriteAt(p, off, fua) }); err != nil {
				t.Fatalf("step %d %s: %v", step, desc, err)
			}
			copy(model[v][off:], p)
		case op < 58 && len(vols) > 0:
			v := pick(vols)
			off, n := randRange(int64(len(model[v])))
			desc = fmt.Sprintf("trim %s %d+%d", v, off, n)
			touched = []string{v}
			if err := withHandle(b.m, v, func(h *Handle) error { return h.Trim(off, n, false) }); err != nil {
				t.Fatalf("step %d %s: %v", step, desc, err)
			}
			for c := (off + ClusterSize - 1) / ClusterSize * ClusterSize; c+ClusterSize <= off+n; c += ClusterSize {
				clear(model[v][c : c+ClusterSize])
			}
		case op < 66 && len(vols) > 0:
			v := pick(vols)
			off, n := randRange(int64(len(model[v])))
			noHole, fast := rng.IntN(3) == 0, rng.IntN(2) == 0
			desc = fmt.Sprintf("zero %s %d+%d nohole=%v fast=%v", v, off, n, noHole, fast)
			touched = []string{v}
			err := withHandle(b.m, v, func(h *Handle) error { return h.WriteZeroes(off, n, noHole, fast, false) })
			switch {
			case err == nil:
				clear(model[v][off : off+n])
			case fast && errors.Is(err, ErrNotFast):
			default:
				t.Fatalf("step %d %s: %v", step, desc, err)
			}
		case op < 72 && len(vols) > 0:
			v := pick(vols)
			s := newName("s")
			desc = fmt.Sprintf("snapshot %s@%s", v, s)
			if _, err := b.m.Snapshot(v, s); err != nil {
				t.Fatalf("step %d %s: %v", step, desc, err)
			}
			model[v+"@"+s] = bytes.Clone(model[v])
			parent[v+"@"+s] = parent[v]
			parent[v] = v + "@" + s
		case op < 80:
			src := names(cloneable)
			if len(src) == 0 {
				continue
			}
			s := pick(src)
			n := newName("c")
			desc = fmt.Sprintf("clone %s %s", s, n)
			if _, err := b.m.Clone(s, n); err != nil {
				t.Fatalf("step %d %s: %v", step, desc, err)
			}
			model[n] = bytes.Clone(model[s])
			parent[n] = s
		case op < 84 && len(vols) > 0:
			v := pick(vols)
			grow := int64(rng.IntN(64)) * 512
			desc = fmt.Sprintf("resize %s +%d", v, grow)
			touched = []string{v}
			if err := b.m.Resize(v, int64(len(model[v]))+grow); err != nil {
				t.Fatalf("step %d %s: %v", step, desc, err)
			}
			model[v] = append(model[v], make([]byte, grow)...)
		case op < 93:
			n := pick(names(func(string) bool { return true }))
			info, _ := b.m.Get(n)
			desc = fmt.Sprintf("delete %s (%s)", n, info.Kind)
			err := b.m.Delete(n)
			hasClone := false
			for c, p := range parent {
				if p == n && !strings.HasPrefix(c, strings.SplitN(n, "@", 2)[0]+"@") && c != strings.SplitN(n, "@", 2)[0] {
					_, alive := model[c]
					hasClone = hasClone || alive
				}
			}
			hasSnap := len(names(func(s string) bool { return strings.HasPrefix(s, n+"@") })) > 0
			switch {
			case err == nil:
				if hasClone || (info.Kind == KindVolume && hasSnap) {
					t.Fatalf("step %d %s: deleted although it has dependents", step, desc)
				}
				delete(model, n)
				for c, p := range parent {
					if p == n {
						parent[c] = parent[n]
					}
				}
				delete(parent, n)
			case errors.Is(err, ErrInUse):
				if !hasClone && !(info.Kind == KindVolume && hasSnap) {
					t.Fatalf("step %d %s: refused without dependents: %v", step, desc, err)
				}
			default:
				t.Fatalf("step %d %s: %v", step, desc, err)
			}
		case op < 96:
			desc = "checkpoint"
			if err := b.m.Checkpoint(); err != nil {
				t.Fatalf("step %d %s: %v", step, desc, err)
			}
		default:
			ck := rng.IntN(2) == 0
			desc = fmt.Sprintf("reopen checkpoint=%v", ck)
			b.reopen(ck)
		}
		rep, err := b.m.Check()
		if err != nil || !rep.Clean() {
			t.Fatalf("step %d %s: check: %v %q", step, desc, err, rep.Problems)
		}
		if touched != nil && step%25 != 0 {
			sub := map[string][]byte{}
			for _, n := range touched {
				sub[n] = model[n]
			}
			compareObjects(t, b.m, sub, fmt.Sprintf("step %d %s", step, desc))
			continue
		}
		compareModel(t, b.m, model, fmt.Sprintf("step %d %s", step, desc))
	}
	b.reopen(false)
	compareModel(t, b.m, model, "final reopen")
}

func withHandle(m *Manager, name string, f func(*Handle) error) error {
	h, err := m.Open(name)
	if err != nil {
		return err
	}
	defer h.Close()
	return f(h)
}

func compareModel(t *testing.T, m *Manager, model map[string][]byte, what string) {
	t.Helper()
	list := m.List()
	if len(list) != len(model) {
		t.Fatalf("%s: %d objects, model has %d", what, len(list), len(model))
	}
	// After a Check (which syncs), every used cluster belongs to exactly one object.
	var alloc int64
	for _, i := range list {
		alloc += i.Allocated
	}
	if st := m.Stats(); st.ClustersPendingFree == 0 && st.BytesUsed != alloc {
		t.Fatalf("%s: %d bytes used on the device, objects own %d", what, st.BytesUsed, alloc)
	}
	for _, i := range list {
		if want, ok := model[i.Name]; !ok || i.Size != int64(len(want)) {
			t.Fatalf("%s: object %q (size %d) not in the model or size differs", what, i.Name, i.Size)
		}
	}
	compareObjects(t, m, model, what)
}

// compareObjects compares the contents and extents of the given objects with the model.
func compareObjects(t *testing.T, m *Manager, model map[string][]byte, what string) {
	t.Helper()
	for name, want := range model {
		err := withHandle(m, name, func(h *Handle) error {
			if h.Size() != int64(len(want)) {
				return fmt.Errorf("size %d, model %d", h.Size(), len(want))
			}
			got := make([]byte, len(want))
			if err := h.ReadAt(got, 0); err != nil {
				return err
			}
			if !bytes.Equal(got, want) {
				return fmt.Errorf("contents differ from the model")
			}
			ext, err := h.Extents(0, int64(len(want)))
			if err != nil {
				return err
			}
			off, total := int64(0), int64(0)
			for _, e := range ext {
				if e.Hole && !isZero(want[off:off+e.Length]) {
					return fmt.Errorf("extent %d+%d reported as a hole holds data", off, e.Length)
				}
				off += e.Length
				total += e.Length
			}
			if total != int64(len(want)) {
				return fmt.Errorf("extents cover %d bytes of %d", total, len(want))
			}
			return nil
		})
		if err != nil {
			t.Fatalf("%s: %q: %v", what, name, err)
		}
	}
}
