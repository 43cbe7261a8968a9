package controller

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"time"

	"github.com/growserver/grow/internal/storage/adminclient"
	"github.com/growserver/grow/internal/storage/volume"
)

// handleImportImage stores the request body as the new read-only image {name}.
// ?format=raw streams the bytes straight into the volume; ?format=qcow2 spools the
// upload under DATA/tmp and converts it with qemu-img. A failed import leaves nothing.
func (c *Controller) handleImportImage(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("name")
	format := r.URL.Query().Get("format")
	if format == "" {
		format = adminclient.FormatRaw
	}
	if format != adminclient.FormatRaw && format != adminclient.FormatQcow2 && format != adminclient.FormatSegments {
		c.fail(w, r, fmt.Errorf("%w: unknown image format %q (want raw or qcow2)", errBadRequest, format))
		return
	}
	var segSize int64
	if format == adminclient.FormatSegments {
		n, err := strconv.ParseInt(r.URL.Query().Get("size"), 10, 64)
		if err != nil || n <= 0 {
			c.fail(w, r, fmt.Errorf("%w: a segmented image upload needs the image size (size=BYTES), got %q", errBadRequest, r.URL.Query().Get("size")))
			return
		}
		segSize = n
	}
	if c.mir != nil && !forwarded(r) {
		if _, err := c.mir.requirePeer(); err != nil {
			c.fail(w, r, err)
			return
		}
		c.mir.metaMu.Lock()
		defer c.mir.metaMu.Unlock()
	}
	// Refuse a taken or malformed name before receiving anything.
	if _, err := c.mgr.Get(name); err == nil {
		c.fail(w, r, fmt.Errorf("Failed to import image %q: %w", name, volume.ErrExists))
		return
	} else if errors.Is(err, volume.ErrInvalid) {
		c.fail(w, r, err)
		return
	}
	start := time.Now()
	var err error
	switch format {
	case adminclient.FormatRaw:
		if r.ContentLength <= 0 {
			c.fail(w, r, fmt.Errorf("%w: a raw image upload needs a Content-Length (the image size), got %d", errBadRequest, r.ContentLength))
			return
		}
		err = c.importRaw(name, r.ContentLength, r.Body)
	case adminclient.FormatQcow2:
		err = c.importQcow2(r.Context(), name, r.Body)
	case adminclient.FormatSegments:
		err = c.importRaw(name, segSize, badSegmentsReader{adminclient.NewSegmentReader(r.Body, segSize)})
	}
	if err == nil && c.mir != nil && !forwarded(r) {
		// The partner gets the same image before either side answers.
		if err = c.mir.pushImage(r.Context(), name); err != nil {
			if derr := c.mgr.Delete(name); derr != nil {
				c.log.Error("Failed to remove the image the partner did not take", "name", name, "err", derr)
			}
		}
	}
	if err != nil {
		c.fail(w, r, fmt.Errorf("Failed to import image %q: %w", name, err))
		return
	}
	c.log.Info("Image imported", "name", name, "format", format, "duration", time.Since(start))
	c.answerVolume(w, r, http.StatusCreated, name)
}

// importRaw streams size bytes of body into the new image name, removing it again on failure.
func (c *Controller) importRaw(name string, size int64, body io.Reader) error {
	lastLog := time.Now()
	progress := func(n int64) {
		if time.Since(lastLog) > 5*time.Second {
			lastLog = time.Now()
			c.log.Info("Importing image", "name", name, "done", n, "total", size)
		}
	}
	exact := &exactReader{r: body, want: size}
	_, err := c.mgr.ImportImage(name, size, bufio.NewReaderSize(exact, 1<<20), progress)
	if err != nil && !errors.Is(err, volume.ErrExists) {
		// The manager is meant to leave nothing behind; make sure of it.
		if _, gerr := c.mgr.Get(name); gerr == nil {
			if derr := c.mgr.Delete(name); derr != nil {
				c.log.Error("Failed to remove partial image", "name", name, "err", derr)
			}
		}
	}
	return err
}

// qemuImgInfo is the part of `qemu-img info --output=json` the import looks at.
type qemuImgInfo struct {
	Format          string `json:"format"`
	VirtualSize     int64  `json:"virtual-size"`
	BackingFilename string `json:"backing-filename"`
	FormatSpecific  struct {
		Data struct {
			DataFile string `json:"data-file"`
		} `json:"data"`
	} `json:"format-specific"`
}

// importQcow2 spools a qcow2 upload, refuses images that reference other files,
// converts it to sparse raw with qemu-img and imports that.
func (c *Controller) importQcow2(ctx context.Context, name string, body io.Reader) error {
	tmpDir := filepath.Join(c.cfg.DataDir, "tmp")
	if err := os.MkdirAll(tmpDir, 0o700); err != nil {
		return fmt.Errorf("Failed to create %q: %w", tmpDir, err)
	}
	work, err := os.MkdirTemp(tmpDir, "import-")
	if err != nil {
		return fmt.Errorf("Failed to create a work directory: %w", err)
	}
	defer os.RemoveAll(work)

	src := filepath.Join(work, "upload.qcow2")
	f, err := os.OpenFile(src, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return fmt.Errorf("Failed to create spool file: %w", err)
	}
	if _, err := io.Copy(f, body); err != nil {
		f.Close()
		return fmt.Errorf("Failed to receive the upload: %w", err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("Failed to write spool file: %w", err)
	}

	out, err := exec.CommandContext(ctx, "qemu-img", "info", "--output=json", "-f", "qcow2", src).Output()
	if err != nil {
		return fmt.Errorf("%w: not a valid qcow2 image: %s", errBadRequest, exitDetail(err))
	}
	var info qemuImgInfo
	if err := json.Unmarshal(out, &info); err != nil {
		return fmt.Errorf("Failed to parse qemu-img info: %w", err)
	}
	if info.BackingFilename != "" || info.FormatSpecific.Data.DataFile != "" {
		return fmt.Errorf("%w: qcow2 images with a backing file or an external data file are refused", errBadRequest)
	}
	if info.VirtualSize <= 0 {
		return fmt.Errorf("%w: qcow2 image has virtual size %d", errBadRequest, info.VirtualSize)
	}

	raw := filepath.Join(work, "image.raw")
	cmd := exec.CommandContext(ctx, "qemu-img", "convert", "-q", "-f", "qcow2", "-O", "raw", "-S", "64k", src, raw)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("Failed to convert qcow2 image: %w: %s", err, bytes.TrimSpace(stderr.Bytes()))
	}
	_ = os.Remove(src)
	rf, err := os.Open(raw)
	if err != nil {
		return fmt.Errorf("Failed to open converted image: %w", err)
	}
	defer rf.Close()
	return c.importRaw(name, info.VirtualSize, adminclient.NewSparseReader(rf, info.VirtualSize))
}

func exitDetail(err error) string {
	var ee *exec.ExitError
	if errors.As(err, &ee) && len(ee.Stderr) > 0 {
		return string(bytes.TrimSpace(ee.Stderr))
	}
	return err.Error()
}

// errShortUpload ends an import whose data stopped before the announced size. It must
// not wrap io.EOF: the volume manager would take that for a short image and zero-fill.
var errShortUpload = errors.New("the image data ended early")

// badSegmentsReader reports a malformed segmented upload as a bad request.
type badSegmentsReader struct{ r io.Reader }

func (b badSegmentsReader) Read(p []byte) (int, error) {
	n, err := b.r.Read(p)
	if errors.Is(err, adminclient.ErrBadSegments) {
		err = fmt.Errorf("%w: %w", errBadRequest, err)
	}
	return n, err
}

// exactReader passes through exactly want bytes and turns an early end into errShortUpload.
type exactReader struct {
	r    io.Reader
	want int64
	got  int64
}

func (e *exactReader) Read(p []byte) (int, error) {
	n, err := e.r.Read(p)
	e.got += int64(n)
	if err != nil && (errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF)) && e.got < e.want {
		return n, fmt.Errorf("%w: received %d of %d bytes", errShortUpload, e.got, e.want)
	}
	return n, err
}
