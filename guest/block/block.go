// Package block defines the self-checking blocks that the test guest's disk writer
// writes, and checks them from either side: inside the guest (to resume after a
// reboot) and on the host (to prove that every acknowledged write survived a
// migration, a crash or a controller restart).
//
// A block is Size bytes: magic, sequence number, slot, timestamp, a payload derived
// from the sequence number, and a CRC-64 over everything before it. Sequence number s
// (counting from 1) lives in slot (s-1) mod slots, at byte offset slot*Size of the
// data disk. This package only encodes, decodes and verifies; it must never write.
package block

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc64"
	"io"
)

// Size is the size of one block in bytes; it is a multiple of every logical sector size.
const Size = 4096

// Magic starts every block.
const Magic = "GROWBLK1"

const (
	offSeq     = 8
	offSlot    = 16
	offStamp   = 24
	offPayload = 32
	offCRC     = Size - 8
)

var table = crc64.MakeTable(crc64.ECMA)

// ErrEmpty means the block is all zeroes (never written).
var ErrEmpty = errors.New("block was never written")

// Block is a decoded block header.
type Block struct {
	Seq   uint64 // sequence number, from 1
	Slot  uint64 // slot the writer put it in
	Stamp int64  // guest wall clock in Unix nanoseconds when it was written
}

// Slot returns the slot of sequence number seq (seq >= 1) on a disk of slots slots.
func Slot(seq, slots uint64) uint64 {
	return (seq - 1) % slots
}

// Encode fills buf (at least Size bytes) with the block for seq in slot.
func Encode(buf []byte, seq, slot uint64, stamp int64) {
	b := buf[:Size]
	copy(b, Magic)
	binary.LittleEndian.PutUint64(b[offSeq:], seq)
	binary.LittleEndian.PutUint64(b[offSlot:], slot)
	binary.LittleEndian.PutUint64(b[offStamp:], uint64(stamp))
	fillPayload(b[offPayload:offCRC], seq)
	binary.LittleEndian.PutUint64(b[offCRC:], crc64.Checksum(b[:offCRC], table))
}

// fillPayload writes a pattern that depends on seq (xorshift64), so that a block's
// content is checked beyond its checksum.
func fillPayload(p []byte, seq uint64) {
	x := seq*0x9E3779B97F4A7C15 | 1
	for i := 0; i+8 <= len(p); i += 8 {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		binary.LittleEndian.PutUint64(p[i:], x)
	}
}

// Decode checks buf (Size bytes) and returns its header. It returns ErrEmpty for an
// all-zero block and a descriptive error for a torn, foreign or corrupt one.
func Decode(buf []byte) (Block, error) {
	if len(buf) < Size {
		return Block{}, fmt.Errorf("short block: %d bytes", len(buf))
	}
	b := buf[:Size]
	if string(b[:len(Magic)]) != Magic {
		if allZero(b) {
			return Block{}, ErrEmpty
		}
		return Block{}, fmt.Errorf("bad magic %q", b[:len(Magic)])
	}
	want := binary.LittleEndian.Uint64(b[offCRC:])
	if got := crc64.Checksum(b[:offCRC], table); got != want {
		return Block{}, fmt.Errorf("checksum mismatch: stored %016x, computed %016x", want, got)
	}
	blk := Block{
		Seq:   binary.LittleEndian.Uint64(b[offSeq:]),
		Slot:  binary.LittleEndian.Uint64(b[offSlot:]),
		Stamp: int64(binary.LittleEndian.Uint64(b[offStamp:])),
	}
	if blk.Seq == 0 {
		return Block{}, errors.New("sequence number 0 is invalid")
	}
	var exp [offCRC - offPayload]byte
	fillPayload(exp[:], blk.Seq)
	if string(exp[:]) != string(b[offPayload:offCRC]) {
		return Block{}, fmt.Errorf("payload of block %d does not match its sequence number", blk.Seq)
	}
	return blk, nil
}

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// Report is the result of Verify.
type Report struct {
	Checked uint64 // acknowledged sequence numbers checked
	Newest  uint64 // highest valid sequence number found in the checked slots
	Torn    bool   // the slot after Newest held a partly written block (a write in flight)
}

// Verify checks that every sequence number up to lastAck that can still be on a disk
// of slots slots (the last min(lastAck, slots) of them) is present in its slot, or
// has been superseded there by a later valid write of the same slot (the writer may
// have gone on after lastAck was observed). The one slot the writer may have been
// writing at that moment (the one after the newest block) may hold a torn block.
// It returns the first violation found.
func Verify(r io.ReaderAt, slots, lastAck uint64) (Report, error) {
	var rep Report
	if slots == 0 {
		return rep, errors.New("slot count must be positive")
	}
	if lastAck == 0 {
		return rep, nil
	}
	first := uint64(1)
	if lastAck > slots {
		first = lastAck - slots + 1
	}
	type entry struct {
		blk Block
		err error
	}
	entries := make([]entry, 0, lastAck-first+1)
	buf := make([]byte, Size)
	for s := first; s <= lastAck; s++ {
		slot := Slot(s, slots)
		if _, err := r.ReadAt(buf, int64(slot)*Size); err != nil {
			return rep, fmt.Errorf("Failed to read slot %d (sequence %d): %w", slot, s, err)
		}
		blk, err := Decode(buf)
		if err == nil && (blk.Slot != slot || Slot(blk.Seq, slots) != slot) {
			err = fmt.Errorf("slot %d holds sequence %d written for slot %d", slot, blk.Seq, blk.Slot)
		}
		if err == nil {
			rep.Newest = max(rep.Newest, blk.Seq)
		}
		entries = append(entries, entry{blk, err})
	}
	inFlight := Slot(rep.Newest+1, slots)
	for i, e := range entries {
		s := first + uint64(i)
		slot := Slot(s, slots)
		if e.err != nil {
			// Only a write after lastAck can be in flight, so only then may its slot be torn.
			if slot == inFlight && rep.Newest >= lastAck && !rep.Torn && !errors.Is(e.err, ErrEmpty) {
				rep.Torn = true
				continue
			}
			return rep, fmt.Errorf("acknowledged sequence %d in slot %d is lost: %w", s, slot, e.err)
		}
		if e.blk.Seq < s {
			return rep, fmt.Errorf("acknowledged sequence %d in slot %d is lost: the slot still holds older sequence %d", s, slot, e.blk.Seq)
		}
		rep.Checked++
	}
	return rep, nil
}

// Scan reads every slot and returns the highest valid sequence number on the disk
// (0 if none) together with an error if the slots do not form the one consistent
// history that a sequential writer leaves: for the newest sequence n, slot of n-k
// holds n-k for every k < min(n, slots), except that the slot after n may hold
// either its older block or nothing.
func Scan(r io.ReaderAt, slots uint64) (uint64, error) {
	if slots == 0 {
		return 0, errors.New("slot count must be positive")
	}
	buf := make([]byte, Size)
	var newest uint64
	for slot := uint64(0); slot < slots; slot++ {
		if _, err := r.ReadAt(buf, int64(slot)*Size); err != nil {
			return 0, fmt.Errorf("Failed to read slot %d: %w", slot, err)
		}
		blk, err := Decode(buf)
		if errors.Is(err, ErrEmpty) {
			continue
		}
		if err != nil {
			// A torn block is tolerated only where the interrupted write was; Verify decides.
			continue
		}
		if blk.Slot == slot && Slot(blk.Seq, slots) == slot {
			newest = max(newest, blk.Seq)
		}
	}
	if newest == 0 {
		return 0, nil
	}
	if _, err := Verify(r, slots, newest); err != nil {
		return newest, err
	}
	return newest, nil
}
