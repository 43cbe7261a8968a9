package pool

import (
	"errors"
	"fmt"

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
