package host_test

import (
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/growserver/grow/internal/host/hostapi"
	"github.com/growserver/grow/internal/network"
	"github.com/growserver/grow/test/testbed"
)

// run types a shell command on the guest console and returns its output and exit code.
func run(t *testing.T, con *testbed.Console, cmd string, timeout time.Duration) (string, int) {
	t.Helper()
	tag := fmt.Sprintf("%06x", rand.Uint32()&0xffffff)
	mark := con.Len()
	if err := con.Type(cmd + "; echo END-" + tag + "-$?\n"); err != nil {
		t.Fatal(err)
	}
	re := regexp.MustCompile(`(?s)\n(.*)END-` + tag + `-(\d+)\r?\n`)
	m, _, err := con.WaitFrom(mark, re, timeout)
	if err != nil {
		t.Fatalf("command %q on the guest: %v\n%s", cmd, err, con.Tail(1000))
	}
	code, _ := strconv.Atoi(m[2])
	return m[1], code
}

// nftCounters installs counters on the client's eth0 for frames from a MAC and packets
// from an IP, and returns a function that reads them (packets).
func nftCounters(t *testing.T, ns, mac, ip string) func() (fromMAC, fromIP, arpIP int) {
	t.Helper()
	inNS := func(stdin string, args ...string) (string, error) {
		cmd := testbed.NetnsCommand(ns, "nft", args...)
		cmd.Stdin = strings.NewReader(stdin)
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	script := fmt.Sprintf(`add table netdev spy
add chain netdev spy in { type filter hook ingress device "eth0" priority 0; policy accept; }
add rule netdev spy in ether saddr %s counter comment "mac"
add rule netdev spy in ether type ip ip saddr %s counter comment "ip"
add rule netdev spy in ether type arp arp saddr ip %s counter comment "arp"
`, mac, ip, ip)
	if out, err := inNS(script, "-f", "-"); err != nil {
		t.Fatalf("nft in the client: %v: %s", err, out)
	}
	re := regexp.MustCompile(`counter packets (\d+) bytes \d+ comment "(\w+)"`)
	return func() (int, int, int) {
		out, err := inNS("", "list", "chain", "netdev", "spy", "in")
		if err != nil {
			t.Fatalf("nft list: %v: %s", err, out)
		}
		got := map[string]int{}
		for _, m := range re.FindAllStringSubmatch(out, -1) {
			got[m[2]], _ = strconv.Atoi(m[1])
		}
		return got["mac"], got["ip"], got["arp"]
	}
}

// TestNetwork boots two guests on one host in parallel: one proves that a guest
// cannot send with another MAC or IP address, the other that shaping holds its rates.
func TestNetwork(t *testing.T) {
	t.Parallel()
	b := testbed.New(t, testbed.Options{Hosts: 1})
	h := b.StartAgents(t)[0]
	ctx := context.Background()
	spoof := testbed.NewAgentGuest(t, "spoofer", 0, false)
	shaped := testbed.NewAgentGuest(t, "shaped", 1, false)
	const rate = 8_000_000 // bits per second, both directions
	shaped.Spec.NICs[0].InRate, shaped.Spec.NICs[0].OutRate = rate, rate
	shaped.Spec.Limits = hostapi.Limits{CPUPercent: 90, MemoryMaxBytes: 1 << 30}
	cons := map[string]*testbed.Console{}
	for _, g := range []*testbed.AgentGuest{spoof, shaped} {
		if _, err := h.API.Define(ctx, g.Spec); err != nil {
			t.Fatal(err)
		}
		if err := h.API.Start(ctx, g.Spec.Name); err != nil {
			t.Fatal(err)
		}
		cons[g.Spec.Name] = h.AttachConsole(t, g.Spec.Name)
	}
	var wg sync.WaitGroup
	for name, con := range cons {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := con.WaitReady(0, 120*time.Second); err != nil {
				t.Errorf("%s not ready: %v\n%s", name, err, con.Tail(1500))
			}
		}()
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}

	t.Run("cgroup", func(t *testing.T) {
		vm, err := h.API.Get(ctx, "shaped")
		if err != nil {
			t.Fatal(err)
		}
		checkCgroup(t, h.Host.CgroupParent(), "shaped", vm.PID, 90, 1<<30)
	})

	t.Run("antispoof", func(t *testing.T) {
		con := cons["spoofer"]
		client := testbed.ClientIP
		const fakeIP, fakeMAC = "10.77.0.66", "52:54:00:66:66:66"
		read := nftCounters(t, b.Client, fakeMAC, fakeIP)
		if out, code := run(t, con, "ping -c 2 -W 3 "+client, 20*time.Second); code != 0 {
			t.Fatalf("the guest cannot reach the client with its own addresses:\n%s", out)
		}
		out, code := run(t, con, "ip addr add "+fakeIP+"/24 dev eth0 && ping -c 3 -W 2 -I "+fakeIP+" "+client, 30*time.Second)
		if code == 0 || !strings.Contains(out, "0 packets received") {
			t.Fatalf("ping from a spoofed IP got through:\n%s", out)
		}
		run(t, con, "ip addr del "+fakeIP+"/24 dev eth0", 10*time.Second)
		out, code = run(t, con, "ip link set eth0 address "+fakeMAC+" && ping -c 3 -W 2 "+client, 30*time.Second)
		if code == 0 || !strings.Contains(out, "0 packets received") {
			t.Fatalf("ping from a spoofed MAC got through:\n%s", out)
		}
		mac, ip, arp := read()
		if mac != 0 || ip != 0 || arp != 0 {
			t.Fatalf("the client saw spoofed traffic: %d frames from %s, %d packets and %d ARP from %s", mac, fakeMAC, ip, arp, fakeIP)
		}
		// With its own MAC back, the same guest gets through again: it was the filter.
		if out, code := run(t, con, "ip link set eth0 address "+spoof.Spec.NICs[0].MAC+" && ping -c 2 -W 3 "+client, 30*time.Second); code != 0 {
			t.Fatalf("the guest cannot reach the client after restoring its MAC:\n%s", out)
		}
	})

	t.Run("shaping", func(t *testing.T) {
		con := cons["shaped"]
		// The guest's peer is the client namespace on the guest network.
		l, err := testbed.Listen(b.Client, testbed.ClientIP+":0")
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		go func() {
			for {
				c, err := l.Accept()
				if err != nil {
					return
				}
				go func() { defer c.Close(); _, _ = io.Copy(io.Discard, c) }()
			}
		}()
		port := l.Addr().(*net.TCPAddr).Port
		measure := func(dir string, counter func(hostapi.Counters) uint64) float64 {
			time.Sleep(1500 * time.Millisecond) // let TCP reach its steady state
			c0, _ := h.API.Counters(ctx, "shaped")
			t0 := time.Now()
			time.Sleep(5 * time.Second)
			c1, _ := h.API.Counters(ctx, "shaped")
			bps := float64(counter(c1)-counter(c0)) * 8 / time.Since(t0).Seconds()
			t.Logf("%s: %.2f Mbit/s for a rate of %.2f Mbit/s (%.1f %%)", dir, bps/1e6, rate/1e6, 100*(bps-rate)/rate)
			if bps < rate*0.85 || bps > rate*1.15 {
				t.Errorf("%s rate %.2f Mbit/s is not within 15 %% of %.2f", dir, bps/1e6, rate/1e6)
			}
			return bps
		}
		// From the guest: it streams zeroes to the client's listener.
		run(t, con, fmt.Sprintf("(timeout 10 nc %s %d < /dev/zero > /dev/null 2>&1 &)", testbed.ClientIP, port), 10*time.Second)
		measure("from the guest", func(c hostapi.Counters) uint64 { return c.TxBytes })
		time.Sleep(3 * time.Second)
		// To the guest: the guest listens, the client streams.
		run(t, con, "(timeout 12 nc -l -p 5002 > /dev/null 2>&1 &)", 10*time.Second)
		time.Sleep(500 * time.Millisecond)
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		c, err := testbed.DialContext(cctx, b.Client, "tcp", shaped.IP+":5002")
		if err != nil {
			t.Fatalf("Failed to connect to the guest: %v", err)
		}
		defer c.Close()
		go func() {
			buf := make([]byte, 64<<10)
			_ = c.SetWriteDeadline(time.Now().Add(9 * time.Second))
			for {
				if _, err := c.Write(buf); err != nil {
					return
				}
			}
		}()
		measure("to the guest", func(c hostapi.Counters) uint64 { return c.RxBytes })
	})
	// The control plane slows a server that used up its monthly traffic and lifts it
	// again, on the running VM: the tap's qdiscs follow, and the record keeps the rates.
	t.Run("reshaping a running VM", func(t *testing.T) {
		vm, err := h.API.Get(ctx, "shaped")
		if err != nil || len(vm.Taps) == 0 {
			t.Fatalf("shaped VM: %+v %v", vm, err)
		}
		tap := vm.Taps[0]
		tc := func(args ...string) string {
			out, err := h.Host.Exec("tc", args...)
			if err != nil {
				t.Fatalf("tc %v: %v\n%s", args, err, out)
			}
			return out
		}
		if err := h.API.Shape(ctx, "shaped", hostapi.ShapeRequest{InRate: 2e6, OutRate: 3e6}); err != nil {
			t.Fatal(err)
		}
		if q, c := tc("qdisc", "show", "dev", tap), tc("class", "show", "dev", network.IfbName(tap)); !strings.Contains(q, "tbf") || !strings.Contains(q, "rate 2Mbit") || !strings.Contains(c, "rate 3Mbit") {
			t.Fatalf("after shaping to 2/3 Mbit/s:\n%s\n%s", q, c)
		}
		if err := h.API.Shape(ctx, "shaped", hostapi.ShapeRequest{}); err != nil {
			t.Fatal(err)
		}
		if q := tc("qdisc", "show", "dev", tap); strings.Contains(q, "tbf") || strings.Contains(q, "ingress") {
			t.Fatalf("after lifting the limits the tap still has:\n%s", q)
		}
		if vm, err := h.API.Get(ctx, "shaped"); err != nil || vm.Spec.NICs[0].InRate != 0 || vm.Spec.NICs[0].OutRate != 0 {
			t.Fatalf("the record keeps rates %+v %v", vm.Spec.NICs, err)
		}
	})
}
