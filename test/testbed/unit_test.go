package testbed

import (
	"encoding/json"
	"io"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/growserver/grow/guest/seed"
)

func TestConsoleWaitAndExpect(t *testing.T) {
	c := NewConsole()
	go func() {
		for _, s := range []string{"boot...\nGROW-COUNTER n=1\n", "GROW-COUNTER n=2\nGROW-READY hostname=a ip=10.0.0.1/24,fd00::1/64 ", "seed=true keys=2 run=counter root=vda\n", "GROW-COUNTER n=3\n"} {
			time.Sleep(10 * time.Millisecond)
			_, _ = c.Write([]byte(s))
		}
	}()
	r, err := c.WaitReady(0, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if r.Hostname != "a" || !slices.Equal(r.IPs, []string{"10.0.0.1/24", "fd00::1/64"}) || !r.Seed || r.Keys != 2 || r.Root != "vda" {
		t.Fatalf("ready %+v", r)
	}
	if n, err := c.WaitCounterAbove(2, 5*time.Second); err != nil || n != 3 {
		t.Fatalf("counter %d, %v", n, err)
	}
	// Expect moves a cursor: the same pattern matches successive occurrences.
	for want := 1; want <= 3; want++ {
		m, err := c.Expect(regexp.MustCompile(`n=(\d)`), time.Second)
		if err != nil || m[1] != string(rune('0'+want)) {
			t.Fatalf("expect %d: %v %v", want, m, err)
		}
	}
	if _, err := c.Expect(regexp.MustCompile(`n=\d`), 50*time.Millisecond); err == nil || !strings.Contains(err.Error(), "timed out") {
		t.Fatalf("a fourth counter line was found: %v", err)
	}
	c.CloseWithError(io.ErrUnexpectedEOF)
	if _, err := c.WaitFor(regexp.MustCompile(`never`), time.Minute); err == nil || !strings.Contains(err.Error(), "console ended") {
		t.Fatalf("closed console: %v", err)
	}
	if err := c.Type("x"); err == nil {
		t.Fatal("typing on a console without input succeeded")
	}
}

func TestParseResponse(t *testing.T) {
	r, err := ParseResponse("GROW-RESP hostname=web1 counter=12 seq=345\n")
	if err != nil || r != (Response{Hostname: "web1", Counter: 12, Seq: 345}) {
		t.Fatalf("%+v %v", r, err)
	}
	if _, err := ParseResponse("HTTP/1.0 200 OK"); err == nil {
		t.Fatal("garbage parsed")
	}
}

func TestVMArgs(t *testing.T) {
	cfg := VMConfig{
		Name: "a", Kernel: "/k", Initrd: "/i", Append: "grow.run=counter", Accel: "tcg",
		Disks: []Disk{
			{NBDSocket: "/s/nbd.sock", Export: "root"},
			{NBDHost: "10.99.0.2", NBDPort: 10809, Export: "data", ReconnectDelay: 2, Serial: "data"},
			{File: "/x.raw", ReadOnly: true},
		},
		SeedISO: "/seed.iso",
		NICs:    []NIC{{Tap: "tap0", MAC: GuestMAC(1)}},
	}
	args, err := cfg.Args("/run/vm")
	if err != nil {
		t.Fatal(err)
	}
	joined := strings.Join(args, " ")
	for _, want := range []string{"-accel tcg", "-M pc", "-m 262136k", "-append console=ttyS0 grow.run=counter",
		"unix:/run/vm/qmp.sock,server=on,wait=off", "logfile=/run/vm/console.log",
		"ifname=tap0,script=no", "mac=52:54:00:77:00:01", "serial=data", "drive=seed"} {
		if !strings.Contains(joined, want) {
			t.Errorf("arguments lack %q:\n%s", want, joined)
		}
	}
	var blockdevs []map[string]any
	for i, a := range args {
		if a == "-blockdev" {
			var m map[string]any
			if err := json.Unmarshal([]byte(args[i+1]), &m); err != nil {
				t.Fatalf("blockdev %q is not JSON: %v", args[i+1], err)
			}
			blockdevs = append(blockdevs, m)
		}
	}
	if len(blockdevs) != 4 {
		t.Fatalf("%d blockdevs, want 4", len(blockdevs))
	}
	f0 := blockdevs[0]["file"].(map[string]any)
	if f0["driver"] != "nbd" || f0["export"] != "root" || f0["reconnect-delay"] != float64(5) {
		t.Fatalf("first disk %v", f0)
	}
	f1 := blockdevs[1]["file"].(map[string]any)
	if srv := f1["server"].(map[string]any); srv["type"] != "inet" || srv["host"] != "10.99.0.2" || srv["port"] != "10809" || f1["reconnect-delay"] != float64(2) {
		t.Fatalf("second disk %v", f1)
	}
	if blockdevs[2]["read-only"] != true {
		t.Fatalf("third disk is writable: %v", blockdevs[2])
	}
	// Under TCG the RAM size must not be a multiple of 256 KiB (QEMU 7.2 loses guest
	// writes during migration otherwise); KVM gets what was asked for.
	for _, c := range []struct {
		mib   int
		accel string
		want  string
	}{{256, "tcg", "262136k"}, {256, "tcg,thread=single", "262136k"}, {1024, "tcg", "1048568k"}, {256, "kvm", "256"}} {
		got := MemoryArgFor(c.mib, c.accel)
		if got != c.want {
			t.Errorf("MemoryArgFor(%d, %q) = %q, want %q", c.mib, c.accel, got, c.want)
		}
		if kib, err := strconv.Atoi(strings.TrimSuffix(got, "k")); strings.HasPrefix(c.accel, "tcg") && (err != nil || kib%256 == 0 || kib%8 != 0) {
			t.Errorf("MemoryArgFor(%d, %q) = %q: want KiB, a multiple of 8 and not of 256", c.mib, c.accel, got)
		}
	}
	if _, err := (VMConfig{Kernel: "/k", Initrd: "/i", Disks: []Disk{{}}}).Args("/d"); err == nil {
		t.Fatal("a disk without a backend was accepted")
	}
	if _, err := (VMConfig{}).Args("/d"); err == nil {
		t.Fatal("a VM without a kernel was accepted")
	}
}

func TestSeedFiles(t *testing.T) {
	s := Seed{
		Meta:    seed.MetaData{InstanceID: "i-1", LocalHostname: "web1"},
		Network: StaticNetwork(GuestMAC(3), []string{GuestIP(3)}, "10.77.0.1"),
		User:    Workloads("counter", "responder"),
	}
	meta, user, network, err := s.Files()
	if err != nil {
		t.Fatal(err)
	}
	m, err := seed.ParseMetaData([]byte(meta))
	if err != nil || m.LocalHostname != "web1" {
		t.Fatalf("meta-data %q: %+v %v", meta, m, err)
	}
	u, ok, err := seed.ParseUserData([]byte(user))
	if err != nil || !ok || !slices.Equal(u.GrowTest.Run, []string{"counter", "responder"}) {
		t.Fatalf("user-data %q: %+v %v %v", user, u, ok, err)
	}
	n, err := seed.ParseNetworkConfig([]byte(network))
	if err != nil || n.Ethernets["eth0"].Match.MACAddress != GuestMAC(3) || n.Ethernets["eth0"].Addresses[0] != "10.77.0.13/24" {
		t.Fatalf("network-config %q: %+v %v", network, n, err)
	}
	if _, _, network, _ := (Seed{Meta: s.Meta, RawUserData: "#!/bin/sh\n"}).Files(); network != "" {
		t.Fatalf("network-config without a Network: %q", network)
	}
}
