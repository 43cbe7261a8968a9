package pool

import (
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"sync/atomic"
	"syscall"

	"golang.org/x/sys/unix"
)

// In-memory disk states; only ok disks are read, ok and rebuilding disks are written.
const (
	stOK int32 = iota
	stRebuilding
	stFailed
	stMissing
	stRemoved // replaced by another disk; kept only until in-flight I/O drains
)

func stateName(s int32) string {
	switch s {
	case stOK:
		return DiskOK
	case stRebuilding:
		return DiskRebuilding
	case stMissing:
		return DiskMissing
	default:
		return DiskFailed
	}
}

// disk is one member of the pool.
type disk struct {
	index int
	pair  int
	path  string
	f     *os.File // nil when the disk could not be opened
	rc    syscall.RawConn
	block bool   // a block device rather than a regular file
	dev   uint64 // identity of the opened file, compared with the path by the health check
	ino   uint64
	state atomic.Int32
	// punch is set when a hole punched in the disk's unused header area succeeded at
	// open: only such disks are spliced from (see SpliceTo), and their discards never
	// overwrite whole pages in place (see discardDisk). Immutable once the disk is in the pool.
	punch bool
	// volatile marks a failure kept in memory only: the disk was the last copy of its
	// pair, so pool.json keeps it trusted and a restart retries it. Guarded by Pool.mu.
	volatile bool

	mu          sync.Mutex // guards err and rebuildDone
	err         string
	rebuildDone int64
}

func (d *disk) live() bool {
	s := d.state.Load()
	return s == stOK || s == stRebuilding
}

func (d *disk) setErr(msg string) {
	d.mu.Lock()
	d.err = msg
	d.mu.Unlock()
}

// errDiskBusy means another pool, process or mount holds the disk.
var errDiskBusy = errors.New("the disk is in use (by another pool or process, or mounted)")

// openDisk opens path read-write, takes it for this process alone (O_EXCL for a block
// device, an exclusive flock for a file) and records its identity.
func openDisk(path string) (*disk, error) {
	st, err := os.Stat(path)
	if err != nil {
		return nil, err
	}
	flags := os.O_RDWR
	block := st.Mode()&os.ModeDevice != 0 && st.Mode()&os.ModeCharDevice == 0
	if !block && !st.Mode().IsRegular() {
		return nil, fmt.Errorf("%q is neither a regular file nor a block device", path)
	}
	if block {
		flags |= unix.O_EXCL
	}
	f, err := os.OpenFile(path, flags, 0)
	if errors.Is(err, unix.EBUSY) {
		return nil, errDiskBusy
	}
	if err != nil {
		return nil, err
	}
	if !block {
		if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
			f.Close()
			if errors.Is(err, unix.EWOULDBLOCK) {
				return nil, errDiskBusy
			}
			return nil, fmt.Errorf("cannot lock: %w", err)
		}
	}
	var fst unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &fst); err != nil {
		f.Close()
		return nil, err
	}
	rc, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return nil, err
	}
	return &disk{path: path, f: f, rc: rc, block: block, dev: fst.Dev, ino: fst.Ino}, nil
}

// withFd runs fn on the disk's descriptor, which stays open meanwhile: a raw descriptor
// number used after Close could name another file by then.
func (d *disk) withFd(fn func(fd int) error) error {
	var ferr error
	if err := d.rc.Control(func(fd uintptr) { ferr = fn(int(fd)) }); err != nil {
		return err
	}
	return ferr
}

// size returns the current size of the disk in bytes.
func (d *disk) size() (int64, error) {
	if d.block {
		return d.f.Seek(0, io.SeekEnd)
	}
	var st unix.Stat_t
	if err := d.withFd(func(fd int) error { return unix.Fstat(fd, &st) }); err != nil {
		return 0, err
	}
	return st.Size, nil
}

func (d *disk) close() {
	if d.f != nil {
		d.f.Close()
	}
}

func (p *Pool) fault(d *disk, op string, off int64) error {
	if p.opts.Fault == nil {
		return nil
	}
	if err := p.opts.Fault(d.index, op, off); err != nil {
		return fmt.Errorf("injected fault: %w", err)
	}
	return nil
}

// readDisk reads exactly len(b) bytes; a short read means the disk shrank. A file that
// was truncated and then extended again by a write reads as zeroes where data was lost,
// so after each read of a regular file its size is checked (one lseek): data writes never
// reach the tail block, so a truncated file stays shorter than the pool needs.
func (p *Pool) readDisk(d *disk, b []byte, off int64) error {
	if err := p.fault(d, "read", off); err != nil {
		return err
	}
	n, err := d.f.ReadAt(b, off)
	if n == len(b) {
		return p.checkSize(d)
	}
	if err == nil || errors.Is(err, io.EOF) {
		return fmt.Errorf("short read (%d of %d bytes at %d): disk truncated", n, len(b), off)
	}
	return err
}

// checkSize fails a regular file that is shorter than the pool needs (one lseek).
func (p *Pool) checkSize(d *disk) error {
	if d.block {
		return nil
	}
	sz, err := d.f.Seek(0, io.SeekEnd)
	if err != nil || sz < p.l.diskBytes() {
		return fmt.Errorf("disk shrank to %d bytes, the pool needs %d: truncated (%v)", sz, p.l.diskBytes(), err)
	}
	return nil
}

// readvDisk fills the buffers from consecutive disk bytes at off (preadv).
func (p *Pool) readvDisk(d *disk, iovs [][]byte, off int64) error {
	if len(iovs) == 1 {
		return p.readDisk(d, iovs[0], off)
	}
	if err := p.fault(d, "read", off); err != nil {
		return err
	}
	err := d.withFd(func(fd int) error {
		for len(iovs) > 0 {
			n, err := unix.Preadv(fd, iovs, off)
			if err == unix.EINTR {
				continue
			}
			if err != nil {
				return err
			}
			if n == 0 {
				return fmt.Errorf("short read at %d: disk truncated", off)
			}
			off += int64(n)
			iovs = advance(iovs, n)
		}
		return nil
	})
	if err != nil {
		return err
	}
	return p.checkSize(d)
}

// writevDisk writes the buffers to consecutive disk bytes at off (pwritev).
func (p *Pool) writevDisk(d *disk, iovs [][]byte, off int64) error {
	if len(iovs) == 1 {
		return p.writeDisk(d, iovs[0], off)
	}
	if err := p.fault(d, "write", off); err != nil {
		return err
	}
	return d.withFd(func(fd int) error {
		for len(iovs) > 0 {
			n, err := unix.Pwritev(fd, iovs, off)
			if err == unix.EINTR {
				continue
			}
			if err != nil {
				return err
			}
			if n == 0 {
				return io.ErrShortWrite
			}
			off += int64(n)
			iovs = advance(iovs, n)
		}
		return nil
	})
}

// advance drops the first n bytes from iovs (copying the slice header list, not the data).
func advance(iovs [][]byte, n int) [][]byte {
	for n > 0 && len(iovs) > 0 {
		if n >= len(iovs[0]) {
			n -= len(iovs[0])
			iovs = iovs[1:]
			continue
		}
		rest := append([][]byte{iovs[0][n:]}, iovs[1:]...)
		return rest
	}
	for len(iovs) > 0 && len(iovs[0]) == 0 {
		iovs = iovs[1:]
	}
	return iovs
}

func (p *Pool) writeDisk(d *disk, b []byte, off int64) error {
	if err := p.fault(d, "write", off); err != nil {
		return err
	}
	_, err := d.f.WriteAt(b, off)
	return err
}

func (p *Pool) syncDisk(d *disk) error {
	if err := p.fault(d, "sync", 0); err != nil {
		return err
	}
	return d.withFd(unix.Fdatasync)
}

var zeroes = make([]byte, 1<<20)

func tailBlock(uuid string) []byte {
	b := make([]byte, tailSize)
	copy(b, "GROWTAIL")
	copy(b[8:], uuid)
	return b
}

// writeTail stamps the tail block at off.
func (d *disk) writeTail(off int64, uuid string) error {
	if _, err := d.f.WriteAt(tailBlock(uuid), off); err != nil {
		return fmt.Errorf("Failed to write tail block of %q: %w", d.path, err)
	}
	return nil
}

// checkTail verifies the tail block at off.
func (d *disk) checkTail(off int64, uuid string) error {
	b := make([]byte, tailSize)
	if _, err := d.f.ReadAt(b, off); err != nil {
		return fmt.Errorf("cannot read the tail block at %d (truncated?): %v", off, err)
	}
	if string(b) != string(tailBlock(uuid)) {
		return fmt.Errorf("the tail block at %d is gone: the disk was truncated or overwritten", off)
	}
	return nil
}

// discardDisk makes a range of the disk read as zeroes, punching a hole when it can.
//
// The whole pages of the range of a disk that is spliced from (d.punch) may still be
// referenced by pipes and sockets: they must be detached from the page cache by a
// punch, never overwritten in place. Only the partial pages at the edges of a range
// are zeroed in place (as a punch itself does), when a block device refuses a range
// that is not aligned to its blocks.
func (p *Pool) discardDisk(d *disk, off, length int64) error {
	if err := p.fault(d, "discard", off); err != nil {
		return err
	}
	err := d.punchHole(off, length)
	if err == nil {
		return nil
	}
	if !errors.Is(err, unix.EOPNOTSUPP) && !errors.Is(err, unix.ENOSYS) && !errors.Is(err, unix.EINVAL) {
		return err
	}
	if !d.punch {
		return d.writeZeroes(off, length)
	}
	if !errors.Is(err, unix.EINVAL) {
		return err
	}
	end := off + length
	lo, hi := min((off+pageSize-1)/pageSize*pageSize, end), max(end/pageSize*pageSize, off)
	if hi > lo {
		if err := d.punchHole(lo, hi-lo); err != nil {
			return err
		}
	} else {
		lo, hi = end, end
	}
	if err := d.writeZeroes(off, lo-off); err != nil {
		return err
	}
	return d.writeZeroes(hi, end-hi)
}

// pageSize is the page-cache granularity that discards of spliced disks respect.
const pageSize = 4096

// punchHole punches a hole in [off, off+length) of the disk.
func (d *disk) punchHole(off, length int64) error {
	return d.withFd(func(fd int) error {
		return unix.Fallocate(fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, length)
	})
}

// writeZeroes writes zeroes over [off, off+length) of the disk.
func (d *disk) writeZeroes(off, length int64) error {
	for length > 0 {
		n := min(length, int64(len(zeroes)))
		if _, err := d.f.WriteAt(zeroes[:n], off); err != nil {
			return err
		}
		off += n
		length -= n
	}
	return nil
}

// probePunch reports whether the disk punches holes: it punches the last block of
// the header area, which holds nothing (the header is its first block).
func (p *Pool) probePunch(d *disk) bool {
	return d.punchHole(p.l.dataOff-pageSize, pageSize) == nil
}

// readHeader reads and decodes the disk's header block.
func (d *disk) readHeader() (header, error) {
	b := make([]byte, headerSize)
	if _, err := d.f.ReadAt(b, 0); err != nil {
		if errors.Is(err, io.EOF) {
			return header{}, fmt.Errorf("disk is smaller than its %d-byte header", headerSize)
		}
		return header{}, err
	}
	return decodeHeader(b)
}

func (d *disk) writeHeader(h header, sync bool) error {
	b, err := encodeHeader(h)
	if err != nil {
		return err
	}
	if _, err := d.f.WriteAt(b, 0); err != nil {
		return fmt.Errorf("Failed to write header of %q: %w", d.path, err)
	}
	if sync {
		if err := d.withFd(unix.Fdatasync); err != nil {
			return fmt.Errorf("Failed to sync header of %q: %w", d.path, err)
		}
	}
	return nil
}

// nextData returns the first offset >= off that holds data (SEEK_DATA); end when none.
// Devices without hole information report everything as data.
func (d *disk) nextData(off, end int64) int64 {
	if d.block {
		return off
	}
	n, err := d.f.Seek(off, unix.SEEK_DATA)
	if err != nil {
		if errors.Is(err, unix.ENXIO) {
			return end
		}
		return off
	}
	return min(n, end)
}
