package nbd

import (
	"bytes"
	"crypto/rand"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestNbdinfoCan checks every capability nbdinfo asks about, on the unix socket and TCP.
func TestNbdinfoCan(t *testing.T) {
	needTool(t, "nbdinfo")
	ex := newMemExports()
	ex.add("disk", "a disk", newMemExport(4<<20))
	ro := ex.add("image", "a gold master", newMemExport(4<<20))
	ro.readOnly = true
	s := startServer(t, ex, nil)

	caps := []string{"flush", "fua", "trim", "zero", "fast-zero", "multi-conn", "structured-reply", "cache", "df", "write", "read"}
	for _, uri := range []string{s.unixURI("disk"), s.tcpURI("disk")} {
		for _, c := range caps {
			if out, err := runErr("nbdinfo", "--can", c, uri); err != nil {
				t.Errorf("nbdinfo --can %s %s: %v %s", c, uri, err, out)
			}
		}
		if out, err := runErr("nbdinfo", "--is", "read-only", uri); err == nil {
			t.Errorf("writable export reported read-only: %s", out)
		}
	}
	// A read-only export says so and offers no write-type commands.
	if out, err := runErr("nbdinfo", "--is", "read-only", s.unixURI("image")); err != nil {
		t.Errorf("read-only export not reported read-only: %v %s", err, out)
	}
	for _, c := range []string{"write", "trim", "zero", "fua"} {
		if _, err := runErr("nbdinfo", "--can", c, s.unixURI("image")); err == nil {
			t.Errorf("read-only export claims --can %s", c)
		}
	}
	for _, c := range []string{"flush", "cache", "multi-conn"} {
		if out, err := runErr("nbdinfo", "--can", c, s.unixURI("image")); err != nil {
			t.Errorf("read-only export: nbdinfo --can %s: %v %s", c, err, out)
		}
	}
	// The full JSON description carries the block sizes and the size.
	var info struct {
		Exports []struct {
			Name        string   `json:"export-name"`
			Description string   `json:"description"`
			Size        int64    `json:"export-size"`
			MinBlock    int64    `json:"block_size_minimum"`
			PrefBlock   int64    `json:"block_size_preferred"`
			MaxBlock    int64    `json:"block_size_maximum"`
			Contexts    []string `json:"contexts"`
		} `json:"exports"`
	}
	out := run(t, "nbdinfo", "--json", s.tcpURI("disk"))
	if err := json.Unmarshal([]byte(out), &info); err != nil {
		t.Fatalf("nbdinfo --json: %v\n%s", err, out)
	}
	if len(info.Exports) != 1 {
		t.Fatalf("nbdinfo --json: %s", out)
	}
	e := info.Exports[0]
	if e.Name != "disk" || e.Description != "a disk" || e.Size != 4<<20 || e.MinBlock != 1 || e.PrefBlock != 4096 || e.MaxBlock != MaxPayload {
		t.Errorf("nbdinfo --json gave %+v\n%s", e, out)
	}
	if strings.Join(e.Contexts, ",") != baseAllocation {
		t.Errorf("contexts %v, want only %s", e.Contexts, baseAllocation)
	}
	// An unknown export is refused without hurting the server.
	if out, err := runErr("nbdinfo", "--size", s.unixURI("nope")); err == nil {
		t.Errorf("unknown export accepted: %s", out)
	}
	if out := strings.TrimSpace(run(t, "nbdinfo", "--size", s.unixURI("disk"))); out != "4194304" {
		t.Errorf("size %q", out)
	}
}

// TestNbdinfoList checks NBD_OPT_LIST with names and descriptions.
func TestNbdinfoList(t *testing.T) {
	needTool(t, "nbdinfo")
	ex := newMemExports()
	ex.add("vm-1", "web server disk", newMemExport(1<<20))
	ex.add("vm-2", "", newMemExport(2<<20))
	ex.add("debian-12", "gold master", newMemExport(3<<20))
	s := startServer(t, ex, nil)
	var list struct {
		Exports []struct {
			Name        string `json:"export-name"`
			Description string `json:"description"`
			Size        int64  `json:"export-size"`
		} `json:"exports"`
	}
	out := run(t, "nbdinfo", "--list", "--json", s.unixURI(""))
	if err := json.Unmarshal([]byte(out), &list); err != nil {
		t.Fatalf("nbdinfo --list --json: %v\n%s", err, out)
	}
	got := map[string]string{}
	for _, e := range list.Exports {
		got[e.Name] = e.Description
	}
	want := map[string]string{"vm-1": "web server disk", "vm-2": "", "debian-12": "gold master"}
	if len(got) != len(want) {
		t.Fatalf("listed %v, want %v", got, want)
	}
	for n, d := range want {
		if g, ok := got[n]; !ok || g != d {
			t.Errorf("export %q: description %q (listed %v), want %q", n, g, ok, d)
		}
	}
}

// mapEntry is one line of nbdinfo --map --json.
type mapEntry struct {
	Offset int64  `json:"offset"`
	Length int64  `json:"length"`
	Type   int    `json:"type"`
	Desc   string `json:"description"`
}

// TestNbdinfoMap checks that block status matches the export's thin layout.
func TestNbdinfoMap(t *testing.T) {
	needTool(t, "nbdinfo")
	ex := newMemExports()
	m := ex.add("thin", "", newMemExport(16*memCluster))
	// Layout: clusters 0-1 data, 2-4 hole, 5 allocated zeroes, 6 data, 7-15 hole.
	data := bytes.Repeat([]byte{0x5a}, 2*memCluster)
	m.WriteAt(data, 0, false)
	m.WriteZeroes(5*memCluster, memCluster, ZeroFlags{NoHole: true})
	m.WriteAt(data[:memCluster], 6*memCluster, false)
	s := startServer(t, ex, nil)
	want := []mapEntry{
		{0, 2 * memCluster, 0, "data"},
		{2 * memCluster, 3 * memCluster, 3, "hole,zero"},
		{5 * memCluster, memCluster, 2, "zero"},
		{6 * memCluster, memCluster, 0, "data"},
		{7 * memCluster, 9 * memCluster, 3, "hole,zero"},
	}
	for _, uri := range []string{s.unixURI("thin"), s.tcpURI("thin")} {
		var got []mapEntry
		out := run(t, "nbdinfo", "--map", "--json", uri)
		if err := json.Unmarshal([]byte(out), &got); err != nil {
			t.Fatalf("nbdinfo --map --json: %v\n%s", err, out)
		}
		if len(got) != len(want) {
			t.Fatalf("map %+v, want %+v", got, want)
		}
		for i := range want {
			if got[i] != want[i] {
				t.Errorf("extent %d: %+v, want %+v", i, got[i], want[i])
			}
		}
	}
	// nbdinfo --map --totals adds the hole/data split up.
	out := run(t, "nbdinfo", "--map", "--totals", s.unixURI("thin"))
	if !strings.Contains(out, "hole,zero") || !strings.Contains(out, "data") {
		t.Errorf("--totals output: %s", out)
	}
}

// randomImage writes size bytes of random data with some zero runs to a file.
func randomImage(t *testing.T, dir string, size int) (string, []byte) {
	t.Helper()
	b := make([]byte, size)
	rand.Read(b)
	// Zero runs of various sizes and alignments so copying tools see holes.
	clear(b[size/8 : size/8+3*memCluster])
	clear(b[size/2+4095 : size/2+4095+200000])
	clear(b[size-memCluster:])
	p := filepath.Join(dir, "in.raw")
	if err := os.WriteFile(p, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return p, b
}

func compareFile(t *testing.T, path string, want []byte) {
	t.Helper()
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != len(want) {
		t.Fatalf("%s has %d bytes, want %d", path, len(got), len(want))
	}
	if !bytes.Equal(got, want) {
		for i := range got {
			if got[i] != want[i] {
				t.Fatalf("%s differs at byte %d", path, i)
			}
		}
	}
}

// TestCopyRoundTrip copies random data in and out with qemu-img and nbdcopy.
func TestCopyRoundTrip(t *testing.T) {
	needTool(t, "qemu-img", "nbdcopy")
	const size = 24 << 20
	dir := t.TempDir()
	in, want := randomImage(t, dir, size)
	ex := newMemExports()
	a := ex.add("a", "", newMemExport(size))
	ex.add("b", "", newMemExport(size))
	s := startServer(t, ex, nil)

	// qemu-img in over TCP, nbdcopy out over the unix socket.
	run(t, "qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", in, s.tcpURI("a"))
	if !bytes.Equal(a.content(0, a.Size()), want) {
		t.Fatal("export content differs from the source after qemu-img convert")
	}
	run(t, "nbdcopy", s.unixURI("a"), filepath.Join(dir, "out1.raw"))
	compareFile(t, filepath.Join(dir, "out1.raw"), want)

	// nbdcopy in over the unix socket, qemu-img out over TCP.
	run(t, "nbdcopy", "--requests=32", in, s.unixURI("b"))
	run(t, "qemu-img", "convert", "-f", "raw", "-O", "raw", s.tcpURI("b"), filepath.Join(dir, "out2.raw"))
	compareFile(t, filepath.Join(dir, "out2.raw"), want)

	// Export to export, and qemu-img compare of the results.
	run(t, "nbdcopy", "--connections=4", s.unixURI("a"), s.tcpURI("b"))
	run(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", in, s.tcpURI("b"))
	run(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", s.unixURI("a"), s.tcpURI("b"))
}

// TestQemuIO writes and verifies patterns with qemu-io, including zeroes and discards.
func TestQemuIO(t *testing.T) {
	needTool(t, "qemu-io")
	ex := newMemExports()
	m := ex.add("disk", "", newMemExport(8<<20))
	s := startServer(t, ex, nil)
	for _, uri := range []string{s.unixURI("disk"), s.tcpURI("disk")} {
		out := run(t, "qemu-io", "-f", "raw", uri,
			"-c", "write -P 0xab 0 64k",
			"-c", "read -P 0xab 0 64k",
			"-c", "write -P 0x11 1000 3000",
			"-c", "read -P 0x11 1000 3000",
			"-c", "write -f -P 0x22 1m 1m",
			"-c", "read -P 0x22 1m 1m",
			"-c", "write -z 1m 128k",
			"-c", "read -P 0 1m 128k",
			"-c", "read -P 0x22 1152k 896k",
			"-c", "discard 4m 1m",
			"-c", "read -P 0 4m 1m",
			"-c", "aio_write -P 0x33 2m 64k",
			"-c", "aio_write -P 0x44 3m 64k",
			"-c", "aio_flush",
			"-c", "read -P 0x33 2m 64k",
			"-c", "read -P 0x44 3m 64k",
			"-c", "flush")
		if strings.Contains(out, "Pattern verification failed") || strings.Contains(out, "failed") {
			t.Fatalf("qemu-io against %s:\n%s", uri, out)
		}
	}
	if m.flushes.Load() == 0 || m.fuas.Load() == 0 || m.zeroes.Load() == 0 || m.trims.Load() == 0 {
		t.Errorf("export saw flushes=%d fuas=%d zeroes=%d trims=%d", m.flushes.Load(), m.fuas.Load(), m.zeroes.Load(), m.trims.Load())
	}
	// A read-only export refuses writes with EPERM.
	ro := newMemExport(1 << 20)
	ro.readOnly = true
	ex.add("ro", "", ro)
	out, _ := runErr("qemu-io", "-f", "raw", "-r", s.unixURI("ro"), "-c", "read -P 0 0 64k")
	if strings.Contains(out, "failed") {
		t.Fatalf("qemu-io read of read-only export: %s", out)
	}
}
