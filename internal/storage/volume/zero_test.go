package volume

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"

	"github.com/growserver/grow/internal/storage/dev"
)

// plainDevice hides the Discarder of a dev.File.
type plainDevice struct{ *dev.File }

func (plainDevice) Discard() {}

// TestFreshClustersReadZero fills the device with garbage (as a crash after
// unrecorded allocations, or a reused disk, would leave it), then checks that the
// first partial writes into new clusters read back with zeroes around them, with and
// without a device that can discard.
func TestFreshClustersReadZero(t *testing.T) {
	for _, discard := range []bool{true, false} {
		name := "discard"
		if !discard {
			name = "no-discard"
		}
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, "disk.img")
			if err := os.WriteFile(path, bytes.Repeat([]byte{0xEE}, 4*MiB), 0o600); err != nil {
				t.Fatal(err)
			}
			f, err := dev.OpenFile(path, 4*MiB)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			var d dev.Device = f
			if !discard {
				d = plainDevice{f}
			}
			if _, ok := d.(dev.Discarder); ok != discard {
				t.Fatalf("device discards: %v", ok)
			}
			m, err := Open(filepath.Join(dir, "meta"), d, Options{SyncInterval: -1})
			if err != nil {
				t.Fatal(err)
			}
			defer m.Close()
			if _, err := m.Create("v", 2*MiB); err != nil {
				t.Fatal(err)
			}
			h := mustOpen(t, m, "v")
			want := make([]byte, 2*MiB)
			for c := int64(0); c < 8; c++ {
				off := c*ClusterSize*3 + 1000 + c
				copy(want[off:], "data")
				if err := h.WriteAt([]byte("data"), off, false); err != nil {
					t.Fatal(err)
				}
			}
			// Free a cluster and reuse it for a partial write.
			if err := h.Trim(0, ClusterSize, true); err != nil {
				t.Fatal(err)
			}
			clear(want[:ClusterSize])
			if err := h.WriteAt([]byte("again"), 30*ClusterSize+7, false); err != nil {
				t.Fatal(err)
			}
			copy(want[30*ClusterSize+7:], "again")
			mustEqual(t, "volume", readAll(t, h), want)
			rep, err := m.Check()
			if err != nil || !rep.Clean() {
				t.Fatalf("check: %v %q", err, rep.Problems)
			}
			if discard {
				if a := allocatedBytes(t, path); a > MiB {
					t.Fatalf("device file uses %d bytes after 9 small writes: fresh clusters were filled", a)
				}
			}
		})
	}
}
