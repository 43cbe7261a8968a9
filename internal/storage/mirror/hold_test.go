package mirror

import (
	"context"
	"errors"
	"testing"
	"time"
)

// A synced volume that loses its peer holds writes and flushes until Release: granted,
// the held write completes and the volume goes on degraded (and goes degraded at
// once on the next loss, being exclusive); refused, the held write fails with
// ErrFenced and nothing more is accepted.
func TestHeldWritesWaitForTheWitness(t *testing.T) {
	for _, granted := range []bool{true, false} {
		const size = 8 << 20
		v, _, _ := newPrimary(t, size)
		sec := startSecondary(t, newFileExport(t, "s.img", size), State{RoleSecondary, 1})
		holds := make(chan struct{}, 4)
		v.SetHoldOnPeerLoss(func() { holds <- struct{}{} })
		if err := v.Resync(context.Background(), sec.dial(1), ResyncOptions{}); err != nil {
			t.Fatal(err)
		}
		mustMode(t, v, ModeSynced)
		sec.kill()
		done := make(chan error, 1)
		go func() { done <- v.WriteAt(pattern(1, 4096), 1<<20, false) }()
		select {
		case <-holds:
		case <-time.After(5 * time.Second):
			t.Fatal("no hold after the peer died")
		}
		flushed := make(chan error, 1)
		go func() { flushed <- v.Flush() }()
		select {
		case err := <-done:
			t.Fatalf("a held write completed before the witness answered: %v", err)
		case err := <-flushed:
			t.Fatalf("a held flush completed before the witness answered: %v", err)
		case <-time.After(300 * time.Millisecond):
		}
		mustMode(t, v, ModeHeld)
		v.Release(granted)
		werr, ferr := <-done, <-flushed
		if granted {
			if werr != nil || ferr != nil {
				t.Fatalf("granted: write %v, flush %v", werr, ferr)
			}
			mustMode(t, v, ModeDegraded)
			if !v.Bitmap().Test(1) {
				t.Fatal("the write made alone is not marked dirty")
			}
			// Exclusive now: a resync and a new loss do not hold again.
			sec.target.SetState(State{RoleStale, 1})
			sec.start()
			if err := v.Resync(context.Background(), sec.dial(2), ResyncOptions{}); err != nil {
				t.Fatal(err)
			}
			continue
		}
		if !errors.Is(werr, ErrFenced) || !errors.Is(ferr, ErrFenced) {
			t.Fatalf("refused: write %v, flush %v, want ErrFenced", werr, ferr)
		}
		if err := v.WriteAt(pattern(2, 4096), 0, false); !errors.Is(err, ErrFenced) {
			t.Fatalf("write after a refusal: %v", err)
		}
	}
}

// A primary restarting at an epoch it shares with its peer holds writes until a
// resync attaches the peer; the held write then reaches both sides.
func TestHeldUntilPeerAttached(t *testing.T) {
	const size = 8 << 20
	v, disk, _ := newPrimary(t, size)
	sdisk := newFileExport(t, "s.img", size)
	sec := startSecondary(t, sdisk, State{RoleSecondary, 1})
	v.SetHoldOnPeerLoss(nil)
	if !v.HoldIfNotExclusive() {
		t.Fatal("a non-exclusive volume without a peer is not held")
	}
	done := make(chan error, 1)
	go func() { done <- v.WriteAt(pattern(3, 8192), 3<<20, true) }()
	select {
	case err := <-done:
		t.Fatalf("write completed while held: %v", err)
	case <-time.After(200 * time.Millisecond):
	}
	if err := v.Resync(context.Background(), sec.dial(1), ResyncOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	if d := sameContent(t, disk, sdisk, DefaultRegionSize); len(d) != 0 {
		t.Fatalf("sides differ in %v", d)
	}
}
