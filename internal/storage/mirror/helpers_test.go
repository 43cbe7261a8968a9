package mirror

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/growserver/grow/internal/storage/nbd"
)

// fileExport is a real file used as a controller's local export in tests.
type fileExport struct {
	f         *os.File
	size      int64
	syncs     atomic.Int64
	fuaWrites atomic.Int64
}

func newFileExport(t *testing.T, name string, size int64) *fileExport {
	t.Helper()
	f, err := os.Create(filepath.Join(t.TempDir(), name))
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return &fileExport{f: f, size: size}
}

func (x *fileExport) Size() int64    { return x.size }
func (x *fileExport) ReadOnly() bool { return false }
func (x *fileExport) ReadAt(p []byte, off int64) error {
	_, err := x.f.ReadAt(p, off)
	return err
}
func (x *fileExport) WriteAt(p []byte, off int64, fua bool) error {
	if _, err := x.f.WriteAt(p, off); err != nil {
		return err
	}
	if fua {
		x.fuaWrites.Add(1)
		return x.Flush()
	}
	return nil
}
func (x *fileExport) Flush() error {
	x.syncs.Add(1)
	return x.f.Sync()
}
func (x *fileExport) zero(off, n int64, fua bool) error {
	return x.WriteAt(make([]byte, n), off, fua)
}
func (x *fileExport) Trim(off, n int64, fua bool) error { return x.zero(off, n, fua) }
func (x *fileExport) WriteZeroes(off, n int64, f nbd.ZeroFlags) error {
	if f.Fast {
		return nbd.ErrFastZeroUnsupported
	}
	return x.zero(off, n, f.FUA)
}
func (x *fileExport) Cache(off, n int64) error { return nil }
func (x *fileExport) Extents(off, n int64) ([]nbd.Extent, error) {
	return []nbd.Extent{{Length: n}}, nil
}
func (x *fileExport) Close() error { return nil }

// secondary is the peer controller of a test: a target on a file, served over loopback TCP.
type secondary struct {
	t      *testing.T
	disk   *fileExport
	target *Target
	srv    *LinkServer
	addr   string
	done   chan error
}

func startSecondary(t *testing.T, disk *fileExport, s State) *secondary {
	sec := &secondary{t: t, disk: disk, target: NewTarget(disk, s)}
	sec.start()
	t.Cleanup(sec.kill)
	return sec
}

// start serves the target on a new ephemeral port (a restarted controller).
func (s *secondary) start() {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		s.t.Fatal(err)
	}
	s.srv = &LinkServer{Lookup: func(name string) (*Target, bool) { return s.target, name == "vol" }}
	s.addr = l.Addr().String()
	s.done = make(chan error, 1)
	go func() { s.done <- s.srv.Serve(l) }()
}

// kill drops the listener and every connection at once, like kill -9 of the controller.
func (s *secondary) kill() {
	if s.srv == nil {
		return
	}
	s.srv.Close()
	if err := <-s.done; err != nil {
		s.t.Errorf("link server: %v", err)
	}
	s.srv = nil
}

func (s *secondary) dial(epoch uint64) *Link {
	s.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	l, err := DialLink(ctx, s.addr, "vol", s.disk.size, epoch, 5*time.Second)
	if err != nil {
		s.t.Fatal(err)
	}
	return l
}

// newPrimary makes a degraded volume over a new file with its bitmap in a temp dir.
func newPrimary(t *testing.T, size int64) (*Volume, *fileExport, string) {
	t.Helper()
	disk := newFileExport(t, "primary.img", size)
	path := filepath.Join(t.TempDir(), "vol.bitmap")
	bm, err := OpenBitmap(path, size, DefaultRegionSize)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { bm.Close() })
	v, err := NewVolume(disk, bm)
	if err != nil {
		t.Fatal(err)
	}
	// Tests of exact marks clear every mark a FLUSH allows (TestWriteIntentKeepsHotRegions covers the activity log).
	v.SetIntentKeep(0)
	t.Cleanup(func() { v.Detach() })
	return v, disk, path
}

// sameContent compares two exports region by region and returns the regions that differ.
func sameContent(t *testing.T, a, b *fileExport, region int64) []uint64 {
	t.Helper()
	var diff []uint64
	ba, bb := make([]byte, region), make([]byte, region)
	for off := int64(0); off < a.size; off += region {
		n := min(region, a.size-off)
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

func pattern(seed, n int) []byte {
	p := make([]byte, n)
	for i := range p {
		p[i] = byte(seed*131 + i*7 + i>>9)
	}
	return p
}

func mustMode(t *testing.T, v *Volume, want Mode) {
	t.Helper()
	if got := v.Mode(); got != want {
		t.Fatalf("mode %v, want %v", got, want)
	}
}

func fmtRegions(r []uint64) string { return fmt.Sprint(r) }

// volatileExport keeps writes in a volatile cache until Flush, like a controller's page
// cache: crash drops what was not flushed.
type volatileExport struct {
	*fileExport
	mu    sync.Mutex
	queue []queuedWrite
}

type queuedWrite struct {
	off  int64
	data []byte
}

func (x *volatileExport) WriteAt(p []byte, off int64, fua bool) error {
	x.mu.Lock()
	x.queue = append(x.queue, queuedWrite{off, bytes.Clone(p)})
	x.mu.Unlock()
	if fua {
		return x.Flush()
	}
	return nil
}

func (x *volatileExport) Trim(off, n int64, fua bool) error {
	return x.WriteAt(make([]byte, n), off, fua)
}
func (x *volatileExport) WriteZeroes(off, n int64, f nbd.ZeroFlags) error {
	return x.WriteAt(make([]byte, n), off, f.FUA)
}

func (x *volatileExport) ReadAt(p []byte, off int64) error {
	if err := x.fileExport.ReadAt(p, off); err != nil {
		return err
	}
	x.mu.Lock()
	defer x.mu.Unlock()
	for _, w := range x.queue {
		lo, hi := max(off, w.off), min(off+int64(len(p)), w.off+int64(len(w.data)))
		if lo < hi {
			copy(p[lo-off:hi-off], w.data[lo-w.off:hi-w.off])
		}
	}
	return nil
}

func (x *volatileExport) Flush() error {
	x.mu.Lock()
	defer x.mu.Unlock()
	for _, w := range x.queue {
		if _, err := x.f.WriteAt(w.data, w.off); err != nil {
			return err
		}
	}
	x.queue = nil
	return x.fileExport.Flush()
}

// crash drops every write not yet flushed.
func (x *volatileExport) crash() {
	x.mu.Lock()
	x.queue = nil
	x.mu.Unlock()
}

// slowPeer delays full-region writes (resync copies) by delay, after signalling started.
type slowPeer struct {
	Peer
	region  int
	delay   time.Duration
	started chan struct{}
	once    sync.Once
}

func (s *slowPeer) WriteAt(p []byte, off int64, fua bool) error {
	if len(p) == s.region {
		s.once.Do(func() { close(s.started) })
		time.Sleep(s.delay)
	}
	return s.Peer.WriteAt(p, off, fua)
}

func newFileExportB(b *testing.B, name string, size int64) *fileExport {
	f, err := os.Create(filepath.Join(b.TempDir(), name))
	if err != nil {
		b.Fatal(err)
	}
	if err := f.Truncate(size); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { f.Close() })
	return &fileExport{f: f, size: size}
}

func newPrimaryB(b *testing.B, size int64) (*Volume, *fileExport) {
	disk := newFileExportB(b, "primary.img", size)
	bm, err := OpenBitmap(filepath.Join(b.TempDir(), "vol.bitmap"), size, DefaultRegionSize)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { bm.Close() })
	v, err := NewVolume(disk, bm)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { v.Detach() })
	return v, disk
}

func (s *secondary) startB(b *testing.B) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	s.srv = &LinkServer{Lookup: func(name string) (*Target, bool) { return s.target, name == "vol" }}
	s.addr = l.Addr().String()
	s.done = make(chan error, 1)
	go func() { s.done <- s.srv.Serve(l) }()
}
