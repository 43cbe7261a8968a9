package block

import (
	"bytes"
	"testing"
)

// FuzzDecode: any block content decodes or fails cleanly, and a valid block that was
// changed anywhere never decodes as the original. (Inputs stay small: the fuzzer is
// slow with 4 KiB seeds; data is laid over a valid block at off.)
func FuzzDecode(f *testing.F) {
	good := make([]byte, Size)
	Encode(good, 7, 3, 99)
	f.Add([]byte{1}, uint16(0))
	f.Add([]byte("GROWBLK1"), uint16(0))
	f.Add([]byte{0, 0, 0, 0}, uint16(4090))
	f.Fuzz(func(t *testing.T, data []byte, off uint16) {
		_, _ = Decode(data) // must not panic, whatever the length
		b := bytes.Clone(good)
		at := int(off) % Size
		n := copy(b[at:], data)
		changed := !bytes.Equal(b, good)
		blk, err := Decode(b)
		if changed && err == nil && blk == (Block{Seq: 7, Slot: 3, Stamp: 99}) {
			t.Fatalf("a block changed at %d..%d still decodes as the original", at, at+n)
		}
		if !changed && err != nil {
			t.Fatalf("the unchanged block does not decode: %v", err)
		}
	})
}
