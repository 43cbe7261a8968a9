package volume

import (
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"slices"
	"sort"
)

// On-disk formats. Every integer is a uvarint unless said otherwise.
//
// Journal file "journal.<gen>": header = magic "GROWVJN1", gen (8 bytes LE), CRC32C of
// the previous 16 bytes (4 bytes LE). Then records, each: payload length (4 bytes LE),
// CRC32C of the payload (4 bytes LE), payload. The payload starts with the record type.
//
// Checkpoint file "checkpoint": magic "GROWVCK1", then a body, then the CRC32C of
// everything before it (4 bytes LE). Body: version, gen, next layer id, number of
// layers, each layer (id, parent id or 0, entry count, entries as delta-coded virtual
// cluster and entry value), number of objects, each object (name, kind, flags, size,
// created unix nanoseconds as varint, layer id).

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

const (
	journalMagic    = "GROWVJN1"
	checkpointMagic = "GROWVCK1"
	journalHeader   = 8 + 8 + 4
	recordHeader    = 8
	maxRecordLen    = 1 << 16
	formatVersion   = 1
)

// Record types.
const (
	recCreate   byte = 1 // name, kind, flags, size, created, layer, parent layer
	recSnapshot byte = 2 // volume name, snapshot name, created, new top layer
	recResize   byte = 3 // name, size
	recDelete   byte = 4 // name
	recMerge    byte = 5 // snapshot name: merge its layer into its only child, then drop it
	recSeal     byte = 6 // name: an imported image is complete
	recMap      byte = 7 // layer, virtual cluster, entry
)

// Object kinds on disk.
const (
	kVolume   byte = 1
	kImage    byte = 2
	kSnapshot byte = 3
)

const flagImporting byte = 1

type record struct {
	typ     byte
	name    string
	name2   string
	kind    byte
	flags   byte
	size    int64
	created int64
	layer   uint64
	parent  uint64
	vc      uint64
	entry   uint64
}

type encoder struct{ b []byte }

func (e *encoder) u(v uint64)   { e.b = binary.AppendUvarint(e.b, v) }
func (e *encoder) i(v int64)    { e.b = binary.AppendVarint(e.b, v) }
func (e *encoder) byte1(v byte) { e.b = append(e.b, v) }
func (e *encoder) str(s string) { e.u(uint64(len(s))); e.b = append(e.b, s...) }

type decoder struct {
	b   []byte
	err error
}

func (d *decoder) fail(what string) {
	if d.err == nil {
		d.err = fmt.Errorf("Failed to decode %s: %w", what, ErrCorrupt)
	}
}

func (d *decoder) u(what string) uint64 {
	if d.err != nil {
		return 0
	}
	v, n := binary.Uvarint(d.b)
	if n <= 0 {
		d.fail(what)
		return 0
	}
	d.b = d.b[n:]
	return v
}

func (d *decoder) i(what string) int64 {
	if d.err != nil {
		return 0
	}
	v, n := binary.Varint(d.b)
	if n <= 0 {
		d.fail(what)
		return 0
	}
	d.b = d.b[n:]
	return v
}

func (d *decoder) byte1(what string) byte {
	if d.err != nil {
		return 0
	}
	if len(d.b) < 1 {
		d.fail(what)
		return 0
	}
	v := d.b[0]
	d.b = d.b[1:]
	return v
}

func (d *decoder) str(what string) string {
	n := d.u(what)
	if d.err != nil {
		return ""
	}
	if n > uint64(len(d.b)) || n > 256 {
		d.fail(what)
		return ""
	}
	s := string(d.b[:n])
	d.b = d.b[n:]
	return s
}

// size reads a virtual size and checks it.
func (d *decoder) size(what string) int64 {
	v := d.u(what)
	if d.err == nil && (v == 0 || v > maxSize || v%512 != 0) {
		d.fail(what)
	}
	return int64(v)
}

func encodeRecord(r *record) []byte {
	e := encoder{b: make([]byte, 0, 32)}
	e.byte1(r.typ)
	switch r.typ {
	case recCreate:
		e.str(r.name)
		e.byte1(r.kind)
		e.byte1(r.flags)
		e.u(uint64(r.size))
		e.i(r.created)
		e.u(r.layer)
		e.u(r.parent)
	case recSnapshot:
		e.str(r.name)
		e.str(r.name2)
		e.i(r.created)
		e.u(r.layer)
	case recResize:
		e.str(r.name)
		e.u(uint64(r.size))
	case recDelete, recMerge, recSeal:
		e.str(r.name)
	case recMap:
		e.u(r.layer)
		e.u(r.vc)
		e.u(r.entry)
	}
	return e.b
}

// decodeRecord parses one record payload; it never panics on hostile input.
func decodeRecord(p []byte) (record, error) {
	d := decoder{b: p}
	r := record{typ: d.byte1("record type")}
	switch r.typ {
	case recCreate:
		r.name = d.str("name")
		r.kind = d.byte1("kind")
		r.flags = d.byte1("flags")
		r.size = d.size("size")
		r.created = d.i("created")
		r.layer = d.u("layer")
		r.parent = d.u("parent")
		if d.err == nil && (r.kind < kVolume || r.kind > kSnapshot || r.flags&^flagImporting != 0 || r.layer == 0) {
			d.fail("create record")
		}
	case recSnapshot:
		r.name = d.str("volume name")
		r.name2 = d.str("snapshot name")
		r.created = d.i("created")
		r.layer = d.u("layer")
		if d.err == nil && r.layer == 0 {
			d.fail("snapshot record")
		}
	case recResize:
		r.name = d.str("name")
		r.size = d.size("size")
	case recDelete, recMerge, recSeal:
		r.name = d.str("name")
	case recMap:
		r.layer = d.u("layer")
		r.vc = d.u("cluster")
		r.entry = d.u("entry")
		if d.err == nil && (r.vc >= maxSize>>clusterShift || r.entry > maxEntry) {
			d.fail("map record")
		}
	default:
		d.fail(fmt.Sprintf("record type %d", r.typ))
	}
	if d.err == nil && len(d.b) != 0 {
		d.fail("record (trailing bytes)")
	}
	if d.err == nil && r.name != "" {
		if err := validAnyName(r.name); err != nil {
			d.fail("record name")
		}
	}
	if d.err == nil && r.name2 != "" {
		if err := validAnyName(r.name2); err != nil {
			d.fail("record snapshot name")
		}
	}
	return r, d.err
}

// frameRecord appends the framed record to b.
func frameRecord(b []byte, r *record) []byte {
	p := encodeRecord(r)
	b = binary.LittleEndian.AppendUint32(b, uint32(len(p)))
	b = binary.LittleEndian.AppendUint32(b, crc32.Checksum(p, castagnoli))
	return append(b, p...)
}

func encodeJournalHeader(gen uint64) []byte {
	b := []byte(journalMagic)
	b = binary.LittleEndian.AppendUint64(b, gen)
	return binary.LittleEndian.AppendUint32(b, crc32.Checksum(b, castagnoli))
}

func decodeJournalHeader(b []byte) (uint64, error) {
	if len(b) < journalHeader || string(b[:8]) != journalMagic {
		return 0, fmt.Errorf("Failed to decode journal header: %w", ErrCorrupt)
	}
	if crc32.Checksum(b[:16], castagnoli) != binary.LittleEndian.Uint32(b[16:20]) {
		return 0, fmt.Errorf("Failed to decode journal header (CRC mismatch): %w", ErrCorrupt)
	}
	return binary.LittleEndian.Uint64(b[8:16]), nil
}

// journalScan is the outcome of decoding a journal file's records.
type journalScan struct {
	records []record
	good    int64  // bytes of the file up to the end of the last good record
	tail    string // why decoding stopped before the end, "" if it reached the end
	// torn is set when what stopped decoding looks like an interrupted final append:
	// a record cut short by the end of the file, a bad last record, or zeroes to the end.
	torn bool
}

// scanJournal decodes the records of a whole journal file (header included).
func scanJournal(b []byte) (uint64, journalScan, error) {
	gen, err := decodeJournalHeader(b)
	if err != nil {
		return 0, journalScan{}, err
	}
	s := journalScan{good: journalHeader}
	off := int64(journalHeader)
	for off < int64(len(b)) {
		rest := b[off:]
		if len(rest) < recordHeader {
			s.tail, s.torn = fmt.Sprintf("truncated record header at offset %d", off), true
			break
		}
		n := binary.LittleEndian.Uint32(rest[0:4])
		sum := binary.LittleEndian.Uint32(rest[4:8])
		if n == 0 || n > maxRecordLen {
			s.tail = fmt.Sprintf("bad record length %d at offset %d", n, off)
			s.torn = allZero(rest)
			break
		}
		if int64(n) > int64(len(rest)-recordHeader) {
			s.tail, s.torn = fmt.Sprintf("truncated record at offset %d", off), true
			break
		}
		p := rest[recordHeader : recordHeader+int(n)]
		last := recordHeader+int(n) == len(rest)
		if crc32.Checksum(p, castagnoli) != sum {
			s.tail = fmt.Sprintf("record CRC mismatch at offset %d", off)
			s.torn = last || allZero(rest[recordHeader:])
			break
		}
		r, err := decodeRecord(p)
		if err != nil {
			s.tail = fmt.Sprintf("undecodable record at offset %d: %v", off, err)
			break
		}
		s.records = append(s.records, r)
		off += recordHeader + int64(n)
		s.good = off
	}
	return gen, s, nil
}

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// encodeCheckpoint serializes the whole state as generation gen.
func encodeCheckpoint(st *state, gen uint64) []byte {
	e := encoder{b: make([]byte, 0, 64+int(st.mappedEntries())*8)}
	e.b = append(e.b, checkpointMagic...)
	e.u(formatVersion)
	e.u(gen)
	e.u(st.nextLayer)
	ids := make([]uint64, 0, len(st.layers))
	for id := range st.layers {
		ids = append(ids, id)
	}
	sort.Slice(ids, func(i, j int) bool { return ids[i] < ids[j] })
	e.u(uint64(len(ids)))
	var keys []uint64
	for _, id := range ids {
		l := st.layers[id]
		e.u(l.id)
		if l.parent != nil {
			e.u(l.parent.id)
		} else {
			e.u(0)
		}
		// Leaves in key order, entries in index order: sorted without sorting entries.
		keys = keys[:0]
		for k := range l.tab.leaves {
			keys = append(keys, k)
		}
		slices.Sort(keys)
		e.u(uint64(l.tab.count))
		prev := uint64(0)
		for _, k := range keys {
			for i, en := range l.tab.leaves[k].e {
				if en == entNone {
					continue
				}
				vc := k<<leafShift + uint64(i)
				e.u(vc - prev)
				prev = vc
				e.u(en)
			}
		}
	}
	names := make([]string, 0, len(st.objects))
	for n := range st.objects {
		names = append(names, n)
	}
	sort.Strings(names)
	e.u(uint64(len(names)))
	for _, n := range names {
		o := st.objects[n]
		e.str(o.name)
		e.byte1(o.kindByte())
		var fl byte
		if o.importing {
			fl |= flagImporting
		}
		e.byte1(fl)
		e.u(uint64(o.size.Load()))
		e.i(o.created)
		e.u(o.layer.id)
	}
	return binary.LittleEndian.AppendUint32(e.b, crc32.Checksum(e.b, castagnoli))
}

// decodeCheckpoint parses a checkpoint into a fresh, structurally validated state.
func decodeCheckpoint(b []byte) (*state, uint64, error) {
	if len(b) < len(checkpointMagic)+4 || string(b[:len(checkpointMagic)]) != checkpointMagic {
		return nil, 0, fmt.Errorf("Failed to decode checkpoint (bad magic): %w", ErrCorrupt)
	}
	body := b[:len(b)-4]
	if crc32.Checksum(body, castagnoli) != binary.LittleEndian.Uint32(b[len(b)-4:]) {
		return nil, 0, fmt.Errorf("Failed to decode checkpoint (CRC mismatch): %w", ErrCorrupt)
	}
	d := decoder{b: body[len(checkpointMagic):]}
	if v := d.u("version"); d.err == nil && v != formatVersion {
		return nil, 0, fmt.Errorf("Failed to decode checkpoint: unsupported version %d: %w", v, ErrCorrupt)
	}
	gen := d.u("generation")
	st := newState()
	st.nextLayer = d.u("next layer")
	nl := d.u("layer count")
	if d.err == nil && nl > uint64(len(d.b)) {
		d.fail("layer count")
	}
	parents := make(map[uint64]uint64)
	for i := uint64(0); i < nl && d.err == nil; i++ {
		id := d.u("layer id")
		parent := d.u("layer parent")
		n := d.u("entry count")
		if d.err != nil {
			break
		}
		if id == 0 || id >= st.nextLayer || st.layers[id] != nil || parent == id || n > uint64(len(d.b)) {
			d.fail("layer")
			break
		}
		l := &layer{id: id, tab: newTable()}
		vc := uint64(0)
		for j := uint64(0); j < n && d.err == nil; j++ {
			delta := d.u("entry cluster")
			en := d.u("entry value")
			if d.err != nil {
				break
			}
			if (j > 0 && delta == 0) || delta >= maxSize>>clusterShift || vc+delta >= maxSize>>clusterShift || en == entNone || en > maxEntry {
				d.fail("entry")
				break
			}
			vc += delta
			l.tab.set(vc, en)
		}
		st.layers[id] = l
		parents[id] = parent
	}
	no := d.u("object count")
	if d.err == nil && no > uint64(len(d.b)) {
		d.fail("object count")
	}
	for i := uint64(0); i < no && d.err == nil; i++ {
		name := d.str("object name")
		kind := d.byte1("object kind")
		flags := d.byte1("object flags")
		size := d.size("object size")
		created := d.i("object created")
		lid := d.u("object layer")
		if d.err != nil {
			break
		}
		if validAnyName(name) != nil || kind < kVolume || kind > kSnapshot || flags&^flagImporting != 0 || st.objects[name] != nil {
			d.fail("object")
			break
		}
		l := st.layers[lid]
		if l == nil || l.owner != nil {
			d.fail("object layer")
			break
		}
		o := newObject(name, kindName(kind), size, created, l)
		o.importing = flags&flagImporting != 0
		st.objects[name] = o
	}
	if d.err == nil && len(d.b) != 0 {
		d.fail("checkpoint (trailing bytes)")
	}
	if d.err != nil {
		return nil, 0, d.err
	}
	for id, l := range st.layers {
		if l.owner == nil {
			return nil, 0, fmt.Errorf("Failed to decode checkpoint: layer %d has no owner: %w", id, ErrCorrupt)
		}
		if p := parents[id]; p != 0 {
			pl := st.layers[p]
			if pl == nil {
				return nil, 0, fmt.Errorf("Failed to decode checkpoint: layer %d has missing parent %d: %w", id, p, ErrCorrupt)
			}
			l.parent = pl
			pl.children++
		}
	}
	if err := st.checkChains(); err != nil {
		return nil, 0, fmt.Errorf("Failed to decode checkpoint: %w", err)
	}
	return st, gen, nil
}
