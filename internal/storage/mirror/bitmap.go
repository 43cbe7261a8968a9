package mirror

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"math/bits"
	"os"
	"path/filepath"
	"sync"
)

// DefaultRegionSize is the bytes of volume one bitmap bit covers.
const DefaultRegionSize = 1 << 20

// Bitmap file format: two slots, each slotLen bytes (a multiple of 4 KiB), written
// alternately. A slot is:
//
//	magic   [8]byte "GROWDBM1"
//	seq     uint64  increases by one at every write; the valid slot with the highest wins
//	region  uint32  region size in bytes (a power of two, at least 4 KiB)
//	_       uint32  zero
//	size    uint64  volume size in bytes
//	bits    [ceil(regions/8)]byte, bit i of byte i/8 (LSB first) marks region i
//	crc     uint32  CRC-32C of every byte of the slot before it
//
// All integers are little endian. Bytes after the CRC up to slotLen are zero.
const (
	bitmapMagic     = "GROWDBM1"
	bitmapHeaderLen = 32
	minRegionSize   = 4096
	// maxBitmapRegions bounds a decoded bitmap (2^27 regions = 16 MiB of bits, 128 TiB at 1 MiB).
	maxBitmapRegions = 1 << 27
)

var crcTable = crc32.MakeTable(crc32.Castagnoli)

// ErrCorruptBitmap is returned when neither slot of a bitmap file is valid.
var ErrCorruptBitmap = errors.New("corrupt dirty-region bitmap")

// Bitmap is a persistent set of dirty regions of one volume; safe for concurrent use.
type Bitmap struct {
	path   string
	f      *os.File
	size   int64
	region int64
	n      uint64

	mu   sync.Mutex
	bits []uint64
	gen  uint64 // bumped at every change
	cnt  uint64

	pmu       sync.Mutex // serialises writes to the file
	seq       uint64     // sequence of the newest slot on disk
	persisted uint64     // gen that is on disk
}

func regionCount(size, region int64) uint64 {
	return uint64((size + region - 1) / region)
}

func slotLen(n uint64) int64 {
	l := int64(bitmapHeaderLen) + int64((n+7)/8) + 4
	return (l + 4095) &^ 4095
}

func checkGeometry(size, region int64) error {
	if size <= 0 {
		return fmt.Errorf("volume size %d must be positive", size)
	}
	if region < minRegionSize || region&(region-1) != 0 {
		return fmt.Errorf("region size %d must be a power of two of at least %d", region, minRegionSize)
	}
	if regionCount(size, region) > maxBitmapRegions {
		return fmt.Errorf("volume size %d needs more than %d regions of %d bytes", size, maxBitmapRegions, region)
	}
	return nil
}

// encodeSlot renders one slot of the file for the given bits.
func encodeSlot(seq uint64, size, region int64, n uint64, words []uint64) []byte {
	buf := make([]byte, slotLen(n))
	copy(buf, bitmapMagic)
	binary.LittleEndian.PutUint64(buf[8:], seq)
	binary.LittleEndian.PutUint32(buf[16:], uint32(region))
	binary.LittleEndian.PutUint64(buf[24:], uint64(size))
	nb := int((n + 7) / 8)
	for i := 0; i < nb; i++ {
		buf[bitmapHeaderLen+i] = byte(words[i/8] >> (8 * (i % 8)))
	}
	end := bitmapHeaderLen + nb
	binary.LittleEndian.PutUint32(buf[end:], crc32.Checksum(buf[:end], crcTable))
	return buf
}

// decodedSlot is one valid slot of a bitmap file.
type decodedSlot struct {
	seq    uint64
	size   int64
	region int64
	words  []uint64
}

// decodeSlot parses and verifies one slot at the start of b.
func decodeSlot(b []byte) (decodedSlot, error) {
	var s decodedSlot
	if len(b) < bitmapHeaderLen+4 {
		return s, fmt.Errorf("slot of %d bytes is too short", len(b))
	}
	if string(b[:8]) != bitmapMagic {
		return s, errors.New("bad magic")
	}
	s.seq = binary.LittleEndian.Uint64(b[8:])
	s.region = int64(binary.LittleEndian.Uint32(b[16:]))
	if binary.LittleEndian.Uint32(b[20:]) != 0 {
		return s, errors.New("reserved field is not zero")
	}
	sz := binary.LittleEndian.Uint64(b[24:])
	if sz > 1<<62 {
		return s, fmt.Errorf("volume size %d out of range", sz)
	}
	s.size = int64(sz)
	if err := checkGeometry(s.size, s.region); err != nil {
		return s, err
	}
	n := regionCount(s.size, s.region)
	nb := int((n + 7) / 8)
	end := bitmapHeaderLen + nb
	if len(b) < end+4 {
		return s, fmt.Errorf("slot of %d bytes is too short for %d regions", len(b), n)
	}
	if got, want := crc32.Checksum(b[:end], crcTable), binary.LittleEndian.Uint32(b[end:]); got != want {
		return s, fmt.Errorf("checksum mismatch (%08x, stored %08x)", got, want)
	}
	s.words = make([]uint64, (n+63)/64)
	for i := 0; i < nb; i++ {
		s.words[i/8] |= uint64(b[bitmapHeaderLen+i]) << (8 * (i % 8))
	}
	if n%64 != 0 && s.words[len(s.words)-1]>>(n%64) != 0 {
		return s, errors.New("bits set beyond the last region")
	}
	return s, nil
}

// decodeBitmap picks the newest valid slot of a whole bitmap file.
func decodeBitmap(data []byte) (decodedSlot, error) {
	first, err0 := decodeSlot(data)
	var second decodedSlot
	err1 := errors.New("no second slot")
	if err0 == nil {
		if l := slotLen(regionCount(first.size, first.region)); int64(len(data)) >= 2*l {
			second, err1 = decodeSlot(data[l:])
		}
	} else {
		// The first slot is torn: find the second by trying every slot length a 4 KiB multiple.
		for l := int64(4096); l < int64(len(data)) && err1 != nil; l += 4096 {
			if s, err := decodeSlot(data[l:]); err == nil && slotLen(regionCount(s.size, s.region)) == l {
				second, err1 = s, nil
			}
		}
	}
	switch {
	case err0 != nil && err1 != nil:
		return decodedSlot{}, fmt.Errorf("%w: slot 0: %v; slot 1: %v", ErrCorruptBitmap, err0, err1)
	case err0 != nil:
		return second, nil
	case err1 != nil:
		return first, nil
	}
	if first.size != second.size || first.region != second.region {
		return decodedSlot{}, fmt.Errorf("%w: slots disagree on geometry", ErrCorruptBitmap)
	}
	if second.seq > first.seq {
		return second, nil
	}
	return first, nil
}

// OpenBitmap opens the bitmap file at path for a volume of size bytes in regions of
// region bytes, creating it (all clean) if it does not exist.
func OpenBitmap(path string, size, region int64) (*Bitmap, error) {
	if err := checkGeometry(size, region); err != nil {
		return nil, fmt.Errorf("Failed to open bitmap %q: %w", path, err)
	}
	b := &Bitmap{path: path, size: size, region: region, n: regionCount(size, region)}
	data, err := os.ReadFile(path)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return b, b.create()
	case err != nil:
		return nil, fmt.Errorf("Failed to read bitmap %q: %w", path, err)
	}
	s, err := decodeBitmap(data)
	if err != nil {
		return nil, fmt.Errorf("Failed to decode bitmap %q: %w", path, err)
	}
	if s.size != size || s.region != region {
		return nil, fmt.Errorf("Failed to open bitmap %q: it is for %d bytes in regions of %d, not %d in %d", path, s.size, s.region, size, region)
	}
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return nil, fmt.Errorf("Failed to open bitmap %q: %w", path, err)
	}
	b.f, b.bits, b.seq = f, s.words, s.seq
	for _, w := range b.bits {
		b.cnt += uint64(bits.OnesCount64(w))
	}
	return b, nil
}

// create writes a new all-clean file by rename so a crash never leaves a half-made one.
func (b *Bitmap) create() error {
	b.bits = make([]uint64, (b.n+63)/64)
	tmp := b.path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return fmt.Errorf("Failed to create bitmap %q: %w", b.path, err)
	}
	// Sequence 1 lives in slot 1, so the first Persist (sequence 2) writes slot 0.
	slot := encodeSlot(1, b.size, b.region, b.n, b.bits)
	_, err = f.WriteAt(slot, int64(len(slot)))
	if err == nil {
		err = f.Sync()
	}
	if err == nil {
		err = os.Rename(tmp, b.path)
	}
	if err == nil {
		err = syncDir(filepath.Dir(b.path))
	}
	if err != nil {
		f.Close()
		os.Remove(tmp)
		return fmt.Errorf("Failed to create bitmap %q: %w", b.path, err)
	}
	b.f, b.seq = f, 1
	return nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// RegionSize is the bytes of volume one bit covers.
func (b *Bitmap) RegionSize() int64 { return b.region }

// Regions is the number of regions of the volume.
func (b *Bitmap) Regions() uint64 { return b.n }

// span returns the regions [first, last] that bytes [off, off+length) touch.
func (b *Bitmap) span(off, length int64) (uint64, uint64, bool) {
	if off < 0 || length <= 0 || off >= b.size || length > b.size-off {
		return 0, 0, false
	}
	return uint64(off / b.region), uint64((off + length - 1) / b.region), true
}

// Mark sets the bits of every region that bytes [off, off+length) touch, in memory,
// and reports whether any bit was newly set (then Persist must run before the write
// they cover may reach the local disk). An out-of-range span is an error.
func (b *Bitmap) Mark(off, length int64) (bool, error) {
	first, last, ok := b.span(off, length)
	if !ok {
		return false, fmt.Errorf("Failed to mark bitmap %q: range %d+%d outside a volume of %d bytes", b.path, off, length, b.size)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	newly := false
	for r := first; r <= last; r++ {
		if b.bits[r/64]&(1<<(r%64)) == 0 {
			b.bits[r/64] |= 1 << (r % 64)
			b.cnt++
			newly = true
		}
	}
	if newly {
		b.gen++
	}
	return newly, nil
}

// MarkDurable marks the regions of [off, off+length) and persists the bitmap if any bit was new.
func (b *Bitmap) MarkDurable(off, length int64) error {
	newly, err := b.Mark(off, length)
	if err != nil || !newly {
		return err
	}
	return b.Persist()
}

// MarkRegions sets the bits of the given region numbers in memory.
func (b *Bitmap) MarkRegions(regions []uint64) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, r := range regions {
		if r >= b.n {
			return fmt.Errorf("Failed to mark bitmap %q: region %d outside %d regions", b.path, r, b.n)
		}
	}
	newly := false
	for _, r := range regions {
		if b.bits[r/64]&(1<<(r%64)) == 0 {
			b.bits[r/64] |= 1 << (r % 64)
			b.cnt++
			newly = true
		}
	}
	if newly {
		b.gen++
	}
	return nil
}

// Clear clears region r in memory (persist afterwards to make it durable).
func (b *Bitmap) Clear(r uint64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if r < b.n && b.bits[r/64]&(1<<(r%64)) != 0 {
		b.bits[r/64] &^= 1 << (r % 64)
		b.cnt--
		b.gen++
	}
}

// Test reports whether region r is marked.
func (b *Bitmap) Test(r uint64) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return r < b.n && b.bits[r/64]&(1<<(r%64)) != 0
}

// Count is the number of marked regions.
func (b *Bitmap) Count() uint64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.cnt
}

// Dirty lists the marked regions in increasing order.
func (b *Bitmap) Dirty() []uint64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	out := make([]uint64, 0, b.cnt)
	for i, w := range b.bits {
		for w != 0 {
			t := uint64(bits.TrailingZeros64(w))
			out = append(out, uint64(i)*64+t)
			w &= w - 1
		}
	}
	return out
}

// Persist makes the in-memory bitmap durable; concurrent callers share one write.
func (b *Bitmap) Persist() error {
	b.mu.Lock()
	want := b.gen
	b.mu.Unlock()
	b.pmu.Lock()
	defer b.pmu.Unlock()
	if b.f == nil {
		return fmt.Errorf("Failed to persist bitmap %q: it is closed", b.path)
	}
	if b.persisted >= want {
		return nil
	}
	b.mu.Lock()
	gen := b.gen
	words := append([]uint64(nil), b.bits...)
	b.mu.Unlock()
	seq := b.seq + 1
	slot := encodeSlot(seq, b.size, b.region, b.n, words)
	// Slot seq%2: the other slot keeps the previous state whole if this write is torn.
	if _, err := b.f.WriteAt(slot, int64(seq%2)*int64(len(slot))); err != nil {
		return fmt.Errorf("Failed to write bitmap %q: %w", b.path, err)
	}
	if err := b.f.Sync(); err != nil {
		return fmt.Errorf("Failed to sync bitmap %q: %w", b.path, err)
	}
	b.seq, b.persisted = seq, gen
	return nil
}

// Close closes the file; it does not persist.
func (b *Bitmap) Close() error {
	b.pmu.Lock()
	defer b.pmu.Unlock()
	if b.f == nil {
		return nil
	}
	err := b.f.Close()
	b.f = nil
	if err != nil {
		return fmt.Errorf("Failed to close bitmap %q: %w", b.path, err)
	}
	return nil
}
