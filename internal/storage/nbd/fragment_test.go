package nbd

import (
	"bytes"
	"encoding/binary"
	"testing"
)

// stripedExport is a huge virtual export whose base:allocation alternates between
// data and hole every stripe bytes; data reads as the low byte of the stripe index.
type stripedExport struct {
	size, stripe int64
}

func (e *stripedExport) Size() int64    { return e.size }
func (e *stripedExport) ReadOnly() bool { return true }
func (e *stripedExport) ReadAt(p []byte, off int64) error {
	for i := range p {
		s := (off + int64(i)) / e.stripe
		if s%2 == 0 {
			p[i] = byte(s) | 1
		} else {
			p[i] = 0
		}
	}
	return nil
}
func (e *stripedExport) WriteAt([]byte, int64, bool) error         { return ErrReadOnly }
func (e *stripedExport) Flush() error                              { return nil }
func (e *stripedExport) Trim(int64, int64, bool) error             { return ErrReadOnly }
func (e *stripedExport) WriteZeroes(int64, int64, ZeroFlags) error { return ErrReadOnly }
func (e *stripedExport) Cache(int64, int64) error                  { return nil }
func (e *stripedExport) Close() error                              { return nil }
func (e *stripedExport) Extents(off, length int64) ([]Extent, error) {
	// Hand out at most 100 extents per call, as a real volume might.
	var out []Extent
	for end := off + length; off < end && len(out) < 100; {
		s := off / e.stripe
		n := min((s+1)*e.stripe, end) - off
		out = append(out, Extent{Length: n, Hole: s%2 == 1, Zero: s%2 == 1})
		off += n
	}
	return out, nil
}

type oneExport struct{ e Export }

func (o oneExport) Open(name string) (Export, error) {
	if name != "striped" {
		return nil, ErrUnknownExport
	}
	return o.e, nil
}
func (o oneExport) List() []ExportInfo { return []ExportInfo{{Name: "striped"}} }

// TestFragmentedExport checks replies over a pathologically fragmented export: a
// READ split into too many chunks still returns the right bytes, and BLOCK_STATUS
// over 4 GiB is bounded in size and never claims more than was asked.
func TestFragmentedExport(t *testing.T) {
	ex := &stripedExport{size: 1 << 40, stripe: 4096}
	srv := startServerWith(t, &Server{Exports: oneExport{ex}})
	c := dialRaw(t, "unix", srv)
	c.greet(flagFixedNewstyle | flagNoZeroes)
	c.option(optStructuredReply, nil)
	c.optReply(optStructuredReply)
	c.option(optSetMetaContext, metaData("striped", baseAllocation))
	c.optReply(optSetMetaContext)
	c.optReply(optSetMetaContext)
	c.goExport("striped")

	const off, n = 1<<39 + 1000, 8 << 20
	c.request(0, cmdRead, 1, off, n, nil)
	got := make([]byte, n)
	chunks := 0
	for {
		ch := c.chunk()
		chunks++
		o := binary.BigEndian.Uint64(ch.data) - off
		switch ch.typ {
		case chunkOffsetData:
			copy(got[o:], ch.data[8:])
		case chunkOffsetHole:
			// got is already zero there.
		default:
			t.Fatalf("chunk type %d", ch.typ)
		}
		if ch.flags&chunkFlagDone != 0 {
			break
		}
	}
	want := make([]byte, n)
	ex.ReadAt(want, off)
	if !bytes.Equal(got, want) {
		t.Fatal("fragmented read reassembled wrongly")
	}
	if chunks > maxReadChunks+1 {
		t.Errorf("%d chunks in one reply, limit %d", chunks, maxReadChunks)
	}

	c.request(0, cmdBlockStatus, 2, 4096, 1<<32-1, nil)
	ch := c.chunk()
	if ch.typ != chunkBlockStat {
		t.Fatalf("chunk type %d", ch.typ)
	}
	desc := ch.data[4:]
	if len(desc)/8 > maxStatusDescriptors {
		t.Errorf("%d descriptors, limit %d", len(desc)/8, maxStatusDescriptors)
	}
	var total uint64
	for i := 0; i < len(desc); i += 8 {
		l, f := binary.BigEndian.Uint32(desc[i:]), binary.BigEndian.Uint32(desc[i+4:])
		wantFlags := uint32(0)
		if (4096+total)/4096%2 == 1 {
			wantFlags = stateHole | stateZero
		}
		if l != 4096 || f != wantFlags {
			t.Fatalf("descriptor %d: length %d flags %d", i/8, l, f)
		}
		total += uint64(l)
	}
	if total == 0 || total > 1<<32-1 {
		t.Errorf("descriptors cover %d bytes", total)
	}
}
