package pool

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"
)

// The first headerSize bytes of every disk hold its header: the magic, a format
// version, the length and CRC-32C of a JSON body, then the body, zero padded.
const (
	headerSize    = 4096
	headerMagic   = "GROWPOOL"
	headerVersion = 1
	headerFixed   = 8 + 4 + 4 + 4
)

var crcTable = crc32.MakeTable(crc32.Castagnoli)

// header identifies a disk as member Index (pair Pair) of pool PoolUUID.
type header struct {
	PoolUUID     string `json:"pool_uuid"`
	Index        int    `json:"index"`
	Pair         int    `json:"pair"`
	Disks        int    `json:"disks"`
	StripeUnit   int64  `json:"stripe_unit"`
	UnitsPerDisk int64  `json:"units_per_disk"`
	DataOffset   int64  `json:"data_offset"`
	Generation   uint64 `json:"generation"`
	// Rebuilding is set while the disk is being rebuilt: its data is not complete.
	Rebuilding bool `json:"rebuilding,omitempty"`
}

// errNoHeader means the header area is all zeroes: a fresh disk.
var errNoHeader = errors.New("no pool header")

// errForeignData means the header area holds something that is not a pool header.
var errForeignData = errors.New("unrecognised data in the header area (not a GrowServer pool disk)")

func encodeHeader(h header) ([]byte, error) {
	body, err := json.Marshal(h)
	if err != nil {
		return nil, fmt.Errorf("Failed to encode disk header: %w", err)
	}
	if len(body) > headerSize-headerFixed {
		return nil, fmt.Errorf("Failed to encode disk header: %d bytes is too long", len(body))
	}
	b := make([]byte, headerSize)
	copy(b, headerMagic)
	binary.LittleEndian.PutUint32(b[8:], headerVersion)
	binary.LittleEndian.PutUint32(b[12:], uint32(len(body)))
	binary.LittleEndian.PutUint32(b[16:], crc32.Checksum(body, crcTable))
	copy(b[headerFixed:], body)
	return b, nil
}

// decodeHeader parses a header block; it never panics on hostile input.
func decodeHeader(b []byte) (header, error) {
	var h header
	if len(b) < headerFixed {
		return h, fmt.Errorf("Header block is %d bytes, need at least %d", len(b), headerFixed)
	}
	if !bytes.Equal(b[:8], []byte(headerMagic)) {
		for _, c := range b {
			if c != 0 {
				return h, errForeignData
			}
		}
		return h, errNoHeader
	}
	if v := binary.LittleEndian.Uint32(b[8:]); v != headerVersion {
		return h, fmt.Errorf("Unsupported pool header version %d", v)
	}
	n := binary.LittleEndian.Uint32(b[12:])
	if int64(n) > int64(len(b)-headerFixed) {
		return h, fmt.Errorf("Damaged pool header: body length %d", n)
	}
	body := b[headerFixed : headerFixed+int(n)]
	if crc := crc32.Checksum(body, crcTable); crc != binary.LittleEndian.Uint32(b[16:]) {
		return h, errors.New("Damaged pool header: checksum mismatch")
	}
	if err := json.Unmarshal(body, &h); err != nil {
		return h, fmt.Errorf("Damaged pool header: %w", err)
	}
	if err := h.validate(); err != nil {
		return h, fmt.Errorf("Damaged pool header: %w", err)
	}
	return h, nil
}

func (h header) validate() error {
	switch {
	case h.PoolUUID == "":
		return errors.New("empty pool UUID")
	case h.Disks < 1 || (h.Disks > 1 && h.Disks%2 != 0):
		return fmt.Errorf("invalid disk count %d", h.Disks)
	case h.Index < 0 || h.Index >= h.Disks:
		return fmt.Errorf("disk index %d out of range for %d disks", h.Index, h.Disks)
	case h.Pair != h.Index/2:
		return fmt.Errorf("disk %d claims pair %d", h.Index, h.Pair)
	case !validUnit(h.StripeUnit):
		return fmt.Errorf("invalid stripe unit %d", h.StripeUnit)
	case h.DataOffset != dataOffsetFor(h.StripeUnit):
		return fmt.Errorf("invalid data offset %d", h.DataOffset)
	case h.UnitsPerDisk < 1 || h.UnitsPerDisk > (1<<62)/h.StripeUnit:
		return fmt.Errorf("invalid units per disk %d", h.UnitsPerDisk)
	}
	return nil
}

// validUnit reports whether u is an acceptable stripe unit: a power of two from 4 KiB to 64 MiB.
func validUnit(u int64) bool {
	return u >= 4096 && u <= 64<<20 && u&(u-1) == 0
}
