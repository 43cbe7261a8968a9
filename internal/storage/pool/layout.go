package pool

// layout is the pure address arithmetic of the pool: stripe unit u lives on mirror
// pair u mod pairs, at disk offset dataOff + (u / pairs) * unit.
type layout struct {
	unit         int64 // stripe unit in bytes
	pairs        int64 // number of mirror pairs (1 for a single-disk pool)
	unitsPerDisk int64 // stripe units each disk holds
	dataOff      int64 // first data byte on each disk (after the header area)
}

// size is the usable size of the pool.
func (l layout) size() int64 { return l.pairs * l.unitsPerDisk * l.unit }

// diskBytes is the smallest disk size that can hold one side of a pair: header area,
// data area and the tail block.
func (l layout) diskBytes() int64 { return l.tailOff() + tailSize }

// tailOff is where the tail block sits, right after the data area. Data writes never
// reach it, so a disk file that was truncated stays shorter than diskBytes even after
// later writes extend it again, and the tail's content proves the disk kept its end.
func (l layout) tailOff() int64 { return l.dataOff + l.unitsPerDisk*l.unit }

// tailSize is the size of the tail block.
const tailSize = 4096

// locate maps the first byte of a request for n bytes at pool offset off to its pair
// and disk offset, and returns how many bytes from there are contiguous on that pair
// (at most n). It also returns the index of the stripe unit on the disk, which readers
// use to spread load over the two sides of a mirror.
func (l layout) locate(off, n int64) (pair int, diskOff, length, diskUnit int64) {
	u := off / l.unit
	in := off - u*l.unit
	pair = int(u % l.pairs)
	diskUnit = u / l.pairs
	diskOff = l.dataOff + diskUnit*l.unit + in
	length = l.unit - in
	if l.pairs == 1 || length > n {
		// With one pair, consecutive units are consecutive on the disk.
		length = n
	}
	return pair, diskOff, length, diskUnit
}

// dataOffsetFor is the header area reserved before the data: 1 MiB, or one stripe
// unit when that is larger, so data stays aligned to the stripe unit.
func dataOffsetFor(unit int64) int64 {
	const minHeaderArea = 1 << 20
	if unit > minHeaderArea {
		return unit
	}
	return minHeaderArea
}
