package volume

import (
	"bytes"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/growserver/grow/internal/storage/dev"
	"golang.org/x/sys/unix"
)

// Handle is one opener's view of a volume (for example one NBD connection). Its
// methods may be called concurrently.
type Handle struct {
	m      *Manager
	o      *object
	closed atomic.Bool
}

var zeroCluster [ClusterSize]byte

// testHookIO, when set by a test, runs between the lookup of a top-layer cluster and
// the device I/O on it, to widen race windows.
var testHookIO func()

var clusterPool = sync.Pool{New: func() any { return new([ClusterSize]byte) }}

// Size is the current virtual size of the volume.
func (h *Handle) Size() int64 { return h.o.size.Load() }

// ReadOnly reports whether writes are refused (images and snapshots).
func (h *Handle) ReadOnly() bool { return h.o.readOnly() }

// Name is the name the handle was opened with.
func (h *Handle) Name() string { return h.o.name }

func (h *Handle) usable(op string) error {
	if h.closed.Load() || h.m.closed.Load() {
		return fmt.Errorf("Failed to %s %q: %w", op, h.o.name, ErrClosed)
	}
	return nil
}

// inRange checks [off, off+n) against the size; caller holds o.io shared.
func (h *Handle) inRange(op string, off, n int64) error {
	size := h.o.size.Load()
	if off < 0 || n < 0 || off > size || n > size-off {
		return fmt.Errorf("Failed to %s %q: range %d+%d is outside the volume (%d bytes): %w", op, h.o.name, off, n, size, ErrInvalid)
	}
	return nil
}

// ReadAt fills p from the volume at off.
func (h *Handle) ReadAt(p []byte, off int64) error {
	return h.read(&devIO{kind: ioRead, p: p}, off, int64(len(p)))
}

// SpliceTo appends the n bytes at off to the pipe whose write end is fd (see
// dev.Splicer), without copying data that the device can splice: large reads of a
// plain NBD connection go from the page cache to the socket. Unallocated and zero
// ranges are written into the pipe as zeroes. It fails with dev.ErrNoSplice when the
// device cannot splice; after any error the caller should use ReadAt instead.
func (h *Handle) SpliceTo(fd int, off int64, n int) error {
	if h.m.splice == nil {
		return fmt.Errorf("Failed to splice %q: %w", h.o.name, dev.ErrNoSplice)
	}
	return h.read(&devIO{kind: ioSplice, fd: fd}, off, int64(n))
}

// read reads length bytes at off into x (a buffer or a pipe).
func (h *Handle) read(x *devIO, off, length int64) error {
	if err := h.usable("read"); err != nil {
		return err
	}
	o := h.o
	o.io.RLock()
	defer o.io.RUnlock()
	if err := h.inRange("read", off, length); err != nil {
		return err
	}
	for length > 0 {
		vc := uint64(off >> clusterShift)
		in := off & (ClusterSize - 1)
		n, err := h.run(vc, in, length, x)
		if err == nil && n == 0 {
			n = min(length, ClusterSize-in)
			err = h.readCluster(vc, in, n, x)
		}
		if err != nil {
			return fmt.Errorf("Failed to read %q at %d: %w", o.name, off, err)
		}
		x.advance(n)
		length -= n
		off += n
	}
	return nil
}

// ioKind is what the device calls of one data-path operation do.
type ioKind uint8

const (
	ioRead ioKind = iota
	ioWrite
	ioSplice
	ioPipeWrite
)

// pipeWriter is a device that can take a write's data from a pipe without a copy in user
// space (cache.Cache and pool.Pool). SpliceFrom writes the next n bytes of the pipe whose
// read end is fd at off; it fails with dev.ErrNoSplice, taking nothing from the pipe,
// when it cannot.
type pipeWriter interface {
	SpliceFrom(fd int, off int64, n int) error
}

// devIO is the device side of one read, write or splice: p holds the bytes still to be
// read or written; a splice appends to the pipe fd instead, and a pipe write takes its
// data from the pipe fd.
type devIO struct {
	kind ioKind
	p    []byte
	fd   int
}

// do performs the next n bytes of the operation at device offset at.
func (x *devIO) do(m *Manager, at, n int64) error {
	var err error
	switch x.kind {
	case ioRead:
		_, err = m.dev.ReadAt(x.p[:n], at)
	case ioWrite:
		_, err = m.dev.WriteAt(x.p[:n], at)
	case ioPipeWrite:
		if m.pipeIn != nil {
			err = m.pipeIn.SpliceFrom(x.fd, at, int(n))
			if !errors.Is(err, dev.ErrNoSplice) {
				break
			}
		}
		// The device cannot take the data from the pipe: copy it through a buffer.
		for err = nil; n > 0 && err == nil; {
			k := min(n, ClusterSize)
			buf := clusterPool.Get().(*[ClusterSize]byte)
			if err = dev.ReadPipe(x.fd, buf[:k]); err == nil {
				_, err = m.dev.WriteAt(buf[:k], at)
			}
			clusterPool.Put(buf)
			at += k
			n -= k
		}
	default:
		err = m.splice.SpliceTo(x.fd, at, int(n))
	}
	return err
}

// zero performs the next n bytes of a read of a range that reads as zeroes.
func (x *devIO) zero(n int64) error {
	if x.kind != ioSplice {
		clear(x.p[:n])
		return nil
	}
	for n > 0 {
		k, err := unix.Write(x.fd, zeroCluster[:min(n, ClusterSize)])
		switch {
		case err == unix.EINTR:
			continue
		case err != nil:
			return fmt.Errorf("Failed to write zeroes into the pipe: %w", err)
		}
		n -= int64(k)
	}
	return nil
}

// advance moves past n bytes that were done.
func (x *devIO) advance(n int64) {
	if x.kind != ioSplice && x.kind != ioPipeWrite {
		x.p = x.p[n:]
	}
}

// maxRun bounds how many clusters one device call covers (distinct busy stripes).
const maxRun = busyStripes

// run does the I/O for the longest run of clusters from vc that map to consecutive
// physical clusters (in the top layer of a writable volume, anywhere in the chain of
// a frozen one) with one device call, and returns the bytes it covered: 0 when vc
// itself is not mapped that way, and the caller falls back to one cluster at a time.
func (h *Handle) run(vc uint64, in, length int64, x *devIO) (int64, error) {
	o := h.o
	top := o.layer
	var e uint64
	var n int64
	if o.readOnly() {
		// Frozen layers do not change under I/O: no locks.
		if e = resolve(top, vc); !isPhys(e) {
			return 0, nil
		}
		n = min(length, ClusterSize-in)
		for k := uint64(1); k < maxRun && n < length; k++ {
			if resolve(top, vc+k) != e+k {
				break
			}
			n += min(length-n, ClusterSize)
		}
	} else {
		var held [maxRun]*paddedRWMutex
		nheld := 0
		defer func() {
			for _, b := range held[:nheld] {
				b.RUnlock()
			}
		}()
		b := o.busyLock(vc)
		b.RLock()
		held[0], nheld = b, 1
		o.tab.RLock()
		e = top.tab.get(vc)
		o.tab.RUnlock()
		if !isPhys(e) {
			return 0, nil
		}
		n = min(length, ClusterSize-in)
		for k := uint64(1); k < maxRun && n < length; k++ {
			// Never wait for a further stripe while holding one: no lock cycles.
			b := o.busyLock(vc + k)
			if !b.TryRLock() {
				break
			}
			o.tab.RLock()
			ek := top.tab.get(vc + k)
			o.tab.RUnlock()
			if ek != e+k {
				b.RUnlock()
				break
			}
			held[nheld] = b
			nheld++
			n += min(length-n, ClusterSize)
		}
		if testHookIO != nil {
			testHookIO()
		}
	}
	return n, x.do(h.m, int64(e-entPhys)<<clusterShift+in, n)
}

// readCluster reads n bytes at in within virtual cluster vc into x.
func (h *Handle) readCluster(vc uint64, in, n int64, x *devIO) error {
	o := h.o
	top := o.layer
	var e uint64
	if o.readOnly() {
		e = resolve(top, vc)
	} else {
		busy := o.busyLock(vc)
		busy.RLock()
		o.tab.RLock()
		e = top.tab.get(vc)
		o.tab.RUnlock()
		if isPhys(e) {
			if testHookIO != nil {
				testHookIO()
			}
			err := x.do(h.m, int64(e-entPhys)<<clusterShift+in, n)
			busy.RUnlock()
			return err
		}
		busy.RUnlock()
		if e == entNone {
			e = resolve(top.parent, vc)
		}
	}
	if isPhys(e) {
		return x.do(h.m, int64(e-entPhys)<<clusterShift+in, n)
	}
	return x.zero(n)
}

// WriteAt writes p at off; with fua it is durable when WriteAt returns.
func (h *Handle) WriteAt(p []byte, off int64, fua bool) error {
	return h.writeFrom(&devIO{kind: ioWrite, p: p}, off, int64(len(p)), fua)
}

// SpliceFrom writes the n bytes held in the pipe whose read end is fd (non-blocking) at
// off, as WriteAt writes a buffer, taking them from the pipe: into mapped clusters the
// device moves them with splice(2) (see pool.Pool.SpliceFrom), so a large write of a
// plain NBD connection is never copied through user space; a first write of a cluster
// reads its part into a buffer for the copy-on-write. An error before any byte was taken
// leaves the pipe full (the caller may then use WriteAt); after one, the range's content
// is undefined, as after a failed WriteAt.
func (h *Handle) SpliceFrom(fd int, off int64, n int, fua bool) error {
	return h.writeFrom(&devIO{kind: ioPipeWrite, fd: fd}, off, int64(n), fua)
}

// writeFrom writes length bytes from x at off; with fua they are durable when it returns.
func (h *Handle) writeFrom(x *devIO, off, length int64, fua bool) error {
	if err := h.usable("write"); err != nil {
		return err
	}
	if h.o.readOnly() {
		return fmt.Errorf("Failed to write %q: it is a %s: %w", h.o.name, h.o.kind, ErrReadOnly)
	}
	o := h.o
	o.io.RLock()
	err := h.inRange("write", off, length)
	if err == nil {
		err = h.write(x, off, length)
	}
	o.io.RUnlock()
	if err != nil {
		return err
	}
	h.m.markDirty()
	if fua {
		return h.flush("write")
	}
	return nil
}

// write writes length bytes from x at off cluster by cluster; caller holds o.io shared.
func (h *Handle) write(x *devIO, off, length int64) error {
	for length > 0 {
		vc := uint64(off >> clusterShift)
		in := off & (ClusterSize - 1)
		var n int64
		var err error
		if !h.o.readOnly() { // an import writes into its image's own layer cluster by cluster
			n, err = h.run(vc, in, length, x)
		}
		if err == nil && n == 0 {
			n = min(length, ClusterSize-in)
			if x.kind == ioPipeWrite {
				// A first write copies on write in a buffer: take the data out of the pipe.
				buf := clusterPool.Get().(*[ClusterSize]byte)
				if err = dev.ReadPipe(x.fd, buf[:n]); err == nil {
					err = h.writeCluster(vc, in, buf[:n])
				}
				clusterPool.Put(buf)
			} else {
				err = h.writeCluster(vc, in, x.p[:n])
			}
		}
		if err != nil {
			return fmt.Errorf("Failed to write %q at %d: %w", h.o.name, off, err)
		}
		x.advance(n)
		length -= n
		off += n
	}
	return nil
}

// writeCluster writes data at in within virtual cluster vc, allocating (copy-on-write)
// on the first write.
func (h *Handle) writeCluster(vc uint64, in int64, data []byte) error {
	o, d := h.o, h.m.dev
	top := o.layer
	busy := o.busyLock(vc)
	for {
		busy.RLock()
		o.tab.RLock()
		e := top.tab.get(vc)
		o.tab.RUnlock()
		if isPhys(e) {
			if testHookIO != nil {
				testHookIO()
			}
			_, err := d.WriteAt(data, int64(e-entPhys)<<clusterShift+in)
			busy.RUnlock()
			return err
		}
		busy.RUnlock()

		o.tab.Lock()
		e = top.tab.get(vc)
		if isPhys(e) {
			o.tab.Unlock()
			continue
		}
		if ch := o.inflight[vc]; ch != nil {
			o.tab.Unlock()
			<-ch
			continue
		}
		ch := make(chan struct{})
		o.inflight[vc] = ch
		goal := top.tab.neighbourGoal(vc)
		o.tab.Unlock()
		return h.allocWrite(vc, e, goal, in, data, ch)
	}
}

// allocWrite gives vc a new physical cluster (near goal, see allocator.get) holding the
// parent's data (or zeroes) overlaid with data, then maps it. ch marks vc as being allocated.
func (h *Handle) allocWrite(vc, e, goal uint64, in int64, data []byte, ch chan struct{}) error {
	o, m := h.o, h.m
	top := o.layer
	done := func() {
		delete(o.inflight, vc)
		close(ch)
	}
	p, zero, err := m.allocate(top.id, vc, goal)
	if err != nil {
		o.tab.Lock()
		done()
		o.tab.Unlock()
		return err
	}
	buf, at := data, int64(p)<<clusterShift
	var pooled *[ClusterSize]byte
	if in != 0 || len(data) != ClusterSize {
		var base uint64 = entNone
		if e == entNone {
			base = resolve(top.parent, vc)
		}
		switch {
		case !isPhys(base) && zero:
			// The new cluster already reads as zeroes: write only the data.
			at += in
		case isPhys(base):
			pooled = clusterPool.Get().(*[ClusterSize]byte)
			buf = pooled[:]
			_, err = m.dev.ReadAt(buf, int64(base-entPhys)<<clusterShift)
			copy(buf[in:], data)
		default:
			pooled = clusterPool.Get().(*[ClusterSize]byte)
			buf = pooled[:]
			clear(buf)
			copy(buf[in:], data)
		}
	}
	if err == nil {
		_, err = m.dev.WriteAt(buf, at)
	}
	if pooled != nil {
		clusterPool.Put(pooled)
	}
	o.tab.Lock()
	defer o.tab.Unlock()
	if err != nil {
		m.unalloc(p)
		done()
		return err
	}
	top.tab.set(vc, physEntry(p))
	m.log(&record{typ: recMap, layer: top.id, vc: vc, entry: physEntry(p)})
	done()
	return nil
}

func (m *Manager) markDirty() {
	if !m.dirty.Load() {
		m.dirty.Store(true)
	}
}

// Flush makes every write that completed before it durable.
func (h *Handle) Flush() error {
	if err := h.usable("flush"); err != nil {
		return err
	}
	return h.flush("flush")
}

func (h *Handle) flush(op string) error {
	if err := h.m.sync(); err != nil {
		return fmt.Errorf("Failed to %s %q: %w", op, h.o.name, err)
	}
	return nil
}

// Trim gives whole clusters in the range back (they then read as zeroes); partial
// clusters at the ends are left as they are, as NBD allows.
func (h *Handle) Trim(off, length int64, fua bool) error {
	return h.zero("trim", off, length, false, false, true, fua)
}

// WriteZeroes makes the range read as zeroes. Whole clusters are unmapped unless
// noHole asks for allocated zeroes; with fast it fails with ErrNotFast, changing
// nothing, when it would have to write data.
func (h *Handle) WriteZeroes(off, length int64, noHole, fast, fua bool) error {
	return h.zero("write zeroes to", off, length, noHole, fast, false, fua)
}

func (h *Handle) zero(op string, off, length int64, noHole, fast, trim, fua bool) error {
	if err := h.usable(op); err != nil {
		return err
	}
	o := h.o
	if o.readOnly() {
		return fmt.Errorf("Failed to %s %q: it is a %s: %w", op, o.name, o.kind, ErrReadOnly)
	}
	o.io.RLock()
	err := h.inRange(op, off, length)
	if err == nil && fast {
		err = h.checkFast(op, off, length, noHole)
	}
	for err == nil && length > 0 {
		vc := uint64(off >> clusterShift)
		in := off & (ClusterSize - 1)
		n := min(length, ClusterSize-in)
		switch {
		case n == ClusterSize && !noHole:
			h.unmapCluster(vc)
		case trim:
			// Partial clusters of a trim stay as they are.
		case noHole || !h.readsZero(vc):
			err = h.writeCluster(vc, in, zeroCluster[:n])
			if err != nil {
				err = fmt.Errorf("Failed to %s %q at %d: %w", op, o.name, off, err)
			}
		}
		off += n
		length -= n
	}
	o.io.RUnlock()
	if err != nil {
		return err
	}
	h.m.markDirty()
	if fua {
		return h.flush(op)
	}
	return nil
}

// checkFast tells whether zeroing the range needs data writes.
func (h *Handle) checkFast(op string, off, length int64, noHole bool) error {
	if length == 0 {
		return nil
	}
	if noHole {
		return fmt.Errorf("Failed to %s %q: allocated zeroes need data writes: %w", op, h.o.name, ErrNotFast)
	}
	for _, edge := range []int64{off, off + length - 1} {
		vc := uint64(edge >> clusterShift)
		start := max(off, int64(vc)<<clusterShift)
		end := min(off+length, int64(vc+1)<<clusterShift)
		if end-start < ClusterSize && !h.readsZero(vc) {
			return fmt.Errorf("Failed to %s %q: a partial cluster holds data: %w", op, h.o.name, ErrNotFast)
		}
	}
	return nil
}

// readsZero reports whether vc is unallocated (hole or zero) through the whole chain.
func (h *Handle) readsZero(vc uint64) bool {
	o := h.o
	o.tab.RLock()
	e := o.layer.tab.get(vc)
	o.tab.RUnlock()
	if e == entNone {
		e = resolve(o.layer.parent, vc)
	}
	return !isPhys(e)
}

// unmapCluster drops vc from the top layer, masking the parent with a zero entry when
// the parent has data there, and frees its physical cluster.
func (h *Handle) unmapCluster(vc uint64) {
	o, m := h.o, h.m
	top := o.layer
	// Exclusive on the cluster's busy stripe: no I/O is using the cluster being freed.
	busy := o.busyLock(vc)
	busy.Lock()
	defer busy.Unlock()
	o.tab.Lock()
	for {
		ch := o.inflight[vc]
		if ch == nil {
			break
		}
		o.tab.Unlock()
		<-ch
		o.tab.Lock()
	}
	defer o.tab.Unlock()
	want := entNone
	if isPhys(resolve(top.parent, vc)) {
		want = entZero
	}
	old := top.tab.get(vc)
	if old == want {
		return
	}
	top.tab.set(vc, want)
	r := &record{typ: recMap, layer: top.id, vc: vc, entry: want}
	if isPhys(old) {
		m.log(r, old-entPhys)
	} else {
		m.log(r)
	}
}

// Extents describes the allocation of the range, true to the thin layout through clones.
func (h *Handle) Extents(off, length int64) ([]Extent, error) {
	if err := h.usable("map"); err != nil {
		return nil, err
	}
	o := h.o
	o.io.RLock()
	defer o.io.RUnlock()
	if err := h.inRange("map", off, length); err != nil {
		return nil, err
	}
	if !o.readOnly() {
		o.tab.RLock()
		defer o.tab.RUnlock()
	}
	var out []Extent
	add := func(n int64, data bool) {
		if k := len(out); k > 0 && out[k-1].Hole == !data {
			out[k-1].Length += n
			return
		}
		out = append(out, Extent{Length: n, Hole: !data, Zero: !data})
	}
	end := off + length
	for off < end {
		vc := uint64(off >> clusterShift)
		if !chainHasLeaf(o.layer, vc) {
			// The rest of this leaf is unmapped in every layer.
			leafEnd := int64((vc|leafMask)+1) << clusterShift
			n := min(end, leafEnd) - off
			add(n, false)
			off += n
			continue
		}
		n := min(end-off, ClusterSize-(off&(ClusterSize-1)))
		add(n, isPhys(resolve(o.layer, vc)))
		off += n
	}
	return out, nil
}

func chainHasLeaf(l *layer, vc uint64) bool {
	for ; l != nil; l = l.parent {
		if l.tab.hasLeaf(vc) {
			return true
		}
	}
	return false
}

// Close releases the handle; further calls fail with ErrClosed.
func (h *Handle) Close() error {
	if h.closed.Swap(true) {
		return nil
	}
	h.m.mu.Lock()
	h.o.opens--
	h.m.mu.Unlock()
	return nil
}

// isZero reports whether every byte of b is zero.
func isZero(b []byte) bool {
	for len(b) > 0 {
		n := min(len(b), ClusterSize)
		if !bytes.Equal(b[:n], zeroCluster[:n]) {
			return false
		}
		b = b[n:]
	}
	return true
}
