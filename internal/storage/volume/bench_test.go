package volume

import (
	"math/rand/v2"
	"path/filepath"
	"sync/atomic"
	"testing"

	"github.com/growserver/grow/internal/storage/dev"
)

const benchVol = 256 * MiB

// benchTarget is what the 4 KiB benchmarks drive: a volume handle, or the raw device.
type benchTarget interface {
	ReadAt(p []byte, off int64) error
	WriteAt(p []byte, off int64, fua bool) error
}

type rawTarget struct{ d *dev.File }

func (r rawTarget) ReadAt(p []byte, off int64) error {
	_, err := r.d.ReadAt(p, off)
	return err
}

func (r rawTarget) WriteAt(p []byte, off int64, _ bool) error {
	_, err := r.d.WriteAt(p, off)
	return err
}

func benchSetup(b *testing.B, mode string) benchTarget {
	dir := b.TempDir()
	d, err := dev.OpenFile(filepath.Join(dir, "disk.img"), 2*benchVol)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { d.Close() })
	fill := make([]byte, MiB)
	for i := range fill {
		fill[i] = byte(i) | 1
	}
	if mode == "raw" {
		for off := int64(0); off < benchVol; off += MiB {
			d.WriteAt(fill, off)
		}
		return rawTarget{d}
	}
	m, err := Open(filepath.Join(dir, "meta"), d, Options{})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { m.Close() })
	if _, err := m.Create("v", benchVol); err != nil {
		b.Fatal(err)
	}
	h, err := m.Open("v")
	if err != nil {
		b.Fatal(err)
	}
	for off := int64(0); off < benchVol; off += MiB {
		if err := h.WriteAt(fill, off, false); err != nil {
			b.Fatal(err)
		}
	}
	if mode == "clone" {
		if _, err := m.Snapshot("v", "base"); err != nil {
			b.Fatal(err)
		}
		if _, err := m.Clone("v@base", "c"); err != nil {
			b.Fatal(err)
		}
		c, err := m.Open("c")
		if err != nil {
			b.Fatal(err)
		}
		return c
	}
	return h
}

// BenchmarkRandom4K measures 4 KiB random reads and writes from parallel goroutines on
// allocated clusters of a volume, a clone (reads fall through to the snapshot) and, for
// comparison in the same run, the raw device file.
func BenchmarkRandom4K(b *testing.B) {
	for _, mode := range []string{"raw", "volume", "clone"} {
		for _, op := range []string{"read", "write"} {
			if mode == "clone" && op == "write" {
				continue // first writes allocate; measured by BenchmarkAllocWrite
			}
			b.Run(mode+"/"+op, func(b *testing.B) {
				t := benchSetup(b, mode)
				var seed atomic.Uint64
				b.SetBytes(4096)
				b.ResetTimer()
				b.RunParallel(func(pb *testing.PB) {
					rng := rand.New(rand.NewPCG(seed.Add(1), 0))
					buf := make([]byte, 4096)
					for i := range buf {
						buf[i] = 7
					}
					for pb.Next() {
						off := rng.Int64N(benchVol/4096) * 4096
						var err error
						if op == "read" {
							err = t.ReadAt(buf, off)
						} else {
							err = t.WriteAt(buf, off, false)
						}
						if err != nil {
							b.Fatal(err)
						}
					}
				})
				b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "IOPS")
			})
		}
	}
}

// BenchmarkAllocWrite measures first writes of 4 KiB into unallocated clusters of a
// clone (each one allocates and copies the rest of the cluster from the parent).
func BenchmarkAllocWrite(b *testing.B) {
	dir := b.TempDir()
	d, err := dev.OpenFile(filepath.Join(dir, "disk.img"), 8<<30)
	if err != nil {
		b.Fatal(err)
	}
	defer d.Close()
	m, err := Open(filepath.Join(dir, "meta"), d, Options{})
	if err != nil {
		b.Fatal(err)
	}
	defer m.Close()
	if _, err := m.Create("v", 4<<30); err != nil {
		b.Fatal(err)
	}
	h, err := m.Open("v")
	if err != nil {
		b.Fatal(err)
	}
	var next atomic.Int64
	b.SetBytes(4096)
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		buf := make([]byte, 4096)
		for pb.Next() {
			c := next.Add(1) % (4 << 30 / ClusterSize)
			if err := h.WriteAt(buf, c*ClusterSize, false); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "IOPS")
}

// BenchmarkAllocWrite1M measures first writes of 1 MiB into a fresh volume, two writers
// each going through its own half sequentially (a guest filling a new disk).
func BenchmarkAllocWrite1M(b *testing.B) {
	dir := b.TempDir()
	const size = 4 << 30
	d, err := dev.OpenFile(filepath.Join(dir, "disk.img"), 2*size)
	if err != nil {
		b.Fatal(err)
	}
	defer d.Close()
	m, err := Open(filepath.Join(dir, "meta"), d, Options{})
	if err != nil {
		b.Fatal(err)
	}
	defer m.Close()
	if _, err := m.Create("v", size); err != nil {
		b.Fatal(err)
	}
	h, err := m.Open("v")
	if err != nil {
		b.Fatal(err)
	}
	const req = 1 << 20
	var writer atomic.Int64
	b.SetBytes(req)
	b.SetParallelism(1)
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		half := writer.Add(1) - 1
		buf := make([]byte, req)
		for i := int64(0); pb.Next(); i++ {
			off := (half*size/2 + i*req) % size
			if err := h.WriteAt(buf, off, false); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// BenchmarkCheckpointEncodeDecode encodes and decodes the metadata of 1M mapped
// clusters (64 GiB of allocated data): the pause a checkpoint costs and the replay
// cost at open.
func BenchmarkCheckpointEncodeDecode(b *testing.B) {
	st := newState()
	r := record{typ: recCreate, name: "v", kind: kVolume, size: 1 << 40, layer: 1}
	if err := st.apply(&r, func(uint64) {}); err != nil {
		b.Fatal(err)
	}
	l := st.layers[1]
	rng := rand.New(rand.NewPCG(1, 1))
	for p := uint64(0); p < 1<<20; p++ {
		l.tab.set(rng.Uint64N(1<<24), physEntry(p))
	}
	var size int
	b.Run("encode", func(b *testing.B) {
		for b.Loop() {
			size = len(encodeCheckpoint(st, 1))
		}
		b.ReportMetric(float64(size), "bytes")
	})
	data := encodeCheckpoint(st, 1)
	b.Run("decode", func(b *testing.B) {
		for b.Loop() {
			if _, _, err := decodeCheckpoint(data); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// BenchmarkSeq1M measures 1 MiB sequential reads and writes of allocated data (one
// device call per run of contiguous clusters) against the raw device file.
func BenchmarkSeq1M(b *testing.B) {
	for _, mode := range []string{"raw", "volume"} {
		for _, op := range []string{"read", "write"} {
			b.Run(mode+"/"+op, func(b *testing.B) {
				t := benchSetup(b, mode)
				buf := make([]byte, MiB)
				b.SetBytes(MiB)
				off := int64(0)
				for b.Loop() {
					var err error
					if op == "read" {
						err = t.ReadAt(buf, off)
					} else {
						err = t.WriteAt(buf, off, false)
					}
					if err != nil {
						b.Fatal(err)
					}
					off = (off + MiB) % benchVol
				}
			})
		}
	}
}
