package mirror

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/growserver/grow/internal/storage/dev"
	"github.com/growserver/grow/internal/storage/nbd"
	"github.com/growserver/grow/internal/storage/volume"
)

// handleExport adapts a real volume.Handle to nbd.Export, as the controller does.
type handleExport struct{ h *volume.Handle }

func (x handleExport) Size() int64                                 { return x.h.Size() }
func (x handleExport) ReadOnly() bool                              { return x.h.ReadOnly() }
func (x handleExport) ReadAt(p []byte, off int64) error            { return x.h.ReadAt(p, off) }
func (x handleExport) WriteAt(p []byte, off int64, fua bool) error { return x.h.WriteAt(p, off, fua) }
func (x handleExport) Flush() error                                { return x.h.Flush() }
func (x handleExport) Trim(off, n int64, fua bool) error           { return x.h.Trim(off, n, fua) }
func (x handleExport) WriteZeroes(off, n int64, f nbd.ZeroFlags) error {
	err := x.h.WriteZeroes(off, n, f.NoHole, f.Fast, f.FUA)
	if f.Fast && err != nil {
		return nbd.ErrFastZeroUnsupported
	}
	return err
}
func (x handleExport) Cache(off, n int64) error { return nil }
func (x handleExport) Extents(off, n int64) ([]nbd.Extent, error) {
	es, err := x.h.Extents(off, n)
	out := make([]nbd.Extent, len(es))
	for i, e := range es {
		out[i] = nbd.Extent{Length: e.Length, Hole: e.Hole, Zero: e.Zero}
	}
	return out, err
}
func (x handleExport) Close() error { return nil }

// controllerVolume opens a volume manager on a temp file device and creates "vol".
func controllerVolume(t *testing.T, size int64) handleExport {
	t.Helper()
	dir := t.TempDir()
	d, err := dev.OpenFile(filepath.Join(dir, "disk0.img"), 4*size)
	if err != nil {
		t.Fatal(err)
	}
	m, err := volume.Open(filepath.Join(dir, "meta"), d, volume.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m.Create("vol", size); err != nil {
		t.Fatal(err)
	}
	h, err := m.Open("vol")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close(); m.Close(); d.Close() })
	return handleExport{h}
}

type oneExport struct{ v *Volume }

func (e oneExport) Open(name string) (nbd.Export, error) {
	if name != "vol" {
		return nil, nbd.ErrUnknownExport
	}
	return e.v.Export(), nil
}
func (e oneExport) List() []nbd.ExportInfo { return []nbd.ExportInfo{{Name: "vol"}} }

func diffExports(t *testing.T, a, b nbd.Export, region int64) []uint64 {
	t.Helper()
	var diff []uint64
	ba, bb := make([]byte, region), make([]byte, region)
	for off := int64(0); off < a.Size(); off += region {
		n := min(region, a.Size()-off)
		if err := a.ReadAt(ba[:n], off); err != nil {
			t.Fatal(err)
		}
		if err := b.ReadAt(bb[:n], off); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(ba[:n], bb[:n]) {
			diff = append(diff, uint64(off/region))
		}
	}
	return diff
}

// qemuIO runs qemu-io commands against the NBD export and fails on any I/O error.
func qemuIO(t *testing.T, addr string, cmds ...string) {
	t.Helper()
	args := []string{"-f", "raw"}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	args = append(args, fmt.Sprintf("nbd://%s/vol", addr))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, "qemu-io", args...).CombinedOutput()
	if err != nil || strings.Contains(string(out), "failed") || strings.Contains(string(out), "error") || strings.Contains(string(out), "Pattern verification") {
		t.Fatalf("qemu-io %v: %v\n%s", cmds, err, out)
	}
}

// A real NBD client (qemu-io) writes through nbd.Server to a mirrored volume made of
// two real volume managers; the secondary dies and comes back; both volumes end equal.
func TestQemuThroughMirroredVolumeManagers(t *testing.T) {
	if _, err := exec.LookPath("qemu-io"); err != nil {
		if testing.Short() {
			t.Skip("qemu-io not installed")
		}
		t.Fatalf("qemu-io is needed (bash scripts/install-deps.sh): %v", err)
	}
	const size = 64 << 20
	a, b := controllerVolume(t, size), controllerVolume(t, size)
	target := NewTarget(b, State{RoleSecondary, 1})
	sec := &secondary{t: t, disk: &fileExport{size: size}, target: target}
	sec.start()
	t.Cleanup(sec.kill)
	bm, err := OpenBitmap(filepath.Join(t.TempDir(), "bitmap"), size, DefaultRegionSize)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { bm.Close() })
	v, err := NewVolume(a, bm)
	if err != nil {
		t.Fatal(err)
	}
	v.SetIntentKeep(0)
	t.Cleanup(func() { v.Detach() })
	if err := v.Resync(context.Background(), sec.dial(1), ResyncOptions{}); err != nil {
		t.Fatal(err)
	}

	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &nbd.Server{Exports: oneExport{v}}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(l) }()
	t.Cleanup(func() {
		srv.Close()
		if err := <-served; err != nil && !errors.Is(err, nbd.ErrServerClosed) {
			t.Errorf("nbd server: %v", err)
		}
	})
	addr := l.Addr().String()

	qemuIO(t, addr, "write -P 0x11 0 4M", "write -P 0x22 10M 1M", "write -z 12M 2M", "flush")
	if d := diffExports(t, a, b, DefaultRegionSize); len(d) != 0 {
		t.Fatalf("mirrored writes differ in %v", d)
	}
	sec.kill()
	qemuIO(t, addr, "write -P 0x33 20M 64k", "write -P 0x44 30M 4k", "write -P 0x55 31M 512", "flush", "read -P 0x33 20M 64k")
	if v.Mode() != ModeDegraded {
		t.Fatalf("mode %v after the secondary died", v.Mode())
	}
	want := []uint64{20, 30, 31}
	if got := bm.Dirty(); !slices.Equal(got, want) {
		t.Fatalf("dirty %v, want %v", got, want)
	}
	target.SetState(State{RoleStale, 1})
	sec.start()
	if err := v.Resync(context.Background(), sec.dial(2), ResyncOptions{}); err != nil {
		t.Fatal(err)
	}
	if got, wantB := v.Progress().Bytes, int64(len(want))*DefaultRegionSize; got != wantB {
		t.Fatalf("resync copied %d bytes, want %d", got, wantB)
	}
	qemuIO(t, addr, "write -P 0x66 40M 8k", "flush", "read -P 0x44 30M 4k")
	if d := diffExports(t, a, b, DefaultRegionSize); len(d) != 0 {
		t.Fatalf("after resync the volumes differ in %v", d)
	}
}
