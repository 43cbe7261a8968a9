package volume

import (
	"bytes"
	"os"
	"testing"
)

const MiB = 1 << 20

func TestCreateWriteReadReopen(t *testing.T) {
	b := newBed(t, 64*MiB)
	info, err := b.m.Create("vm1", 100<<30)
	if err != nil {
		t.Fatal(err)
	}
	if info.Kind != KindVolume || info.Size != 100<<30 || info.Allocated != 0 || info.ReadOnly {
		t.Fatalf("bad info %+v", info)
	}
	h := mustOpen(t, b.m, "vm1")
	data := pattern(3*ClusterSize+1000, 3)
	off := int64(50<<30) + 12345
	if err := h.WriteAt(data, off, false); err != nil {
		t.Fatal(err)
	}
	if err := h.Flush(); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(data)+2000)
	if err := h.ReadAt(got, off-1000); err != nil {
		t.Fatal(err)
	}
	mustEqual(t, "read back", got[1000:1000+len(data)], data)
	if !isZero(got[:1000]) || !isZero(got[1000+len(data):]) {
		t.Fatal("bytes around the write are not zero")
	}
	info, _ = b.m.Get("vm1")
	if info.Allocated != 4*ClusterSize { // spans 4 clusters
		t.Fatalf("allocated %d, want %d", info.Allocated, 4*ClusterSize)
	}
	b.check()
	h.Close()
	for _, ckpt := range []bool{false, true} {
		b.reopen(ckpt)
		b.check()
		h = mustOpen(t, b.m, "vm1")
		clear(got)
		if err := h.ReadAt(got, off-1000); err != nil {
			t.Fatal(err)
		}
		mustEqual(t, "after reopen", got[1000:1000+len(data)], data)
		h.Close()
	}
}

func TestBadInputChangesNothing(t *testing.T) {
	b := newBed(t, 16*MiB)
	for _, name := range []string{"", "A", "-x", "a b", "a@b", "x/y", string(make([]byte, 65))} {
		_, err := b.m.Create(name, 1<<20)
		wantErr(t, "create "+name, err, ErrInvalid)
	}
	_, err := b.m.Create("ok", 1000)
	wantErr(t, "size not multiple of 512", err, ErrInvalid)
	if err == nil || !bytes.Contains([]byte(err.Error()), []byte("multiple of 512")) {
		t.Fatalf("error should say multiple of 512: %v", err)
	}
	_, err = b.m.Create("ok", 0)
	wantErr(t, "zero size", err, ErrInvalid)
	if _, err := b.m.Create("ok", 1<<20); err != nil {
		t.Fatal(err)
	}
	_, err = b.m.Create("ok", 1<<20)
	wantErr(t, "duplicate", err, ErrExists)
	wantErr(t, "shrink", b.m.Resize("ok", 512), ErrInvalid)
	wantErr(t, "resize missing", b.m.Resize("nope", 2<<20), ErrNotFound)
	_, err = b.m.Clone("ok", "c")
	wantErr(t, "clone a writable volume", err, ErrInvalid)
	_, err = b.m.Snapshot("ok", "a@b")
	wantErr(t, "bad snapshot name", err, ErrInvalid)
	h := mustOpen(t, b.m, "ok")
	wantErr(t, "read past end", h.ReadAt(make([]byte, 512), 1<<20), ErrInvalid)
	wantErr(t, "write past end", h.WriteAt(make([]byte, 1024), 1<<20-512, false), ErrInvalid)
	wantErr(t, "negative offset", h.WriteAt(make([]byte, 1), -1, false), ErrInvalid)
	wantErr(t, "delete open", b.m.Delete("ok"), ErrInUse)
	if l := b.m.List(); len(l) != 1 || l[0].Name != "ok" || l[0].Allocated != 0 {
		t.Fatalf("list after bad input: %+v", l)
	}
	if s := b.m.Stats(); s.ClustersUsed != 0 {
		t.Fatalf("clusters used after bad input: %+v", s)
	}
	b.check()
}

func TestImageCloneSnapshot(t *testing.T) {
	b := newBed(t, 64*MiB)
	img := pattern(4*MiB, 9)
	clear(img[MiB : 2*MiB]) // a zero MiB is not stored
	var progress int64
	info, err := b.m.ImportImage("gold", 4*MiB, bytes.NewReader(img), func(d int64) { progress = d })
	if err != nil {
		t.Fatal(err)
	}
	if progress != 4*MiB || info.Kind != KindImage || !info.ReadOnly || info.Allocated != 3*MiB {
		t.Fatalf("import: progress %d info %+v", progress, info)
	}
	gh := mustOpen(t, b.m, "gold")
	wantErr(t, "write image", gh.WriteAt([]byte{1}, 0, false), ErrReadOnly)
	mustEqual(t, "image", readAll(t, gh), img)

	c, err := b.m.Clone("gold", "vm")
	if err != nil {
		t.Fatal(err)
	}
	if c.Parent != "gold" || c.Allocated != 0 || c.Size != 4*MiB {
		t.Fatalf("clone info %+v", c)
	}
	vh := mustOpen(t, b.m, "vm")
	mustEqual(t, "clone before writes", readAll(t, vh), img)
	// A small write copies the rest of the cluster from the image.
	want := bytes.Clone(img)
	copy(want[100:], "hello")
	if err := vh.WriteAt([]byte("hello"), 100, false); err != nil {
		t.Fatal(err)
	}
	// A write in the zero MiB of the image allocates with zeroes around it.
	copy(want[MiB+5:], "zz")
	if err := vh.WriteAt([]byte("zz"), MiB+5, false); err != nil {
		t.Fatal(err)
	}
	mustEqual(t, "clone after writes", readAll(t, vh), want)
	mustEqual(t, "image untouched", readAll(t, gh), img)
	if i, _ := b.m.Get("vm"); i.Allocated != 2*ClusterSize {
		t.Fatalf("clone allocated %d", i.Allocated)
	}
	wantErr(t, "delete image with clone", b.m.Delete("gold"), ErrInUse)

	// Snapshot: frozen view; the volume keeps going.
	s, err := b.m.Snapshot("vm", "s1")
	if err != nil {
		t.Fatal(err)
	}
	if s.Name != "vm@s1" || s.Kind != KindSnapshot || !s.ReadOnly || s.Parent != "gold" {
		t.Fatalf("snapshot info %+v", s)
	}
	if i, _ := b.m.Get("vm"); i.Parent != "vm@s1" || i.Allocated != 0 {
		t.Fatalf("volume after snapshot %+v", i)
	}
	copy(want[200:], "after")
	if err := vh.WriteAt([]byte("after"), 200, false); err != nil {
		t.Fatal(err)
	}
	sh := mustOpen(t, b.m, "vm@s1")
	snapWant := bytes.Clone(want)
	copy(snapWant[200:], img[200:205])
	mustEqual(t, "snapshot frozen", readAll(t, sh), snapWant)
	mustEqual(t, "volume after snapshot", readAll(t, vh), want)
	// A clone of the snapshot sees the frozen contents.
	if _, err := b.m.Clone("vm@s1", "vm2"); err != nil {
		t.Fatal(err)
	}
	v2 := mustOpen(t, b.m, "vm2")
	mustEqual(t, "clone of snapshot", readAll(t, v2), snapWant)
	b.check()
	for _, h := range []*Handle{gh, vh, sh, v2} {
		h.Close()
	}
	b.reopen(false)
	b.check()
	gh, vh, sh, v2 = mustOpen(t, b.m, "gold"), mustOpen(t, b.m, "vm"), mustOpen(t, b.m, "vm@s1"), mustOpen(t, b.m, "vm2")
	mustEqual(t, "image after reopen", readAll(t, gh), img)
	mustEqual(t, "volume after reopen", readAll(t, vh), want)
	mustEqual(t, "snapshot after reopen", readAll(t, sh), snapWant)
	mustEqual(t, "clone after reopen", readAll(t, v2), snapWant)

	// Deletion rules.
	wantErr(t, "delete open volume", b.m.Delete("vm"), ErrInUse)
	vh.Close()
	wantErr(t, "delete volume with snapshot", b.m.Delete("vm"), ErrInUse)
	sh.Close()
	wantErr(t, "delete snapshot with a clone", b.m.Delete("vm@s1"), ErrInUse)
	v2.Close()
	if err := b.m.Delete("vm2"); err != nil {
		t.Fatal(err)
	}
	mustEqual(t, "image after deleting a clone", readAll(t, gh), img)
	// Only the volume stacks on the snapshot now: deleting it folds it into the volume.
	if err := b.m.Delete("vm@s1"); err != nil {
		t.Fatal(err)
	}
	vh = mustOpen(t, b.m, "vm")
	mustEqual(t, "volume after snapshot deletion", readAll(t, vh), want)
	if i, _ := b.m.Get("vm"); i.Parent != "gold" || i.Allocated != 2*ClusterSize {
		t.Fatalf("volume after merge: %+v", i)
	}
	b.check()
	vh.Close()
	if err := b.m.Delete("vm"); err != nil {
		t.Fatal(err)
	}
	gh.Close()
	if err := b.m.Delete("gold"); err != nil {
		t.Fatal(err)
	}
	wantErr(t, "delete twice", b.m.Delete("gold"), ErrNotFound)
	if st := b.m.Stats(); st.ClustersUsed != 0 || st.ClustersPendingFree != 0 {
		t.Fatalf("stats after deleting everything: %+v", st)
	}
	if len(b.m.List()) != 0 {
		t.Fatal("list not empty")
	}
	b.check()
}

func TestMain(m *testing.M) {
	if os.Getenv(crashEnv) != "" {
		crashChild()
		return
	}
	os.Exit(m.Run())
}
