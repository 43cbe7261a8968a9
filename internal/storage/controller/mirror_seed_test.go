package controller

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
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
	importImage(t, a, "gold", img)
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

// A controller that ran alone (its volumes, images and clones made before pairing) is
// paired with a new, empty partner: it adopts its volumes at once (its VMs do not wait
// for the partner), the partner receives them when it comes, and both sides end synced
// and identical.
func TestMirrorPairingExistingController(t *testing.T) {
	needQemuIO(t)
	a, b, _ := testPair(t)
	paired := a.cfg.Mirror
	a.cfg.Mirror = MirrorConfig{}
	a.start()
	ctx := context.Background()
	img := bytes.Repeat([]byte{0x5a}, 4<<20)
	importImage(t, a, "gold", img)
	if _, err := a.cl.CloneVolume(ctx, "gold", "c1"); err != nil {
		t.Fatal(err)
	}
	if _, err := a.cl.CreateVolume(ctx, "e1", 8<<20); err != nil {
		t.Fatal(err)
	}
	for name, cmds := range map[string][]string{
		"c1": {"write -P 0x31 2M 4k", "flush"},
		"e1": {"write -P 0x32 3M 1M", "flush"},
	} {
		if out, err := qemuIOAt(a.cfg.NBDAddr, name, cmds...); err != nil {
			t.Fatalf("%s: %v\n%s", name, err, out)
		}
	}
	a.stop()
	a.cfg.Mirror = paired
	a.start()
	v := a.waitState(t, "c1", "primary", adminclient.MirrorDegraded, 10*time.Second)
	if out, err := qemuIOAt(v.NBDAddress, "c1", "read -P 0x31 2M 4k", "write -P 0x33 3M 4k", "flush"); err != nil {
		t.Fatalf("c1 before the partner is up: %v\n%s", err, out)
	}
	b.start()
	pairUp(t, a, b)
	for _, name := range []string{"c1", "e1"} {
		a.waitState(t, name, "primary", adminclient.MirrorSynced, 30*time.Second)
		b.waitState(t, name, "secondary", adminclient.MirrorSynced, 10*time.Second)
	}
	if c1 := b.volume("c1"); c1 == nil || c1.Parent != "gold" {
		t.Fatalf("c1 on the new partner is not a clone of gold: %+v", c1)
	}
	if log := a.logText(); strings.Count(log, "Volume made before pairing adopted") != 2 || !strings.Contains(log, "Image copied to the partner") {
		t.Fatalf("a did not adopt its two volumes and copy its image:\n%s", log)
	}
	// Changes are made on both sides from now on.
	if _, err := b.cl.CloneVolume(ctx, "gold", "c2"); err != nil {
		t.Fatal(err)
	}
	if a.volume("c2") == nil {
		t.Fatal("a clone made after pairing is missing on one side")
	}
	a.stop()
	b.stop()
	for _, name := range []string{"gold", "c1", "e1"} {
		sameBytes(t, name, readVolume(t, a.cfg.DataDir, name), readVolume(t, b.cfg.DataDir, name))
	}
	if got := readVolume(t, b.cfg.DataDir, "e1"); got[3<<20] != 0x32 || got[0] != 0 {
		t.Fatalf("e1 on the new partner: %x %x", got[3<<20], got[0])
	}
}
