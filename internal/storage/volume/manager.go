package volume

import (
	"errors"
	"io"

	"github.com/growserver/grow/internal/storage/dev"
)

var errTODO = errors.New("volume: not implemented yet")

// Manager owns every volume, image and snapshot on one device and its metadata directory.
type Manager struct{}

// Handle is one opener's view of a volume (for example one NBD connection).
type Handle struct{}

// Open replays the checkpoint and journal in metaDir, creating them on first use.
func Open(metaDir string, d dev.Device, opts Options) (*Manager, error) { return nil, errTODO }

// Close makes all metadata durable, writes a checkpoint and releases the directory.
func (m *Manager) Close() error { return errTODO }

// Create makes a new, empty, writable thin volume.
func (m *Manager) Create(name string, size int64) (Info, error) { return Info{}, errTODO }

// ImportImage streams r into a new read-only image, skipping all-zero clusters.
func (m *Manager) ImportImage(name string, size int64, r io.Reader, progress func(done int64)) (Info, error) {
	return Info{}, errTODO
}

// Clone makes a writable volume dst over the image or snapshot src in O(1).
func (m *Manager) Clone(src, dst string) (Info, error) { return Info{}, errTODO }

// Snapshot freezes volume name as the read-only snapshot "name@snap" in O(1).
func (m *Manager) Snapshot(name, snap string) (Info, error) { return Info{}, errTODO }

// Resize grows a volume; shrinking is refused with ErrInvalid.
func (m *Manager) Resize(name string, size int64) error { return errTODO }

// Delete removes a volume, image or snapshot that nothing depends on and nobody has open.
func (m *Manager) Delete(name string) error { return errTODO }

// Get describes one volume, image or snapshot.
func (m *Manager) Get(name string) (Info, error) { return Info{}, errTODO }

// List describes every volume, image and snapshot, sorted by name.
func (m *Manager) List() []Info { return nil }

// Stats reports the device's cluster accounting.
func (m *Manager) Stats() Stats { return Stats{} }

// Open opens a volume, image or snapshot for I/O.
func (m *Manager) Open(name string) (*Handle, error) { return nil, errTODO }

// Check verifies the on-disk metadata and the in-memory state.
func (m *Manager) Check() (Report, error) { return Report{}, errTODO }

// Size is the current virtual size of the volume.
func (h *Handle) Size() int64 { return 0 }

// ReadOnly reports whether writes are refused (images and snapshots).
func (h *Handle) ReadOnly() bool { return true }

// ReadAt fills p from the volume at off.
func (h *Handle) ReadAt(p []byte, off int64) error { return errTODO }

// WriteAt writes p at off; with fua it is durable when WriteAt returns.
func (h *Handle) WriteAt(p []byte, off int64, fua bool) error { return errTODO }

// Flush makes every write that completed before it durable.
func (h *Handle) Flush() error { return errTODO }

// Trim gives the range back; it then reads as zeroes.
func (h *Handle) Trim(off, length int64, fua bool) error { return errTODO }

// WriteZeroes makes the range read as zeroes.
func (h *Handle) WriteZeroes(off, length int64, noHole, fast, fua bool) error { return errTODO }

// Extents describes the allocation of the range, true to the thin layout through clones.
func (h *Handle) Extents(off, length int64) ([]Extent, error) { return nil, errTODO }

// Close releases the handle.
func (h *Handle) Close() error { return errTODO }
