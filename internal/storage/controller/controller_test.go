package controller

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/growserver/grow/internal/storage/adminclient"
	"github.com/growserver/grow/internal/storage/nbd"
)

// startTest opens a controller on a fresh directory (one 256 MiB file disk) and serves it.
func startTest(t *testing.T, dir string) (*Controller, *adminclient.Client) {
	t.Helper()
	c, err := Open(Config{
		DataDir: dir, NBDAddr: "127.0.0.1:0", APIAddr: "127.0.0.1:0",
		PoolSize: 256 << 20, CacheSize: 8 << 20,
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Serve(ctx) }()
	t.Cleanup(func() {
		cancel()
		<-done
	})
	cl, err := adminclient.New("http://"+c.APIAddr(), c.Token())
	if err != nil {
		t.Fatal(err)
	}
	return c, cl
}

func TestAPIVolumeErrors(t *testing.T) {
	_, cl := startTest(t, t.TempDir())
	ctx := context.Background()
	if _, err := cl.CreateVolume(ctx, "v1", 64<<20); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		what   string
		err    error
		status int
		code   string
	}{
		{"duplicate", second(cl.CreateVolume(ctx, "v1", 64<<20)), 409, adminclient.CodeExists},
		{"bad name", second(cl.CreateVolume(ctx, "Bad Name", 64<<20)), 400, adminclient.CodeInvalid},
		{"zero size", second(cl.CreateVolume(ctx, "v2", 0)), 400, adminclient.CodeInvalid},
		{"unaligned size", second(cl.CreateVolume(ctx, "v2", 1000)), 400, adminclient.CodeInvalid},
		{"missing", second(cl.GetVolume(ctx, "nope")), 404, adminclient.CodeNotFound},
		{"clone of a writable volume", second(cl.CloneVolume(ctx, "v1", "v3")), 400, adminclient.CodeInvalid},
		{"resize of a missing volume", second(cl.ResizeVolume(ctx, "nope", 1<<30)), 404, adminclient.CodeNotFound},
		{"delete of a missing volume", cl.DeleteVolume(ctx, "nope"), 404, adminclient.CodeNotFound},
		{"replace of an unknown disk", second(cl.ReplaceDisk(ctx, "/no/such/disk", "/tmp/x")), 404, adminclient.CodeNotFound},
	}
	for _, tc := range cases {
		var ae *adminclient.APIError
		if !errors.As(tc.err, &ae) || ae.Status != tc.status || ae.Code != tc.code || ae.Message == "" {
			t.Errorf("%s: got %v (%+v), want %d %s", tc.what, tc.err, ae, tc.status, tc.code)
		}
	}
	// A snapshot has two dependants here: the volume's new top layer and the clone.
	if _, err := cl.Snapshot(ctx, "v1", "s1"); err != nil {
		t.Fatal(err)
	}
	if _, err := cl.CloneVolume(ctx, "v1@s1", "v4"); err != nil {
		t.Fatal(err)
	}
	if err := cl.DeleteVolume(ctx, "v1@s1"); !adminclient.IsCode(err, adminclient.CodeInUse) {
		t.Errorf("delete of a snapshot with a clone: %v", err)
	}
	v, err := cl.GetVolume(ctx, "v1@s1")
	if err != nil || v.Children != 2 || v.Kind != "snapshot" || !v.ReadOnly {
		t.Errorf("snapshot: %+v %v", v, err)
	}
	rep, err := cl.Check(ctx)
	if err != nil || !rep.OK {
		t.Errorf("check: %+v %v", rep, err)
	}
}

func second[T any](_ T, err error) error { return err }

// TestAPIRejectsBadJSON sends malformed bodies straight over HTTP.
func TestAPIRejectsBadJSON(t *testing.T) {
	c, cl := startTest(t, t.TempDir())
	for _, body := range []string{`{`, `{"name":"x","size":1048576,"extra":1}`, `{"name":"x","size":"big"}`, `{"name":"x","size":1048576} {}`} {
		req, _ := http.NewRequest(http.MethodPost, "http://"+c.APIAddr()+"/v1/volumes", strings.NewReader(body))
		req.Header.Set("Authorization", "Bearer "+c.Token())
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 400 || !bytes.Contains(b, []byte(`"code": "invalid"`)) {
			t.Errorf("body %s: %d %s", body, resp.StatusCode, b)
		}
	}
	if vols, err := cl.ListVolumes(context.Background()); err != nil || len(vols) != 0 {
		t.Errorf("bad bodies created volumes: %v %v", vols, err)
	}
}

// TestExportsMapErrors checks the adapter between volumes and the NBD server.
func TestExportsMapErrors(t *testing.T) {
	c, cl := startTest(t, t.TempDir())
	ctx := context.Background()
	if _, err := c.exports.Open("nope"); !errors.Is(err, nbd.ErrUnknownExport) {
		t.Errorf("open of a missing volume: %v", err)
	}
	if _, err := cl.ImportImage(ctx, "img", bytes.NewReader(bytes.Repeat([]byte{7}, 1<<20)), 1<<20, "raw", nil); err != nil {
		t.Fatal(err)
	}
	img, err := c.exports.Open("img")
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	if !img.ReadOnly() || img.Size() != 1<<20 {
		t.Errorf("image export: read-only %v size %d", img.ReadOnly(), img.Size())
	}
	if err := img.WriteAt(make([]byte, 512), 0, false); !errors.Is(err, nbd.ErrReadOnly) {
		t.Errorf("write to an image: %v", err)
	}
	buf := make([]byte, 4096)
	if err := img.ReadAt(buf, 4096); err != nil || buf[0] != 7 || buf[4095] != 7 {
		t.Errorf("read of an image: %v %d", err, buf[0])
	}
	if err := img.Cache(0, 1<<20); err != nil {
		t.Errorf("cache hint: %v", err)
	}
	ext, err := img.Extents(0, 1<<20)
	if err != nil || len(ext) == 0 || ext[0].Hole || ext[0].Zero {
		t.Errorf("extents of a written image: %+v %v", ext, err)
	}
	// Only one export list entry per volume, and the list names them all.
	names := map[string]bool{}
	for _, e := range c.exports.List() {
		names[e.Name] = true
	}
	if !names["img"] || len(names) != 1 {
		t.Errorf("export list: %v", names)
	}
	st := c.stats()
	if st.OpenExports != 1 || st.Connections != 1 || st.ReadOps == 0 {
		t.Errorf("stats do not count the export: %+v", st)
	}
}

// TestCloseFlushesAndReopens writes without a flush, closes the controller the way
// SIGTERM does, and finds the data after reopening.
func TestCloseFlushesAndReopens(t *testing.T) {
	dir := t.TempDir()
	c, err := Open(Config{DataDir: dir, APIAddr: "127.0.0.1:0", PoolSize: 256 << 20, CacheSize: 8 << 20, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.mgr.Create("v", 16<<20); err != nil {
		t.Fatal(err)
	}
	x, err := c.exports.Open("v")
	if err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte("grow"), 16<<10)
	if err := x.WriteAt(data, 1<<20, false); err != nil {
		t.Fatal(err)
	}
	x.Close()
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if err := c.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	c2, err := Open(Config{DataDir: dir, APIAddr: "127.0.0.1:0", PoolSize: 256 << 20, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatalf("reopen: %v", err)
	}
	defer c2.Close()
	x2, err := c2.exports.Open("v")
	if err != nil {
		t.Fatal(err)
	}
	defer x2.Close()
	got := make([]byte, len(data))
	if err := x2.ReadAt(got, 1<<20); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("data after close and reopen: %v", err)
	}
}

// TestOpenFailuresLeaveNothingOpen makes Open fail late (the API port is taken) and
// checks that a second Open of the same directory works.
func TestOpenFailuresLeaveNothingOpen(t *testing.T) {
	dir := t.TempDir()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	if _, err := Open(Config{DataDir: dir, APIAddr: l.Addr().String(), PoolSize: 64 << 20, Logger: quiet}); err == nil {
		t.Fatal("Open on a busy API port succeeded")
	}
	if _, err := Open(Config{DataDir: dir, APIAddr: "127.0.0.1:0", TLSClientCA: "/x", PoolSize: 64 << 20, Logger: quiet}); err == nil {
		t.Fatal("Open with a client CA but no certificate succeeded")
	}
	c, err := Open(Config{DataDir: dir, APIAddr: "127.0.0.1:0", NBDSocket: filepath.Join(dir, "s.sock"), PoolSize: 64 << 20, Logger: quiet})
	if err != nil {
		t.Fatalf("Open after failed attempts: %v", err)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestSecondControllerOnSameDataRefused starts a second controller on a data directory
// in use: it must fail without disturbing the first (its socket keeps working).
func TestSecondControllerOnSameDataRefused(t *testing.T) {
	dir := t.TempDir()
	c, cl := startTest(t, dir)
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	if _, err := Open(Config{DataDir: dir, APIAddr: "127.0.0.1:0", PoolSize: 64 << 20, Logger: quiet}); err == nil {
		t.Fatal("a second controller opened a data directory in use")
	}
	if _, err := Open(Config{DataDir: dir, APIAddr: "127.0.0.1:0", NBDSocket: "none", PoolSize: 64 << 20, Logger: quiet}); err == nil {
		t.Fatal("a second controller opened the pool of a running one")
	}
	if _, err := cl.ListVolumes(context.Background()); err != nil {
		t.Fatalf("the first controller stopped answering: %v", err)
	}
	conn, err := net.Dial("unix", c.NBDSocket())
	if err != nil {
		t.Fatalf("the first controller's NBD socket is gone: %v", err)
	}
	conn.Close()
}

// TestFailedFirstStartLeavesNoDisks fails a first start (an odd number of disks) and
// checks that the disk files it created are gone again.
func TestFailedFirstStartLeavesNoDisks(t *testing.T) {
	dir := t.TempDir()
	disks := []string{filepath.Join(dir, "a.img"), filepath.Join(dir, "b.img"), filepath.Join(dir, "c.img")}
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	c, err := Open(Config{DataDir: filepath.Join(dir, "data"), APIAddr: "127.0.0.1:0", Disks: disks, PoolSize: 64 << 20, Logger: quiet})
	if err == nil {
		c.Close()
		t.Skip("the pool accepts an odd number of disks")
	}
	for _, d := range disks {
		if _, err := os.Stat(d); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("failed start left %s behind (%v)", d, err)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "data", "pool.json")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("failed start left pool.json behind")
	}
}

// TestAdvertisedNBDAddress checks what the stats tell hosts about reaching NBD.
func TestAdvertisedNBDAddress(t *testing.T) {
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	if _, err := Open(Config{DataDir: t.TempDir(), APIAddr: "127.0.0.1:0", NBDAdvertise: "no-port", PoolSize: 64 << 20, Logger: quiet}); err == nil {
		t.Fatal("an advertised address without a port was accepted")
	}
	c, err := Open(Config{DataDir: t.TempDir(), NBDAddr: "127.0.0.1:0", APIAddr: "127.0.0.1:0", NBDAdvertise: "storage1.example:10809", PoolSize: 64 << 20, Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if got := c.stats().NBDAddress; got != "storage1.example:10809" {
		t.Errorf("stats report NBD at %q", got)
	}
}
