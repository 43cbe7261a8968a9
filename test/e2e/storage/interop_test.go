package storage

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestNBDInfoCan checks that real clients see every capability the controller promises.
func TestNBDInfoCan(t *testing.T) {
	needTools(t, "nbdinfo")
	c := startCtl(t)
	c.mustCLI("volume", "create", "can", "--size", "64MiB")
	for _, uri := range []string{c.uri("can"), c.tcpURI("can")} {
		for _, feature := range []string{"connect", "read", "write", "flush", "fua", "trim", "zero", "fast-zero", "multi-conn", "structured-reply", "cache"} {
			r := run(t, "nbdinfo", "--can", feature, uri)
			if r.Code != 0 {
				t.Errorf("nbdinfo --can %s %s: exit %d (want 0: supported)\n%s", feature, uri, r.Code, r.Stderr)
			}
		}
	}
	// An image is read-only over NBD.
	img := randomFile(t, t.TempDir(), "img.raw", 1<<20, 7)
	c.mustCLI("image", "import", "ro-img", img)
	if r := run(t, "nbdinfo", "--is", "read-only", c.uri("ro-img")); r.Code != 0 {
		t.Errorf("an image must be read-only over NBD: nbdinfo --is read-only exit %d\n%s", r.Code, r.Stderr)
	}
	// A name that is not a volume is refused by the server, not by a crash.
	if r := run(t, "nbdinfo", "--can", "connect", c.uri("no-such-volume")); r.Code == 0 {
		t.Errorf("connecting to a missing export succeeded")
	}
	// Listing shows the volumes.
	out := mustRun(t, "nbdinfo", "--list", "--json", fmt.Sprintf("nbd+unix://?socket=%s", c.Socket))
	if !strings.Contains(out, `"can"`) || !strings.Contains(out, `"ro-img"`) {
		t.Errorf("nbdinfo --list does not show the volumes:\n%s", out)
	}
}

type mapEntry struct {
	Offset int64 `json:"offset"`
	Length int64 `json:"length"`
	Type   int   `json:"type"`
}

// nbdMap returns the base:allocation map of a URI as nbdinfo reports it, with
// adjacent runs of the same type merged.
func nbdMap(t *testing.T, uri string) []mapEntry {
	t.Helper()
	out := mustRun(t, "nbdinfo", "--map", "--json", uri)
	var m []mapEntry
	if err := json.Unmarshal([]byte(out), &m); err != nil {
		t.Fatalf("Failed to parse nbdinfo --map output: %v\n%s", err, out)
	}
	var merged []mapEntry
	for _, e := range m {
		if n := len(merged); n > 0 && merged[n-1].Type == e.Type && merged[n-1].Offset+merged[n-1].Length == e.Offset {
			merged[n-1].Length += e.Length
			continue
		}
		merged = append(merged, e)
	}
	return merged
}

// typeAt returns the map type at byte off.
func typeAt(t *testing.T, m []mapEntry, off int64) int {
	t.Helper()
	for _, e := range m {
		if off >= e.Offset && off < e.Offset+e.Length {
			return e.Type
		}
	}
	t.Fatalf("offset %d is not in the map %v", off, m)
	return -1
}

// TestMapThinLayout writes a known layout and checks that nbdinfo --map reports it,
// on the volume, on a snapshot of it and on a clone of that snapshot.
func TestMapThinLayout(t *testing.T) {
	needTools(t, "nbdinfo", "qemu-io")
	c := startCtl(t)
	c.mustCLI("volume", "create", "thin", "--size", "16MiB")
	const (
		KiB = 1 << 10
		MiB = 1 << 20
	)
	mustRun(t, "qemu-io", "-f", "raw", "-c", "write -P 0xab 0 64k", "-c", "write -P 0x11 1M 128k",
		"-c", "write -P 0x22 4M 256k", "-c", "write -z -u 4M 64k", "-c", "write -P 0x44 6M 128k", "-c", "write -z 6M 64k", "-c", "flush", c.uri("thin"))

	check := func(name string, m []mapEntry) {
		t.Helper()
		const data, hole, zero = 0, 3, 2
		want := []struct {
			off int64
			ok  func(int) bool
			say string
		}{
			{0, func(ty int) bool { return ty == data }, "data"},
			{64 * KiB, func(ty int) bool { return ty == hole }, "hole"},
			{512 * KiB, func(ty int) bool { return ty == hole }, "hole"},
			{1 * MiB, func(ty int) bool { return ty == data }, "data"},
			{1*MiB + 127*KiB, func(ty int) bool { return ty == data }, "data"},
			{1*MiB + 128*KiB, func(ty int) bool { return ty == hole }, "hole"},
			{4 * MiB, func(ty int) bool { return ty&zero != 0 }, "zero"},
			{4*MiB + 64*KiB, func(ty int) bool { return ty == data }, "data"},
			{4*MiB + 256*KiB, func(ty int) bool { return ty == hole }, "hole"},
			// Zeroing with NO_HOLE keeps the cluster allocated: data or allocated zero.
			{6 * MiB, func(ty int) bool { return ty&1 == 0 }, "allocated"},
			{6*MiB + 64*KiB, func(ty int) bool { return ty == data }, "data"},
			{15 * MiB, func(ty int) bool { return ty == hole }, "hole"},
		}
		for _, w := range want {
			if ty := typeAt(t, m, w.off); !w.ok(ty) {
				t.Errorf("%s: at offset %d the map says type %d, want %s; map: %+v", name, w.off, ty, w.say, m)
			}
		}
		var total int64
		for _, e := range m {
			total += e.Length
		}
		if total != 16*MiB {
			t.Errorf("%s: the map covers %d bytes, want %d", name, total, 16*MiB)
		}
	}
	check("volume", nbdMap(t, c.uri("thin")))
	c.mustCLI("volume", "snapshot", "thin", "s1")
	check("snapshot", nbdMap(t, c.uri("thin@s1")))
	c.mustCLI("volume", "clone", "thin@s1", "thin-clone")
	check("clone", nbdMap(t, c.uri("thin-clone")))
	// The volume after its snapshot still shows the same layout through its new top layer.
	check("volume after snapshot", nbdMap(t, c.uri("thin")))

	// A write to the clone shows up in the clone's map only.
	mustRun(t, "qemu-io", "-f", "raw", "-c", "write -P 0x33 8M 64k", "-c", "flush", c.uri("thin-clone"))
	if ty := typeAt(t, nbdMap(t, c.uri("thin-clone")), 8*MiB); ty != 0 {
		t.Errorf("clone: written cluster at 8 MiB has type %d, want data", ty)
	}
	if ty := typeAt(t, nbdMap(t, c.uri("thin@s1")), 8*MiB); ty != 3 {
		t.Errorf("snapshot: cluster at 8 MiB has type %d after a write to the clone, want hole", ty)
	}
	// And the data reads back through the layers.
	mustRun(t, "qemu-io", "-f", "raw", "-c", "read -P 0xab 0 64k", "-c", "read -P 0x11 1M 128k",
		"-c", "read -P 0 4M 64k", "-c", "read -P 0x22 4160k 192k", "-c", "read -P 0 6M 64k", "-c", "read -P 0x44 6208k 64k", "-c", "read -P 0x33 8M 64k", "-c", "read -P 0 9M 1M", c.uri("thin-clone"))
}

// TestCopyInOut copies random data in and out with nbdcopy and qemu-img and compares byte for byte.
func TestCopyInOut(t *testing.T) {
	needTools(t, "nbdcopy", "qemu-img")
	c := startCtl(t)
	dir := t.TempDir()
	const size = 48 << 20
	src := randomFile(t, dir, "src.raw", size, 42)
	c.mustCLI("volume", "create", "copy1", "--size", "48MiB")
	c.mustCLI("volume", "create", "copy2", "--size", "48MiB")

	// nbdcopy in over the unix socket, out over TCP.
	mustRun(t, "nbdcopy", src, c.uri("copy1"))
	out1 := filepath.Join(dir, "out1.raw")
	mustRun(t, "nbdcopy", c.tcpURI("copy1"), out1)
	sameFiles(t, src, out1)

	// qemu-img convert in and out.
	mustRun(t, "qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src, c.qemuJSON("copy2"))
	out2 := filepath.Join(dir, "out2.raw")
	mustRun(t, "qemu-img", "convert", "-f", "raw", "-O", "raw", c.qemuJSON("copy2"), out2)
	sameFiles(t, src, out2)

	// qemu-img compare sees the same content, and a difference when there is one.
	mustRun(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", src, c.qemuJSON("copy1"))
	mustRun(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", c.qemuJSON("copy1"), c.qemuJSON("copy2"))
	mustRun(t, "qemu-io", "-f", "raw", "-c", "write -P 0x5a 7M 4k", c.uri("copy2"))
	if r := run(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", src, c.qemuJSON("copy2")); r.Code != 1 {
		t.Errorf("qemu-img compare after a change: exit %d, want 1 (different)\n%s%s", r.Code, r.Stdout, r.Stderr)
	}

	// The data survives a clean restart.
	c.stop()
	c.restart()
	out3 := filepath.Join(dir, "out3.raw")
	mustRun(t, "nbdcopy", c.uri("copy1"), out3)
	sameFiles(t, src, out3)
	_ = os.Remove(out3)
}

// TestQemuIOPatterns writes patterns of many sizes and alignments with qemu-io and verifies them.
func TestQemuIOPatterns(t *testing.T) {
	needTools(t, "qemu-io")
	c := startCtl(t)
	c.mustCLI("volume", "create", "pat", "--size", "32MiB")
	writes := []string{
		"write -P 0x01 0 512", "write -P 0x02 512 3584", "write -P 0x03 4k 60k",
		"write -P 0x05 100k 300k", "write -P 0x06 1000000 12345",
		"write -P 0x07 16M 4M", "write -z 17M 64k", "write -P 0x08 31M 1M", "discard 20M 1M",
		"aio_write -P 0x09 24M 64k", "aio_write -P 0x0a 25M 64k", "aio_flush",
		"write -f -P 0x0b 26M 8k", "flush",
	}
	mustRun(t, "qemu-io", append([]string{"-f", "raw"}, append(cmdArgs(writes), c.uri("pat"))...)...)
	reads := []string{
		"read -P 0x01 0 512", "read -P 0x02 512 3584", "read -P 0x03 4k 60k",
		"read -P 0x05 100k 300k", "read -P 0x06 1000000 12345",
		"read -P 0x07 16M 1M", "read -P 0 17M 64k", "read -P 0x07 17472k 2880k", "read -P 0x08 31M 1M",
		"read -P 0x09 24M 64k", "read -P 0x0a 25M 64k", "read -P 0x0b 26M 8k", "read -P 0 27M 1M",
	}
	out := mustRun(t, "qemu-io", append([]string{"-f", "raw", "-r"}, append(cmdArgs(reads), c.uri("pat"))...)...)
	if strings.Contains(out, "Pattern verification failed") {
		t.Fatalf("qemu-io pattern verification failed:\n%s", out)
	}
	// A read past the end is an error answered by the server, and the connection survives it.
	r := run(t, "qemu-io", "-f", "raw", "-r", "-c", "read 32767k 2M", "-c", "read -P 0x01 0 512", c.uri("pat"))
	if !strings.Contains(r.Stdout+r.Stderr, "read failed") || strings.Contains(r.Stdout, "Pattern verification failed") {
		t.Errorf("read past the end: want an error then a good read\n%s%s", r.Stdout, r.Stderr)
	}
}

func cmdArgs(cmds []string) []string {
	var out []string
	for _, c := range cmds {
		out = append(out, "-c", c)
	}
	return out
}
