package pool

import (
	"errors"
	"fmt"
	"sync"

	"github.com/growserver/grow/internal/storage/dev"
	"golang.org/x/sys/unix"
)

var _ dev.Splicer = (*Pool)(nil)

// errPipeFull means the pipe had no room for the rest of a splice.
var errPipeFull = errors.New("pipe full")

// SpliceTo appends n bytes at off to the pipe fd with splice(2), from the same disks
// ReadAt would read. Only disks that punch holes are spliced from (their discarded pages
// are detached from the page cache, never overwritten in place while a pipe or socket
// may still reference them). It does not fail over or mark disks failed: after an
// error the caller reads the range with ReadAt, which does both.
func (p *Pool) SpliceTo(fd int, off int64, n int) error {
	if err := p.checkRange("read", off, int64(n)); err != nil {
		return err
	}
	for done := int64(0); done < int64(n); {
		pair, doff, l, du := p.l.locate(off+done, int64(n)-done)
		d := p.spliceSource(pair, du)
		if d == nil {
			return fmt.Errorf("Failed to splice %d bytes at %d: %w", n, off, dev.ErrNoSplice)
		}
		if err := p.spliceDisk(d, fd, doff, int(l)); err != nil {
			return fmt.Errorf("Failed to splice %d bytes at %d from disk %q: %w", n, off, d.path, err)
		}
		done += l
	}
	return nil
}

// spliceSource picks the disk of pair that readPair would read first, if it is healthy
// and punches holes.
func (p *Pool) spliceSource(pair int, du int64) *disk {
	first := 2*pair + int(du&1)
	if len(p.disks) == 1 {
		first = 0
	}
	for try := 0; try < 2 && try < len(p.disks); try++ {
		d := p.disks[first^try].Load()
		if d.state.Load() == stOK {
			if !d.punch {
				return nil
			}
			return d
		}
	}
	return nil
}

// spliceDisk splices n bytes at doff of d into the pipe, then checks the disk's size
// as readDisk does.
func (p *Pool) spliceDisk(d *disk, pipe int, doff int64, n int) error {
	if err := p.fault(d, "read", doff); err != nil {
		return err
	}
	err := d.withFd(func(fd int) error {
		for n > 0 {
			k, err := unix.Splice(fd, &doff, pipe, nil, n, unix.SPLICE_F_MOVE|unix.SPLICE_F_NONBLOCK)
			switch {
			case err == unix.EINTR:
				continue
			case err == unix.EAGAIN:
				return errPipeFull
			case err != nil:
				return err
			case k == 0:
				return fmt.Errorf("short read at %d: disk truncated", doff)
			}
			n -= int(k)
		}
		return nil
	})
	if err != nil {
		return err
	}
	return p.checkSize(d)
}

// SpliceFrom writes the next n bytes of the pipe whose read end is fd (non-blocking,
// holding at least n bytes) at off, as WriteAt writes a buffer: under the same chunk
// locks and write-intent marks, to every live disk of the owning pair, marking a disk
// that errors as failed. On a pool of one disk the data moves from the pipe into the
// disk with splice(2), so it is copied once, in the kernel; a pool of mirror pairs reads
// it from the pipe into a buffer and writes that to both disks. An error before any byte
// was taken from the pipe is a range error; after one, the pipe's content is undefined.
func (p *Pool) SpliceFrom(fd int, off int64, n int) error {
	if err := p.checkRange("write", off, int64(n)); err != nil {
		return err
	}
	if len(p.disks) != 1 {
		b := getPipeBuf(n)
		defer pipeBufs.Put(b)
		if err := dev.ReadPipe(fd, *b); err != nil {
			return fmt.Errorf("Failed to write %d bytes at %d: %w", n, off, err)
		}
		_, err := p.WriteAt(*b, off)
		return err
	}
	var small [4]run
	runs := p.split(small[:0], nil, off, int64(n))
	for i := range runs {
		runs[i].pipe = fd
		runs[i].fromPipe = true
	}
	if err := p.mutate(runs, false); err != nil {
		return fmt.Errorf("Failed to write %d bytes at %d: %w", n, off, err)
	}
	return nil
}

// spliceIntoDisk moves n bytes from the pipe into d at doff with splice(2).
func (p *Pool) spliceIntoDisk(d *disk, pipe int, doff, n int64) error {
	if err := p.fault(d, "write", doff); err != nil {
		return err
	}
	return d.withFd(func(fd int) error {
		for n > 0 {
			k, err := unix.Splice(pipe, nil, fd, &doff, int(n), unix.SPLICE_F_MOVE|unix.SPLICE_F_NONBLOCK)
			switch {
			case err == unix.EINTR:
				continue
			case err == unix.EAGAIN || (err == nil && k == 0):
				return dev.ErrPipeShort
			case err != nil:
				return err
			}
			n -= k
		}
		return nil
	})
}

// pipeBufs holds buffers for writes read out of a pipe (pools of mirror pairs).
var pipeBufs = sync.Pool{New: func() any { return new([]byte) }}

// getPipeBuf returns a pooled buffer of n bytes.
func getPipeBuf(n int) *[]byte {
	b := pipeBufs.Get().(*[]byte)
	if cap(*b) < n {
		*b = make([]byte, n)
	}
	*b = (*b)[:n]
	return b
}
