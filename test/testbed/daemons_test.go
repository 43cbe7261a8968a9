package testbed

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/growserver/grow/internal/host/agentclient"
	"github.com/growserver/grow/internal/host/hostapi"
	"github.com/growserver/grow/internal/storage/adminclient"
)

// TestDaemonsBootGuestFromStoraged runs the real daemons on the bed: grow storaged in
// its own namespace holds the gold master as an image and a clone of it, grow hostd
// on a host boots the guest from that clone over the storage network, and the test
// reaches the guest on the guest network and verifies its disk writer's blocks on the
// controller's export.
func TestDaemonsBootGuestFromStoraged(t *testing.T) {
	// Mostly waiting (or unrelated to the others): overlap with the other parallel tests.
	t.Parallel()
	t0 := time.Now()
	phase := func(what string) { t.Logf("%6.1fs %s", time.Since(t0).Seconds(), what) }
	bed := New(t, Options{Hosts: 1})
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	st := bed.StartStoraged(t, StoragedOptions{Extra: []string{"--pool-size", "1GiB", "--cache", "32MiB"}})
	phase("storaged up")
	sc, err := adminclient.New(st.URL, st.Token)
	if err != nil {
		t.Fatal(err)
	}
	img := filepath.Join(GuestDir(t), "disk.raw")
	f, err := os.Open(img)
	if err != nil {
		t.Fatal(err)
	}
	fi, _ := f.Stat()
	_, err = sc.ImportImage(ctx, "guest", f, fi.Size(), adminclient.FormatRaw, nil)
	f.Close()
	if err != nil {
		t.Fatalf("Failed to import the gold master: %v", err)
	}
	if _, err := sc.CloneVolume(ctx, "guest", "web1-root"); err != nil {
		t.Fatal(err)
	}
	if _, err := sc.CreateVolume(ctx, "web1-data", 8<<20); err != nil {
		t.Fatal(err)
	}

	phase("gold master imported and cloned")
	hd := bed.Hosts[0].StartHostd(t, HostdOptions{})
	phase("hostd up")
	hc, err := agentclient.New(hd.URL, hd.Token)
	if err != nil {
		t.Fatal(err)
	}
	meta, user, network, err := guestSeed("web1", 0, "counter", "diskwriter", "responder").Files()
	if err != nil {
		t.Fatal(err)
	}
	g := GuestDir(t)
	spec := hostapi.VMSpec{
		Name: "web1", VCPUs: 1, MemoryMiB: 256,
		Disks: []hostapi.Disk{
			{ID: "root", Host: st.IP, Port: 10809, Export: "web1-root", ReconnectDelay: 5},
			{ID: "data", Host: st.IP, Port: 10809, Export: "web1-data", ReconnectDelay: 5},
		},
		NICs: []hostapi.NIC{{MAC: GuestMAC(0), IPv4: []string{strings.TrimSuffix(GuestIP(0), "/24")},
			IPv6: []string{strings.TrimSuffix(GuestIP6(0), "/64")}}},
		Seed: &hostapi.Seed{MetaData: meta, UserData: user, NetworkConfig: network},
		Boot: &hostapi.DirectBoot{Kernel: filepath.Join(g, "vmlinux"), Initrd: filepath.Join(g, "initrd.img"), Append: "console=ttyS0"},
	}
	if _, err := hc.Define(ctx, spec); err != nil {
		t.Fatalf("Failed to define the VM: %v", err)
	}
	if err := hc.Start(ctx, "web1"); err != nil {
		t.Fatalf("Failed to start the VM: %v", err)
	}
	// The agent's console log carries the guest's ready line.
	con := NewConsole()
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		var seen int
		for {
			select {
			case <-stop:
				return
			case <-time.After(200 * time.Millisecond):
			}
			b, err := hc.ConsoleLog(ctx, "web1")
			if err != nil || len(b) <= seen {
				continue
			}
			_, _ = con.Write(b[seen:])
			seen = len(b)
		}
	}()
	ready, err := con.WaitReady(0, bootTimeout)
	if err != nil {
		t.Fatal(err)
	}
	phase("guest ready")
	if ready.Hostname != "web1" || ready.Root != "vda" || len(ready.IPs) == 0 || ready.IPs[0] != GuestIP(0) {
		t.Fatalf("unexpected ready line %+v", ready)
	}
	ip := strings.TrimSuffix(GuestIP(0), "/24")
	var resp Response
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err = bed.Query(ip+":7777", 5*time.Second)
		if err == nil && resp.Seq >= 20 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("responder: %+v, %v", resp, err)
		}
		time.Sleep(500 * time.Millisecond)
	}
	if resp.Hostname != "web1" {
		t.Fatalf("responder says %q", resp.Hostname)
	}
	phase("responder answered")
	rep, err := VerifyBlocksNBD(st.Netns, st.NBDURI("web1-data"), 2048, resp.Seq)
	if err != nil {
		t.Fatalf("blocks up to %d do not verify on the controller: %v", resp.Seq, err)
	}
	t.Logf("guest %+v; responder %+v; verified %d blocks on the controller", ready, resp, rep.Checked)

	// Restarting the agent leaves the guest running and the agent finds it again.
	if err := hd.Restart(); err != nil {
		t.Fatal(err)
	}
	hc2, err := agentclient.New(hd.URL, hd.Token)
	if err != nil {
		t.Fatal(err)
	}
	vm, err := hc2.Get(ctx, "web1")
	if err != nil || vm.State != hostapi.StateRunning {
		t.Fatalf("after an agent restart: %+v, %v", vm, err)
	}
	after, err := bed.Query(ip+":7777", 10*time.Second)
	if err != nil || after.Counter < resp.Counter {
		t.Fatalf("after an agent restart the guest answers %+v, %v (before: %+v)", after, err, resp)
	}
	phase("agent restarted, guest untouched")
}
