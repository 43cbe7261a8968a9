package nbd

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/growserver/grow/internal/storage/dev"
)

// writeSpliceExport is a memExport that also implements WriteSplicer by reading the pipe
// and writing what it read. With refuse, every third call fails leaving the pipe full
// (the server then uses WriteAt); with half, every fifth takes half the data and fails
// (the request must fail and write nothing).
type writeSpliceExport struct {
	*memExport
	refuse, half   bool
	calls, spliced atomic.Int64
	mu             sync.Mutex
	failed         map[int64]bool // offsets of writes that failed half-way
}

func (s *writeSpliceExport) SpliceWrite(fd int, off int64, n int, fua bool) error {
	call := s.calls.Add(1)
	if s.refuse && call%3 == 0 {
		return errors.New("simulated refusal")
	}
	b := make([]byte, n)
	if s.half && call%5 == 0 {
		if err := dev.ReadPipe(fd, b[:n/2]); err != nil {
			return err
		}
		s.mu.Lock()
		s.failed[off] = true
		s.mu.Unlock()
		return errors.New("simulated failure half-way")
	}
	if err := dev.ReadPipe(fd, b); err != nil {
		return err
	}
	s.spliced.Add(1)
	return s.WriteAt(b, off, fua)
}

func (s *writeSpliceExport) Close() error { return nil }

// resetPipes closes every idle pipe so that the next ones are made afresh.
func resetPipes(t *testing.T) {
	pipes.mu.Lock()
	defer pipes.mu.Unlock()
	if pipes.open != len(pipes.idle) {
		t.Fatalf("%d pipes in use by another test", pipes.open-len(pipes.idle))
	}
	for _, p := range pipes.idle {
		unix.Close(p.r)
		unix.Close(p.w)
	}
	pipes.idle, pipes.open, pipes.limit = nil, 0, 0
}

// TestSplicedWrites: many WRITEs in flight, of sizes that are spliced and that are not,
// interleaved with READs of the same ranges, land byte-exact; a SpliceWrite that fails
// before taking any data falls back to WriteAt, one that fails half-way fails only its
// request (EIO) and writes nothing; with pipes too small for the payload the server
// copies instead; every pipe is given back.
func TestSplicedWrites(t *testing.T) {
	for _, tc := range []struct {
		name         string
		refuse, half bool
		smallPipes   bool
	}{
		{"spliced", false, false, false},
		{"refused splices", true, false, false},
		{"failing half-way", false, true, false},
		{"pipes too small", false, false, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.smallPipes {
				resetPipes(t)
				orig := growPipe
				growPipe = func(int) error { return nil } // pipes keep the default 64 KiB
				t.Cleanup(func() { growPipe = orig; resetPipes(t) })
			}
			const size = 128 << 20
			m := newMemExport(size)
			rng := rand.New(rand.NewPCG(3, 4))
			old := make([]byte, size)
			for i := range old {
				old[i] = byte(rng.Uint32())
			}
			if err := m.WriteAt(old, 0, false); err != nil {
				t.Fatal(err)
			}
			ex := &writeSpliceExport{memExport: m, refuse: tc.refuse, half: tc.half, failed: map[int64]bool{}}
			sock := startServerWith(t, &Server{Exports: diskExports{ex}})
			c := dialRaw(t, "unix", sock)
			c.greet(flagFixedNewstyle | flagNoZeroes)
			c.goExport("disk")

			type req struct {
				off, n uint64
				write  bool
				data   []byte
			}
			want := append([]byte(nil), old...)
			reqs := map[uint64]req{}
			var spliceable int64
			sizes := []uint64{4096, 128 << 10, 1 << 20, 300<<10 + 512, 2 << 20, 1 << 20, 64 << 10}
			for i := uint64(0); i < 60; i++ {
				n := sizes[i%uint64(len(sizes))]
				off := i * (2 << 20) // each WRITE has its own 2 MiB
				if i%4 == 3 {
					// A READ of an earlier write's range, in flight with later writes.
					w := reqs[i-2]
					reqs[i] = req{off: w.off, n: w.n}
					c.request(0, cmdRead, i, w.off, uint32(w.n), nil)
					continue
				}
				if i%3 == 1 {
					off += 1000 // unaligned
				}
				data := make([]byte, n)
				for j := range data {
					data[j] = byte(rng.Uint32())
				}
				reqs[i] = req{off: off, n: n, write: true, data: data}
				if n >= spliceMin && n <= pipeSize {
					spliceable++
				}
				var flags uint16
				if i%5 == 2 {
					flags = cmdFlagFUA
				}
				c.request(flags, cmdWrite, i, off, uint32(n), data)
			}
			var errs int
			for len(reqs) > 0 {
				errno, cookie := c.simpleReply()
				rq, ok := reqs[cookie]
				if !ok {
					t.Fatalf("reply for unknown or answered cookie %d", cookie)
				}
				delete(reqs, cookie)
				if !rq.write {
					if errno != 0 {
						t.Fatalf("READ %d failed: %d", cookie, errno)
					}
					c.read(int(rq.n)) // it raced with its write: either content is right
					continue
				}
				ex.mu.Lock()
				failed := ex.failed[int64(rq.off)]
				ex.mu.Unlock()
				switch {
				case failed && errno != errIO:
					t.Fatalf("WRITE %d failed half-way in the export but got error %d", cookie, errno)
				case failed:
					errs++
				case errno != 0:
					t.Fatalf("WRITE %d (%d bytes at %d) failed: %d", cookie, rq.n, rq.off, errno)
				default:
					copy(want[rq.off:], rq.data)
				}
			}
			if got := m.content(0, size); !bytes.Equal(got, want) {
				for i := range got {
					if got[i] != want[i] {
						t.Fatalf("content differs at byte %d", i)
					}
				}
			}
			switch {
			case tc.smallPipes && ex.calls.Load() >= spliceable:
				// A pipe's capacity is in pieces, not bytes: some payloads fit.
				t.Fatalf("all %d spliceable writes fit pipes of 64 KiB: no fallback tested", spliceable)
			case !tc.smallPipes && ex.spliced.Load() == 0:
				t.Fatal("no WRITE was spliced")
			case tc.half && errs == 0:
				t.Fatal("no splice failed half-way")
			case tc.refuse && ex.calls.Load() == ex.spliced.Load():
				t.Fatal("no splice was refused")
			}
			c.request(0, cmdDisc, 999, 0, 0, nil)
			c.expectClosed()
			waitPipesIdle(t)
		})
	}
}
