// Package cache is the storage controller's shared read cache: one Cache wraps the
// pool and is shared by every NBD connection, so that all connections see the same
// data (which is what lets the NBD server advertise MULTI_CONN honestly).
//
// The cache is write-through: a write reaches the device before it is acknowledged and
// then updates (or, for a page it covers entirely, drops) any cached copy, so a FLUSH
// only has to sync the device and nothing acknowledged is ever held only in memory. It
// must never return data older than the last completed write to the same bytes, and it
// must never take a global lock on the read path: pages are spread over independently
// locked shards, each evicting with CLOCK.
//
// A page is 64 KiB (the cluster size) with validity tracked per 4 KiB block, so a small
// random read that misses costs one small device read, not a whole page.
package cache

import (
	"errors"
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/growserver/grow/internal/storage/dev"
)

// PageSize is the unit the cache holds data in; it equals the volume cluster size.
const PageSize = 64 << 10

// BlockSize is the granularity at which parts of a page are valid.
const BlockSize = 4 << 10

// maxShards bounds the number of independently locked shards.
const maxShards = 64

// bypassSize is the read size from which reads go straight to the device: streaming
// reads would only evict what small random reads use, and gain nothing from a copy.
const bypassSize = 256 << 10

// Stats are the cache's counters; Hits and Misses count page accesses.
type Stats struct {
	Hits     int64 `json:"hits"`
	Misses   int64 `json:"misses"`
	Bytes    int64 `json:"bytes"`
	Capacity int64 `json:"capacity"`
}

// Cache is a sharded read cache in front of a Device; it implements dev.Device and dev.Discarder.
type Cache struct {
	d        dev.Device
	size     int64
	capacity int64
	bypass   int
	shards   []shard
	mask     uint64
	bufs     sync.Pool
}

type slot struct {
	page  int64  // page number; -1 when free
	n     int    // page length (short only for the device's last page)
	valid uint32 // bit i: block i of the page holds the device's data
	data  []byte
	ref   atomic.Uint32 // CLOCK reference bit
}

type shard struct {
	mu       sync.RWMutex
	m        map[int64]int32
	slots    []slot // capacity maxSlots, never reallocated
	free     []int32
	hand     int
	maxSlots int
	gen      uint64 // bumped by every write or discard that touches a page of the shard
	hits     atomic.Int64
	misses   atomic.Int64
	used     atomic.Int64
	_        [64]byte
}

// New returns a cache of size bytes in front of d (size 0 disables caching).
func New(d dev.Device, size int64) *Cache {
	c := &Cache{d: d, size: d.Size()}
	pages := size / PageSize
	if pages <= 0 {
		return c
	}
	n := 1
	for n*2 <= maxShards && int64(n*2) <= pages {
		n *= 2
	}
	c.capacity = pages * PageSize
	c.shards = make([]shard, n)
	c.mask = uint64(n - 1)
	per := int(pages / int64(n))
	for i := range c.shards {
		c.shards[i].m = make(map[int64]int32, per)
		c.shards[i].maxSlots = per
		c.shards[i].slots = make([]slot, 0, per)
	}
	c.bypass = int(min(bypassSize, max(c.capacity/8, PageSize)))
	c.bufs.New = func() any { b := make([]byte, PageSize); return &b }
	return c
}

func (c *Cache) shardOf(page int64) *shard {
	h := uint64(page) * 0x9E3779B97F4A7C15
	return &c.shards[(h>>56)&c.mask]
}

// blocks returns the validity bits of the blocks overlapping [lo, hi) of a page.
func blocks(lo, hi int) uint32 {
	first, last := lo/BlockSize, (hi-1)/BlockSize
	return (uint32(1)<<(last+1) - 1) &^ (uint32(1)<<first - 1)
}

// fullBlocks returns the validity bits of the blocks of a page of length plen that
// [lo, hi) covers entirely.
func fullBlocks(lo, hi, plen int) uint32 {
	first := (lo + BlockSize - 1) / BlockSize
	end := hi / BlockSize
	if hi == plen {
		end = (plen + BlockSize - 1) / BlockSize
	}
	if end <= first {
		return 0
	}
	return (uint32(1)<<end - 1) &^ (uint32(1)<<first - 1)
}

// ReadAt reads from the cache, filling it from the device on a miss.
func (c *Cache) ReadAt(p []byte, off int64) (int, error) {
	if c.shards == nil || off < 0 || off+int64(len(p)) > c.size || len(p) >= c.bypass {
		return c.d.ReadAt(p, off)
	}
	done := 0
	for done < len(p) {
		pos := off + int64(done)
		page := pos / PageSize
		start := page * PageSize
		plen := int(min(PageSize, c.size-start))
		in := int(pos - start)
		n := min(len(p)-done, plen-in)
		need := blocks(in, in+n)
		s := c.shardOf(page)
		s.mu.RLock()
		if i, ok := s.m[page]; ok && s.slots[i].valid&need == need {
			sl := &s.slots[i]
			copy(p[done:done+n], sl.data[in:in+n])
			if sl.ref.Load() == 0 {
				sl.ref.Store(1)
			}
			s.mu.RUnlock()
			s.hits.Add(1)
			done += n
			continue
		}
		gen := s.gen
		s.mu.RUnlock()
		s.misses.Add(1)
		if err := c.fill(p[done:done+n], page, plen, in, s, gen); err != nil {
			return done, err
		}
		done += n
	}
	return done, nil
}

// fill reads the blocks of page that p (at in) needs from the device, copies p out and
// caches the blocks unless a write or discard touched the shard since gen was taken.
func (c *Cache) fill(p []byte, page int64, plen, in int, s *shard, gen uint64) error {
	lo := in / BlockSize * BlockSize
	hi := min((in+len(p)+BlockSize-1)/BlockSize*BlockSize, plen)
	bp := c.bufs.Get().(*[]byte)
	defer c.bufs.Put(bp)
	buf := (*bp)[:hi-lo]
	if _, err := c.d.ReadAt(buf, page*PageSize+int64(lo)); err != nil {
		return err
	}
	copy(p, buf[in-lo:])
	s.mu.Lock()
	if s.gen == gen {
		sl := s.lookup(page)
		if sl == nil {
			sl = s.insert(page, plen)
		}
		copy(sl.data[lo:hi], buf)
		sl.valid |= blocks(lo, hi)
	}
	s.mu.Unlock()
	return nil
}

func (s *shard) lookup(page int64) *slot {
	if i, ok := s.m[page]; ok {
		return &s.slots[i]
	}
	return nil
}

// insert adds an empty (nothing valid) slot for page, evicting with CLOCK when the
// shard is full; s.mu is held.
func (s *shard) insert(page int64, plen int) *slot {
	var i int32
	switch {
	case len(s.free) > 0:
		i = s.free[len(s.free)-1]
		s.free = s.free[:len(s.free)-1]
		s.used.Add(1)
	case len(s.slots) < s.maxSlots:
		i = int32(len(s.slots))
		s.slots = s.slots[:i+1]
		s.slots[i].data = make([]byte, PageSize)
		s.used.Add(1)
	default:
		for {
			if s.hand >= len(s.slots) {
				s.hand = 0
			}
			if sl := &s.slots[s.hand]; sl.ref.Load() != 0 {
				sl.ref.Store(0)
				s.hand++
				continue
			}
			i = int32(s.hand)
			s.hand++
			delete(s.m, s.slots[i].page)
			break
		}
	}
	sl := &s.slots[i]
	sl.page, sl.n, sl.valid = page, plen, 0
	sl.ref.Store(0)
	s.m[page] = i
	return sl
}

// remove drops page from the shard; s.mu is held.
func (s *shard) remove(page int64) {
	i, ok := s.m[page]
	if !ok {
		return
	}
	delete(s.m, page)
	s.slots[i].page = -1
	s.slots[i].valid = 0
	s.free = append(s.free, i)
	s.used.Add(-1)
}

// WriteAt writes through to the device, then updates the cached pages it covers in
// part: blocks the write covers entirely become valid, partly covered ones stay as they
// were (updated if they were valid). A cached page the write covers entirely is dropped
// instead of copied into: the writer holds that data in its own cache (a guest's page
// cache), sequential writes cost no memory copy, and the next read of the page fills it
// from the device.
func (c *Cache) WriteAt(p []byte, off int64) (int, error) {
	n, err := c.d.WriteAt(p, off)
	if c.shards == nil || off < 0 || len(p) == 0 || off+int64(len(p)) > c.size {
		return n, err
	}
	end := off + int64(len(p))
	for page := off / PageSize; page*PageSize < end; page++ {
		s := c.shardOf(page)
		s.mu.Lock()
		s.gen++
		if sl := s.lookup(page); sl != nil {
			start := page * PageSize
			lo, hi := int(max(off, start)-start), int(min(end, start+int64(sl.n))-start)
			switch {
			case err != nil:
				// The device's content is unknown after a failed write: forget the page.
				s.remove(page)
			case lo == 0 && hi == sl.n:
				s.remove(page)
			default:
				copy(sl.data[lo:hi], p[start+int64(lo)-off:])
				sl.valid |= fullBlocks(lo, hi, sl.n)
			}
		}
		s.mu.Unlock()
	}
	return n, err
}

// invalidate forgets every cached page overlapping [off, off+length).
func (c *Cache) invalidate(off, length int64) {
	if c.shards == nil || length <= 0 {
		return
	}
	end := off + length
	for page := max(off, 0) / PageSize; page*PageSize < end; page++ {
		s := c.shardOf(page)
		s.mu.Lock()
		s.gen++
		s.remove(page)
		s.mu.Unlock()
	}
}

// ErrDiscardUnsupported is returned by Discard when the device cannot discard.
var ErrDiscardUnsupported = errors.New("Device does not support discard")

// Discard passes the discard to the device and forgets the cached pages it covers.
func (c *Cache) Discard(off, length int64) error {
	dd, ok := c.d.(dev.Discarder)
	if !ok {
		return ErrDiscardUnsupported
	}
	if off < 0 || length < 0 || off > c.size-length {
		return fmt.Errorf("Failed to discard %d bytes at %d: out of range (size %d)", length, off, c.size)
	}
	err := dd.Discard(off, length)
	c.invalidate(off, length)
	return err
}

// SpliceTo passes a splice (see dev.Splicer) straight to the device: the cache is
// write-through, so the device always holds the data of every completed write and
// the cached copy never has to be consulted.
func (c *Cache) SpliceTo(fd int, off int64, n int) error {
	sp, ok := c.d.(dev.Splicer)
	if !ok {
		return fmt.Errorf("Failed to splice %d bytes at %d: %w", n, off, dev.ErrNoSplice)
	}
	return sp.SpliceTo(fd, off, n)
}

// pipeWriter is a device that can take a write's data from a pipe (pool.SpliceFrom).
type pipeWriter interface {
	SpliceFrom(fd int, off int64, n int) error
}

// SpliceFrom writes the next n bytes of the pipe whose read end is fd at off through to
// the device (which takes them from the pipe without a copy in user space), then forgets
// every cached page the range overlaps, as a failed WriteAt does: the cache never sees
// the data. It fails with dev.ErrNoSplice, leaving the pipe untouched, when the device
// cannot take data from a pipe.
func (c *Cache) SpliceFrom(fd int, off int64, n int) error {
	pw, ok := c.d.(pipeWriter)
	if !ok {
		return fmt.Errorf("Failed to write %d bytes at %d from a pipe: %w", n, off, dev.ErrNoSplice)
	}
	err := pw.SpliceFrom(fd, off, n)
	c.invalidate(off, int64(n))
	return err
}

// Sync makes every completed write durable; the cache holds nothing dirty, so this is the device's Sync.
func (c *Cache) Sync() error { return c.d.Sync() }

// Size is the device's size.
func (c *Cache) Size() int64 { return c.size }

// Stats returns the cache counters; Bytes counts whole pages held.
func (c *Cache) Stats() Stats {
	st := Stats{Capacity: c.capacity}
	for i := range c.shards {
		s := &c.shards[i]
		st.Hits += s.hits.Load()
		st.Misses += s.misses.Load()
		st.Bytes += s.used.Load() * PageSize
	}
	return st
}
