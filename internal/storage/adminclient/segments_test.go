package adminclient

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"testing"
	"testing/iotest"
)

// TestSegmentsRoundTrip writes images with data at the start, the end, in the middle
// and nowhere as segmented uploads and reads them back byte for byte, also one byte at a
// time; the upload carries only the data and the headers.
func TestSegmentsRoundTrip(t *testing.T) {
	const size = 1 << 20
	img := make([]byte, size)
	for i := range img {
		img[i] = byte(i*7 + 1)
	}
	for _, segs := range [][]Segment{
		nil,
		{{0, size}},
		{{0, 4096}},
		{{size - 1, 1}},
		{{0, 100}, {100, 50}, {4096, 8192}, {size - 4096, 4096}},
		{{65536, 3}},
	} {
		want := make([]byte, size)
		for _, s := range segs {
			copy(want[s.Off:s.Off+s.Len], img[s.Off:s.Off+s.Len])
		}
		var body bytes.Buffer
		if err := WriteSegments(&body, bytes.NewReader(img), segs); err != nil {
			t.Fatal(err)
		}
		if int64(body.Len()) != SegmentsLength(segs) {
			t.Fatalf("%v: body of %d bytes, SegmentsLength says %d", segs, body.Len(), SegmentsLength(segs))
		}
		for _, one := range []bool{false, true} {
			var r io.Reader = NewSegmentReader(bytes.NewReader(body.Bytes()), size)
			if one {
				r = iotest.OneByteReader(r)
			}
			got, err := io.ReadAll(r)
			if err != nil {
				t.Fatalf("%v: %v", segs, err)
			}
			if !bytes.Equal(got, want) {
				t.Fatalf("%v: the image read back differs", segs)
			}
		}
	}
}

// TestSegmentsMalformed feeds streams that break the format: every one fails with
// ErrBadSegments, none yields more than the image size.
func TestSegmentsMalformed(t *testing.T) {
	seg := func(off, n uint64, data int) []byte {
		b := binary.BigEndian.AppendUint64(nil, off)
		b = binary.BigEndian.AppendUint64(b, n)
		return append(b, make([]byte, data)...)
	}
	cat := func(parts ...[]byte) []byte { return bytes.Join(parts, nil) }
	for name, body := range map[string][]byte{
		"header cut short":      seg(0, 4, 4)[:10],
		"data cut short":        seg(0, 4, 3),
		"empty segment":         seg(0, 0, 0),
		"beyond the size":       seg(1000, 100, 100),
		"offset beyond":         seg(1<<40, 1, 1),
		"length overflows":      seg(8, ^uint64(0)-4, 0),
		"overlap":               cat(seg(0, 10, 10), seg(5, 10, 10)),
		"out of order":          cat(seg(100, 10, 10), seg(0, 10, 10)),
		"trailing partial head": cat(seg(0, 10, 10), []byte{1, 2, 3}),
	} {
		got, err := io.ReadAll(NewSegmentReader(bytes.NewReader(body), 1024))
		if !errors.Is(err, ErrBadSegments) {
			t.Errorf("%s: got %v, want ErrBadSegments", name, err)
		}
		if len(got) > 1024 {
			t.Errorf("%s: %d bytes from an image of 1024", name, len(got))
		}
	}
}

// FuzzSegmentReader checks that any stream either expands to exactly the image size or
// fails, and never yields more.
func FuzzSegmentReader(f *testing.F) {
	var ok bytes.Buffer
	img := bytes.Repeat([]byte{7}, 4096)
	_ = WriteSegments(&ok, bytes.NewReader(img), []Segment{{0, 10}, {100, 20}, {4000, 96}})
	f.Add(ok.Bytes(), int64(4096))
	f.Add([]byte{}, int64(0))
	f.Add(ok.Bytes()[:30], int64(4096))
	f.Fuzz(func(t *testing.T, body []byte, size int64) {
		if size < 0 || size > 1<<20 {
			return
		}
		got, err := io.ReadAll(NewSegmentReader(bytes.NewReader(body), size))
		if err == nil && int64(len(got)) != size {
			t.Fatalf("%d bytes without an error, want %d", len(got), size)
		}
		if int64(len(got)) > size {
			t.Fatalf("%d bytes from an image of %d", len(got), size)
		}
	})
}
