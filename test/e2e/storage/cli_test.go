package storage

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/growserver/grow/internal/storage/adminclient"
)

// listVolumes runs `volume list --output json`.
func (c *ctl) listVolumes() map[string]adminclient.Volume {
	c.t.Helper()
	var vols []adminclient.Volume
	if err := json.Unmarshal([]byte(c.mustCLI("volume", "list", "--output", "json")), &vols); err != nil {
		c.t.Fatalf("volume list --output json: %v", err)
	}
	m := make(map[string]adminclient.Volume, len(vols))
	for _, v := range vols {
		m[v.Name] = v
	}
	return m
}

// wantCode fails unless r exited with code and said something containing msg.
func wantCode(t *testing.T, what string, r cliResult, code int, msg string) {
	t.Helper()
	if r.Code != code {
		t.Errorf("%s: exit %d, want %d\nstdout: %s\nstderr: %s", what, r.Code, code, r.Stdout, r.Stderr)
		return
	}
	if msg != "" && !strings.Contains(strings.ToLower(r.Stderr+r.Stdout), strings.ToLower(msg)) {
		t.Errorf("%s: the error does not say %q:\n%s%s", what, msg, r.Stdout, r.Stderr)
	}
}

// TestCLIVolumeLifecycle is the operator's flow: images, clones, snapshots, resize, delete.
func TestCLIVolumeLifecycle(t *testing.T) {
	needTools(t, "qemu-io", "qemu-img", "nbdinfo")
	c := startCtl(t)
	dir := t.TempDir()

	// A raw image and a qcow2 image.
	raw := randomFile(t, dir, "gold.raw", 8<<20, 1)
	out := c.mustCLI("image", "import", "gold", raw)
	if !strings.Contains(out, "Imported gold") {
		t.Errorf("image import said: %s", out)
	}
	qcow := filepath.Join(dir, "gold.qcow2")
	mustRun(t, "qemu-img", "create", "-q", "-f", "qcow2", qcow, "64M")
	mustRun(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0x77 1M 1M", "-c", "write -P 0x78 60M 64k", qcow)
	c.mustCLI("image", "import", "goldq", qcow)
	mustRun(t, "qemu-io", "-f", "raw", "-r", "-c", "read -P 0x77 1M 1M", "-c", "read -P 0x78 60M 64k", "-c", "read -P 0 0 1M", "-c", "read -P 0 2M 58M", c.uri("goldq"))
	mustRun(t, "qemu-img", "compare", "-f", "raw", "-F", "qcow2", c.qemuJSON("goldq"), qcow)

	c.mustCLI("volume", "create", "vm1", "--size", "10GiB")
	c.mustCLI("volume", "clone", "gold", "vm2")
	c.mustCLI("volume", "clone", "goldq", "vm3")
	vols := c.listVolumes()
	for name, want := range map[string]adminclient.Volume{
		"gold":  {Kind: "image", Size: 8 << 20, ReadOnly: true, Children: 1},
		"goldq": {Kind: "image", Size: 64 << 20, ReadOnly: true, Children: 1},
		"vm1":   {Kind: "volume", Size: 10 << 30},
		"vm2":   {Kind: "volume", Size: 8 << 20, Parent: "gold"},
		"vm3":   {Kind: "volume", Size: 64 << 20, Parent: "goldq"},
	} {
		got, ok := vols[name]
		if !ok {
			t.Errorf("volume list lacks %s: %v", name, vols)
			continue
		}
		if got.Kind != want.Kind || got.Size != want.Size || got.ReadOnly != want.ReadOnly || got.Parent != want.Parent || got.Children != want.Children {
			t.Errorf("%s: got %+v, want %+v", name, got, want)
		}
	}
	table := c.mustCLI("volume", "list")
	for _, s := range []string{"NAME", "gold", "vm1", "10GiB", "image"} {
		if !strings.Contains(table, s) {
			t.Errorf("volume list table lacks %q:\n%s", s, table)
		}
	}

	// The clone reads the image, and writes to it never reach the image.
	mustRun(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", raw, c.qemuJSON("vm2"))
	mustRun(t, "qemu-io", "-f", "raw", "-c", "write -P 0xee 0 1M", "-c", "flush", c.uri("vm2"))
	mustRun(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", raw, c.qemuJSON("gold"))

	// Snapshot, change, and the snapshot keeps the old content.
	c.mustCLI("volume", "snapshot", "vm2", "before")
	mustRun(t, "qemu-io", "-f", "raw", "-c", "write -P 0xdd 0 1M", "-c", "flush", c.uri("vm2"))
	mustRun(t, "qemu-io", "-f", "raw", "-r", "-c", "read -P 0xee 0 1M", c.uri("vm2@before"))
	mustRun(t, "qemu-io", "-f", "raw", "-r", "-c", "read -P 0xdd 0 1M", c.uri("vm2"))
	c.mustCLI("volume", "clone", "vm2@before", "vm2-restore")
	mustRun(t, "qemu-io", "-f", "raw", "-r", "-c", "read -P 0xee 0 1M", c.uri("vm2-restore"))

	// Resize grows the volume as seen over NBD; a client connected meanwhile keeps working.
	before, err := dialNBD("unix", c.Socket, "vm1")
	if err != nil {
		t.Fatal(err)
	}
	r0 := c.cli("volume", "resize", "vm1", "--size", "20GiB")
	t.Logf("resize with a client connected: exit %d %s", r0.Code, strings.TrimSpace(r0.Stderr))
	if r0.Code != 0 && r0.Code != 4 {
		t.Errorf("resize with a client connected: exit %d, want success or a conflict\n%s", r0.Code, r0.Stderr)
	}
	if err := before.WriteAt(make([]byte, 4096), 0, true); err != nil {
		t.Errorf("a client connected across a resize: %v", err)
	}
	before.Close()
	c.mustCLI("volume", "resize", "vm1", "--size", "20GiB")
	if v := c.listVolumes()["vm1"]; v.Size != 20<<30 {
		t.Errorf("after resize vm1 has size %d", v.Size)
	}
	if out := mustRun(t, "nbdinfo", "--size", c.uri("vm1")); strings.TrimSpace(out) != "21474836480" {
		t.Errorf("nbdinfo --size after resize: %s", out)
	}

	// A volume in use by an NBD client (a running VM) cannot be deleted under it.
	busy, err := dialNBD("unix", c.Socket, "vm1")
	if err != nil {
		t.Fatal(err)
	}
	wantCode(t, "delete of a volume open over NBD", c.cli("volume", "delete", "vm1"), 4, "")
	if err := busy.ReadAt(make([]byte, 4096), 0); err != nil {
		t.Errorf("the client of a volume whose delete was refused: %v", err)
	}
	busy.Close()

	// Deleting an image with clones is refused and changes nothing.
	r := c.cli("volume", "delete", "gold")
	wantCode(t, "delete of an image with clones", r, 4, "")
	if _, ok := c.listVolumes()["gold"]; !ok {
		t.Fatal("a refused delete removed the image")
	}
	// Deleting the clone leaves the image intact, then the image can go.
	c.mustCLI("volume", "delete", "vm2-restore")
	wantCode(t, "delete of a volume with a snapshot", c.cli("volume", "delete", "vm2"), 4, "")
	c.mustCLI("volume", "delete", "vm2@before")
	c.mustCLI("volume", "delete", "vm2")
	mustRun(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", raw, c.qemuJSON("gold"))
	c.mustCLI("volume", "delete", "gold")
	wantCode(t, "delete of a deleted volume", c.cli("volume", "delete", "gold"), 3, "")
	if out := c.mustCLI("check"); !strings.Contains(out, "OK") {
		t.Errorf("check after the lifecycle: %s", out)
	}
	var rep adminclient.CheckReport
	if err := json.Unmarshal([]byte(c.mustCLI("check", "--output", "json")), &rep); err != nil || !rep.OK {
		t.Errorf("check --output json: %v %+v", err, rep)
	}
}

// TestCLIBadInput checks that bad input gets a clear error, the right exit code, and changes nothing.
func TestCLIBadInput(t *testing.T) {
	needTools(t)
	c := startCtl(t)
	c.mustCLI("volume", "create", "keep", "--size", "1GiB")
	before := c.mustCLI("volume", "list", "--output", "json")

	wantCode(t, "bad size", c.cli("volume", "create", "x1", "--size", "ten"), 2, "invalid")
	wantCode(t, "negative size", c.cli("volume", "create", "x2", "--size", "-1GiB"), 2, "")
	wantCode(t, "zero size", c.cli("volume", "create", "x3", "--size", "0"), 2, "")
	wantCode(t, "missing size", c.cli("volume", "create", "x4"), 2, "--size")
	wantCode(t, "unaligned size", c.cli("volume", "create", "x5", "--size", "1000"), 2, "512")
	wantCode(t, "bad name", c.cli("volume", "create", "Bad/Name", "--size", "1GiB"), 2, "name")
	wantCode(t, "bad name (space)", c.cli("volume", "create", "a b", "--size", "1GiB"), 2, `name "a b"`)
	wantCode(t, "odd name in a URL path", c.cli("volume", "resize", "a b/c", "--size", "2GiB"), 3, `"a b/c"`)
	okImg := randomFile(t, t.TempDir(), "ok.raw", 1<<20, 9)
	wantCode(t, "bad image name", c.cli("image", "import", "Bad Name", okImg), 2, `name "Bad Name"`)
	wantCode(t, "existing name", c.cli("volume", "create", "keep", "--size", "1GiB"), 4, "exist")
	wantCode(t, "missing image file", c.cli("image", "import", "img", filepath.Join(t.TempDir(), "nope.raw")), 2, "no such file")
	empty := filepath.Join(t.TempDir(), "empty.raw")
	if err := os.WriteFile(empty, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	wantCode(t, "empty image file", c.cli("image", "import", "img", empty), 2, "empty")
	bogus := filepath.Join(t.TempDir(), "bogus.qcow2")
	if err := os.WriteFile(bogus, []byte("QFI\xfbthis is not really a qcow2 image"), 0o600); err != nil {
		t.Fatal(err)
	}
	wantCode(t, "corrupt qcow2", c.cli("image", "import", "img", bogus), 2, "qcow2")
	wantCode(t, "clone of a missing image", c.cli("volume", "clone", "nope", "x6"), 3, "")
	wantCode(t, "clone of a writable volume", c.cli("volume", "clone", "keep", "x7"), 2, "snapshot")
	wantCode(t, "resize of a missing volume", c.cli("volume", "resize", "nope", "--size", "2GiB"), 3, "")
	wantCode(t, "resize with a bad size", c.cli("volume", "resize", "keep", "--size", "2XB"), 2, "")
	wantCode(t, "snapshot with a bad name", c.cli("volume", "snapshot", "keep", "Bad@Snap"), 2, "")
	wantCode(t, "too few arguments", c.cli("volume", "clone", "keep"), 2, "usage")
	wantCode(t, "unknown flag", c.cli("volume", "list", "--colour"), 2, "unknown flag")
	wantCode(t, "bad output format", c.cli("volume", "list", "--output", "yaml"), 2, "output")
	wantCode(t, "replace of an unknown disk", c.cli("disk", "replace", "/nonexistent/disk", filepath.Join(t.TempDir(), "new.img")), 3, "")

	// Only the clone of "keep" (if cloning a writable volume is allowed) may have appeared.
	after := c.listVolumes()
	delete(after, "x7")
	var b []adminclient.Volume
	_ = json.Unmarshal([]byte(before), &b)
	if len(after) != len(b) {
		t.Errorf("bad input changed the volume list: before %s, after %v", before, after)
	}
	if _, err := os.Stat(filepath.Join(c.dir, "tmp")); err == nil {
		entries, _ := os.ReadDir(filepath.Join(c.dir, "tmp"))
		if len(entries) != 0 {
			t.Errorf("a failed import left files behind in DATA/tmp: %v", entries)
		}
	}
}

// TestAuth checks that the admin API refuses missing and wrong tokens, /metrics included.
func TestAuth(t *testing.T) {
	needTools(t)
	c := startCtl(t)
	wantCode(t, "no token", c.cliWithToken("", "volume", "list"), 5, "token")
	wantCode(t, "wrong token", c.cliWithToken("not-the-token", "volume", "list"), 5, "token")
	wantCode(t, "wrong token on create", c.cliWithToken("not-the-token", "volume", "create", "x", "--size", "1GiB"), 5, "")
	if _, ok := c.listVolumes()["x"]; ok {
		t.Error("a refused create made a volume")
	}
	// GROW_TOKEN works.
	r := runEnv(t, []string{"GROW_TOKEN=" + c.Token}, c.bin, "storage", "--controller", c.API, "--token-file", "/nonexistent", "volume", "list")
	if r.Code != 0 {
		t.Errorf("GROW_TOKEN was not used: exit %d %s", r.Code, r.Stderr)
	}
	// Raw HTTP: every endpoint, /metrics included, wants the token; errors are JSON.
	for _, path := range []string{"/v1/volumes", "/v1/pool", "/v1/stats", "/metrics", "/v1/nothing"} {
		status, body := httpGet(t, c.API+path, "")
		if status != 401 || !strings.Contains(body, `"code":"unauthorized"`) {
			t.Errorf("GET %s without token: %d %s", path, status, body)
		}
	}
	status, body := httpGet(t, c.API+"/metrics", c.Token)
	if status != 200 || !strings.Contains(body, "grow_storage_capacity_bytes") || !strings.Contains(body, "grow_storage_nbd_requests_total") {
		t.Errorf("GET /metrics with the token: %d\n%.2000s", status, body)
	}
	status, body = httpGet(t, c.API+"/v1/volumes/nope", c.Token)
	var e adminclient.Error
	if status != 404 || json.Unmarshal([]byte(body), &e) != nil || e.Code != "not_found" || e.Message == "" {
		t.Errorf("GET of a missing volume: %d %s", status, body)
	}
	// The token never reaches the log.
	if strings.Contains(c.log(), c.Token) {
		t.Error("the admin token appears in the controller log")
	}
}

// TestCloneIsConstantTime clones a 100 MiB and a 10 GiB image, both well under 100 ms.
func TestCloneIsConstantTime(t *testing.T) {
	needTools(t, "qemu-img", "qemu-io")
	c := startCtl(t)
	dir := t.TempDir()
	small := randomFile(t, dir, "small.raw", 100<<20, 3)
	c.mustCLI("image", "import", "img100m", small)
	big := filepath.Join(dir, "big.qcow2")
	mustRun(t, "qemu-img", "create", "-q", "-f", "qcow2", big, "10G")
	// Spread 64 MiB of data over the 10 GiB so the image has a real mapping.
	var writes []string
	for i := 0; i < 64; i++ {
		writes = append(writes, "write -P "+itoa(i+1)+" "+itoa(i*160)+"M 1M")
	}
	mustRun(t, "qemu-io", append([]string{"-f", "qcow2"}, append(cmdArgs(writes), big)...)...)
	c.mustCLI("image", "import", "img10g", big)

	cl := c.client()
	ctx := context.Background()
	// The best of three, so that a busy shared machine does not decide the result.
	for _, img := range []string{"img100m", "img10g"} {
		best, bestRTT := time.Hour, time.Hour
		for i := 0; i < 3; i++ {
			name := img + "-clone-" + itoa(i)
			start := time.Now()
			res, err := cl.CloneVolume(ctx, img, name)
			rtt := time.Since(start)
			if err != nil {
				t.Fatalf("clone %s: %v", img, err)
			}
			best, bestRTT = min(best, time.Duration(res.Nanoseconds)), min(bestRTT, rtt)
		}
		t.Logf("clone of %s: %s in the controller, %s round trip (best of 3)", img, best, bestRTT)
		if best >= 50*time.Millisecond || bestRTT >= 100*time.Millisecond {
			t.Errorf("clone of %s took %s (round trip %s), want well under 100 ms", img, best, bestRTT)
		}
	}
	mustRun(t, "qemu-io", "-f", "raw", "-r", "-c", "read -P 1 0 1M", "-c", "read -P 64 10080M 1M", "-c", "read -P 0 1M 159M", c.uri("img10g-clone-2"))
}

// TestThinProvisioning checks that a 100 GiB volume costs almost nothing and that TRIM gives space back.
func TestThinProvisioning(t *testing.T) {
	needTools(t, "qemu-io")
	c := startCtl(t, "--pool-size", "200GiB")
	disk := filepath.Join(c.dir, "disk0.img")
	cl := c.client()
	ctx := context.Background()
	s0, err := cl.Stats(ctx)
	if err != nil {
		t.Fatal(err)
	}
	alloc0 := allocatedBytes(t, disk)
	c.mustCLI("volume", "create", "huge", "--size", "100GiB")
	s1, _ := cl.Stats(ctx)
	if d := s1.Used - s0.Used; d > 1<<20 {
		t.Errorf("a new 100 GiB volume used %d bytes of the pool", d)
	}
	if d := allocatedBytes(t, disk) - alloc0; d > 4<<20 {
		t.Errorf("a new 100 GiB volume took %d bytes on disk", d)
	}
	// 64 MiB written at both ends and in the middle.
	mustRun(t, "qemu-io", "-f", "raw", "-c", "write -P 1 0 32M", "-c", "write -P 2 50G 16M", "-c", "write -P 3 99G 16M", "-c", "flush", c.uri("huge"))
	s2, _ := cl.Stats(ctx)
	if d := s2.Used - s1.Used; d < 64<<20 || d > 66<<20 {
		t.Errorf("after writing 64 MiB the pool use grew by %d bytes", d)
	}
	// TRIM and WRITE_ZEROES give the space back.
	mustRun(t, "qemu-io", "-f", "raw", "-c", "discard 0 32M", "-c", "write -z -u 50G 16M", "-c", "flush", c.uri("huge"))
	waitFor(t, 15*time.Second, "trimmed space to come back", func() bool {
		s3, err := cl.Stats(ctx)
		return err == nil && s3.Used-s1.Used <= 17<<20
	})
	mustRun(t, "qemu-io", "-f", "raw", "-r", "-c", "read -P 0 0 32M", "-c", "read -P 0 50G 16M", "-c", "read -P 3 99G 16M", c.uri("huge"))
	s4, _ := cl.Stats(ctx)
	if s4.TrimOps == 0 {
		t.Errorf("stats count no TRIM: %+v", s4)
	}
	t.Logf("pool use: empty %d, +100GiB volume %d, +64MiB data %d, after trim %d; disk file %d bytes allocated", s0.Used, s1.Used, s2.Used, s4.Used, allocatedBytes(t, disk))
}

func itoa(i int) string { return strconv.Itoa(i) }

// TestFailedImportLeavesNothing cuts an upload short and checks that no image, no
// partial volume and no temporary file is left, and that the name can be used again.
func TestFailedImportLeavesNothing(t *testing.T) {
	needTools(t)
	c := startCtl(t)
	for _, format := range []string{"raw", "qcow2"} {
		name := "cut-" + format
		pr, pw := io.Pipe()
		go func() {
			// Promise 64 MiB, send 3 MiB, then break the connection.
			_, _ = pw.Write(bytes.Repeat([]byte{0xaa}, 3<<20))
			pw.CloseWithError(errors.New("client went away"))
		}()
		_, err := c.client().ImportImage(context.Background(), name, pr, 64<<20, format, nil)
		if err == nil {
			t.Fatalf("%s: an import cut short succeeded", format)
		}
		waitFor(t, 10*time.Second, "the failed import to be cleaned up", func() bool {
			_, exists := c.listVolumes()[name]
			entries, _ := os.ReadDir(filepath.Join(c.dir, "tmp"))
			return !exists && len(entries) == 0
		})
	}
	stats, err := c.client().Stats(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if stats.Used != 0 {
		t.Errorf("failed imports left %d bytes allocated", stats.Used)
	}
	// The name is free again.
	img := randomFile(t, t.TempDir(), "ok.raw", 2<<20, 5)
	c.mustCLI("image", "import", "cut-raw", img)
	if out := c.mustCLI("check"); !strings.Contains(out, "OK") {
		t.Errorf("check: %s", out)
	}
}

// TestGracefulShutdownFlushes writes without FLUSH, stops the controller with SIGTERM
// and checks the data is there after the restart.
func TestGracefulShutdownFlushes(t *testing.T) {
	needTools(t)
	c := startCtl(t)
	c.mustCLI("volume", "create", "soft", "--size", "16MiB")
	conn, err := dialNBD("unix", c.Socket, "soft")
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, crashBlock)
	for slot := 0; slot < 16<<20/crashBlock; slot += 7 {
		blockFor(buf, slot, uint64(slot+1))
		if err := conn.WriteAt(buf, int64(slot)*crashBlock, false); err != nil {
			t.Fatal(err)
		}
	}
	// A second client stays connected (as a running VM would): SIGTERM must not wait for it.
	idle, err := dialNBD("unix", c.Socket, "soft")
	if err != nil {
		t.Fatal(err)
	}
	defer idle.c.Close()
	conn.Close()
	start := time.Now()
	c.stop()
	if took := time.Since(start); took > 10*time.Second {
		t.Errorf("SIGTERM took %s with an idle client connected", took)
	}
	if !strings.Contains(c.log(), "Storage controller stopped cleanly") {
		t.Errorf("no clean stop in the log:\n%s", c.log())
	}
	c.restart()
	conn, err = dialNBD("unix", c.Socket, "soft")
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	for slot := 0; slot < 16<<20/crashBlock; slot++ {
		if err := conn.ReadAt(buf, int64(slot)*crashBlock); err != nil {
			t.Fatal(err)
		}
		want := uint64(0)
		if slot%7 == 0 {
			want = uint64(slot + 1)
		}
		if got, ok := seqOf(buf, slot); !ok || got != want {
			t.Fatalf("block %d holds %d (intact %v) after a clean restart, want %d", slot, got, ok, want)
		}
	}
}
