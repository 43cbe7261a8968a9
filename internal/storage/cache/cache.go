// Package cache is the storage controller's shared read cache: one Cache wraps the
// pool and is shared by every NBD connection, so that all connections see the same
// data (which is what lets the NBD server advertise MULTI_CONN honestly).
//
// The cache is write-through: a write reaches the device before it is acknowledged and
// then updates any cached copy, so a FLUSH only has to sync the device and nothing
// acknowledged is ever held only in memory. It must never return data older than the
// last completed write to the same bytes, and it must never take a global lock on the
// read path: pages are spread over independently locked shards, each evicting with CLOCK.
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

// maxShards bounds the number of independently locked shards.
const maxShards = 64

// Stats are the cache's counters; Hits and Misses count pages.
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
	page int64 // -1 when free
	n    int   // valid bytes (short only for the device's last page)
	data []byte
	ref  atomic.Uint32
}

type shard struct {
	mu       sync.RWMutex
	m        map[int64]int32
	slots    []*slot
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
	}
	// A read bigger than an eighth of the cache would only evict what others use.
	c.bypass = int(c.capacity / 8)
	if c.bypass < PageSize {
		c.bypass = PageSize
	}
	c.bufs.New = func() any { b := make([]byte, PageSize); return &b }
	return c
}

func (c *Cache) shardOf(page int64) *shard {
	h := uint64(page) * 0x9E3779B97F4A7C15
	return &c.shards[(h>>56)&c.mask]
}

// ReadAt reads from the cache, filling it from the device on a miss.
func (c *Cache) ReadAt(p []byte, off int64) (int, error) {
	if c.shards == nil || off < 0 || off+int64(len(p)) > c.size || len(p) > c.bypass {
		return c.d.ReadAt(p, off)
	}
	done := 0
	for done < len(p) {
		pos := off + int64(done)
		page := pos / PageSize
		in := int(pos - page*PageSize)
		s := c.shardOf(page)
		s.mu.RLock()
		if i, ok := s.m[page]; ok {
			sl := s.slots[i]
			n := copy(p[done:], sl.data[in:sl.n])
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
		n, err := c.fill(p[done:], page, in, s, gen)
		done += n
		if err != nil {
			return done, err
		}
	}
	return done, nil
}

// fill reads one page from the device, copies the wanted part into p and caches the
// page unless a write or discard touched the shard since gen was taken.
func (c *Cache) fill(p []byte, page int64, in int, s *shard, gen uint64) (int, error) {
	start := page * PageSize
	plen := int(min(PageSize, c.size-start))
	bp := c.bufs.Get().(*[]byte)
	defer c.bufs.Put(bp)
	buf := (*bp)[:plen]
	if _, err := c.d.ReadAt(buf, start); err != nil {
		return 0, err
	}
	n := copy(p, buf[in:])
	s.mu.Lock()
	if s.gen == gen {
		if _, ok := s.m[page]; !ok {
			s.insert(page, buf)
		}
	}
	s.mu.Unlock()
	return n, nil
}

// insert caches data as page, evicting with CLOCK when the shard is full; s.mu is held.
func (s *shard) insert(page int64, data []byte) {
	var i int32
	switch {
	case len(s.free) > 0:
		i = s.free[len(s.free)-1]
		s.free = s.free[:len(s.free)-1]
		s.used.Add(1)
	case len(s.slots) < s.maxSlots:
		i = int32(len(s.slots))
		s.slots = append(s.slots, &slot{data: make([]byte, PageSize)})
		s.used.Add(1)
	default:
		for {
			if s.hand >= len(s.slots) {
				s.hand = 0
			}
			if sl := s.slots[s.hand]; sl.ref.Load() != 0 {
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
	sl := s.slots[i]
	sl.page, sl.n = page, copy(sl.data, data)
	sl.ref.Store(0)
	s.m[page] = i
}

// remove drops page from the shard; s.mu is held.
func (s *shard) remove(page int64) {
	i, ok := s.m[page]
	if !ok {
		return
	}
	delete(s.m, page)
	s.slots[i].page = -1
	s.free = append(s.free, i)
	s.used.Add(-1)
}

// WriteAt writes through to the device, then updates the cached pages it covers.
func (c *Cache) WriteAt(p []byte, off int64) (int, error) {
	n, err := c.d.WriteAt(p, off)
	if c.shards == nil || off < 0 || len(p) == 0 {
		return n, err
	}
	end := off + int64(len(p))
	for page := off / PageSize; page*PageSize < end; page++ {
		s := c.shardOf(page)
		s.mu.Lock()
		s.gen++
		if i, ok := s.m[page]; ok {
			if err != nil {
				// The device's content is unknown after a failed write: forget the page.
				s.remove(page)
			} else {
				sl := s.slots[i]
				start := page * PageSize
				lo, hi := max(off, start), min(end, start+int64(sl.n))
				copy(sl.data[lo-start:hi-start], p[lo-off:hi-off])
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
	if off < 0 || length < 0 || off+length > c.size {
		return fmt.Errorf("Failed to discard %d bytes at %d: out of range (size %d)", length, off, c.size)
	}
	err := dd.Discard(off, length)
	c.invalidate(off, length)
	return err
}

// Sync makes every completed write durable; the cache holds nothing dirty, so this is the device's Sync.
func (c *Cache) Sync() error { return c.d.Sync() }

// Size is the device's size.
func (c *Cache) Size() int64 { return c.size }

// Stats returns the cache counters.
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
