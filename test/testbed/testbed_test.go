package testbed

import (
	"context"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/growserver/grow/guest/seed"
)

// bootTimeout is generous: a guest boots in about 3 s under TCG on an idle machine,
// but `make test` runs it next to other packages' QEMUs on 2 cores.
const bootTimeout = 120 * time.Second

// guestSeed is the seed of guest i on the bed's guest network.
func guestSeed(name string, i int, run ...string) Seed {
	user := Workloads(run...)
	user.SSHAuthorizedKeys = []string{"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGrowTestKey test@bed"}
	user.GrowTest.WriteInterval = "20ms"
	user.GrowTest.CounterInterval = "200ms"
	return Seed{
		Meta:    seed.MetaData{InstanceID: "i-" + name, LocalHostname: name},
		Network: StaticNetwork(GuestMAC(i), []string{GuestIP(i), GuestIP6(i)}, GuestPrefix+"1"),
		User:    user,
	}
}

// TestGuestBootsFromNBDDisk boots the gold master from an NBD export (qemu-nbd), with
// a seed and a data disk on a second export, and checks what the guest reports, that
// it answers on the guest network, and that its acknowledged blocks verify from the
// host side while it runs and after it quits.
func TestGuestBootsFromNBDDisk(t *testing.T) {
	bed := New(t, Options{Hosts: 1})
	h := bed.Hosts[0]
	dir := t.TempDir()
	root := StartQemuNBD(t, CopyGuestImage(t, dir))
	data := StartQemuNBD(t, BlankImage(t, filepath.Join(dir, "data.raw"), 8<<20))
	tap, err := h.AddTap()
	if err != nil {
		t.Fatal(err)
	}
	vm := StartVM(t, VMConfig{
		Name:    "web1",
		Netns:   h.Netns,
		Disks:   []Disk{root.Disk(), data.Disk()},
		SeedISO: SeedISO(t, guestSeed("web1", 0, "counter", "diskwriter", "responder")),
		NICs:    []NIC{{Tap: tap, MAC: GuestMAC(0)}},
	})
	start := time.Now()
	ready, err := vm.Console.WaitReady(0, bootTimeout)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("guest ready after %s: %+v", time.Since(start).Round(time.Millisecond), ready)
	if ready.Hostname != "web1" || ready.Root != "vda" || !ready.Seed || ready.Keys != 1 || ready.InstanceID != "i-web1" {
		t.Fatalf("unexpected ready line %+v (want hostname web1 from the seed, root on vda, 1 key)", ready)
	}
	if !slices.Equal(ready.IPs, []string{GuestIP(0), GuestIP6(0)}) {
		t.Fatalf("guest reports addresses %v, want %v", ready.IPs, []string{GuestIP(0), GuestIP6(0)})
	}
	if strings.Contains(vm.Console.Output(), "GROW-ERROR") {
		t.Fatalf("guest reported an error:\n%s", vm.Console.Tail(3000))
	}

	// The guest network: ping and the responder, from the client namespace.
	ip := strings.TrimSuffix(GuestIP(0), "/24")
	p := bed.StartPing(t, ip)
	if _, err := p.WaitReplies(PingStats{}, 3, 20*time.Second); err != nil {
		t.Fatal(err)
	}
	resp, err := bed.Query(ip+":7777", 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if resp.Hostname != "web1" {
		t.Fatalf("responder says hostname %q, want web1", resp.Hostname)
	}
	// The same line over HTTP, through a client whose sockets live in the client namespace.
	hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			return DialContext(ctx, bed.Client, network, addr)
		}}}
	hr, err := hc.Get("http://" + ip + "/")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(hr.Body)
	hr.Body.Close()
	if r, err := ParseResponse(string(body)); hr.StatusCode != 200 || err != nil || r.Hostname != "web1" {
		t.Fatalf("HTTP responder: %d %q %v", hr.StatusCode, body, err)
	}
	ip6 := strings.TrimSuffix(GuestIP6(0), "/64")
	if r6, err := bed.Query("["+ip6+"]:7777", 10*time.Second); err != nil || r6.Hostname != "web1" {
		t.Fatalf("responder over IPv6: %+v, %v", r6, err)
	}
	c1, err := vm.Console.WaitCounterAbove(resp.Counter, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("responder %+v, counter now %d", resp, c1)

	// Blocks acknowledged so far verify through an NBD client while the guest writes on.
	ack, err := vm.Console.WaitAckAbove(30, 60*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	rep, err := VerifyBlocksNBD("", data.URI(), 2048, ack)
	if err != nil {
		t.Fatalf("blocks up to %d do not verify while the guest runs: %v", ack, err)
	}
	if rep.Checked != ack || rep.Newest < ack {
		t.Fatalf("verified %d blocks (newest %d), want %d", rep.Checked, rep.Newest, ack)
	}
	// After QEMU quits, every block up to the last acknowledged one is there.
	if err := vm.Quit(20 * time.Second); err != nil {
		t.Fatal(err)
	}
	final, _ := vm.Console.LastAck()
	rep, err = VerifyBlocksNBD("", data.URI(), 2048, final)
	if err != nil {
		t.Fatalf("blocks up to %d do not verify after quit: %v", final, err)
	}
	t.Logf("verified %d blocks up to sequence %d (newest on disk %d)", rep.Checked, final, rep.Newest)

	// The verifier is not blind: a corrupted acknowledged block is reported.
	img := filepath.Join(dir, "data.raw")
	f, err := os.OpenFile(img, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte("x"), 4096*int64((final-1)%2048)+100); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if _, err := VerifyBlocksFile(img, 2048, final); err == nil {
		t.Fatal("a corrupted acknowledged block verified")
	}
}

// TestTwoGuestsReachEachOther boots one guest on each of two hosts (from the
// initramfs, no disk) and has guest A query guest B's responder over the bed's guest
// network, typed on A's serial console (a console round trip).
func TestTwoGuestsReachEachOther(t *testing.T) {
	bed := New(t, Options{Hosts: 2})
	var vms []*VM
	for i, name := range []string{"alpha", "beta"} {
		h := bed.Hosts[i]
		tap, err := h.AddTap()
		if err != nil {
			t.Fatal(err)
		}
		vms = append(vms, StartVM(t, VMConfig{
			Name:    name,
			Netns:   h.Netns,
			SeedISO: SeedISO(t, guestSeed(name, i, "responder")),
			NICs:    []NIC{{Tap: tap, MAC: GuestMAC(i)}},
		}))
	}
	for i, vm := range vms {
		r, err := vm.Console.WaitReady(0, bootTimeout)
		if err != nil {
			t.Fatal(err)
		}
		if r.Root != "initramfs" || len(r.IPs) == 0 || r.IPs[0] != GuestIP(i) {
			t.Fatalf("guest %s: unexpected ready line %+v", vm.Name, r)
		}
	}
	a := vms[0].Console
	// Console round trip: the shell evaluates what we type.
	if err := a.Type("\necho sum=$((6*7))\n"); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Expect(regexp.MustCompile(`sum=42`), 20*time.Second); err != nil {
		t.Fatal(err)
	}
	// What the seed configured, seen from inside: route, resolver, key, hostname.
	if err := a.Type("ip route; cat /etc/resolv.conf /root/.ssh/authorized_keys; echo host=$(hostname)\n"); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{`default via 10\.77\.0\.1 dev eth0`, `ssh-ed25519 \S+ test@bed`, `host=alpha`} {
		if _, err := a.Expect(regexp.MustCompile(want), 20*time.Second); err != nil {
			t.Fatal(err)
		}
	}
	// Guest to guest across hosts, at L2 through the switch namespace.
	bIP := strings.TrimSuffix(GuestIP(1), "/24")
	if err := a.Type("nc " + bIP + " 7777\n"); err != nil {
		t.Fatal(err)
	}
	m, err := a.Expect(regexp.MustCompile(`GROW-RESP hostname=(\S+) counter=`), 20*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if m[1] != "beta" {
		t.Fatalf("guest alpha reached %q at %s, want beta", m[1], bIP)
	}
	// And the other way, by ping from beta's console.
	if err := vms[1].Console.Type("\nping -c 2 -W 5 " + strings.TrimSuffix(GuestIP(0), "/24") + " && echo PING-OK\n"); err != nil {
		t.Fatal(err)
	}
	if _, err := vms[1].Console.Expect(regexp.MustCompile(`PING-OK`), 20*time.Second); err != nil {
		t.Fatal(err)
	}
}
