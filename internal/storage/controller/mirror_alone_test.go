package controller

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/growserver/grow/internal/jobs"
	"github.com/growserver/grow/internal/storage/adminclient"
	"github.com/growserver/grow/internal/store"
)

// While one controller is away (maintenance), the other still clones, creates and
// deletes volumes alone; when the partner returns it receives every change before
// anything else, the new volumes are resynced, and both sides end identical. The
// witness lets only one side change volumes alone: a side that missed changes made by
// the other refuses to make its own until that partner has returned and replayed them.
func TestMirrorChangesWhilePartnerAway(t *testing.T) {
	needQemuIO(t)
	a, b, ws := startedPair(t)
	ctx := context.Background()
	img := bytes.Repeat([]byte{0xab}, 4<<20)
	importImage(t, a, "gold", img)
	syncedVolume(t, a, a, b, "old", 8<<20)

	// The control plane registered the pair as b, with a as b's partner.
	cp, err := jobs.Clients{}.Storage(store.StorageController{Name: "pair", URL: "http://" + b.cfg.APIAddr, Token: b.token,
		PartnerURL: "http://" + a.cfg.APIAddr, PartnerToken: a.token})
	if err != nil {
		t.Fatal(err)
	}

	// b goes away; a takes "old" over and changes volumes alone. The control plane's
	// order of a new server reaches a, although it knows the pair as b.
	b.stop()
	a.waitState(t, "old", "primary", adminclient.MirrorDegraded, 15*time.Second)
	if err := cp.CloneVolume(ctx, "gold", "c1"); err != nil {
		t.Fatalf("clone with the partner away: %v", err)
	}
	if d, err := cp.Endpoint(ctx, "c1"); err != nil || d.Port == 0 {
		t.Fatalf("the control plane's endpoint of c1 with the registered controller away: %+v %v", d, err)
	}
	if h, err := cp.Health(ctx); err != nil || !strings.Contains(h, "partner answers") {
		t.Fatalf("health of the pair with the registered controller away: %q %v", h, err)
	}
	if _, err := a.cl.CreateVolume(ctx, "e1", 8<<20); err != nil {
		t.Fatalf("create with the partner away: %v", err)
	}
	if err := a.cl.DeleteVolume(ctx, "old"); err != nil {
		t.Fatalf("delete with the partner away: %v", err)
	}
	for name, cmds := range map[string][]string{
		"c1": {"read -P 0xab 0 4M", "write -P 0x11 1M 64k", "write -z 3M 64k", "flush"},
		"e1": {"read -P 0 0 8M", "write -P 0x22 0 4k", "write -P 0x23 7M 1M", "flush"},
	} {
		v := a.waitState(t, name, "primary", adminclient.MirrorDegraded, 5*time.Second)
		if out, err := qemuIOAt(v.NBDAddress, name, cmds...); err != nil {
			t.Fatalf("I/O on %s made alone: %v\n%s", name, err, out)
		}
	}
	// e1 grows alone, keeping the marks of what was written before.
	if err := cp.ResizeVolume(ctx, "e1", 16<<20); err != nil {
		t.Fatalf("resize with the partner away: %v", err)
	}
	v := a.waitState(t, "e1", "primary", adminclient.MirrorDegraded, 5*time.Second)
	if v.Size != 16<<20 {
		t.Fatalf("e1 is %d bytes after growing alone", v.Size)
	}
	if out, err := qemuIOAt(v.NBDAddress, "e1", "read -P 0x23 7M 1M", "write -P 0x24 12M 64k", "flush"); err != nil {
		t.Fatalf("I/O on e1 grown alone: %v\n%s", err, out)
	}
	// What cannot be done alone is refused with a clear reason, and changes nothing.
	if _, err := a.cl.Snapshot(ctx, "c1", "s1"); adminclient.StatusOf(err) != 503 {
		t.Fatalf("snapshot with the partner away: %v", err)
	}
	if _, err := a.cl.CreateVolume(ctx, "old", 8<<20); adminclient.StatusOf(err) != 409 || !strings.Contains(err.Error(), "deleted while the partner is away") {
		t.Fatalf("re-using a name deleted alone: %v", err)
	}
	st, err := a.cl.MirrorStatus(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if st.MetaPending != 4 || st.MetaEpoch != 1 {
		t.Fatalf("journal: %d changes at metadata epoch %d, want 4 at 1", st.MetaPending, st.MetaEpoch)
	}
	if m := a.metrics(t); !strings.Contains(m, "grow_mirror_meta_pending 4") {
		t.Fatalf("metrics lack the pending changes:\n%s", m)
	}
	if rec := ws.Get(metaKey(a.name, b.name)); rec.Holder != a.name || rec.Epoch != 1 {
		t.Fatalf("witness holds the pair's metadata as %+v", rec)
	}

	// b returns: it learns every change, then the new volumes are resynced.
	b.start()
	waitFor(t, 20*time.Second, "replay to the returned partner", func() (bool, string) {
		st, err := a.cl.MirrorStatus(ctx)
		return err == nil && st.MetaPending == 0, "pending"
	})
	for _, name := range []string{"c1", "e1"} {
		a.waitState(t, name, "primary", adminclient.MirrorSynced, 20*time.Second)
		b.waitState(t, name, "secondary", adminclient.MirrorSynced, 10*time.Second)
	}
	if b.volume("old") != nil {
		t.Fatal("the volume deleted alone survived on the returned partner")
	}
	if st, err := b.cl.MirrorStatus(ctx); err != nil || st.MetaEpoch != 1 {
		t.Fatalf("the returned partner's metadata epoch: %+v %v", st, err)
	}
	// Changes are made on both sides again.
	if _, err := b.cl.CreateVolume(ctx, "old", 8<<20); err != nil {
		t.Fatalf("re-use of the name once the partner returned: %v", err)
	}
	if a.volume("old") == nil {
		t.Fatal("a volume created with both sides up is missing on one")
	}

	// Now a is away and b changes volumes alone (metadata epoch 2) ...
	a.stop()
	if _, err := b.cl.CloneVolume(ctx, "gold", "c2"); err != nil {
		t.Fatalf("clone on the other side alone: %v", err)
	}
	// ... and then b goes too, and a returns alone: it missed b's change, so it refuses its own.
	b.stop()
	a.start()
	if _, err := a.cl.CreateVolume(ctx, "e2", 8<<20); adminclient.StatusOf(err) != 503 || !strings.Contains(err.Error(), "changed volumes while this controller was away") {
		t.Fatalf("create on a side that missed the partner's changes: %v", err)
	}
	if a.volume("e2") != nil {
		t.Fatal("a refused create left a volume behind")
	}
	b.start()
	waitFor(t, 20*time.Second, "replay of the second side's changes", func() (bool, string) {
		st, err := b.cl.MirrorStatus(ctx)
		return err == nil && st.MetaPending == 0 && a.volume("c2") != nil, "pending"
	})
	if _, err := a.cl.CreateVolume(ctx, "e2", 8<<20); err != nil {
		t.Fatalf("create once the partner replayed its changes: %v", err)
	}
	p, s := primaryAndSecondary(t, a, b, "c2")
	p.waitState(t, "c2", "primary", adminclient.MirrorSynced, 20*time.Second)
	s.waitState(t, "c2", "secondary", adminclient.MirrorSynced, 10*time.Second)
	for _, name := range []string{"c1", "e1"} {
		a.waitState(t, name, "primary", adminclient.MirrorSynced, 20*time.Second)
	}

	a.stop()
	b.stop()
	for _, name := range []string{"c1", "e1", "c2"} {
		sameBytes(t, name, readVolume(t, a.cfg.DataDir, name), readVolume(t, b.cfg.DataDir, name))
	}
	c1 := readVolume(t, b.cfg.DataDir, "c1")
	if c1[0] != 0xab || c1[1<<20] != 0x11 || c1[3<<20] != 0 || c1[4<<20-1] != 0xab {
		t.Fatalf("c1 on the returned partner: %x %x %x %x", c1[0], c1[1<<20], c1[3<<20], c1[4<<20-1])
	}
	e1 := readVolume(t, b.cfg.DataDir, "e1")
	if len(e1) != 16<<20 || e1[0] != 0x22 || e1[7<<20] != 0x23 || e1[4<<20] != 0 || e1[12<<20] != 0x24 {
		t.Fatalf("e1 on the returned partner (%d bytes): %x %x %x %x", len(e1), e1[0], e1[7<<20], e1[4<<20], e1[12<<20])
	}
}

// A volume made under the name of an earlier one starts above the epoch the witness
// remembers of it, so that its takeover can still be granted.
func TestMirrorRecreatedNameTakesOver(t *testing.T) {
	needQemuIO(t)
	a, b, ws := startedPair(t)
	if _, err := ws.Grant("x", "an-earlier-controller", 7); err != nil {
		t.Fatal(err)
	}
	p, s, pv := syncedVolume(t, a, a, b, "x", 8<<20)
	if pv.Mirror.Epoch != 8 {
		t.Fatalf("epoch of a volume whose name the witness holds at 7: %d", pv.Mirror.Epoch)
	}
	if sv := s.volume("x"); sv.Mirror.Epoch != 8 {
		t.Fatalf("the secondary's epoch: %d", sv.Mirror.Epoch)
	}
	if out, err := qemuIOAt(pv.NBDAddress, "x", "write -P 0x31 0 1M", "flush"); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	p.kill()
	sv := s.waitState(t, "x", "primary", adminclient.MirrorDegraded, 15*time.Second)
	if sv.Mirror.Epoch != 9 {
		t.Fatalf("epoch after the takeover: %d", sv.Mirror.Epoch)
	}
	if out, err := qemuIOAt(sv.NBDAddress, "x", "read -P 0x31 0 1M"); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
}

// A primary restarted while its partner runs waits for the partner's first answer and
// resyncs at the same epoch, instead of electing itself a new one.
func TestMirrorRestartKeepsEpoch(t *testing.T) {
	a, b, _ := startedPair(t)
	p, _, pv := syncedVolume(t, a, a, b, "v", 8<<20)
	p.stop()
	p.start()
	v := p.waitState(t, "v", "primary", adminclient.MirrorSynced, 15*time.Second)
	if v.Mirror.Epoch != pv.Mirror.Epoch {
		t.Fatalf("epoch %d after a restart beside a running partner, was %d", v.Mirror.Epoch, pv.Mirror.Epoch)
	}
}

// A crash between making a volume alone and writing its mirror state leaves a volume
// without state and a journaled creation: the replay adopts it, and the pair ends synced.
func TestMirrorAloneCreateCrashBeforeState(t *testing.T) {
	needQemuIO(t)
	a, b, _ := startedPair(t)
	ctx := context.Background()
	b.stop()
	if _, err := a.cl.CreateVolume(ctx, "e9", 8<<20); err != nil {
		t.Fatal(err)
	}
	v := a.waitState(t, "e9", "primary", adminclient.MirrorDegraded, 5*time.Second)
	if out, err := qemuIOAt(v.NBDAddress, "e9", "write -P 0x44 1M 64k", "flush"); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	a.kill()
	if err := os.Remove(filepath.Join(a.cfg.DataDir, "mirror", "e9.json")); err != nil {
		t.Fatal(err)
	}
	a.start()
	b.start()
	a.waitState(t, "e9", "primary", adminclient.MirrorSynced, 30*time.Second)
	b.waitState(t, "e9", "secondary", adminclient.MirrorSynced, 10*time.Second)
	a.stop()
	b.stop()
	got := readVolume(t, b.cfg.DataDir, "e9")
	sameBytes(t, "e9", readVolume(t, a.cfg.DataDir, "e9"), got)
	if got[1<<20] != 0x44 {
		t.Fatalf("e9 on the partner: %x", got[1<<20])
	}
}
