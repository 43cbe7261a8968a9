package control

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/growserver/grow/internal/host/agentclient"
	"github.com/growserver/grow/internal/storage/adminclient"
	"github.com/growserver/grow/test/testbed"
)

// TestStoragePairMaintenance is a storage controller's maintenance window as an operator
// lives it, with the control plane, two hosts and a mirrored pair of controllers that
// the control plane knows as one registered controller with its partner: a server runs
// on the pair; controller A is drained and stopped; meanwhile a customer orders a new
// server (cloned, grown and started on B alone, as the control plane reaches B when A
// does not answer) and the first server moves to the other host; A returns, receives
// the changes made without it, is resynced and resumed; both guests stay alive
// throughout and every volume ends synced on both controllers.
func TestStoragePairMaintenance(t *testing.T) {
	if testing.Short() {
		t.Skip("needs root, network namespaces and QEMU")
	}
	t.Parallel()
	t0 := time.Now()
	phase := func(what string) { t.Logf("%6.1fs %s", time.Since(t0).Seconds(), what) }
	ctx := context.Background()
	guest := testbed.GuestDir(t)
	bed := testbed.New(t, testbed.Options{Hosts: 2})
	pair := bed.StartStoragePair(t, testbed.StoragePairOptions{DiskSize: "8GiB", Cache: "32MiB"})
	a, b := pair.Ctl[0], pair.Ctl[1]
	ca, err := adminclient.New(a.URL, a.Token)
	if err != nil {
		t.Fatal(err)
	}
	cb, err := adminclient.New(b.URL, b.Token)
	if err != nil {
		t.Fatal(err)
	}
	c := &cluster{bed: bed}
	for _, h := range bed.Hosts {
		d := h.StartHostd(t, testbed.HostdOptions{})
		c.hostds = append(c.hostds, d)
		ac, err := agentclient.New(d.URL, d.Token)
		if err != nil {
			t.Fatal(err)
		}
		c.agents = append(c.agents, ac)
	}
	s := startServe(t, bed.Hosts[0].Netns, "")
	c.s = s
	phase("pair, hosts and grow serve up")

	s.mustGrow("controller", "add", "pair", "--storage-url", a.PeerURL, "--storage-token", a.Token,
		"--partner-url", b.PeerURL, "--partner-token", b.Token)
	for i, d := range c.hostds {
		s.mustGrow("host", "add", fmt.Sprintf("h%d", i), "--agent-url", d.PeerURL, "--agent-token", d.Token, "--cpus", "2", "--memory", "2GiB")
	}
	s.mustGrow("ippool", "create", "guests", "--cidr", "10.77.0.0/24", "--first", testbed.GuestPrefix+"10", "--last", testbed.GuestPrefix+"60")
	s.mustGrow("image", "import", "tiny", filepath.Join(guest, "disk.raw"), "--kernel", filepath.Join(guest, "vmlinux"),
		"--initrd", filepath.Join(guest, "initrd.img"), "--cmdline", "console=ttyS0")
	s.mustGrow("customer", "create", "acme", "--max-servers", "5")
	ud := filepath.Join(t.TempDir(), "user-data")
	if err := os.WriteFile(ud, []byte("#cloud-config\ngrow_test:\n  run: [counter, responder]\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	create := func(name string, ip int) {
		t.Helper()
		out := s.mustGrow("server", "create", name, "--customer", "acme", "--plan", "E", "--image", "tiny", "--user-data", ud)
		if !strings.Contains(out, "GROW-READY hostname="+name+" ip="+testbed.GuestIP(ip)) {
			t.Fatalf("create %s: no ready report from the guest:\n%s", name, out)
		}
	}
	create("web1", 0)
	web1 := c.server(t, "web1")
	if v, err := ca.GetVolume(ctx, web1.Volume); err != nil || v.Mirror == nil {
		t.Fatalf("web1's volume is not mirrored: %+v %v", v, err)
	}
	if _, err := pair.WaitSynced(web1.Volume, 30*time.Second); err != nil {
		t.Fatal(err)
	}
	phase("web1 runs on the pair, synced")

	// Maintenance of A: drain, then stop.
	waitMoved(t, ca, a.Name)
	if err := a.Stop(30 * time.Second); err != nil {
		t.Fatal(err)
	}
	phase("A drained and stopped")
	create("web2", 1)
	web2 := c.server(t, "web2")
	if v, err := cb.GetVolume(ctx, web2.Volume); err != nil || v.Mirror == nil || v.Mirror.Primary != b.Name {
		t.Fatalf("web2's volume on B: %+v %v", v, err)
	}
	phase("web2 ordered and running while A is away")
	src := c.hostIndex(t, web1.HostID)
	s.mustGrow("server", "migrate", "web1", "--to", fmt.Sprintf("h%d", 1-src))
	phase("web1 migrated while A is away")
	ips := map[string]string{"web1": testbed.GuestPrefix + "10", "web2": testbed.GuestPrefix + "11"}
	counters := map[string]uint64{}
	for name, ip := range ips {
		counters[name] = c.query(t, name, ip).Counter
	}

	// A returns (still drained), learns of web2, is resynced, then resumed.
	if err := a.Start(); err != nil {
		t.Fatal(err)
	}
	for _, v := range []string{web1.Volume, web2.Volume} {
		if _, err := pair.WaitSynced(v, 60*time.Second); err != nil {
			t.Fatal(err)
		}
	}
	phase("A back and synced")
	waitResumed(t, cb, a.Name)
	for _, v := range []string{web1.Volume, web2.Volume} {
		if _, err := pair.WaitSynced(v, 60*time.Second); err != nil {
			t.Fatal(err)
		}
	}
	phase("A resumed")
	// Both guests kept running through all of it: their counters went on.
	for name, ip := range ips {
		c.waitCounterAbove(t, name, ip, counters[name])
	}

	for _, name := range []string{"web1", "web2"} {
		s.mustGrow("server", "delete", name)
	}
	for _, cl := range []*adminclient.Client{ca, cb} {
		for _, v := range []string{web1.Volume, web2.Volume} {
			if _, err := cl.GetVolume(ctx, v); !adminclient.IsNotFound(err) {
				t.Fatalf("volume %s survived its server's deletion: %v", v, err)
			}
		}
	}
	phase("deleted on both controllers")
}

// waitMoved drains controller name through cl until every primary has moved off it.
func waitMoved(t *testing.T, cl *adminclient.Client, name string) {
	t.Helper()
	repeatMove(t, "drain of "+name, 60*time.Second, func() (*adminclient.MoveResult, error) { return cl.Drain(context.Background(), name) })
}

// waitResumed resumes controller name through cl until it has its primaries back.
func waitResumed(t *testing.T, cl *adminclient.Client, name string) {
	t.Helper()
	repeatMove(t, "resume of "+name, 90*time.Second, func() (*adminclient.MoveResult, error) { return cl.Resume(context.Background(), name) })
}

// repeatMove repeats a drain or resume step until it reports done.
func repeatMove(t *testing.T, what string, timeout time.Duration, step func() (*adminclient.MoveResult, error)) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		r, err := step()
		if err == nil && r.Done {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s did not finish: %+v %v", what, r, err)
		}
		time.Sleep(500 * time.Millisecond)
	}
}
