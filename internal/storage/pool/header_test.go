package pool

import (
	"errors"
	"testing"
)

func TestHeaderRoundTrip(t *testing.T) {
	h := header{PoolUUID: "u-1", Index: 3, Pair: 1, Disks: 4, StripeUnit: 65536, UnitsPerDisk: 10, DataOffset: 1 << 20, Generation: 7, Rebuilding: true}
	b, err := encodeHeader(h)
	if err != nil {
		t.Fatal(err)
	}
	got, err := decodeHeader(b)
	if err != nil || got != h {
		t.Fatalf("decode = %+v, %v; want %+v", got, err, h)
	}
	b[headerFixed+3] ^= 1
	if _, err := decodeHeader(b); err == nil {
		t.Fatal("a flipped bit was not detected")
	}
	if _, err := decodeHeader(make([]byte, headerSize)); !errors.Is(err, errNoHeader) {
		t.Fatalf("zero block: %v, want errNoHeader", err)
	}
	junk := make([]byte, headerSize)
	junk[100] = 1
	if _, err := decodeHeader(junk); !errors.Is(err, errForeignData) {
		t.Fatalf("junk block: %v, want errForeignData", err)
	}
	bad := h
	bad.Pair = 0
	b, _ = encodeHeader(bad)
	if _, err := decodeHeader(b); err == nil {
		t.Fatal("a header whose pair does not match its index was accepted")
	}
}

func FuzzDecodeHeader(f *testing.F) {
	b, _ := encodeHeader(header{PoolUUID: "x", Index: 0, Disks: 1, StripeUnit: 65536, UnitsPerDisk: 1, DataOffset: 1 << 20, Generation: 1})
	f.Add(b)
	f.Add(make([]byte, headerSize))
	f.Add([]byte("GROWPOOL\x01\x00\x00\x00\xff\xff\xff\xff"))
	f.Fuzz(func(t *testing.T, b []byte) {
		h, err := decodeHeader(b)
		if err != nil {
			return
		}
		if h.validate() != nil {
			t.Fatalf("decoded an invalid header %+v", h)
		}
		re, err := encodeHeader(h)
		if err != nil {
			t.Fatalf("re-encode: %v", err)
		}
		if h2, err := decodeHeader(re); err != nil || h2 != h {
			t.Fatalf("round trip: %+v %v", h2, err)
		}
	})
}
