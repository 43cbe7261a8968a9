package store

import (
	"context"
	"database/sql"
	"fmt"
	"time"
)

// Image states.
const (
	ImageImporting = "importing"
	ImageReady     = "ready"
	ImageError     = "error"
)

// Image is a gold master: a read-only volume on a storage controller that servers clone.
// Kernel, Initrd and Cmdline, when set, are files on the hosts for direct kernel boot.
type Image struct {
	ID        string    `json:"id"`
	Name      string    `json:"name"`
	StorageID string    `json:"storage_id"`
	Volume    string    `json:"volume"`
	SizeBytes int64     `json:"size_bytes"`
	Kernel    string    `json:"kernel,omitempty"`
	Initrd    string    `json:"initrd,omitempty"`
	Cmdline   string    `json:"cmdline,omitempty"`
	State     string    `json:"state"`
	CreatedAt time.Time `json:"created_at"`
}

// CreateImage inserts im.
func (s *Store) CreateImage(ctx context.Context, im *Image) error {
	if im.ID == "" {
		im.ID = NewID("img")
	}
	if im.State == "" {
		im.State = ImageImporting
	}
	im.CreatedAt = time.Now().UTC()
	_, err := s.exec(ctx, `INSERT INTO images (id, name, storage_id, volume, size_bytes, kernel, initrd, cmdline, state, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`,
		im.ID, im.Name, nullStr(im.StorageID), im.Volume, im.SizeBytes, im.Kernel, im.Initrd, im.Cmdline, im.State, ts(im.CreatedAt))
	if err != nil {
		return fmt.Errorf("Failed to create image %q: %w", im.Name, err)
	}
	return nil
}

// UpdateImage saves everything but the name and creation time of im.
func (s *Store) UpdateImage(ctx context.Context, im Image) error {
	err := affected(s.exec(ctx, `UPDATE images SET storage_id = ?, volume = ?, size_bytes = ?, kernel = ?, initrd = ?, cmdline = ?, state = ? WHERE id = ?`,
		nullStr(im.StorageID), im.Volume, im.SizeBytes, im.Kernel, im.Initrd, im.Cmdline, im.State, im.ID))
	if err != nil {
		return fmt.Errorf("Failed to update image %q: %w", im.Name, err)
	}
	return nil
}

const imageCols = `id, name, storage_id, volume, size_bytes, kernel, initrd, cmdline, state, created_at`

func scanImage(sc interface{ Scan(...any) error }) (Image, error) {
	var im Image
	var stor sql.NullString
	var at int64
	if err := sc.Scan(&im.ID, &im.Name, &stor, &im.Volume, &im.SizeBytes, &im.Kernel, &im.Initrd, &im.Cmdline, &im.State, &at); err != nil {
		return Image{}, mapErr(err)
	}
	im.StorageID = stor.String
	im.CreatedAt = fromTS(at)
	return im, nil
}

// GetImage returns the image with the given ID or name.
func (s *Store) GetImage(ctx context.Context, idOrName string) (Image, error) {
	im, err := scanImage(s.queryRow(ctx, `SELECT `+imageCols+` FROM images WHERE id = ? OR name = ?`, idOrName, idOrName))
	if err != nil {
		return Image{}, fmt.Errorf("Failed to load image %q: %w", idOrName, err)
	}
	return im, nil
}

// ListImages returns every image ordered by name.
func (s *Store) ListImages(ctx context.Context) ([]Image, error) {
	rows, err := s.query(ctx, `SELECT `+imageCols+` FROM images ORDER BY name`)
	if err != nil {
		return nil, fmt.Errorf("Failed to list images: %w", err)
	}
	defer rows.Close()
	var out []Image
	for rows.Next() {
		im, err := scanImage(rows)
		if err != nil {
			return nil, fmt.Errorf("Failed to read image: %w", err)
		}
		out = append(out, im)
	}
	return out, rows.Err()
}

// DeleteImage removes an image no server was cloned from.
func (s *Store) DeleteImage(ctx context.Context, id string) error {
	if err := affected(s.exec(ctx, `DELETE FROM images WHERE id = ?`, id)); err != nil {
		return fmt.Errorf("Failed to delete image %q: %w", id, err)
	}
	return nil
}
