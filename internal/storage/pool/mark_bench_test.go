package pool

import (
	"fmt"
	"io"
	"log/slog"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
)

// BenchmarkPoolMark measures 4 KiB writes that each need a new write-intent mark (the
// first write to a chunk since the bitmap was reset), from 1 and from 16 writers at
// once: the cost of marking, which the durable bitmap pays with an fdatasync (shared
// by the writers waiting together). The blocks written are allocated beforehand, so
// that only marking differs from a plain overwrite.
func BenchmarkPoolMark(b *testing.B) {
	for _, writers := range []int{1, 16} {
		b.Run(fmt.Sprintf("writers=%d", writers), func(b *testing.B) {
			dir := b.TempDir()
			var paths []string
			for i := 0; i < 4; i++ {
				path := filepath.Join(dir, fmt.Sprint(i))
				CreateFileDisk(path, 257<<20+tailSize)
				paths = append(paths, path)
			}
			p, err := Open(filepath.Join(dir, "s"), paths, Options{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
			if err != nil {
				b.Fatal(err)
			}
			defer p.Close()
			chunks := p.Size() / p.chunk
			buf := make([]byte, 4096)
			for c := int64(0); c < chunks; c++ {
				p.WriteAt(buf, chunkOffset(int(c%2), c/2))
			}
			p.Sync()
			b.SetBytes(int64(len(buf)))
			b.ResetTimer()
			for done := 0; done < b.N; {
				b.StopTimer()
				if err := p.dirty.reset(); err != nil {
					b.Fatal(err)
				}
				round := min(int64(b.N-done), chunks)
				b.StartTimer()
				var next atomic.Int64
				var wg sync.WaitGroup
				for w := 0; w < writers; w++ {
					wg.Add(1)
					go func() {
						defer wg.Done()
						buf := make([]byte, 4096)
						for c := next.Add(1) - 1; c < round; c = next.Add(1) - 1 {
							if _, err := p.WriteAt(buf, chunkOffset(int(c%2), c/2)); err != nil {
								b.Error(err)
								return
							}
						}
					}()
				}
				wg.Wait()
				done += int(round)
			}
		})
	}
}
