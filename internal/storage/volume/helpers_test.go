package volume

import (
	"bytes"
	"errors"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/growserver/grow/internal/storage/dev"
)

type bed struct {
	t    *testing.T
	wrap func(*dev.File) dev.Device // nil: the file itself
	dir  string
	path string
	size int64
	dev  *dev.File
	m    *Manager
}

// newBed makes a sparse device file of size bytes and opens a Manager on it.
func newBed(t *testing.T, size int64) *bed { return newBedWith(t, size, nil) }

// newBedWith is newBed with the device wrapped (for example to hide its Discarder).
func newBedWith(t *testing.T, size int64, wrap func(*dev.File) dev.Device) *bed {
	t.Helper()
	dir := t.TempDir()
	b := &bed{t: t, wrap: wrap, dir: filepath.Join(dir, "meta"), path: filepath.Join(dir, "disk.img"), size: size}
	b.open()
	t.Cleanup(func() {
		if b.m != nil {
			b.m.Close()
		}
		if b.dev != nil {
			b.dev.Close()
		}
	})
	return b
}

func (b *bed) open() {
	b.t.Helper()
	d, err := dev.OpenFile(b.path, b.size)
	if err != nil {
		b.t.Fatal(err)
	}
	var dd dev.Device = d
	if b.wrap != nil {
		dd = b.wrap(d)
	}
	m, err := Open(b.dir, dd, Options{SyncInterval: -1})
	if err != nil {
		d.Close()
		b.t.Fatalf("Open: %v", err)
	}
	b.dev, b.m = d, m
}

// reopen closes the Manager (with or without its closing checkpoint) and opens it again.
func (b *bed) reopen(checkpoint bool) {
	b.t.Helper()
	if !checkpoint {
		b.m.opts.NoCheckpointOnClose = true
	}
	if err := b.m.Close(); err != nil {
		b.t.Fatalf("Close: %v", err)
	}
	b.dev.Close()
	b.m, b.dev = nil, nil
	b.open()
}

func (b *bed) check() {
	b.t.Helper()
	rep, err := b.m.Check()
	if err != nil {
		b.t.Fatalf("Check: %v", err)
	}
	if !rep.Clean() {
		b.t.Fatalf("Check found problems: %q", rep.Problems)
	}
}

func mustOpen(t *testing.T, m *Manager, name string) *Handle {
	t.Helper()
	h, err := m.Open(name)
	if err != nil {
		t.Fatalf("Open %q: %v", name, err)
	}
	t.Cleanup(func() { h.Close() })
	return h
}

func readAll(t *testing.T, h *Handle) []byte {
	t.Helper()
	p := make([]byte, h.Size())
	if err := h.ReadAt(p, 0); err != nil {
		t.Fatalf("ReadAt: %v", err)
	}
	return p
}

func mustEqual(t *testing.T, what string, got, want []byte) {
	t.Helper()
	if !bytes.Equal(got, want) {
		i := 0
		for i < len(got) && i < len(want) && got[i] == want[i] {
			i++
		}
		t.Fatalf("%s: contents differ at byte %d (len %d vs %d)", what, i, len(got), len(want))
	}
}

func wantErr(t *testing.T, what string, err, target error) {
	t.Helper()
	if !errors.Is(err, target) {
		t.Fatalf("%s: got error %v, want %v", what, err, target)
	}
}

func pattern(n int, seed byte) []byte {
	p := make([]byte, n)
	for i := range p {
		p[i] = seed + byte(i*7) + byte(i>>9)
		if p[i] == 0 {
			p[i] = 1
		}
	}
	return p
}

// allocatedBytes is the disk space a (sparse) file really uses.
func allocatedBytes(t *testing.T, path string) int64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512
}

// holdAt sets *hook so that the code calling it stops there until release: held is
// closed when it got there. The test's end releases it and clears *hook, so a failed
// test does not leave the code (and the bed's Close) waiting.
func holdAt(t *testing.T, hook *func()) (held <-chan struct{}, release func()) {
	h, r := make(chan struct{}), make(chan struct{})
	var once sync.Once
	release = func() { once.Do(func() { close(r) }) }
	*hook = func() {
		close(h)
		<-r
	}
	t.Cleanup(func() {
		release()
		*hook = nil
	})
	return h, release
}

// waitHeld waits up to 10 s for held, reporting what did not happen.
func waitHeld(t *testing.T, held <-chan struct{}, what string) {
	t.Helper()
	select {
	case <-held:
	case <-time.After(10 * time.Second):
		t.Fatal(what + " did not happen")
	}
}
