package testbed

import (
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestBareMigrationKeepsAddress migrates a bare QEMU guest (counter, disk writer,
// responder) from host 0 to host 1 and back over the bed's storage network, with both
// disks on qemu-nbd. The guest keeps its address on the shared guest network: beyond
// the probes of the 50 ms ping stream that fall into QEMU's downtime at most one is
// lost per migration, its counter goes on increasing on the destination, and every
// acknowledged block verifies.
func TestBareMigrationKeepsAddress(t *testing.T) {
	bed := New(t, Options{Hosts: 2})
	dir := t.TempDir()
	root := StartQemuNBD(t, CopyGuestImage(t, dir))
	data := StartQemuNBD(t, BlankImage(t, filepath.Join(dir, "data.raw"), 8<<20))
	iso := SeedISO(t, guestSeed("mover", 0, "counter", "diskwriter", "responder"))
	config := func(h *Host, incoming string) VMConfig {
		tap, err := h.AddTap()
		if err != nil {
			t.Fatal(err)
		}
		return VMConfig{
			Name:     fmt.Sprintf("mover-h%d", h.Index),
			Netns:    h.Netns,
			Disks:    []Disk{root.Disk(), data.Disk()},
			SeedISO:  iso,
			NICs:     []NIC{{Tap: tap, MAC: GuestMAC(0)}},
			Incoming: incoming,
		}
	}
	src := StartVM(t, config(bed.Hosts[0], ""))
	if _, err := src.Console.WaitReady(0, bootTimeout); err != nil {
		t.Fatal(err)
	}
	ip := strings.TrimSuffix(GuestIP(0), "/24")
	ping := bed.StartPing(t, ip)
	if _, err := ping.WaitReplies(PingStats{}, 5, 20*time.Second); err != nil {
		t.Fatal(err)
	}
	if _, err := src.Console.WaitAckAbove(10, 30*time.Second); err != nil {
		t.Fatal(err)
	}

	cur := src
	for round, to := range []int{1, 0} {
		h := bed.Hosts[to]
		uri := fmt.Sprintf("tcp:%s:%d", h.StorageIP, 4444+round)
		dst := StartVM(t, config(h, uri))
		// QMP answers once QEMU listens for the stream (never probe the incoming port:
		// QEMU takes the first connection as the migration).
		dq, err := dst.QMP()
		if err != nil {
			t.Fatal(err)
		}
		// Announce the guest's MAC on the destination at once, so the switch learns the new port.
		if _, err := dq.Execute("migrate-set-parameters", map[string]any{"announce-initial": 1, "announce-step": 50}); err != nil {
			t.Fatal(err)
		}
		before := ping.Stats()
		counter, _ := cur.Console.Counter()
		res, err := cur.Migrate(uri, 50, 60*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		lastAck, _ := cur.Console.LastAck()
		cur.Kill()
		// Alive and progressing on the destination, not just "completed".
		if _, err := dst.Console.WaitCounterAbove(counter, 20*time.Second); err != nil {
			t.Fatalf("round %d: the guest does not count on the destination: %v", round, err)
		}
		if _, err := dst.Console.WaitAckAbove(lastAck, 20*time.Second); err != nil {
			t.Fatalf("round %d: the disk writer does not go on: %v", round, err)
		}
		after, err := ping.WaitReplies(before, 10, 20*time.Second)
		if err != nil {
			t.Fatalf("round %d: %v", round, err)
		}
		lost := after.Lost - before.Lost
		resp, err := bed.Query(ip+":7777", 10*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		ack, _ := dst.Console.LastAck()
		rep, err := VerifyBlocksNBD("", data.URI(), 2048, ack)
		if err != nil {
			t.Fatalf("round %d: blocks up to %d: %v", round, ack, err)
		}
		t.Logf("round %d to host %d: total %d ms, downtime %d ms, %d probes lost, responder %+v, %d blocks verified",
			round, to, res.TotalMS, res.DowntimeMS, lost, resp, rep.Checked)
		// Probes that fall into the guest's pause are lost whatever the network does;
		// beyond those, at most one more (the bridge learning the guest's new port).
		if allowed := 1 + int(res.DowntimeMS/50); lost > allowed {
			t.Fatalf("round %d: %d probes lost with %d ms downtime, want at most %d", round, lost, res.DowntimeMS, allowed)
		}
		if resp.Counter <= counter {
			t.Fatalf("round %d: responder counter %d did not pass %d", round, resp.Counter, counter)
		}
		cur = dst
	}
}
