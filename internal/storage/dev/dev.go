// Package dev defines Device, the block-addressed store that the storage layers stack
// on (pool -> cache -> volume), and a plain file-backed Device for tests and one-disk pools.
package dev

import (
	"errors"
	"fmt"
	"io"
	"os"

	"golang.org/x/sys/unix"
)

// Device is a fixed-size, byte-addressed block store. ReadAt and WriteAt may be called
// concurrently on non-overlapping ranges. Data written is durable only after Sync returns.
type Device interface {
	io.ReaderAt
	io.WriterAt
	// Sync makes every completed write durable.
	Sync() error
	// Size is the usable size in bytes.
	Size() int64
}

// File is a Device backed by a regular file or block device.
type File struct {
	f    *os.File
	size int64
}

// OpenFile opens path as a Device of the given size, creating (sparse) or growing the file if needed.
func OpenFile(path string, size int64) (*File, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("Failed to open device %q: %w", path, err)
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("Failed to stat device %q: %w", path, err)
	}
	if st.Mode().IsRegular() && st.Size() < size {
		if err := f.Truncate(size); err != nil {
			f.Close()
			return nil, fmt.Errorf("Failed to size device %q: %w", path, err)
		}
	}
	return &File{f: f, size: size}, nil
}

// ReadAt reads len(p) bytes at off; reading past the end of a shrunken file is an error.
func (d *File) ReadAt(p []byte, off int64) (int, error) { return d.f.ReadAt(p, off) }

// WriteAt writes p at off.
func (d *File) WriteAt(p []byte, off int64) (int, error) { return d.f.WriteAt(p, off) }

// Sync flushes written data to stable storage (fdatasync).
func (d *File) Sync() error { return unix.Fdatasync(int(d.f.Fd())) }

// Size is the size the Device was opened with.
func (d *File) Size() int64 { return d.size }

// Fd exposes the descriptor for fast paths (fallocate punch-hole, copy_file_range).
func (d *File) Fd() uintptr { return d.f.Fd() }

// Close closes the file.
func (d *File) Close() error { return d.f.Close() }

// Discarder is implemented by Devices that can give the space of a range back
// (punch a hole); the range then reads as zeroes.
type Discarder interface {
	Discard(off, length int64) error
}

// Discard punches a hole in the file so the range costs no space and reads as zeroes.
func (d *File) Discard(off, length int64) error {
	err := unix.Fallocate(int(d.f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, length)
	if err != nil {
		return fmt.Errorf("Failed to discard %d bytes at %d: %w", length, off, err)
	}
	return nil
}

// Splicer is implemented by Devices that can put a range's data into a pipe without
// copying it through user space (splice(2) from the page cache of a backing file), so
// that a server can send it on with another splice.
//
// The pipe then holds references to page-cache pages, not a copy: an implementation
// must make sure that the pages it splices are never overwritten in place with other
// data after the range is discarded (a discard must punch a hole, which detaches them),
// and callers must treat the data as a read that is concurrent with any write issued
// before the pipe is drained.
type Splicer interface {
	// SpliceTo appends the n bytes at off to the pipe whose write end is fd; the pipe
	// must be non-blocking and have room for them. It returns an error wrapping
	// ErrNoSplice when it cannot splice the range; after any error the pipe may hold
	// part of the data and the caller should read the range with ReadAt instead.
	SpliceTo(fd int, off int64, n int) error
}

// ErrNoSplice means a range cannot be spliced (see Splicer); ReadAt still reads it.
var ErrNoSplice = errors.New("cannot splice this range")
