package adminclient

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// FormatSegments is an image upload that carries only the image's data: a sequence of
// segments, each a 16-byte header (offset and length, big endian uint64) and length
// bytes of data, in increasing offset order without overlap; everything between them
// reads as zeroes. The image size travels in the size query parameter. Controllers
// copy images to their mirror partner this way, so that a mostly empty gold image
// costs its data on the wire, not its size.
const FormatSegments = "segments"

// segmentHeader is the size of a segment header.
const segmentHeader = 16

// ErrBadSegments is returned by a SegmentReader for a stream that breaks the format.
var ErrBadSegments = errors.New("malformed segmented image upload")

// Segment is one run of image data to send in a segmented upload.
type Segment struct{ Off, Len int64 }

// SegmentsLength is the body length of a segmented upload of segs.
func SegmentsLength(segs []Segment) int64 {
	var n int64
	for _, s := range segs {
		n += segmentHeader + s.Len
	}
	return n
}

// WriteSegments writes the segmented upload of the segments segs of src to w.
func WriteSegments(w io.Writer, src io.ReaderAt, segs []Segment) error {
	var hdr [segmentHeader]byte
	for _, s := range segs {
		binary.BigEndian.PutUint64(hdr[:8], uint64(s.Off))
		binary.BigEndian.PutUint64(hdr[8:], uint64(s.Len))
		if _, err := w.Write(hdr[:]); err != nil {
			return err
		}
		if _, err := io.Copy(w, io.NewSectionReader(src, s.Off, s.Len)); err != nil {
			return err
		}
	}
	return nil
}

// SegmentReader expands a segmented upload into the image's size bytes, zeroes between
// the segments. A stream that is malformed (segments out of order, overlapping, empty
// or beyond the size, or cut short) fails with ErrBadSegments.
type SegmentReader struct {
	r      io.Reader
	size   int64
	pos    int64 // image bytes returned so far
	segOff int64 // the current or next segment: [segOff, segEnd); size, size when none is left
	segEnd int64
	loaded bool // the first header was read
}

// NewSegmentReader returns the reader of the size-byte image that r carries.
func NewSegmentReader(r io.Reader, size int64) *SegmentReader {
	return &SegmentReader{r: r, size: size}
}

func (s *SegmentReader) Read(p []byte) (int, error) {
	if !s.loaded {
		s.loaded = true
		if err := s.nextSegment(0); err != nil {
			return 0, err
		}
	}
	if s.pos >= s.size {
		return 0, io.EOF
	}
	if len(p) == 0 {
		return 0, nil
	}
	if s.pos < s.segOff {
		n := int(min(int64(len(p)), s.segOff-s.pos))
		clear(p[:n])
		s.pos += int64(n)
		return n, nil
	}
	n, err := s.r.Read(p[:min(int64(len(p)), s.segEnd-s.pos)])
	s.pos += int64(n)
	if s.pos < s.segEnd {
		if errors.Is(err, io.EOF) {
			return n, fmt.Errorf("%w: the segment at %d ends %d bytes early", ErrBadSegments, s.segOff, s.segEnd-s.pos)
		}
		return n, err
	}
	if err != nil && !errors.Is(err, io.EOF) {
		return n, err
	}
	return n, s.nextSegment(s.segEnd)
}

// nextSegment reads the next segment header, which must start at or after from; at
// the end of the stream the rest of the image is zeroes.
func (s *SegmentReader) nextSegment(from int64) error {
	var hdr [segmentHeader]byte
	k, err := io.ReadFull(s.r, hdr[:])
	if k == 0 && errors.Is(err, io.EOF) {
		s.segOff, s.segEnd = s.size, s.size
		return nil
	}
	if errors.Is(err, io.ErrUnexpectedEOF) {
		return fmt.Errorf("%w: a segment header is cut short", ErrBadSegments)
	}
	if err != nil {
		return err
	}
	off, n := binary.BigEndian.Uint64(hdr[:8]), binary.BigEndian.Uint64(hdr[8:])
	if off < uint64(from) || n == 0 || off > uint64(s.size) || n > uint64(s.size)-off {
		return fmt.Errorf("%w: segment of %d bytes at %d (the image has %d bytes, the previous segment ended at %d)", ErrBadSegments, n, off, s.size, from)
	}
	s.segOff, s.segEnd = int64(off), int64(off+n)
	return nil
}
