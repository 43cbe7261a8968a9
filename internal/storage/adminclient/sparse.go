package adminclient

import (
	"errors"
	"fmt"
	"io"
	"os"

	"golang.org/x/sys/unix"
)

// SparseReader reads a file from start to end like a plain reader, but produces the
// zeroes of its holes from memory (found with SEEK_DATA/SEEK_HOLE) instead of asking
// the kernel for them, so a mostly empty 10 GiB image streams in a fraction of the time.
type SparseReader struct {
	f        *os.File
	off      int64
	size     int64
	holeEnd  int64 // [off, holeEnd) is known to be a hole
	dataEnd  int64 // [off, dataEnd) is known to be data
	noSparse bool
}

// NewSparseReader reads size bytes of f from offset 0.
func NewSparseReader(f *os.File, size int64) *SparseReader {
	return &SparseReader{f: f, size: size}
}

// Read implements io.Reader.
func (r *SparseReader) Read(p []byte) (int, error) {
	if r.off >= r.size {
		return 0, io.EOF
	}
	if len(p) == 0 {
		return 0, nil
	}
	if r.off >= r.holeEnd && r.off >= r.dataEnd {
		r.classify()
	}
	if r.off < r.holeEnd {
		n := int(min(int64(len(p)), r.holeEnd-r.off))
		clear(p[:n])
		r.off += int64(n)
		return n, nil
	}
	n := int(min(int64(len(p)), r.dataEnd-r.off))
	n, err := r.f.ReadAt(p[:n], r.off)
	r.off += int64(n)
	if errors.Is(err, io.EOF) {
		if r.off < r.size {
			return n, fmt.Errorf("Failed to read %q: file shrank to %d bytes while reading: %w", r.f.Name(), r.off, io.ErrUnexpectedEOF)
		}
		err = nil
	}
	return n, err
}

// classify finds whether r.off starts a hole or data, and how far it goes.
func (r *SparseReader) classify() {
	if r.noSparse {
		r.dataEnd = r.size
		return
	}
	if fi, err := r.f.Stat(); err == nil && fi.Mode().IsRegular() && r.off >= fi.Size() {
		// Past the file's end: let ReadAt report the file as shorter than announced.
		r.dataEnd = r.size
		return
	}
	fd := int(r.f.Fd())
	d, err := unix.Seek(fd, r.off, unix.SEEK_DATA)
	switch {
	case errors.Is(err, unix.ENXIO):
		// Only a hole from here to the end of the file.
		r.holeEnd = r.size
		if fi, err := r.f.Stat(); err == nil && fi.Mode().IsRegular() {
			r.holeEnd = min(r.size, fi.Size())
		}
		return
	case err != nil:
		r.noSparse = true
		r.dataEnd = r.size
		return
	case d > r.off:
		r.holeEnd = min(d, r.size)
		return
	}
	h, err := unix.Seek(fd, r.off, unix.SEEK_HOLE)
	if err != nil || h <= r.off {
		h = r.size
	}
	r.dataEnd = min(h, r.size)
}
