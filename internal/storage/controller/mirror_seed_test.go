package controller

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/growserver/grow/internal/storage/adminclient"
)

// A controller that comes back empty (its data lost, or new hardware under its name)
// gets every image and volume back from its partner: clones as clones of the same
// image (sharing its clusters), with only what they changed copied; afterwards both
// sides are synced and identical.
func TestMirrorPartnerRebuilt(t *testing.T) {
	needQemuIO(t)
	a, b, _ := startedPair(t)
	ctx := context.Background()
	img := bytes.Repeat([]byte{0xab}, 4<<20)
	if _, err := a.cl.ImportImage(ctx, "gold", bytes.NewReader(img), int64(len(img)), adminclient.FormatRaw, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := a.cl.CloneVolume(ctx, "gold", "c1"); err != nil {
		t.Fatal(err)
	}
	if _, err := a.cl.ResizeVolume(ctx, "c1", 6<<20); err != nil {
		t.Fatal(err)
	}
	if _, err := b.cl.CreateVolume(ctx, "e1", 8<<20); err != nil {
		t.Fatal(err)
	}
	writes := map[string][]string{
		"c1": {"write -P 0x11 1M 64k", "write -P 0x12 5M 4k", "flush"},
		"e1": {"write -P 0x22 0 4k", "write -P 0x23 7M 1M", "flush"},
	}
	for name, cmds := range writes {
		p, s := primaryAndSecondary(t, a, b, name)
		v := p.waitState(t, name, "primary", adminclient.MirrorSynced, 10*time.Second)
		s.waitState(t, name, "secondary", adminclient.MirrorSynced, 10*time.Second)
		if out, err := qemuIOAt(v.NBDAddress, name, cmds...); err != nil {
			t.Fatalf("%s: %v\n%s", name, err, out)
		}
	}

	// b dies and loses everything; a takes every volume over.
	b.kill()
	for name := range writes {
		a.waitState(t, name, "primary", adminclient.MirrorDegraded, 15*time.Second)
	}
	if err := os.RemoveAll(b.cfg.DataDir); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(b.cfg.DataDir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(b.cfg.DataDir, "admin.token"), []byte(b.token+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	before, err := a.cl.Stats(ctx)
	if err != nil {
		t.Fatal(err)
	}
	b.start()
	for name := range writes {
		a.waitState(t, name, "primary", adminclient.MirrorSynced, 30*time.Second)
		b.waitState(t, name, "secondary", adminclient.MirrorSynced, 10*time.Second)
	}
	after, err := a.cl.Stats(ctx)
	if err != nil {
		t.Fatal(err)
	}
	// c1 changed two 64 KiB clusters and its grown tail, e1 a 64 KiB cluster and 1 MiB:
	// at most a few regions each, never the image again.
	copied := after.MirrorResyncBytes - before.MirrorResyncBytes
	t.Logf("the rebuild copied %d bytes", copied)
	if copied == 0 || copied > 6<<20 {
		t.Errorf("the rebuild copied %d bytes", copied)
	}
	if g := b.volume("gold"); g == nil || g.Kind != "image" {
		t.Fatalf("the image on the rebuilt side: %+v", g)
	}
	// The resync copies whole 1 MiB regions: c1 owns its two changed regions there and
	// shares the rest of the 4 MiB image.
	c1 := b.volume("c1")
	if c1 == nil || c1.Size != 6<<20 || c1.Parent != "gold" || c1.Allocated > 2<<20 {
		t.Fatalf("c1 on the rebuilt side (a clone of gold owning at most its 2 changed regions): %+v", c1)
	}
	a.stop()
	b.stop()
	for _, name := range []string{"gold", "c1", "e1"} {
		sameBytes(t, name, readVolume(t, a.cfg.DataDir, name), readVolume(t, b.cfg.DataDir, name))
	}
	got := readVolume(t, b.cfg.DataDir, "c1")
	if got[0] != 0xab || got[1<<20] != 0x11 || got[5<<20] != 0x12 || got[4<<20] != 0 {
		t.Fatalf("c1 on the rebuilt side: %x %x %x %x", got[0], got[1<<20], got[5<<20], got[4<<20])
	}
}
