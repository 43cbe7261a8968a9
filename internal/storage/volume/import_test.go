package volume

import (
	"bytes"
	"errors"
	"io"
	"testing"
)

type failingReader struct {
	r     io.Reader
	after int64
}

func (f *failingReader) Read(p []byte) (int, error) {
	if f.after <= 0 {
		return 0, errors.New("disk unplugged")
	}
	p = p[:min(int64(len(p)), f.after)]
	n, err := f.r.Read(p)
	f.after -= int64(n)
	return n, err
}

func TestImportFailureLeavesNothing(t *testing.T) {
	b := newBed(t, 64*MiB)
	data := pattern(8*MiB, 4)
	_, err := b.m.ImportImage("img", 8*MiB, &failingReader{r: bytes.NewReader(data), after: 5 * MiB}, nil)
	if err == nil || !bytes.Contains([]byte(err.Error()), []byte("disk unplugged")) {
		t.Fatalf("import with a failing reader: %v", err)
	}
	_, err = b.m.ImportImage("img2", MiB, bytes.NewReader(data[:2*MiB]), nil)
	wantErr(t, "import of data larger than the size", err, ErrInvalid)
	for _, n := range []string{"img", "img2"} {
		_, err := b.m.Get(n)
		wantErr(t, "get after failed import", err, ErrNotFound)
	}
	if len(b.m.List()) != 0 {
		t.Fatalf("list after failed imports: %+v", b.m.List())
	}
	if st := b.m.Stats(); st.ClustersUsed != 0 {
		t.Fatalf("clusters still used after failed imports: %+v", st)
	}
	b.check()
	// The name is free again.
	if _, err := b.m.ImportImage("img", 8*MiB, bytes.NewReader(data), nil); err != nil {
		t.Fatal(err)
	}
	h := mustOpen(t, b.m, "img")
	mustEqual(t, "image", readAll(t, h), data)
}

// TestUnfinishedImportDroppedAtOpen leaves an import half done in the journal (as a
// crash would) and checks that Open removes it and frees its clusters.
func TestUnfinishedImportDroppedAtOpen(t *testing.T) {
	b := newBed(t, 64*MiB)
	b.m.mu.Lock()
	err := b.m.commit(&record{typ: recCreate, name: "half", kind: kImage, flags: flagImporting, size: 4 * MiB, layer: b.m.st.nextLayer})
	o := b.m.st.objects["half"]
	b.m.mu.Unlock()
	if err != nil {
		t.Fatal(err)
	}
	if err := b.m.importData(o, 4*MiB, bytes.NewReader(pattern(2*MiB, 1)), nil); err != nil {
		t.Fatal(err)
	}
	if _, err := b.m.Open("half"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("an unfinished import could be opened: %v", err)
	}
	if err := b.m.sync(); err != nil {
		t.Fatal(err)
	}
	if st := b.m.Stats(); st.ClustersUsed != 32 {
		t.Fatalf("clusters used during import: %+v", st)
	}
	b.reopen(false)
	if _, err := b.m.Get("half"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("unfinished import survived reopen: %v", err)
	}
	if st := b.m.Stats(); st.ClustersUsed != 0 {
		t.Fatalf("clusters of the unfinished import not freed: %+v", st)
	}
	b.check()
}
