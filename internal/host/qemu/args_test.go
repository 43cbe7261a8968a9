package qemu

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/growserver/grow/internal/host/hostapi"
)

func testSpec() hostapi.VMSpec {
	s := hostapi.VMSpec{
		Name: "web-1", VCPUs: 2, MaxVCPUs: 4, MemoryMiB: 512, MaxMemMiB: 2048,
		Disks: []hostapi.Disk{
			{ID: "root", Host: "10.0.0.5", Port: 10809, Export: "vol-1", ReconnectDelay: 5, TLSCredsDir: "/etc/grow/pki", TLSHostname: "stor1"},
			{ID: "data", Socket: "/run/grow/nbd,odd.sock", Export: "vol-2", ReadOnly: true},
		},
		NICs: []hostapi.NIC{{Bridge: "br0", MAC: "52:54:00:12:34:56", IPv4: []string{"10.1.0.7"}}},
		Boot: &hostapi.DirectBoot{Kernel: "/k", Initrd: "/i", Append: "console=ttyS0"},
	}
	if err := s.Validate(); err != nil {
		panic(err)
	}
	return s
}

// argAfter returns the values following every occurrence of flag.
func argAfter(args []string, flag string) []string {
	var out []string
	for i := 0; i+1 < len(args); i++ {
		if args[i] == flag {
			out = append(out, args[i+1])
		}
	}
	return out
}

func TestArgs(t *testing.T) {
	c := Config{Spec: testSpec(), Dir: "/var/lib/grow/vms/web-1", Accel: "tcg", Taps: []string{"gt1-0"}, SeedISO: "/var/lib/grow/vms/web-1/seed.iso"}
	a, err := c.Args()
	if err != nil {
		t.Fatal(err)
	}
	if a[0] != "qemu-system-x86_64" {
		t.Fatalf("argv0 %q", a[0])
	}
	for flag, want := range map[string]string{
		"-accel": "tcg", "-cpu": "Nehalem", "-smp": "2,maxcpus=4", "-m": "524280k,slots=8,maxmem=2048M",
		"-machine": "pc", "-kernel": "/k", "-initrd": "/i", "-append": "console=ttyS0 memhp_default_state=online no_timer_check",
	} {
		if got := argAfter(a, flag); len(got) != 1 || got[0] != want {
			t.Errorf("%s = %v, want %q", flag, got, want)
		}
	}
	if len(argAfter(a, "-incoming")) != 0 {
		t.Error("-incoming without Incoming")
	}
	bd := argAfter(a, "-blockdev")
	if len(bd) != 3 {
		t.Fatalf("want 3 blockdevs (2 disks + seed), got %d: %v", len(bd), bd)
	}
	var root map[string]any
	if err := json.Unmarshal([]byte(bd[0]), &root); err != nil {
		t.Fatalf("blockdev is not JSON: %v", err)
	}
	file := root["file"].(map[string]any)
	srv := file["server"].(map[string]any)
	if root["node-name"] != "disk-root" || file["driver"] != "nbd" || file["export"] != "vol-1" || srv["type"] != "inet" ||
		srv["host"] != "10.0.0.5" || srv["port"] != "10809" || file["reconnect-delay"] != float64(5) || file["tls-creds"] != "tls-root" || file["tls-hostname"] != "stor1" {
		t.Errorf("root blockdev %v", root)
	}
	var data map[string]any
	_ = json.Unmarshal([]byte(bd[1]), &data)
	dsrv := data["file"].(map[string]any)["server"].(map[string]any)
	if dsrv["type"] != "unix" || dsrv["path"] != "/run/grow/nbd,odd.sock" || data["read-only"] != true {
		t.Errorf("data blockdev %v", data)
	}
	if _, ok := data["file"].(map[string]any)["reconnect-delay"]; ok {
		t.Error("reconnect-delay set without being asked")
	}
	objs := argAfter(a, "-object")
	if len(objs) != 1 || objs[0] != "tls-creds-x509,id=tls-root,dir=/etc/grow/pki,endpoint=client" {
		t.Errorf("-object %v", objs)
	}
	devs := strings.Join(argAfter(a, "-device"), " ")
	for _, want := range []string{"virtio-blk-pci,drive=disk-root,id=vd-root,serial=root", "virtio-blk-pci,drive=seed,id=vd-seed,serial=cidata",
		"virtio-net-pci,netdev=net0,mac=52:54:00:12:34:56,id=nic0"} {
		if !strings.Contains(devs, want) {
			t.Errorf("missing device %q in %s", want, devs)
		}
	}
	if nd := argAfter(a, "-netdev"); len(nd) != 1 || nd[0] != "tap,id=net0,ifname=gt1-0,script=no,downscript=no" {
		t.Errorf("-netdev %v", nd)
	}
	// Sockets live in the VM directory; commas in paths are escaped for QEMU.
	ch := strings.Join(argAfter(a, "-chardev"), " ")
	if !strings.Contains(ch, "path=/var/lib/grow/vms/web-1/qmp.sock,server=on,wait=off") ||
		!strings.Contains(ch, "logfile=/var/lib/grow/vms/web-1/console.log") {
		t.Errorf("-chardev %s", ch)
	}

	// KVM guests get exactly their plan's memory; TCG guests 8 KiB less (see memArg).
	kc := c
	kc.Accel = "kvm"
	ka, _ := kc.Args()
	if got := argAfter(ka, "-m"); len(got) != 1 || got[0] != "512M,slots=8,maxmem=2048M" {
		t.Errorf("kvm -m %v", got)
	}
	if got := argAfter(ka, "-append"); len(got) != 1 || got[0] != "console=ttyS0 memhp_default_state=online" {
		t.Errorf("kvm -append %v", got)
	}

	c.Incoming = true
	a2, _ := c.Args()
	if got := argAfter(a2, "-incoming"); len(got) != 1 || got[0] != "defer" {
		t.Errorf("incoming: %v", got)
	}
	// Source and destination of a migration get the same devices in the same order.
	strip := func(a []string) string {
		var out []string
		for i := 0; i < len(a); i++ {
			if a[i] == "-incoming" || a[i] == "-accel" {
				i++
				continue
			}
			out = append(out, a[i])
		}
		return strings.Join(out, " ")
	}
	if strip(a) != strip(a2) {
		t.Errorf("incoming command line differs from the source's:\n%s\n%s", strip(a), strip(a2))
	}
}

func TestArgsRefusesInconsistentConfig(t *testing.T) {
	c := Config{Spec: testSpec(), Dir: "/d", Accel: "tcg"}
	if _, err := c.Args(); err == nil {
		t.Error("accepted a NIC without a tap")
	}
	c.Taps = []string{"t0"}
	c.Accel = "hvf"
	if _, err := c.Args(); err == nil {
		t.Error("accepted an unknown accelerator")
	}
}

func TestCommaEscaping(t *testing.T) {
	if got := optValue("a,b,,c"); got != "a,,b,,,,c" {
		t.Errorf("optValue = %q", got)
	}
}

func TestCPUHasVirt(t *testing.T) {
	for in, want := range map[string]bool{
		"processor\t: 0\nflags\t\t: fpu vme vmx sse\n": true,
		"flags\t\t: fpu svm\n":                         true,
		"flags\t\t: fpu sse4_2 hypervisor\n":           false,
		"vmx appears elsewhere\nflags : fpu\n":         false,
		"":                                             false,
	} {
		if got := cpuHasVirt(in); got != want {
			t.Errorf("cpuHasVirt(%q) = %v, want %v", in, got, want)
		}
	}
}
