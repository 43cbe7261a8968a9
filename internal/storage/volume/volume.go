// Package volume keeps thin, layered, copy-on-write volumes on a dev.Device.
//
// The device is cut into 64 KiB clusters. A volume is a chain of layers; each layer
// maps virtual clusters to physical clusters, to "zero" (reads as zeroes and masks the
// parent) or to nothing (falls through to the parent; with no parent, a hole). A clone
// of an image or a snapshot is one new empty layer over the read-only source, so clone
// and snapshot are O(1) whatever the size. Metadata lives in a directory (DATA/meta):
// an append-only journal of CRC-protected records plus a checkpoint written by rename.
//
// Durability: a write is durable once a later Flush returns, or at once with FUA. The
// journal is written and fsynced only after the device has been synced, so a durable
// mapping never points at data that is not durable. A freed physical cluster is reused
// only after the record that freed it is durable.
//
// Placement (alloc.go): each 4 MiB chunk of a volume goes to one 4 MiB group of the
// device, cluster i of the chunk at cluster i of the group, so that sequential I/O is
// one device call per chunk however the clusters were first written (out of order,
// from several connections). It is a hint kept in memory, never a rule on disk.
//
// This package must never: write into a cluster that a read-only layer (image or
// snapshot) maps, hand out a physical cluster that another layer maps or whose freeing
// record is not yet durable, hold a manager-wide lock on the data path (reads, writes
// and trims take per-volume locks only, a flush waits only for other flushes; Check
// and snapshot deletion are the admin operations that briefly pause I/O), or keep
// metadata in memory in proportion to virtual (rather than allocated) size.
package volume

import (
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"
)

// ClusterSize is the allocation unit of volumes on the device, in bytes.
const ClusterSize = 64 << 10

const clusterShift = 16

// Errors returned by the Manager and Handles; test with errors.Is.
var (
	// ErrNotFound means the named volume, image or snapshot does not exist.
	ErrNotFound = errors.New("not found")
	// ErrExists means the name is already taken.
	ErrExists = errors.New("already exists")
	// ErrInUse means other volumes depend on it, or it is open.
	ErrInUse = errors.New("in use")
	// ErrReadOnly means a write was attempted on an image or a snapshot.
	ErrReadOnly = errors.New("read-only")
	// ErrInvalid means bad input (name, size, range); nothing was changed.
	ErrInvalid = errors.New("invalid argument")
	// ErrNoSpace means the device has no free cluster left.
	ErrNoSpace = errors.New("no space left on device")
	// ErrNotFast means a fast zeroing request would have to write data.
	ErrNotFast = errors.New("zeroing would not be fast")
	// ErrCorrupt means the on-disk metadata is damaged; Open refuses to guess.
	ErrCorrupt = errors.New("corrupt metadata")
	// ErrClosed means the Manager or Handle was closed.
	ErrClosed = errors.New("closed")
)

// Kinds of named objects.
const (
	KindVolume   = "volume"
	KindImage    = "image"
	KindSnapshot = "snapshot"
)

// Info describes one volume, image or snapshot.
type Info struct {
	Name      string    `json:"name"`
	Kind      string    `json:"kind"` // "volume", "image" or "snapshot"
	Size      int64     `json:"size"`
	Allocated int64     `json:"allocated"` // bytes of clusters owned by its own layer
	Parent    string    `json:"parent,omitempty"`
	ReadOnly  bool      `json:"read_only"`
	Created   time.Time `json:"created"`
}

// Stats is the cluster accounting of the device.
type Stats struct {
	ClusterSize         int64 `json:"cluster_size"`
	ClustersTotal       int64 `json:"clusters_total"`
	ClustersUsed        int64 `json:"clusters_used"`
	ClustersFree        int64 `json:"clusters_free"`
	ClustersPendingFree int64 `json:"clusters_pending_free"`
	BytesTotal          int64 `json:"bytes_total"`
	BytesUsed           int64 `json:"bytes_used"`
	BytesFree           int64 `json:"bytes_free"`
	JournalBytes        int64 `json:"journal_bytes"`
}

// Extent is one run of a volume's address space with the same allocation state.
type Extent struct {
	Length int64 `json:"length"`
	Hole   bool  `json:"hole"` // no storage allocated
	Zero   bool  `json:"zero"` // reads as zeroes
}

// Report is the result of a consistency check; it is clean when Problems is empty.
type Report struct {
	Problems       []string `json:"problems"`
	Objects        int      `json:"objects"`
	Layers         int      `json:"layers"`
	ClustersTotal  int64    `json:"clusters_total"`
	ClustersUsed   int64    `json:"clusters_used"`
	JournalFiles   int      `json:"journal_files"`
	JournalRecords int64    `json:"journal_records"`
}

// Clean reports whether the check found no problem.
func (r Report) Clean() bool { return len(r.Problems) == 0 }

// Options tune a Manager; the zero value gives sensible defaults.
type Options struct {
	// JournalLimit is the journal size after which a checkpoint compacts it (default 64 MiB).
	JournalLimit int64
	// SyncInterval is how often buffered metadata is made durable in the background
	// (default 5 s; negative disables the timed sync; compaction still runs).
	SyncInterval time.Duration
	// NoCheckpointOnClose skips the checkpoint that Close normally writes.
	NoCheckpointOnClose bool
	// Logger receives recovery notes and background failures (default slog.Default()).
	Logger *slog.Logger
}

func (o Options) withDefaults() Options {
	if o.JournalLimit <= 0 {
		o.JournalLimit = 64 << 20
	}
	if o.SyncInterval == 0 {
		o.SyncInterval = 5 * time.Second
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	return o
}

const maxNameLen = 64

// validName checks a plain name: 1-64 chars of [a-z0-9][a-z0-9._-]*.
func validName(name string) error {
	if len(name) == 0 || len(name) > maxNameLen {
		return fmt.Errorf("Invalid name %q: must be 1-%d characters: %w", name, maxNameLen, ErrInvalid)
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		ok := (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || (i > 0 && (c == '.' || c == '_' || c == '-'))
		if !ok {
			return fmt.Errorf("Invalid name %q: use lower-case letters, digits, '.', '_' and '-', starting with a letter or digit: %w", name, ErrInvalid)
		}
	}
	return nil
}

// validAnyName accepts a plain name or a snapshot name "vol@snap".
func validAnyName(name string) error {
	vol, snap, isSnap := strings.Cut(name, "@")
	if err := validName(vol); err != nil {
		return err
	}
	if isSnap {
		if err := validName(snap); err != nil {
			return err
		}
	}
	return nil
}

func validSize(size int64) error {
	if size <= 0 {
		return fmt.Errorf("Invalid size %d: must be positive: %w", size, ErrInvalid)
	}
	if size%512 != 0 {
		return fmt.Errorf("Invalid size %d: must be a multiple of 512 bytes: %w", size, ErrInvalid)
	}
	if size > maxSize {
		return fmt.Errorf("Invalid size %d: larger than the maximum %d: %w", size, int64(maxSize), ErrInvalid)
	}
	return nil
}

// maxSize bounds virtual sizes (1 EiB) so cluster arithmetic never overflows.
const maxSize = 1 << 60
