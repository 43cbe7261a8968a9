package volume

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
)

// Check makes the metadata durable, then verifies it: it replays the on-disk
// checkpoint and journals (checking every CRC), cross-checks the result (every mapped
// cluster inside the device, no physical cluster owned twice, parents exist and are
// frozen, no cycles) and compares it with the live state and the free clusters. I/O is
// paused only to sync and copy the live state and allocator (memory copies); the
// replay and every comparison run against that copy while I/O goes on, and read the
// journal only up to where it ended at the copy. Report lists the problems; an error
// means it could not run.
func (m *Manager) Check() (Report, error) {
	if err := m.checkOpen("check"); err != nil {
		return Report{}, err
	}
	// ckptMu keeps checkpoints (the only writer of the checkpoint file, and the only
	// remover of journals) away until the replay is done.
	m.ckptMu.Lock()
	defer m.ckptMu.Unlock()
	snap, err := m.checkSnapshot()
	if err != nil {
		return Report{}, err
	}
	if checkSnapshotHook != nil {
		checkSnapshotHook()
	}
	rep, disk, used, err := checkDir(m.dir, m.total, &journalEnd{gen: snap.jgen, size: snap.jsize})
	if err != nil {
		return rep, err
	}
	if disk != nil {
		compareStates(&rep, snap.st, disk)
	}
	if used == nil {
		used, _ = validate(&Report{}, snap.st, m.total)
	}
	snap.checkAllocator(&rep, used)
	return rep, nil
}

// checkSnapshotHook, when set by a test, runs after Check resumed I/O and before it
// replays the metadata.
var checkSnapshotHook func()

// checkCopy is the live metadata and allocator at one sync point, and where the journal
// ended there.
type checkCopy struct {
	st          *state
	alloc       allocator
	used        int64
	pending     int64
	pendingNext int
	total       uint64
	jgen        uint64
	jsize       int64
}

// checkSnapshot makes the metadata durable and, with I/O paused for the last sync and
// the copy only, copies the live state and allocator.
func (m *Manager) checkSnapshot() (*checkCopy, error) {
	// Most of the data and metadata become durable here, while I/O goes on; the sync
	// under the pause then has only the last moment's writes left.
	if err := m.sync(); err != nil {
		return nil, fmt.Errorf("Failed to check: %w", err)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	unlock := m.lockAll()
	defer unlock()
	m.syncMu.Lock()
	defer m.syncMu.Unlock()
	freed, err := m.syncHeld()
	if err != nil {
		return nil, fmt.Errorf("Failed to check: %w", err)
	}
	m.release(freed)
	m.relMu.Lock() // every other release has finished too
	defer m.relMu.Unlock()
	c := &checkCopy{st: m.st.clone(), total: m.total, jgen: m.jgen, jsize: m.jsize.Load()}
	m.amu.Lock()
	c.alloc = m.alloc.clone()
	c.used, c.pending = m.used, m.pending
	m.amu.Unlock()
	m.jmu.Lock()
	c.pendingNext = len(m.pendingNext)
	m.jmu.Unlock()
	return c, nil
}

// CheckDir verifies the metadata in metaDir offline (no Manager may have it open),
// for a device of deviceSize bytes.
func CheckDir(metaDir string, deviceSize int64) (Report, error) {
	rep, _, _, err := checkDir(metaDir, uint64(deviceSize/ClusterSize), nil)
	return rep, err
}

// journalEnd is where a live journal ended at a sync point: journal gen, size bytes.
type journalEnd struct {
	gen  uint64
	size int64
}

func (r *Report) problem(format string, a ...any) {
	r.Problems = append(r.Problems, fmt.Sprintf(format, a...))
}

// checkDir replays the metadata files, up to end when it is not nil (later journals
// and bytes are being written meanwhile); it returns the replayed state (nil when it
// could not be built) and the set of used clusters.
func checkDir(dir string, total uint64, end *journalEnd) (Report, *state, bitmap, error) {
	rep := Report{ClustersTotal: int64(total)}
	b, err := os.ReadFile(filepath.Join(dir, checkpointName))
	if errors.Is(err, fs.ErrNotExist) {
		rep.problem("checkpoint file is missing")
		return rep, nil, nil, nil
	}
	if err != nil {
		return rep, nil, nil, fmt.Errorf("Failed to read checkpoint in %q: %w", dir, err)
	}
	st, gen, err := decodeCheckpoint(b)
	if err != nil {
		rep.problem("checkpoint: %v", err)
		return rep, nil, nil, nil
	}
	for g := gen; end == nil || g <= end.gen; g++ {
		path := filepath.Join(dir, journalName(g))
		jb, err := os.ReadFile(path)
		if errors.Is(err, fs.ErrNotExist) {
			if end != nil {
				rep.problem("journal %s is missing", filepath.Base(path))
				return rep, nil, nil, nil
			}
			break
		}
		if err != nil {
			return rep, nil, nil, fmt.Errorf("Failed to read journal %q: %w", path, err)
		}
		if end != nil && g == end.gen {
			if int64(len(jb)) < end.size {
				rep.problem("journal %s: %d bytes on disk, %d were synced", filepath.Base(path), len(jb), end.size)
				return rep, nil, nil, nil
			}
			jb = jb[:end.size]
		}
		rep.JournalFiles++
		jg, scan, err := scanJournal(jb)
		if err != nil || jg != g {
			rep.problem("journal %s: bad header (generation %d, want %d): %v", filepath.Base(path), jg, g, err)
			return rep, nil, nil, nil
		}
		if scan.tail != "" {
			rep.problem("journal %s: %s", filepath.Base(path), scan.tail)
		}
		for i := range scan.records {
			rep.JournalRecords++
			if err := st.apply(&scan.records[i], func(uint64) {}); err != nil {
				rep.problem("journal %s record %d: %v", filepath.Base(path), i, err)
				return rep, nil, nil, nil
			}
		}
	}
	used, _ := validate(&rep, st, total)
	return rep, st, used, nil
}

// validate cross-checks a state and returns the bitmap of used physical clusters.
func validate(rep *Report, st *state, total uint64) (bitmap, int64) {
	rep.Objects = len(st.objects)
	rep.Layers = len(st.layers)
	used := newBitmap(total)
	var n int64
	children := make(map[uint64]int)
	for id, l := range st.layers {
		if id >= st.nextLayer {
			rep.problem("layer %d: id not below the next layer id %d", id, st.nextLayer)
		}
		if l.owner == nil || l.owner.layer != l || st.objects[l.owner.name] != l.owner {
			rep.problem("layer %d: not owned by exactly one object", id)
		}
		if l.parent != nil {
			if st.layers[l.parent.id] != l.parent {
				rep.problem("layer %d: parent layer %d does not exist", id, l.parent.id)
			} else if !canParent(l.parent) {
				rep.problem("layer %d: parent layer %d is not a frozen image or snapshot", id, l.parent.id)
			}
			children[l.parent.id]++
		}
		steps := 0
		for p := l.parent; p != nil; p = p.parent {
			if steps++; steps > len(st.layers) {
				rep.problem("layer %d: parent chain has a cycle", id)
				break
			}
		}
		l.tab.each(func(vc, e uint64) {
			if !isPhys(e) {
				return
			}
			p := e - entPhys
			if p >= total {
				rep.problem("layer %d: cluster %d maps physical cluster %d beyond the device (%d clusters)", id, vc, p, total)
				return
			}
			if used.has(p) {
				rep.problem("physical cluster %d is mapped more than once (again by layer %d cluster %d)", p, id, vc)
				return
			}
			used.set(p)
			n++
		})
	}
	for id, l := range st.layers {
		if children[id] != l.children {
			rep.problem("layer %d: child count %d, but %d layers name it as parent", id, l.children, children[id])
		}
	}
	for name, o := range st.objects {
		if o.name != name || validAnyName(name) != nil {
			rep.problem("object %q: bad name", name)
		}
		if (o.kind == KindSnapshot) != strings.Contains(name, "@") {
			rep.problem("object %q: kind %s does not match its name", name, o.kind)
		}
		if o.layer == nil || st.layers[o.layer.id] != o.layer {
			rep.problem("object %q: its layer does not exist", name)
		} else if o.kind == KindVolume && o.layer.children != 0 {
			rep.problem("object %q: a writable volume has dependent layers", name)
		}
	}
	rep.ClustersUsed = n
	return used, n
}

// compareStates reports every difference between the live state and the replayed one.
func compareStates(rep *Report, live, disk *state) {
	names := func(st *state) []string {
		var s []string
		for n := range st.objects {
			s = append(s, n)
		}
		sort.Strings(s)
		return s
	}
	if a, b := names(live), names(disk); strings.Join(a, ",") != strings.Join(b, ",") {
		rep.problem("live objects %v differ from the on-disk metadata %v", a, b)
	}
	for n, lo := range live.objects {
		do := disk.objects[n]
		if do == nil {
			continue
		}
		if lo.kind != do.kind || lo.size.Load() != do.size.Load() || lo.layer.id != do.layer.id || lo.importing != do.importing {
			rep.problem("object %q differs from the on-disk metadata", n)
		}
	}
	for id, ll := range live.layers {
		dl := disk.layers[id]
		if dl == nil {
			rep.problem("layer %d is not in the on-disk metadata", id)
			continue
		}
		lp, dp := uint64(0), uint64(0)
		if ll.parent != nil {
			lp = ll.parent.id
		}
		if dl.parent != nil {
			dp = dl.parent.id
		}
		if lp != dp {
			rep.problem("layer %d: parent %d live, %d on disk", id, lp, dp)
		}
		if ll.tab.count != dl.tab.count {
			rep.problem("layer %d: %d entries live, %d on disk", id, ll.tab.count, dl.tab.count)
			continue
		}
		diff := 0
		ll.tab.each(func(vc, e uint64) {
			if dl.tab.get(vc) != e {
				diff++
			}
		})
		if diff > 0 {
			rep.problem("layer %d: %d entries differ between live and on-disk metadata", id, diff)
		}
	}
	if len(live.layers) != len(disk.layers) {
		rep.problem("%d layers live, %d on disk", len(live.layers), len(disk.layers))
	}
}

// checkAllocator verifies that the copied free clusters are exactly the complement of
// the used ones.
func (c *checkCopy) checkAllocator(rep *Report, used bitmap) {
	if c.pending != 0 || c.pendingNext != 0 {
		rep.problem("%d clusters still pending free after a sync", c.pending)
	}
	a := &c.alloc
	var inUse, free, full uint64
	groupFree := make([]int, len(a.groupFree))
	for p := uint64(0); p < c.total; p++ {
		isFree := a.free.has(p)
		switch {
		case used.has(p) && isFree:
			rep.problem("cluster %d is both free and mapped", p)
		case !used.has(p) && !isFree:
			rep.problem("cluster %d is neither free nor mapped", p)
		}
		if a.zero.has(p) && !isFree {
			rep.problem("cluster %d is marked as reading zeroes but is not free", p)
		}
		if used.has(p) {
			inUse++
		}
		if isFree {
			free++
			groupFree[p>>groupShift]++
		}
	}
	for g, n := range groupFree {
		if int(a.groupFree[g]) != n {
			rep.problem("allocator counts %d free clusters in group %d, its bitmap %d", a.groupFree[g], g, n)
		}
		if n == groupSize {
			full++
		}
		if a.fullMap.has(uint64(g)) != (n == groupSize) {
			rep.problem("allocator's map of free groups is wrong for group %d (%d free clusters)", g, n)
		}
	}
	if free != a.nfree || full != a.fullFree {
		rep.problem("allocator counts %d free clusters and %d free groups, its bitmap %d and %d", a.nfree, a.fullFree, free, full)
	}
	if int64(inUse) != c.used {
		rep.problem("allocator counts %d used clusters, the tables map %d", c.used, inUse)
	}
}
