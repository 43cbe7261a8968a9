package volume

import (
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/growserver/grow/internal/storage/dev"
)

// syncCounter is a dev.File that counts Syncs.
type syncCounter struct {
	*dev.File
	syncs atomic.Int64
}

func (s *syncCounter) Sync() error {
	s.syncs.Add(1)
	return s.File.Sync()
}

// TestBackgroundSyncOnlyForMetadata: the timed background sync makes new mappings
// durable (device first, then journal), but plain overwrites of mapped clusters cause
// no device sync of their own; a FLUSH after them still syncs the device.
func TestBackgroundSyncOnlyForMetadata(t *testing.T) {
	dir := t.TempDir()
	f, err := dev.OpenFile(filepath.Join(dir, "disk.img"), 16<<20)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	d := &syncCounter{File: f}
	m, err := Open(filepath.Join(dir, "meta"), d, Options{SyncInterval: 5 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if _, err := m.Create("v", 1<<20); err != nil {
		t.Fatal(err)
	}
	h := mustOpen(t, m, "v")
	data := make([]byte, 1<<20)
	if err := h.WriteAt(data, 0, false); err != nil { // allocates: journal records
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for d.syncs.Load() == 0 {
		if time.Now().After(deadline) {
			t.Fatal("the new mappings were not synced in the background")
		}
		time.Sleep(time.Millisecond)
	}
	time.Sleep(20 * time.Millisecond) // let that sync finish
	before := d.syncs.Load()
	for i := 0; i < 20; i++ {
		data[0] = byte(i)
		if err := h.WriteAt(data, 0, false); err != nil {
			t.Fatal(err)
		}
		time.Sleep(5 * time.Millisecond)
	}
	if n := d.syncs.Load() - before; n != 0 {
		t.Fatalf("%d device syncs for plain overwrites", n)
	}
	if err := h.Flush(); err != nil {
		t.Fatal(err)
	}
	if d.syncs.Load() == before {
		t.Fatal("FLUSH after plain writes did not sync the device")
	}
}
