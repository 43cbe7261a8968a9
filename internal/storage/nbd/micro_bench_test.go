package nbd

import (
	"bufio"
	"encoding/binary"
	"io"
	"log/slog"

	"testing"
	"time"
)

// benchPipeline drives b.N requests of one kind through a real unix-socket
// connection with depth requests in flight, using an allocation-free client, so
// that -benchmem shows the server's own allocations per request.
func benchPipeline(b *testing.B, typ uint16, size uint32, structured bool) {
	ex := newMemExports()
	m := ex.add("disk", "", newMemExport(64<<20))
	for i := range m.state {
		m.state[i] = clusterData // reads move real bytes, not hole chunks
	}
	s := startServer(b, ex, nil)
	s.srv.Logger = slog.New(slog.DiscardHandler) // no logging cost in measurements
	c := dialRaw(b, "unix", s.sock)
	c.greet(flagFixedNewstyle | flagNoZeroes)
	if structured {
		c.option(optStructuredReply, nil)
		c.optReply(optStructuredReply)
	}
	c.goExport("disk")
	c.nc.SetDeadline(time.Time{})
	const depth = 32
	var payload []byte
	if typ == cmdWrite {
		payload = make([]byte, size)
	}
	slots := make(chan uint64, depth)
	for i := range depth {
		slots <- uint64(i)
	}
	errc := make(chan error, 1)
	go func() {
		br := bufio.NewReaderSize(c.nc, 256<<10)
		var hdr [20]byte
		for i := 0; i < b.N; i++ {
			var cookie uint64
			if structured && typ == cmdRead {
				if _, err := io.ReadFull(br, hdr[:20]); err != nil {
					errc <- err
					return
				}
				cookie = binary.BigEndian.Uint64(hdr[8:])
				n := binary.BigEndian.Uint32(hdr[16:])
				br.Discard(int(n))
			} else {
				if _, err := io.ReadFull(br, hdr[:16]); err != nil {
					errc <- err
					return
				}
				cookie = binary.BigEndian.Uint64(hdr[8:])
				if typ == cmdRead {
					br.Discard(int(size))
				}
			}
			slots <- cookie
		}
		errc <- nil
	}()
	bw := bufio.NewWriterSize(c.nc, 256<<10)
	var req [28]byte
	binary.BigEndian.PutUint32(req[0:], requestMagic)
	binary.BigEndian.PutUint16(req[6:], typ)
	binary.BigEndian.PutUint32(req[24:], size)
	b.SetBytes(int64(size))
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		cookie := <-slots
		binary.BigEndian.PutUint64(req[8:], cookie)
		binary.BigEndian.PutUint64(req[16:], uint64(i*int(size))%(64<<20-uint64(size)))
		bw.Write(req[:])
		bw.Write(payload)
		if len(slots) == 0 {
			bw.Flush()
		}
	}
	bw.Flush()
	if err := <-errc; err != nil {
		b.Fatal(err)
	}
}

func BenchmarkRead4K(b *testing.B)           { benchPipeline(b, cmdRead, 4096, false) }
func BenchmarkRead4KStructured(b *testing.B) { benchPipeline(b, cmdRead, 4096, true) }
func BenchmarkWrite4K(b *testing.B)          { benchPipeline(b, cmdWrite, 4096, false) }
func BenchmarkRead1M(b *testing.B)           { benchPipeline(b, cmdRead, 1<<20, false) }
func BenchmarkRead1MStructured(b *testing.B) { benchPipeline(b, cmdRead, 1<<20, true) }
func BenchmarkWrite1M(b *testing.B)          { benchPipeline(b, cmdWrite, 1<<20, false) }
