package volume

import (
	"errors"
	"fmt"
	"io"
	"time"
)

const importChunk = 1 << 20

// ImportImage streams r into a new read-only image of the given size, skipping
// all-zero clusters. Data shorter than size reads as zeroes beyond its end; data
// longer than size is refused. On any error (or a crash) it leaves nothing behind.
func (m *Manager) ImportImage(name string, size int64, r io.Reader, progress func(done int64)) (Info, error) {
	if err := m.checkOpen("import image"); err != nil {
		return Info{}, err
	}
	if err := validName(name); err != nil {
		return Info{}, fmt.Errorf("Failed to import image: %w", err)
	}
	if err := validSize(size); err != nil {
		return Info{}, fmt.Errorf("Failed to import image %q: %w", name, err)
	}
	m.mu.Lock()
	if m.st.objects[name] != nil {
		m.mu.Unlock()
		return Info{}, fmt.Errorf("Failed to import image %q: %w", name, ErrExists)
	}
	rec := &record{typ: recCreate, name: name, kind: kImage, flags: flagImporting, size: size, created: time.Now().UnixNano(), layer: m.st.nextLayer}
	err := m.commit(rec)
	var o *object
	if err == nil {
		o = m.st.objects[name]
	}
	m.mu.Unlock()
	if err != nil {
		return Info{}, fmt.Errorf("Failed to import image %q: %w", name, err)
	}
	if err := m.importData(o, size, r, progress); err != nil {
		m.mu.Lock()
		derr := m.deleteLocked(name, true)
		m.mu.Unlock()
		if derr == nil {
			derr = m.sync()
		}
		if derr != nil {
			err = fmt.Errorf("%w (and cleaning up failed: %v)", err, derr)
		}
		return Info{}, fmt.Errorf("Failed to import image %q: %w", name, err)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.commit(&record{typ: recSeal, name: name}); err != nil {
		return Info{}, fmt.Errorf("Failed to import image %q: %w", name, err)
	}
	if err := m.sync(); err != nil {
		return Info{}, fmt.Errorf("Failed to import image %q: %w", name, err)
	}
	return o.info(), nil
}

func (m *Manager) importData(o *object, size int64, r io.Reader, progress func(done int64)) error {
	h := &Handle{m: m, o: o}
	buf := make([]byte, importChunk)
	var off int64
	for off < size {
		want := min(int64(len(buf)), size-off)
		n, err := io.ReadFull(r, buf[:want])
		eof := errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF)
		if err != nil && !eof {
			return fmt.Errorf("Failed to read image data at %d: %w", off, err)
		}
		if m.closed.Load() {
			return ErrClosed
		}
		o.io.RLock()
		for c := 0; c < n; c += ClusterSize {
			chunk := buf[c:min(n, c+ClusterSize)]
			if isZero(chunk) {
				continue
			}
			if werr := h.writeCluster(uint64((off+int64(c))>>clusterShift), 0, chunk); werr != nil {
				o.io.RUnlock()
				return fmt.Errorf("Failed to write image data at %d: %w", off+int64(c), werr)
			}
		}
		o.io.RUnlock()
		off += int64(n)
		if progress != nil {
			progress(off)
		}
		if eof {
			return nil
		}
	}
	var one [1]byte
	for {
		n, err := r.Read(one[:])
		if n > 0 {
			return fmt.Errorf("Failed to import: the data is larger than the size %d: %w", size, ErrInvalid)
		}
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("Failed to read image data at %d: %w", off, err)
		}
	}
}
