// Package pool implements RAID 1+0 over the storage controller's disks as a dev.Device:
// stripe unit i lives on mirror pair i mod P at offset (i / P) * unit past a header
// area, is written to both disks of its pair and read from one healthy disk. A disk
// that errors, shrinks or vanishes is marked failed (persisted in stateDir/pool.json)
// and the pool keeps serving from its mirror; Replace rebuilds a pair onto a new disk
// in the background while I/O continues.
//
// The pool must never read from a disk that was marked failed, never overwrite newer
// data with older during a rebuild, and never initialise a disk that holds data it
// does not recognise.
package pool

import (
	"context"
	"errors"
	"fmt"
	"os"
)

var errNotImplemented = errors.New("Pool is not implemented yet")

// Pool is a RAID 1+0 set of disks; it implements dev.Device and dev.Discarder.
type Pool struct{}

// Open opens (or on first use initialises) the pool made of disks, keeping its state in stateDir.
func Open(stateDir string, disks []string, opts Options) (*Pool, error) {
	return nil, errNotImplemented
}

// CreateFileDisk creates a sparse file of size bytes to be used as a pool disk.
func CreateFileDisk(path string, size int64) error {
	if size <= 0 {
		return fmt.Errorf("Failed to create disk %q: size %d must be positive", path, size)
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return fmt.Errorf("Failed to create disk %q: %w", path, err)
	}
	if err := f.Truncate(size); err != nil {
		f.Close()
		os.Remove(path)
		return fmt.Errorf("Failed to size disk %q: %w", path, err)
	}
	return f.Close()
}

// ReadAt reads len(b) bytes at off from a healthy disk of the owning pairs.
func (p *Pool) ReadAt(b []byte, off int64) (int, error) { return 0, errNotImplemented }

// WriteAt writes b at off to every live disk of the owning pairs.
func (p *Pool) WriteAt(b []byte, off int64) (int, error) { return 0, errNotImplemented }

// Sync makes every completed write durable on every live disk.
func (p *Pool) Sync() error { return errNotImplemented }

// Size is the usable size of the pool in bytes.
func (p *Pool) Size() int64 { return 0 }

// Discard gives the space of a range back; the range then reads as zeroes.
func (p *Pool) Discard(off, length int64) error { return errNotImplemented }

// Close stops background work and closes the disks.
func (p *Pool) Close() error { return nil }

// Status reports the health of the pool and of each disk.
func (p *Pool) Status() Status { return Status{State: StateFailed} }

// Replace swaps oldPath for newPath and rebuilds the pair onto it in the background.
func (p *Pool) Replace(oldPath, newPath string) error { return errNotImplemented }

// WaitRebuild waits until no rebuild is running and returns the last rebuild's error.
func (p *Pool) WaitRebuild(ctx context.Context) error { return errNotImplemented }
