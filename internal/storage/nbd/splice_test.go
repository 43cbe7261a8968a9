package nbd

import (
	"bytes"
	"encoding/binary"
	"errors"
	"math/rand/v2"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// spliceExport is a memExport that also implements ReadSplicer by writing its data
// into the pipe; with failOdd every other splice fails after putting half the data in.
type spliceExport struct {
	*memExport
	failOdd         bool
	calls, spliced  atomic.Int64
	openedForSplice atomic.Int64
}

func (s *spliceExport) SpliceRead(fd int, off int64, n int) error {
	call := s.calls.Add(1)
	b := make([]byte, n)
	if err := s.ReadAt(b, off); err != nil {
		return err
	}
	if s.failOdd && call%2 == 1 {
		b = b[:n/2]
	}
	for len(b) > 0 {
		k, err := unix.Write(fd, b)
		if err != nil {
			return err
		}
		b = b[k:]
	}
	if s.failOdd && call%2 == 1 {
		return errors.New("simulated splice failure")
	}
	s.spliced.Add(1)
	return nil
}

func (s *spliceExport) Close() error { return nil }

// diskExports serves one export, "disk".
type diskExports struct{ e Export }

func (o diskExports) Open(name string) (Export, error) {
	if name != "disk" {
		return nil, ErrUnknownExport
	}
	return o.e, nil
}
func (o diskExports) List() []ExportInfo { return []ExportInfo{{Name: "disk"}} }

// TestSplicedReads: many READs in flight, of sizes and offsets that are spliced and
// that are not, interleaved with WRITEs, get the right data behind the right reply
// headers, with simple and structured replies, also when splices fail half-way (the
// server then reads the data with ReadAt); and every pipe is given back. Large READs
// that are copied have their replies sent by their workers (some of them at least,
// between the writer's batches). Over loopback TCP nothing is spliced.
func TestSplicedReads(t *testing.T) {
	for _, tc := range []struct {
		name       string
		structured bool
		failOdd    bool
		network    string
	}{
		{"simple", false, false, "unix"},
		{"structured", true, false, "unix"},
		{"failing splices", true, true, "unix"},
		{"loopback TCP simple", false, false, "tcp"},
		{"loopback TCP structured", true, false, "tcp"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			const size = 16 << 20
			m := newMemExport(size)
			r := rand.New(rand.NewPCG(1, 2))
			data := make([]byte, size)
			for i := range data {
				data[i] = byte(r.Uint32())
			}
			if err := m.WriteAt(data, 0, false); err != nil {
				t.Fatal(err)
			}
			ex := &spliceExport{memExport: m, failOdd: tc.failOdd}
			srv := &Server{Exports: diskExports{ex}}
			c := dialRaw(t, tc.network, startServerOn(t, srv, tc.network))
			c.greet(flagFixedNewstyle | flagNoZeroes)
			if tc.structured {
				c.option(optStructuredReply, nil)
				c.optReply(optStructuredReply)
			}
			c.goExport("disk")

			type req struct {
				off, n uint64
				write  bool
			}
			reqs := map[uint64]req{}
			// Spliced: 128 KiB to 1 MiB at page-aligned offsets; copied: small,
			// unaligned and larger than a pipe.
			sizes := []uint64{4096, 128 << 10, 1 << 20, 1 << 20, 300 << 10, 2 << 20}
			for i := uint64(0); i < 96; i++ {
				n := sizes[i%uint64(len(sizes))]
				off := (i << 20) % (6 << 20)
				if i%7 == 3 {
					off += 1000
				}
				if i%5 == 4 {
					// Writes go to the upper half, which no READ touches.
					w := req{off: 8<<20 + i*4096, n: 4096, write: true}
					reqs[i] = w
					c.request(0, cmdWrite, i, w.off, uint32(w.n), bytes.Repeat([]byte{byte(i)}, 4096))
					continue
				}
				reqs[i] = req{off: off, n: n}
				c.request(0, cmdRead, i, off, uint32(n), nil)
			}
			for len(reqs) > 0 {
				var cookie uint64
				var got []byte
				if tc.structured {
					// Writes still get simple replies; peek at the magic.
					magic := c.u32()
					switch magic {
					case simpleMagic:
						errno, ck := c.u32(), c.u64()
						if errno != 0 || !reqs[ck].write {
							t.Fatalf("simple reply %d for cookie %d (%+v)", errno, ck, reqs[ck])
						}
						delete(reqs, ck)
						continue
					case structuredMagic:
					default:
						t.Fatalf("reply magic %#x", magic)
					}
					flags, typ := c.u16(), c.u16()
					cookie = c.u64()
					body := c.read(int(c.u32()))
					if typ != chunkOffsetData || flags&chunkFlagDone == 0 {
						t.Fatalf("chunk type %d flags %d for cookie %d", typ, flags, cookie)
					}
					if o := binary.BigEndian.Uint64(body); o != reqs[cookie].off {
						t.Fatalf("chunk offset %d for a READ at %d", o, reqs[cookie].off)
					}
					got = body[8:]
				} else {
					var errno uint32
					errno, cookie = c.simpleReply()
					if errno != 0 {
						t.Fatalf("error %d for cookie %d", errno, cookie)
					}
					if !reqs[cookie].write {
						got = c.read(int(reqs[cookie].n))
					}
				}
				rq, ok := reqs[cookie]
				if !ok {
					t.Fatalf("reply for unknown or answered cookie %d", cookie)
				}
				if !rq.write && !bytes.Equal(got, data[rq.off:rq.off+rq.n]) {
					t.Fatalf("READ %d (%d bytes at %d) returned wrong data", cookie, rq.n, rq.off)
				}
				delete(reqs, cookie)
			}
			switch spliced := ex.spliced.Load(); {
			case tc.network == "unix" && spliced == 0:
				t.Fatal("no READ was spliced")
			case tc.network == "tcp" && ex.calls.Load() != 0:
				t.Fatalf("%d READs were spliced over loopback TCP", spliced)
			}
			// Alone on the connection (the writer idle), a large READ that is copied
			// is answered by its worker. The writer lets go of the socket just after
			// its last send, so a READ sent at once on receipt of that reply may still
			// find it busy: a few tries.
			sentOwn := false
			for try := uint64(0); try < 10 && !sentOwn; try++ {
				own := srv.Stats().OwnReplies
				cookie := 1000 + try
				c.request(0, cmdRead, cookie, 1000, 1<<20, nil)
				if tc.structured {
					if ch := c.chunk(); ch.cookie != cookie || ch.typ != chunkOffsetData || !bytes.Equal(ch.data[8:], data[1000:1000+1<<20]) {
						t.Fatalf("READ of 1 MiB at 1000: chunk type %d for cookie %d, or wrong data", ch.typ, ch.cookie)
					}
				} else if errno, ck := c.simpleReply(); errno != 0 || ck != cookie || !bytes.Equal(c.read(1<<20), data[1000:1000+1<<20]) {
					t.Fatalf("READ of 1 MiB at 1000: error %d for cookie %d, or wrong data", errno, ck)
				}
				sentOwn = srv.Stats().OwnReplies == own+1
				time.Sleep(time.Duration(try) * 10 * time.Millisecond)
			}
			if !sentOwn {
				t.Fatal("the reply of a lone large READ was never sent by its worker")
			}
			if tc.failOdd && ex.calls.Load() == ex.spliced.Load() {
				t.Fatal("no splice failed")
			}
			c.request(0, cmdDisc, 999, 0, 0, nil)
			c.expectClosed()
			waitPipesIdle(t)
		})
	}
}

// TestPipeQuota: when the kernel refuses to grow a pipe (the per-user quota of pipe
// pages), the server keeps using the pipes it has and stops splicing only when it
// has none.
func TestPipeQuota(t *testing.T) {
	pipes.mu.Lock()
	if pipes.open != len(pipes.idle) {
		pipes.mu.Unlock()
		t.Skip("pipes in use by another test")
	}
	for _, p := range pipes.idle {
		unix.Close(p.r)
		unix.Close(p.w)
	}
	pipes.idle, pipes.open, pipes.limit = nil, 0, 0
	pipes.mu.Unlock()
	orig := growPipe
	t.Cleanup(func() {
		growPipe = orig
		pipes.mu.Lock()
		pipes.limit = 0
		pipes.mu.Unlock()
		pipes.broken.Store(false)
	})
	var grown atomic.Int64
	growPipe = func(fd int) error {
		if grown.Load() >= 3 {
			return unix.EPERM
		}
		if err := orig(fd); err != nil {
			return err
		}
		grown.Add(1)
		return nil
	}
	var got []*pipe
	for i := 0; i < 5; i++ {
		if p := getPipe(); p != nil {
			got = append(got, p)
		}
	}
	if len(got) != 3 || pipes.broken.Load() {
		t.Fatalf("got %d pipes (broken %v), want the 3 the kernel allowed", len(got), pipes.broken.Load())
	}
	for _, p := range got {
		p.put()
	}
	if p := getPipe(); p == nil {
		t.Fatal("an idle pipe was not reused")
	} else {
		p.put()
	}
	// With none open, a refusal turns splicing off.
	pipes.mu.Lock()
	for _, p := range pipes.idle {
		unix.Close(p.r)
		unix.Close(p.w)
	}
	pipes.idle, pipes.open, pipes.limit = nil, 0, 0
	pipes.mu.Unlock()
	if p := getPipe(); p != nil || !pipes.broken.Load() {
		t.Fatalf("pipe %v, broken %v: splicing should be off", p, pipes.broken.Load())
	}
}

// waitPipesIdle waits until every pipe the server opened is back among the idle ones
// (the connection that used them has ended); it fails the test after 5 s.
func waitPipesIdle(t *testing.T) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		pipes.mu.Lock()
		open, idle := pipes.open, len(pipes.idle)
		pipes.mu.Unlock()
		if open == idle {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d pipes open, %d of them idle: pipes leaked", open, idle)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
