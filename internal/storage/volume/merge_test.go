package volume

import (
	"bytes"
	"testing"
	"time"
)

// TestMergePausesOnlyItsReaders deletes the oldest snapshot of a volume (a merge into
// the next snapshot, which a clone also reads through) and holds the merge: I/O on an
// unrelated volume goes on, a read on the clone waits for the merge, and afterwards
// the clone and the volume read what they read before.
func TestMergePausesOnlyItsReaders(t *testing.T) {
	b := newBed(t, 64*MiB)
	for _, name := range []string{"v", "x"} {
		if _, err := b.m.Create(name, 2*MiB); err != nil {
			t.Fatal(err)
		}
	}
	v := mustOpen(t, b.m, "v")
	first, second := pattern(MiB, 1), pattern(MiB, 2)
	if err := v.WriteAt(first, 0, false); err != nil {
		t.Fatal(err)
	}
	if _, err := b.m.Snapshot("v", "s1"); err != nil {
		t.Fatal(err)
	}
	if err := v.WriteAt(second, MiB, false); err != nil {
		t.Fatal(err)
	}
	if _, err := b.m.Snapshot("v", "s2"); err != nil {
		t.Fatal(err)
	}
	if _, err := b.m.Clone("v@s2", "c"); err != nil {
		t.Fatal(err)
	}
	if err := v.WriteAt(pattern(MiB, 3), 0, false); err != nil {
		t.Fatal(err)
	}
	c, x := mustOpen(t, b.m, "c"), mustOpen(t, b.m, "x")
	wantC := append(append([]byte{}, first...), second...)
	wantV := readAll(t, v)

	held, unblock := holdAt(t, &mergeHook)
	deleted := make(chan error, 1)
	go func() { deleted <- b.m.Delete("v@s1") }()
	waitHeld(t, held, "the merge")

	other := make(chan error, 1)
	go func() {
		if err := x.WriteAt(pattern(MiB, 4), 0, false); err != nil {
			other <- err
			return
		}
		p := make([]byte, MiB)
		other <- x.ReadAt(p, 0)
	}()
	select {
	case err := <-other:
		if err != nil {
			t.Fatalf("I/O on an unrelated volume during a merge: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("I/O on an unrelated volume waited for a merge")
	}
	cread := make(chan []byte, 1)
	go func() {
		p := make([]byte, 2*MiB)
		if err := c.ReadAt(p, 0); err != nil {
			t.Errorf("ReadAt on the clone: %v", err)
		}
		cread <- p
	}()
	select {
	case <-cread:
		t.Fatal("a read on a clone that reads through the merged snapshot did not wait for the merge")
	case <-time.After(200 * time.Millisecond):
	}
	unblock()
	if err := <-deleted; err != nil {
		t.Fatalf("Delete v@s1: %v", err)
	}
	mergeHook = nil
	if got := <-cread; !bytes.Equal(got, wantC) {
		t.Error("the clone reads other data after the merge")
	}
	if got := readAll(t, v); !bytes.Equal(got, wantV) {
		t.Error("the volume reads other data after the merge")
	}
	b.check()
}
