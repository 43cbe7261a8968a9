package volume

import (
	"bytes"
	"reflect"
	"testing"
)

// Origin names the image under a clone (through its snapshots) and lists only what the
// clone and its snapshots changed; an empty volume has no image and lists its writes.
func TestOrigin(t *testing.T) {
	b := newBed(t, 256*MiB)
	img := pattern(8*MiB, 7)
	if _, err := b.m.ImportImage("gold", int64(len(img)), bytes.NewReader(img), nil); err != nil {
		t.Fatal(err)
	}
	if _, err := b.m.Clone("gold", "c"); err != nil {
		t.Fatal(err)
	}
	h := mustOpen(t, b.m, "c")
	image, changed, err := h.Origin()
	if err != nil || image != "gold" || len(changed) != 0 {
		t.Fatalf("fresh clone: %q %v %v", image, changed, err)
	}
	for _, off := range []int64{0, 100, ClusterSize, 5 * ClusterSize} {
		if err := h.WriteAt([]byte{1, 2, 3}, off, false); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := b.m.Snapshot("c", "s1"); err != nil {
		t.Fatal(err)
	}
	h.Close()
	h = mustOpen(t, b.m, "c")
	defer h.Close()
	// A trim after the snapshot hides image data: a change too.
	if err := h.Trim(7*ClusterSize, ClusterSize, false); err != nil {
		t.Fatal(err)
	}
	image, changed, err = h.Origin()
	want := [][2]int64{{0, 2 * ClusterSize}, {5 * ClusterSize, ClusterSize}, {7 * ClusterSize, ClusterSize}}
	if err != nil || image != "gold" || !reflect.DeepEqual(changed, want) {
		t.Fatalf("clone with a snapshot: %q %v %v, want gold %v", image, changed, err, want)
	}

	if _, err := b.m.Create("e", 4*MiB); err != nil {
		t.Fatal(err)
	}
	e := mustOpen(t, b.m, "e")
	defer e.Close()
	if err := e.WriteAt(make([]byte, 10), 4*MiB-10, false); err != nil {
		t.Fatal(err)
	}
	image, changed, err = e.Origin()
	if err != nil || image != "" || !reflect.DeepEqual(changed, [][2]int64{{4*MiB - ClusterSize, ClusterSize}}) {
		t.Fatalf("empty volume: %q %v %v", image, changed, err)
	}
}
