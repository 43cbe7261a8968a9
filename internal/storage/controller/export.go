package controller

import (
	"errors"
	"fmt"
	"sync/atomic"

	"github.com/growserver/grow/internal/storage/nbd"
	"github.com/growserver/grow/internal/storage/volume"
)

// ioCounters are the controller's NBD counters; atomics so the data path never locks.
type ioCounters struct {
	connections atomic.Int64
	open        atomic.Int64
	readOps     atomic.Int64
	readBytes   atomic.Int64
	writeOps    atomic.Int64
	writeBytes  atomic.Int64
	flushOps    atomic.Int64
	trimOps     atomic.Int64
	zeroOps     atomic.Int64
	cacheOps    atomic.Int64
	errors      atomic.Int64
}

// exports is the NBD catalogue: every volume, image and snapshot of the manager, by name.
type exports struct {
	mgr *volume.Manager
	io  *ioCounters
	mir *mirrorMgr // nil unless paired: mirrored volumes open only on their primary
}

var _ nbd.Exports = (*exports)(nil)

// Open opens the volume name for one NBD connection.
func (e *exports) Open(name string) (nbd.Export, error) {
	if e.mir != nil {
		if x, ok, err := e.mir.open(name); ok {
			return x, err
		}
	}
	h, err := e.mgr.Open(name)
	if err != nil {
		if errors.Is(err, volume.ErrNotFound) || errors.Is(err, volume.ErrInvalid) {
			return nil, fmt.Errorf("%w: %w", nbd.ErrUnknownExport, err)
		}
		return nil, fmt.Errorf("Failed to open volume %q: %w", name, err)
	}
	e.io.connections.Add(1)
	e.io.open.Add(1)
	return &export{h: h, io: e.io}, nil
}

// List names every volume, image and snapshot.
func (e *exports) List() []nbd.ExportInfo {
	vols := e.mgr.List()
	out := make([]nbd.ExportInfo, 0, len(vols))
	for _, v := range vols {
		out = append(out, nbd.ExportInfo{Name: v.Name, Description: describe(v)})
	}
	return out
}

// export adapts one volume.Handle to nbd.Export, mapping volume errors to NBD ones.
type export struct {
	h      *volume.Handle
	io     *ioCounters
	closed atomic.Bool
}

var _ nbd.Export = (*export)(nil)

func (x *export) Size() int64    { return x.h.Size() }
func (x *export) ReadOnly() bool { return x.h.ReadOnly() }

func (x *export) ReadAt(p []byte, off int64) error {
	x.io.readOps.Add(1)
	x.io.readBytes.Add(int64(len(p)))
	return x.mapErr(x.h.ReadAt(p, off))
}

// SpliceRead is ReadAt into a pipe (nbd.ReadSplicer); on an error the server retries
// with ReadAt, which counts and maps it.
func (x *export) SpliceRead(fd int, off int64, n int) error {
	if err := x.h.SpliceTo(fd, off, n); err != nil {
		return err
	}
	x.io.readOps.Add(1)
	x.io.readBytes.Add(int64(n))
	return nil
}

func (x *export) WriteAt(p []byte, off int64, fua bool) error {
	x.io.writeOps.Add(1)
	x.io.writeBytes.Add(int64(len(p)))
	return x.mapErr(x.h.WriteAt(p, off, fua))
}

// SpliceWrite is WriteAt from a pipe (nbd.WriteSplicer). When it fails with the pipe
// still full the server retries with WriteAt, which counts the write.
func (x *export) SpliceWrite(fd int, off int64, n int, fua bool) error {
	if err := x.h.SpliceFrom(fd, off, n, fua); err != nil {
		return x.mapErr(err)
	}
	x.io.writeOps.Add(1)
	x.io.writeBytes.Add(int64(n))
	return nil
}

func (x *export) Flush() error {
	x.io.flushOps.Add(1)
	return x.mapErr(x.h.Flush())
}

func (x *export) Trim(off, length int64, fua bool) error {
	x.io.trimOps.Add(1)
	return x.mapErr(x.h.Trim(off, length, fua))
}

func (x *export) WriteZeroes(off, length int64, f nbd.ZeroFlags) error {
	x.io.zeroOps.Add(1)
	return x.mapErr(x.h.WriteZeroes(off, length, f.NoHole, f.Fast, f.FUA))
}

// Cache is a prefetch hint; the volume layer reads through the shared cache, so a
// read of the range warms it for every connection.
func (x *export) Cache(off, length int64) error {
	x.io.cacheOps.Add(1)
	const chunk = 1 << 20
	buf := make([]byte, min(length, chunk))
	for length > 0 {
		n := min(length, chunk)
		if err := x.h.ReadAt(buf[:n], off); err != nil {
			return x.mapErr(err)
		}
		off += n
		length -= n
	}
	return nil
}

func (x *export) Extents(off, length int64) ([]nbd.Extent, error) {
	ext, err := x.h.Extents(off, length)
	if err != nil {
		return nil, x.mapErr(err)
	}
	out := make([]nbd.Extent, len(ext))
	for i, e := range ext {
		out[i] = nbd.Extent{Length: e.Length, Hole: e.Hole, Zero: e.Zero}
	}
	return out, nil
}

func (x *export) Close() error {
	if !x.closed.CompareAndSwap(false, true) {
		return nil
	}
	x.io.open.Add(-1)
	return x.h.Close()
}

// mapErr turns volume errors into the NBD sentinels the server maps to error codes,
// keeping the original for the log.
func (x *export) mapErr(err error) error {
	if err == nil {
		return nil
	}
	x.io.errors.Add(1)
	switch {
	case errors.Is(err, volume.ErrNoSpace):
		return fmt.Errorf("%w: %w", nbd.ErrNoSpace, err)
	case errors.Is(err, volume.ErrReadOnly):
		return fmt.Errorf("%w: %w", nbd.ErrReadOnly, err)
	case errors.Is(err, volume.ErrNotFast):
		return fmt.Errorf("%w: %w", nbd.ErrFastZeroUnsupported, err)
	case errors.Is(err, volume.ErrInvalid):
		return fmt.Errorf("%w: %w", nbd.ErrInvalid, err)
	}
	return err
}
