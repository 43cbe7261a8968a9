package controller

import (
	"bytes"
	"context"
	"encoding/binary"
	"net/http"
	"strings"
	"testing"

	"github.com/growserver/grow/internal/storage/adminclient"
)

// TestImportSegments imports an image as a segmented upload (only its data) and reads
// it back; malformed uploads and a missing size are bad requests that leave no image.
func TestImportSegments(t *testing.T) {
	c, cl := startTest(t, t.TempDir())
	ctx := context.Background()
	const size = 8 << 20
	img := make([]byte, size)
	for i := range img[:1<<20] {
		img[i] = byte(i%251 + 1)
	}
	copy(img[5<<20:], img[:64<<10])
	segs := []adminclient.Segment{{Off: 0, Len: 1 << 20}, {Off: 5 << 20, Len: 64 << 10}}
	var body bytes.Buffer
	if err := adminclient.WriteSegments(&body, bytes.NewReader(img), segs); err != nil {
		t.Fatal(err)
	}
	if _, err := cl.ImportImageSegments(ctx, "gold", size, bytes.NewReader(body.Bytes()), int64(body.Len())); err != nil {
		t.Fatal(err)
	}
	ex, err := c.exports.Open("gold")
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, ex.Size())
	err = ex.ReadAt(got, 0)
	ex.Close()
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, img) {
		t.Fatal("the image imported from segments reads other bytes")
	}

	bad := binary.BigEndian.AppendUint64(nil, 100)
	bad = binary.BigEndian.AppendUint64(bad, size) // runs past the image's end
	for name, try := range map[string]func() error{
		"malformed": func() error {
			_, err := cl.ImportImageSegments(ctx, "bad1", size, bytes.NewReader(bad), int64(len(bad)))
			return err
		},
		"no size": func() error {
			_, err := cl.ImportImageSegments(ctx, "bad2", 0, bytes.NewReader(body.Bytes()), int64(body.Len()))
			return err
		},
	} {
		err := try()
		if adminclient.StatusOf(err) != http.StatusBadRequest {
			t.Errorf("%s: %v, want 400", name, err)
		}
		if err != nil && name == "malformed" && !strings.Contains(err.Error(), "segment") {
			t.Errorf("%s: the error does not say what is wrong: %v", name, err)
		}
	}
	for _, n := range []string{"bad1", "bad2"} {
		if _, err := cl.GetVolume(ctx, n); !adminclient.IsNotFound(err) {
			t.Errorf("%s after a failed import: %v, want not found", n, err)
		}
	}
}

// TestMirrorImageCopiesOnlyData imports a 64 MiB image holding 2 MiB of data on one
// controller of a pair: the partner receives it as a segmented upload (it logs the
// format) and both sides hold the same bytes.
func TestMirrorImageCopiesOnlyData(t *testing.T) {
	a, b, _ := startedPair(t)
	img := make([]byte, 64<<20)
	for i := range img[:1<<20] {
		img[i] = byte(i%253 + 1)
	}
	copy(img[40<<20:], img[:1<<20])
	importImage(t, a, "gold", img)
	imported := ""
	for _, line := range strings.Split(b.logText(), "\n") {
		if strings.Contains(line, `msg="Image imported"`) && strings.Contains(line, "name=gold") {
			imported = line
		}
	}
	if !strings.Contains(imported, "format="+adminclient.FormatSegments) {
		t.Fatalf("the partner did not receive the image as segments: %q", imported)
	}
	a.stop()
	b.stop()
	got := readVolume(t, b.cfg.DataDir, "gold")
	sameBytes(t, "gold", readVolume(t, a.cfg.DataDir, "gold"), got)
	sameBytes(t, "gold as imported", img, got)
}
