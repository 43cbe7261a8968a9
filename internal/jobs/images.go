package jobs

import (
	"context"
	"errors"
	"fmt"
	"io"
	"path/filepath"

	"github.com/growserver/grow/internal/host/hostapi"
	"github.com/growserver/grow/internal/store"
)

// ImportImageRequest describes an image upload.
type ImportImageRequest struct {
	Name    string
	Format  string // "raw" or "qcow2"
	Size    int64  // bytes in the body (raw: the image size)
	Storage string // controller name or ID; "" picks the first active one
	Kernel  string // optional direct-boot kernel, a path present on every host
	Initrd  string
	Cmdline string
}

// ImportImage streams r into a storage controller as a read-only gold master and records
// it; a failed import leaves neither the volume nor the row.
func (m *Manager) ImportImage(ctx context.Context, req ImportImageRequest, r io.Reader, progress func(int64)) (store.Image, error) {
	if !hostapi.ValidName(req.Name) {
		return store.Image{}, fmt.Errorf("Invalid image name %q: use lower-case letters, digits and dashes: %w", req.Name, ErrInvalid)
	}
	if req.Format != "raw" && req.Format != "qcow2" {
		return store.Image{}, fmt.Errorf("Unknown image format %q (want raw or qcow2): %w", req.Format, ErrInvalid)
	}
	for _, p := range []string{req.Kernel, req.Initrd} {
		if p != "" && !filepath.IsAbs(p) {
			return store.Image{}, fmt.Errorf("Kernel and initrd must be absolute paths on the hosts, not %q: %w", p, ErrInvalid)
		}
	}
	if req.Initrd != "" && req.Kernel == "" {
		return store.Image{}, fmt.Errorf("An initrd needs a kernel: %w", ErrInvalid)
	}
	var sc store.StorageController
	if req.Storage != "" {
		s, err := m.st.GetStorage(ctx, req.Storage)
		if err != nil {
			return store.Image{}, err
		}
		sc = s
	} else {
		all, err := m.st.ListStorage(ctx)
		if err != nil {
			return store.Image{}, err
		}
		for _, s := range all {
			if s.State == store.StateActive {
				sc = s
				break
			}
		}
		if sc.ID == "" {
			return store.Image{}, fmt.Errorf("No active storage controller is registered: %w", ErrConflict)
		}
	}
	im := store.Image{Name: req.Name, StorageID: sc.ID, Volume: "image-" + req.Name, Kernel: req.Kernel, Initrd: req.Initrd,
		Cmdline: req.Cmdline, State: store.ImageImporting}
	if err := m.st.CreateImage(ctx, &im); err != nil {
		return store.Image{}, err
	}
	ok := false
	defer func() {
		if !ok {
			c, cancel := cleanup()
			defer cancel()
			if err := m.st.DeleteImage(c, im.ID); err != nil && !errors.Is(err, store.ErrNotFound) {
				m.log.Error("Undo: failed to delete image row", "image", im.Name, "err", err)
			}
		}
	}()
	stor, err := m.cfg.Connector.Storage(sc)
	if err != nil {
		return store.Image{}, err
	}
	size, err := stor.ImportImage(ctx, im.Volume, r, req.Size, req.Format, progress)
	if err != nil {
		return store.Image{}, err
	}
	im.SizeBytes, im.State = size, store.ImageReady
	if err := m.st.UpdateImage(ctx, im); err != nil {
		c, cancel := cleanup()
		defer cancel()
		_ = stor.DeleteVolume(c, im.Volume)
		return store.Image{}, err
	}
	ok = true
	return im, nil
}

// DeleteImage removes an image no server was cloned from, row first (so no new clone
// starts from it), then its volume.
func (m *Manager) DeleteImage(ctx context.Context, im store.Image) error {
	if err := m.st.DeleteImage(ctx, im.ID); err != nil {
		return err
	}
	if im.StorageID == "" {
		return nil
	}
	_, stor, err := m.storageOf(ctx, im.StorageID)
	if err != nil {
		return err
	}
	return stor.DeleteVolume(ctx, im.Volume)
}
