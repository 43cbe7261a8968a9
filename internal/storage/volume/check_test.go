package volume

import (
	"bytes"
	"testing"
	"time"
)

// TestCheckRunsAlongsideIO checks that Check pauses I/O only while it copies the live
// state: while its replay is held, writes, a flush, a new volume, a clone and a
// deletion all complete; the check (which compares the copy with the journal as it was
// at the copy) is clean, the next one (which sees all of them) too, and the data reads
// back.
func TestCheckRunsAlongsideIO(t *testing.T) {
	b := newBed(t, 64<<20)
	for _, name := range []string{"a", "b"} {
		if _, err := b.m.Create(name, 8<<20); err != nil {
			t.Fatal(err)
		}
	}
	h := mustOpen(t, b.m, "a")
	data := bytes.Repeat([]byte("check-alongside-io"), 4<<20/18+1)[:4<<20]
	if err := h.WriteAt(data[:1<<20], 0, false); err != nil {
		t.Fatal(err)
	}

	held, unblock := holdAt(t, &checkSnapshotHook)
	type result struct {
		rep Report
		err error
	}
	done := make(chan result, 1)
	go func() {
		rep, err := b.m.Check()
		done <- result{rep, err}
	}()
	waitHeld(t, held, "Check reaching its replay")

	ioDone := make(chan error, 1)
	go func() {
		ioDone <- func() error {
			// New clusters (journal records past the copy's end) and a flush that makes
			// them durable while the check reads the journal.
			if err := h.WriteAt(data[1<<20:], 1<<20, false); err != nil {
				return err
			}
			if err := h.Flush(); err != nil {
				return err
			}
			if _, err := b.m.Create("c", 1<<20); err != nil {
				return err
			}
			if _, err := b.m.Snapshot("a", "s1"); err != nil {
				return err
			}
			return b.m.Delete("b")
		}()
	}()
	select {
	case err := <-ioDone:
		if err != nil {
			t.Fatalf("I/O while Check replays: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("I/O and admin operations waited for Check's replay")
	}
	unblock()
	r := <-done
	checkSnapshotHook = nil
	if r.err != nil {
		t.Fatalf("Check: %v", r.err)
	}
	if !r.rep.Clean() {
		t.Fatalf("Check found problems: %q", r.rep.Problems)
	}
	if r.rep.Objects != 2 {
		t.Errorf("Check saw %d objects, want the 2 of its copy (a, b)", r.rep.Objects)
	}
	b.check()
	if got := readAll(t, h)[:len(data)]; !bytes.Equal(got, data) {
		t.Fatal("data written during Check does not read back")
	}
	if _, err := b.m.Get("b"); err == nil {
		t.Error("b still exists after its deletion during Check")
	}
}
