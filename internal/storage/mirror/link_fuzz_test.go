package mirror

import (
	"encoding/binary"
	"io"
	"log/slog"
	"net"
	"testing"
	"time"

	"github.com/growserver/grow/internal/storage/nbd"
)

func helloBytes(name string, size int64, epoch uint64) []byte {
	b := make([]byte, 26+len(name))
	copy(b, helloMagic)
	binary.BigEndian.PutUint64(b[8:], epoch)
	binary.BigEndian.PutUint64(b[16:], uint64(size))
	binary.BigEndian.PutUint16(b[24:], uint16(len(name)))
	copy(b[26:], name)
	return b
}

func requestBytes(op, flags uint16, cookie uint64, off int64, n uint32, epoch uint64, payload []byte) []byte {
	b := make([]byte, requestLen, requestLen+len(payload))
	binary.BigEndian.PutUint32(b[0:], requestMagic)
	binary.BigEndian.PutUint16(b[4:], op)
	binary.BigEndian.PutUint16(b[6:], flags)
	binary.BigEndian.PutUint64(b[8:], cookie)
	binary.BigEndian.PutUint64(b[16:], uint64(off))
	binary.BigEndian.PutUint32(b[24:], n)
	binary.BigEndian.PutUint64(b[28:], epoch)
	return append(b, payload...)
}

// FuzzLinkServer feeds arbitrary bytes after a valid hello: the server must answer or
// drop the connection, never panic, hang or write outside the volume.
func FuzzLinkServer(f *testing.F) {
	f.Add(requestBytes(opWrite, 0, 1, 4096, 512, 1, make([]byte, 512)))
	f.Add(requestBytes(opWrite, flagFUA, 2, 1<<20-10, 20, 1, make([]byte, 20)))
	f.Add(requestBytes(opFlush, 0, 3, 0, 0, 1, nil))
	f.Add(requestBytes(opZero, flagNoHole, 4, 0, 1<<20, 1, nil))
	f.Add(requestBytes(opTrim, 0, 5, -1, 10, 1, nil))
	f.Add(requestBytes(opResyncDone, 0, 6, 0, 0, 7, nil))
	f.Add(requestBytes(99, 0, 7, 0, 0, 1, nil))
	f.Add(requestBytes(opWrite, 0, 8, 0, 0xffffffff, 1, nil))
	f.Fuzz(func(t *testing.T, data []byte) {
		ex := &memExport{data: make([]byte, 1<<20)}
		target := NewTarget(ex, State{RoleSecondary, 1})
		srv := &LinkServer{Lookup: func(string) (*Target, bool) { return target, true }, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}
		c, s := net.Pipe()
		done := make(chan struct{})
		go func() {
			srv.serveConn(s)
			s.Close()
			close(done)
		}()
		go io.Copy(io.Discard, c)
		c.SetWriteDeadline(time.Now().Add(2 * time.Second))
		c.Write(helloBytes("vol", 1<<20, 1))
		c.Write(data)
		c.Close()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			t.Fatal("server did not end the connection")
		}
	})
}

// memExport is a bounds-checked in-memory export for the fuzzer.
type memExport struct {
	fileExport
	data []byte
}

func (m *memExport) Size() int64 { return int64(len(m.data)) }
func (m *memExport) check(off, n int64) {
	if off < 0 || n < 0 || off+n > int64(len(m.data)) {
		panic("server passed an out-of-range request to the export")
	}
}
func (m *memExport) ReadAt(p []byte, off int64) error {
	m.check(off, int64(len(p)))
	copy(p, m.data[off:])
	return nil
}
func (m *memExport) WriteAt(p []byte, off int64, fua bool) error {
	m.check(off, int64(len(p)))
	copy(m.data[off:], p)
	return nil
}
func (m *memExport) Flush() error { return nil }
func (m *memExport) Trim(off, n int64, fua bool) error {
	m.check(off, n)
	clear(m.data[off : off+n])
	return nil
}
func (m *memExport) WriteZeroes(off, n int64, f nbd.ZeroFlags) error { return m.Trim(off, n, false) }
