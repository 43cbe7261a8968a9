package volume

import (
	"bytes"
	"encoding/binary"
	"hash/crc32"
	"reflect"
	"testing"
)

func seedRecords() []record {
	return []record{
		{typ: recCreate, name: "vm1", kind: kVolume, size: 1 << 30, created: 1700000000000000000, layer: 1},
		{typ: recCreate, name: "gold", kind: kImage, flags: flagImporting, size: 4 << 20, created: 1, layer: 2},
		{typ: recSeal, name: "gold"},
		{typ: recCreate, name: "c-1", kind: kVolume, size: 4 << 20, created: 2, layer: 3, parent: 2},
		{typ: recSnapshot, name: "vm1", name2: "vm1@daily.1", created: 3, layer: 4},
		{typ: recResize, name: "vm1", size: 2 << 30},
		{typ: recMap, layer: 4, vc: 12345, entry: physEntry(77)},
		{typ: recMap, layer: 4, vc: 12, entry: entZero},
		{typ: recMap, layer: 4, vc: 12, entry: entNone},
		{typ: recMerge, name: "vm1@daily.1"},
		{typ: recDelete, name: "c-1"},
	}
}

// FuzzDecodeRecord feeds arbitrary journal record payloads to the decoder: it must
// never panic, and whatever it accepts must encode back to an equal record.
func FuzzDecodeRecord(f *testing.F) {
	for _, r := range seedRecords() {
		f.Add(encodeRecord(&r))
	}
	f.Add([]byte{})
	f.Add([]byte{recMap, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01})
	f.Fuzz(func(t *testing.T, p []byte) {
		r, err := decodeRecord(p)
		if err != nil {
			return
		}
		r2, err := decodeRecord(encodeRecord(&r))
		if err != nil || !reflect.DeepEqual(r, r2) {
			t.Fatalf("round trip of %+v gave %+v, %v", r, r2, err)
		}
	})
}

// FuzzReplayJournal decodes whole journal files and replays them onto a fresh state:
// no panic, and a state that replays must pass the structural validation or be
// rejected by it with problems, never crash it.
func FuzzReplayJournal(f *testing.F) {
	j := encodeJournalHeader(1)
	for _, r := range seedRecords() {
		j = frameRecord(j, &r)
	}
	f.Add(j, false)
	f.Add(j[:len(j)-3], false)
	f.Add(encodeJournalHeader(7), false)
	// With framed set, the input is a list of (length byte, payload) that the harness
	// frames with correct CRCs, so the fuzzer explores replay rather than CRC checks.
	var lp []byte
	for _, r := range seedRecords() {
		p := encodeRecord(&r)
		lp = append(append(lp, byte(len(p))), p...)
	}
	f.Add(lp, true)
	f.Fuzz(func(t *testing.T, b []byte, framed bool) {
		if framed {
			j := encodeJournalHeader(1)
			for len(b) > 0 {
				n := min(int(b[0]), len(b)-1)
				p := b[1 : 1+n]
				b = b[1+n:]
				j = binary.LittleEndian.AppendUint32(j, uint32(len(p)))
				j = binary.LittleEndian.AppendUint32(j, crc32.Checksum(p, castagnoli))
				j = append(j, p...)
			}
			b = j
		}
		_, scan, err := scanJournal(b)
		if err != nil {
			return
		}
		if scan.good > int64(len(b)) {
			t.Fatalf("good length %d beyond %d", scan.good, len(b))
		}
		st := newState()
		for i := range scan.records {
			if st.apply(&scan.records[i], func(uint64) {}) != nil {
				break
			}
		}
		var rep Report
		validate(&rep, st, 1<<20)
		if rep.Clean() {
			b2 := encodeCheckpoint(st, 3)
			if _, _, err := decodeCheckpoint(b2); err != nil {
				t.Fatalf("a valid replayed state does not survive a checkpoint: %v", err)
			}
		}
	})
}

// FuzzDecodeCheckpoint feeds arbitrary checkpoints to the decoder: no panic, and an
// accepted checkpoint re-encodes to a checkpoint that decodes to the same bytes again.
func FuzzDecodeCheckpoint(f *testing.F) {
	st := newState()
	for _, r := range seedRecords()[:8] {
		if err := st.apply(&r, func(uint64) {}); err != nil {
			f.Fatal(err)
		}
	}
	// With fixCRC set, the harness appends a correct CRC so the body parser is explored.
	body := func(b []byte) []byte { return b[len(checkpointMagic) : len(b)-4] }
	f.Add(encodeCheckpoint(st, 5), false)
	f.Add(body(encodeCheckpoint(st, 5)), true)
	f.Add(body(encodeCheckpoint(newState(), 1)), true)
	f.Add([]byte(checkpointMagic), false)
	f.Fuzz(func(t *testing.T, b []byte, fixCRC bool) {
		if fixCRC {
			b = append([]byte(checkpointMagic), b...)
			b = binary.LittleEndian.AppendUint32(b, crc32.Checksum(b, castagnoli))
		}
		st, gen, err := decodeCheckpoint(b)
		if err != nil {
			return
		}
		var rep Report
		validate(&rep, st, 1<<20)
		b2 := encodeCheckpoint(st, gen)
		st2, gen2, err := decodeCheckpoint(b2)
		if err != nil || gen2 != gen {
			t.Fatalf("re-encoded checkpoint does not decode: %v", err)
		}
		if b3 := encodeCheckpoint(st2, gen2); !bytes.Equal(b2, b3) {
			t.Fatal("checkpoint encoding is not stable")
		}
	})
}
