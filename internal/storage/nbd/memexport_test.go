package nbd

import (
	"bytes"
	"errors"
	"fmt"
	"sort"
	"sync"
	"sync/atomic"
	"time"
)

// memCluster is the allocation unit of memExport, like a thin volume's cluster.
const memCluster = 64 << 10

// Cluster states of a memExport.
const (
	clusterHole = iota // unallocated, reads as zeroes
	clusterData        // allocated, holds data
	clusterZero        // allocated, known to read as zeroes
)

// memExport is an in-memory thin export for tests: clusters are allocated on first
// write, and Trim/WriteZeroes of whole clusters make them holes again.
type memExport struct {
	mu       sync.RWMutex
	data     []byte
	state    []byte // per cluster: clusterHole, clusterData or clusterZero
	readOnly bool
	noFast   atomic.Bool // WriteZeroes with Fast fails with ErrFastZeroUnsupported

	// Counters the tests look at.
	flushes, fuas, caches, trims, zeroes atomic.Int64
	lastZero                             atomic.Value // ZeroFlags

	// delay, when set, is applied to reads at offsets it returns non-zero for.
	delay func(off int64) time.Duration
	// failAt, when >= 0, makes any access covering that offset fail with an I/O error.
	failAt int64
}

func newMemExport(size int64) *memExport {
	return &memExport{
		data:   make([]byte, size),
		state:  make([]byte, (size+memCluster-1)/memCluster),
		failAt: -1,
	}
}

func (m *memExport) check(off, length int64) error {
	if off < 0 || length < 0 || off+length > int64(len(m.data)) {
		return fmt.Errorf("range %d+%d outside export of %d bytes: %w", off, length, len(m.data), ErrInvalid)
	}
	if m.failAt >= 0 && off <= m.failAt && m.failAt < off+length {
		return fmt.Errorf("simulated media error at %d", m.failAt)
	}
	return nil
}

func (m *memExport) Size() int64 { return int64(len(m.data)) }

// content returns a copy of [off, off+length) taken under the lock.
func (m *memExport) content(off, length int64) []byte {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return bytes.Clone(m.data[off : off+length])
}
func (m *memExport) ReadOnly() bool { return m.readOnly }

func (m *memExport) ReadAt(p []byte, off int64) error {
	if err := m.check(off, int64(len(p))); err != nil {
		return err
	}
	if m.delay != nil {
		if d := m.delay(off); d > 0 {
			time.Sleep(d)
		}
	}
	m.mu.RLock()
	copy(p, m.data[off:])
	m.mu.RUnlock()
	return nil
}

func (m *memExport) WriteAt(p []byte, off int64, fua bool) error {
	if m.readOnly {
		return ErrReadOnly
	}
	if err := m.check(off, int64(len(p))); err != nil {
		return err
	}
	m.mu.Lock()
	copy(m.data[off:], p)
	for c := off / memCluster; c <= (off+int64(len(p))-1)/memCluster; c++ {
		m.state[c] = clusterData
	}
	m.mu.Unlock()
	if fua {
		m.fuas.Add(1)
	}
	return nil
}

func (m *memExport) Flush() error { m.flushes.Add(1); return nil }

// zeroRange zeroes [off, off+length); whole clusters in it become holes, or with
// keep allocated zero clusters.
func (m *memExport) zeroRange(off, length int64, keep bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	clear(m.data[off : off+length])
	st := byte(clusterHole)
	if keep {
		st = clusterZero
	}
	for c := (off + memCluster - 1) / memCluster; (c+1)*memCluster <= off+length; c++ {
		m.state[c] = st
	}
}

func (m *memExport) Trim(off, length int64, fua bool) error {
	if m.readOnly {
		return ErrReadOnly
	}
	if err := m.check(off, length); err != nil {
		return err
	}
	m.trims.Add(1)
	m.zeroRange(off, length, false)
	return nil
}

func (m *memExport) WriteZeroes(off, length int64, f ZeroFlags) error {
	if m.readOnly {
		return ErrReadOnly
	}
	if err := m.check(off, length); err != nil {
		return err
	}
	m.lastZero.Store(f)
	if f.Fast && m.noFast.Load() {
		return ErrFastZeroUnsupported
	}
	m.zeroes.Add(1)
	m.zeroRange(off, length, f.NoHole)
	return nil
}

func (m *memExport) Cache(off, length int64) error {
	if err := m.check(off, length); err != nil {
		return err
	}
	m.caches.Add(1)
	return nil
}

// Extents reports holes (Hole+Zero), allocated zero clusters (Zero) and data, merging
// neighbours of the same kind.
func (m *memExport) Extents(off, length int64) ([]Extent, error) {
	if err := m.check(off, length); err != nil {
		return nil, err
	}
	if length == 0 {
		return nil, ErrInvalid
	}
	m.mu.RLock()
	defer m.mu.RUnlock()
	var out []Extent
	end := off + length
	for pos := off; pos < end; {
		c := pos / memCluster
		next := min((c+1)*memCluster, end)
		e := Extent{Length: next - pos}
		switch m.state[c] {
		case clusterHole:
			e.Hole, e.Zero = true, true
		case clusterZero:
			e.Zero = true
		}
		if n := len(out); n > 0 && out[n-1].Hole == e.Hole && out[n-1].Zero == e.Zero {
			out[n-1].Length += e.Length
		} else {
			out = append(out, e)
		}
		pos = next
	}
	return out, nil
}

func (m *memExport) Close() error { return nil }

// memExports is a catalogue of memExports; every Open hands out a handle whose
// Close is counted, so tests can check that connections close what they open.
type memExports struct {
	mu      sync.Mutex
	exports map[string]*memExport
	desc    map[string]string
	opens   atomic.Int64
	closes  atomic.Int64
}

func newMemExports() *memExports {
	return &memExports{exports: map[string]*memExport{}, desc: map[string]string{}}
}

func (e *memExports) add(name, desc string, m *memExport) *memExport {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.exports[name] = m
	e.desc[name] = desc
	return m
}

func (e *memExports) Open(name string) (Export, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	m, ok := e.exports[name]
	if !ok {
		return nil, fmt.Errorf("Failed to open %q: %w", name, ErrUnknownExport)
	}
	e.opens.Add(1)
	return &memHandle{memExport: m, parent: e}, nil
}

func (e *memExports) List() []ExportInfo {
	e.mu.Lock()
	defer e.mu.Unlock()
	var out []ExportInfo
	for n := range e.exports {
		out = append(out, ExportInfo{Name: n, Description: e.desc[n]})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// memHandle is one connection's view of a memExport.
type memHandle struct {
	*memExport
	parent *memExports
	closed atomic.Bool
}

func (h *memHandle) Close() error {
	if !h.closed.CompareAndSwap(false, true) {
		return errors.New("export closed twice")
	}
	h.parent.closes.Add(1)
	return nil
}
