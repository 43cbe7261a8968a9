package mirror

import (
	"context"
	"math/rand/v2"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/growserver/grow/internal/storage/nbd"
)

// benchTargets returns the unmirrored local export and a mirrored volume over loopback,
// each on its own file, so one run compares them side by side.
func benchTargets(b *testing.B) map[string]nbd.Export {
	size := int64(256 << 20)
	plain := newFileExportB(b, "plain.img", size)
	return map[string]nbd.Export{"local": plain, "mirrored": syncedPrimaryB(b, size).Export()}
}

// syncedPrimaryB returns a primary synced with a secondary over a loopback link.
func syncedPrimaryB(b *testing.B, size int64) *Volume {
	v, _ := newPrimaryB(b, size)
	sec := newFileExportB(b, "secondary.img", size)
	s := &secondary{t: nil, disk: sec, target: NewTarget(sec, State{RoleSecondary, 1})}
	s.startB(b)
	b.Cleanup(func() { s.srv.Close(); <-s.done })
	l, err := DialLink(context.Background(), s.addr, "vol", size, 1, 30*time.Second)
	if err != nil {
		b.Fatal(err)
	}
	if err := v.Resync(context.Background(), l, ResyncOptions{}); err != nil {
		b.Fatal(err)
	}
	return v
}

func benchWrites(b *testing.B, n int, random bool) {
	for _, name := range []string{"local", "mirrored"} {
		b.Run(name, func(b *testing.B) {
			ex := benchTargets(b)[name]
			size := ex.Size()
			var seq atomic.Int64
			b.SetBytes(int64(n))
			b.SetParallelism(8) // 8 x GOMAXPROCS requests in flight, like a guest's queue
			b.ResetTimer()
			cpu0 := processCPU()
			b.RunParallel(func(pb *testing.PB) {
				buf := pattern(1, n)
				rng := rand.New(rand.NewPCG(rand.Uint64(), 1))
				for pb.Next() {
					var off int64
					if random {
						off = rng.Int64N(size/int64(n)) * int64(n)
					} else {
						off = (seq.Add(1) * int64(n)) % size
					}
					if err := ex.WriteAt(buf, off, false); err != nil {
						b.Error(err)
						return
					}
				}
			})
			b.StopTimer()
			// CPU time per write (both sides share this process) is far less noisy than
			// throughput on a shared machine.
			b.ReportMetric(float64(processCPU()-cpu0)/float64(b.N), "cpu-ns/op")
			if err := ex.Flush(); err != nil {
				b.Fatal(err)
			}
		})
	}
}

// processCPU is the user and system CPU time of this process.
func processCPU() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// BenchmarkWrite4KRandom compares 4 KiB random writes, mirrored against unmirrored.
func BenchmarkWrite4KRandom(b *testing.B) { benchWrites(b, 4096, true) }

// BenchmarkWrite1MSequential compares 1 MiB sequential writes, mirrored against unmirrored.
func BenchmarkWrite1MSequential(b *testing.B) { benchWrites(b, 1<<20, false) }

// BenchmarkJournalingGuest writes 4 KiB blocks at random in a 32 MiB hot area with a
// FLUSH after every 16 writes, as a journaling filesystem does, on a mirrored volume
// with the write-intent activity log (keep) and without it (keep0: every FLUSH clears
// every mark, so the next write to each region fsyncs the bitmap first).
func BenchmarkJournalingGuest(b *testing.B) {
	for _, keep := range []int{IntentKeep, 0} {
		name := "keep"
		if keep == 0 {
			name = "keep0"
		}
		b.Run(name, func(b *testing.B) {
			v := syncedPrimaryB(b, 256<<20)
			v.SetIntentKeep(keep)
			buf := pattern(1, 4096)
			rng := rand.New(rand.NewPCG(1, 2))
			b.SetBytes(4096)
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				if err := v.WriteAt(buf, rng.Int64N(32<<20/4096)*4096, false); err != nil {
					b.Fatal(err)
				}
				if i%16 == 15 {
					if err := v.Flush(); err != nil {
						b.Fatal(err)
					}
				}
			}
		})
	}
}
