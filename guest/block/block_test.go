package block

import (
	"bytes"
	"errors"
	"strings"
	"testing"
)

// disk is an in-memory data disk of n slots.
type disk []byte

func newDisk(slots int) disk { return make(disk, slots*Size) }

func (d disk) write(seq, slots uint64) {
	slot := Slot(seq, slots)
	Encode(d[slot*Size:], seq, slot, int64(seq))
}

func (d disk) ReadAt(p []byte, off int64) (int, error) { return bytes.NewReader(d).ReadAt(p, off) }

func TestEncodeDecodeRoundTrip(t *testing.T) {
	buf := make([]byte, Size)
	Encode(buf, 42, 7, 1234)
	b, err := Decode(buf)
	if err != nil {
		t.Fatal(err)
	}
	if b != (Block{Seq: 42, Slot: 7, Stamp: 1234}) {
		t.Fatalf("decoded %+v", b)
	}
	if _, err := Decode(make([]byte, Size)); !errors.Is(err, ErrEmpty) {
		t.Fatalf("zero block: got %v, want ErrEmpty", err)
	}
	if _, err := Decode(buf[:100]); err == nil {
		t.Fatal("short block decoded")
	}
	for _, off := range []int{0, 9, 17, 25, 100, Size - 9, Size - 1} {
		c := bytes.Clone(buf)
		c[off] ^= 0x40
		if _, err := Decode(c); err == nil {
			t.Fatalf("a flipped bit at %d went unnoticed", off)
		}
	}
	// A block whose checksum was recomputed over another sequence's payload is caught too.
	other := make([]byte, Size)
	Encode(other, 43, 7, 1234)
	copy(other[offSeq:offSeq+8], buf[offSeq:offSeq+8])
	Encode(buf, 42, 7, 1234)
	if _, err := Decode(other); err == nil {
		t.Fatal("a block with a foreign payload decoded")
	}
}

func TestVerifyWrapsAndSupersedes(t *testing.T) {
	const slots = 8
	d := newDisk(slots)
	for s := uint64(1); s <= 20; s++ {
		d.write(s, slots)
	}
	rep, err := Verify(d, slots, 20)
	if err != nil {
		t.Fatal(err)
	}
	if rep.Checked != slots || rep.Newest != 20 || rep.Torn {
		t.Fatalf("report %+v", rep)
	}
	// An observer that saw ack 15 while the writer went on to 20 still verifies.
	if _, err := Verify(d, slots, 15); err != nil {
		t.Fatalf("superseded blocks: %v", err)
	}
	// Nothing written, nothing acknowledged: fine; acknowledged but never written: lost.
	if _, err := Verify(newDisk(slots), slots, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := Verify(newDisk(slots), slots, 1); err == nil {
		t.Fatal("a missing acknowledged block verified")
	}
	if _, err := Verify(d, 0, 1); err == nil {
		t.Fatal("zero slots accepted")
	}
}

func TestVerifyDetectsLostAndStaleBlocks(t *testing.T) {
	const slots = 8
	d := newDisk(slots)
	for s := uint64(1); s <= 12; s++ {
		d.write(s, slots)
	}
	// A write that the disk "lost": slot of 11 still holds 3.
	stale := bytes.Clone(d)
	Encode(stale[Slot(11, slots)*Size:], 3, Slot(3, slots), 3)
	if _, err := Verify(disk(stale), slots, 12); err == nil || !strings.Contains(err.Error(), "older sequence 3") {
		t.Fatalf("stale block: got %v", err)
	}
	// A block written to the wrong place.
	moved := bytes.Clone(d)
	copy(moved[Slot(10, slots)*Size:], d[Slot(9, slots)*Size:Slot(9, slots)*Size+Size])
	if _, err := Verify(disk(moved), slots, 12); err == nil {
		t.Fatal("a misplaced block verified")
	}
	// A corrupt acknowledged block.
	bad := bytes.Clone(d)
	bad[Slot(12, slots)*Size+200] ^= 1
	if _, err := Verify(disk(bad), slots, 12); err == nil {
		t.Fatal("a corrupt newest acknowledged block verified")
	}
}

func TestVerifyToleratesOnlyTheWriteInFlight(t *testing.T) {
	const slots = 8
	d := newDisk(slots)
	for s := uint64(1); s <= 12; s++ {
		d.write(s, slots)
	}
	// Sequence 13 was being written (not acknowledged) into the slot of 5: torn.
	torn := bytes.Clone(d)
	i := Slot(13, slots) * Size
	copy(torn[i:i+Size/2], make([]byte, Size/2))
	rep, err := Verify(disk(torn), slots, 12)
	if err != nil {
		t.Fatalf("a torn unacknowledged write failed verification: %v", err)
	}
	if !rep.Torn || rep.Checked != slots-1 {
		t.Fatalf("report %+v", rep)
	}
	// The same damage one slot further is a lost acknowledged block.
	torn2 := bytes.Clone(d)
	j := Slot(14, slots) * Size
	copy(torn2[j:j+Size/2], make([]byte, Size/2))
	if _, err := Verify(disk(torn2), slots, 12); err == nil {
		t.Fatal("a torn acknowledged block verified")
	}
}

func TestScanResumes(t *testing.T) {
	const slots = 16
	d := newDisk(slots)
	if n, err := Scan(d, slots); err != nil || n != 0 {
		t.Fatalf("blank disk: %d, %v", n, err)
	}
	for s := uint64(1); s <= 37; s++ {
		d.write(s, slots)
	}
	if n, err := Scan(d, slots); err != nil || n != 37 {
		t.Fatalf("scan: %d, %v", n, err)
	}
	// A hole in the history is reported.
	copy(d[Slot(30, slots)*Size:], make([]byte, Size))
	if _, err := Scan(d, slots); err == nil {
		t.Fatal("a hole in the history went unnoticed")
	}
}
