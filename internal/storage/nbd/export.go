// Package nbd is GrowServer's Network Block Device server: the fixed-newstyle
// handshake and its options (including STARTTLS), and the transmission phase with
// structured replies, block status and many requests in flight per connection.
//
// It serves whatever the caller's Exports catalogue hands it and knows nothing about
// volumes, pools or caches. It must never trust a client: malformed or hostile input
// ends that one connection with a logged reason and never the server, requests out of
// range get an NBD error reply, and memory per connection stays bounded.
package nbd

import (
	"errors"
)

// Export is one block device served over NBD; implementations are safe for concurrent use.
//
// The server advertises NBD_FLAG_CAN_MULTI_CONN, so Flush on any Export of a name must
// make durable every write completed on every other open Export of the same name.
// ReadAt, WriteAt, Trim and WriteZeroes are only called with ranges inside [0, Size()).
type Export interface {
	// Size is the export size in bytes; it must not change while the export is open.
	Size() int64
	// ReadOnly reports whether writes are refused (NBD_FLAG_READ_ONLY).
	ReadOnly() bool
	// ReadAt fills p completely from off or returns an error.
	ReadAt(p []byte, off int64) error
	// WriteAt writes p at off; with fua the data is durable before it returns.
	WriteAt(p []byte, off int64, fua bool) error
	// Flush makes every completed write durable.
	Flush() error
	// Trim discards a range (its content becomes unspecified, usually zeroes).
	Trim(off, length int64, fua bool) error
	// WriteZeroes makes a range read as zeroes; return ErrFastZeroUnsupported if f.Fast and it is not cheap.
	WriteZeroes(off, length int64, f ZeroFlags) error
	// Cache is a prefetch hint for a range.
	Cache(off, length int64) error
	// Extents describes base:allocation starting at off, covering at least one byte of [off, off+length).
	Extents(off, length int64) ([]Extent, error)
	// Close is called once when the connection that opened the export ends.
	Close() error
}

// Describer may be implemented by an Export to give its NBD_INFO_DESCRIPTION
// directly; without it the server looks the name up in Exports.List.
type Describer interface {
	Description() string
}

// ZeroFlags are the request flags of NBD_CMD_WRITE_ZEROES.
type ZeroFlags struct {
	// NoHole asks for the range to stay allocated (NBD_CMD_FLAG_NO_HOLE).
	NoHole bool
	// Fast asks to fail with ErrFastZeroUnsupported unless zeroing is cheap (NBD_CMD_FLAG_FAST_ZERO).
	Fast bool
	// FUA asks for the result to be durable before returning (NBD_CMD_FLAG_FUA).
	FUA bool
}

// Extent is one run of the base:allocation map; Hole means unallocated, Zero reads as zeroes.
type Extent struct {
	Length int64
	Hole   bool
	Zero   bool
}

// ExportInfo names one export for NBD_OPT_LIST.
type ExportInfo struct {
	Name        string
	Description string
}

// Exports is the catalogue of names the server serves.
type Exports interface {
	// Open opens name for one connection; errors.Is(err, ErrUnknownExport) when there is no such name.
	Open(name string) (Export, error)
	// List returns every export a client may list.
	List() []ExportInfo
}

// Sentinel errors an Export may return; the server maps them to NBD error codes.
var (
	// ErrUnknownExport is returned by Exports.Open for a name it does not serve.
	ErrUnknownExport = errors.New("unknown export")
	// ErrNoSpace maps to NBD_ENOSPC.
	ErrNoSpace = errors.New("no space left")
	// ErrReadOnly maps to NBD_EPERM.
	ErrReadOnly = errors.New("export is read-only")
	// ErrInvalid maps to NBD_EINVAL.
	ErrInvalid = errors.New("invalid request")
	// ErrFastZeroUnsupported maps to NBD_ENOTSUP for a WRITE_ZEROES with FAST_ZERO.
	ErrFastZeroUnsupported = errors.New("fast zero not supported")
)
