package nbd

import (
	"bytes"
	"context"
	"math/rand/v2"
	"runtime"
	"testing"
	"time"
)

// readersBlocking returns the number of readers in blocking mode in the process.
func readersBlocking() int {
	blockingReaders.mu.Lock()
	defer blockingReaders.mu.Unlock()
	return blockingReaders.n
}

// largeWrites sends n WRITEs of 256 KiB of random data from off on, checks their
// replies and records the data in want.
func largeWrites(t *testing.T, c *rawClient, rng *rand.Rand, want []byte, off uint64, n int) {
	t.Helper()
	for i := range n {
		data := make([]byte, 256<<10)
		for j := range data {
			data[j] = byte(rng.Uint32())
		}
		o := off + uint64(i)*(256<<10)
		copy(want[o:], data)
		c.request(0, cmdWrite, uint64(i), o, uint32(len(data)), data)
	}
	for range n {
		if errno, cookie := c.simpleReply(); errno != 0 {
			t.Fatalf("WRITE %d failed with %d", cookie, errno)
		}
	}
}

// TestBlockingWrites checks blocking mode on a unix socket: a stream of large WRITEs
// switches the reader into it (GOMAXPROCS doubled meanwhile), their data lands
// intact, and the reader goes back to the netpoller after enough other requests and
// after the client has been idle, each time with GOMAXPROCS restored.
func TestBlockingWrites(t *testing.T) {
	base := runtime.GOMAXPROCS(0)
	ex := newMemExports()
	const size = 32 << 20
	m := ex.add("disk", "", newMemExport(size))
	s := startServer(t, ex, nil)
	c := dialRaw(t, "unix", s.sock)
	c.greet(flagFixedNewstyle | flagNoZeroes)
	c.goExport("disk")
	rng := rand.New(rand.NewPCG(5, 6))
	want := make([]byte, size)

	largeWrites(t, c, rng, want, 0, 2*blockingAfter)
	if st := s.srv.Stats(); st.BlockingModes != 1 || readersBlocking() != 1 {
		t.Fatalf("after %d large WRITEs: BlockingModes %d, readers blocking %d; want 1, 1", 2*blockingAfter, st.BlockingModes, readersBlocking())
	}
	if p := runtime.GOMAXPROCS(0); p != 2*base {
		t.Errorf("GOMAXPROCS %d with a reader in blocking mode, want %d", p, 2*base)
	}
	if !bytes.Equal(m.content(0, size), want) {
		t.Fatal("data written in blocking mode differs")
	}
	// Small READs: the reader goes back after blockingLeaveAfter of them.
	for i := range blockingLeaveAfter + 1 {
		c.request(0, cmdRead, uint64(i), uint64(i)*4096, 4096, nil)
		if errno, _ := c.simpleReply(); errno != 0 {
			t.Fatalf("READ failed with %d", errno)
		}
		if !bytes.Equal(c.read(4096), want[i*4096:(i+1)*4096]) {
			t.Fatalf("READ %d returned wrong data", i)
		}
	}
	if n := readersBlocking(); n != 0 {
		t.Fatalf("%d readers still blocking after %d small requests", n, blockingLeaveAfter+1)
	}
	if p := runtime.GOMAXPROCS(0); p != base {
		t.Errorf("GOMAXPROCS %d after blocking mode, want %d", p, base)
	}
	// Large WRITEs again, then an idle client: back to the netpoller within blockingIdle.
	largeWrites(t, c, rng, want, 8<<20, blockingAfter+1)
	if st := s.srv.Stats(); st.BlockingModes != 2 {
		t.Fatalf("BlockingModes %d, want 2", st.BlockingModes)
	}
	waitFor(t, "the idle reader to leave blocking mode", func() bool { return readersBlocking() == 0 })
	if p := runtime.GOMAXPROCS(0); p != base {
		t.Errorf("GOMAXPROCS %d after an idle reader left blocking mode, want %d", p, base)
	}
	// The connection still works from the netpoller.
	largeWrites(t, c, rng, want, 16<<20, 2)
	if !bytes.Equal(m.content(0, size), want) {
		t.Fatal("data differs after leaving blocking mode")
	}
	c.request(0, cmdDisc, 0, 0, 0, nil)
	c.expectClosed()
}

// TestBlockingReaderStops checks that a reader blocked in read(2) in blocking mode, in
// the middle of a payload, is woken by Shutdown and by Close, which deadlines alone
// would not do.
func TestBlockingReaderStops(t *testing.T) {
	defer func(d time.Duration) { blockingIdle = d }(blockingIdle)
	blockingIdle = time.Minute
	for _, stop := range []string{"Shutdown", "Close"} {
		t.Run(stop, func(t *testing.T) {
			ex := newMemExports()
			ex.add("disk", "", newMemExport(8<<20))
			s := startServer(t, ex, nil)
			c := dialRaw(t, "unix", s.sock)
			c.greet(flagFixedNewstyle | flagNoZeroes)
			c.goExport("disk")
			largeWrites(t, c, rand.New(rand.NewPCG(7, 8)), make([]byte, 8<<20), 0, blockingAfter)
			if readersBlocking() != 1 {
				t.Fatal("reader not in blocking mode")
			}
			// Half a payload: the reader waits in read(2) for the rest.
			c.write(uint32(requestMagic), uint16(0), uint16(cmdWrite), uint64(99), uint64(0), uint32(256<<10), string(make([]byte, 128<<10)))
			time.Sleep(50 * time.Millisecond)
			done := make(chan error, 1)
			start := time.Now()
			go func() {
				if stop == "Close" {
					done <- s.srv.Close()
					return
				}
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				defer cancel()
				done <- s.srv.Shutdown(ctx)
			}()
			select {
			case err := <-done:
				if err != nil {
					t.Fatalf("%s: %v", stop, err)
				}
			case <-time.After(4 * time.Second):
				t.Fatalf("%s did not end a reader blocked in read(2) in 4 s", stop)
			}
			c.expectClosed()
			waitFor(t, "the reader to leave blocking mode", func() bool { return readersBlocking() == 0 })
			t.Logf("%s took %v", stop, time.Since(start))
		})
	}
}

// TestNoBlockingOverTCP checks that large WRITEs over TCP stay with the netpoller, which
// measured better there.
func TestNoBlockingOverTCP(t *testing.T) {
	ex := newMemExports()
	m := ex.add("disk", "", newMemExport(8<<20))
	s := startServer(t, ex, nil)
	c := dialRaw(t, "tcp", s.tcp)
	c.greet(flagFixedNewstyle | flagNoZeroes)
	c.goExport("disk")
	want := make([]byte, 8<<20)
	largeWrites(t, c, rand.New(rand.NewPCG(9, 10)), want, 0, 2*blockingAfter)
	if st := s.srv.Stats(); st.BlockingModes != 0 || readersBlocking() != 0 {
		t.Fatalf("BlockingModes %d, readers blocking %d over TCP; want 0", st.BlockingModes, readersBlocking())
	}
	if !bytes.Equal(m.content(0, 8<<20), want) {
		t.Fatal("data differs")
	}
}
