package nbd

import (
	"bytes"
	"encoding/binary"
	"io"
	"log/slog"
	"net"
	"testing"
	"time"
)

// pipeConn is a net.Conn that reads a fixed input and records what is written.
type pipeConn struct {
	in  *bytes.Reader
	out bytes.Buffer
}

func (p *pipeConn) Read(b []byte) (int, error)         { return p.in.Read(b) }
func (p *pipeConn) Write(b []byte) (int, error)        { return p.out.Write(b) }
func (p *pipeConn) Close() error                       { return nil }
func (p *pipeConn) LocalAddr() net.Addr                { return &net.UnixAddr{Net: "unix"} }
func (p *pipeConn) RemoteAddr() net.Addr               { return &net.UnixAddr{Net: "unix"} }
func (p *pipeConn) SetDeadline(t time.Time) error      { return nil }
func (p *pipeConn) SetReadDeadline(t time.Time) error  { return nil }
func (p *pipeConn) SetWriteDeadline(t time.Time) error { return nil }

// fuzzServe runs one connection over input and checks the invariants every run must keep.
func fuzzServe(t *testing.T, input []byte) []byte {
	ex := newMemExports()
	m := ex.add("disk", "fuzz", newMemExport(1<<20))
	m.WriteAt(bytes.Repeat([]byte{1}, 3*memCluster), memCluster, false)
	ro := ex.add("ro", "", newMemExport(memCluster))
	ro.readOnly = true
	srv := &Server{Exports: ex, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}
	pc := &pipeConn{in: bytes.NewReader(input)}
	done := make(chan struct{})
	go func() {
		srv.ServeConn(pc)
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatalf("connection did not end on input %x", input)
	}
	if o, c := ex.opens.Load(), ex.closes.Load(); o != c {
		t.Fatalf("exports opened %d times, closed %d times", o, c)
	}
	out := pc.out.Bytes()
	if len(out) < 18 || binary.BigEndian.Uint64(out) != nbdMagic {
		t.Fatalf("no greeting in output %x", out)
	}
	return out
}

func opt(opt uint32, data []byte) []byte {
	b := binary.BigEndian.AppendUint64(nil, optMagic)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	return append(b, data...)
}

func req(flags, typ uint16, cookie, off uint64, length uint32, payload []byte) []byte {
	b := binary.BigEndian.AppendUint32(nil, requestMagic)
	b = binary.BigEndian.AppendUint16(b, flags)
	b = binary.BigEndian.AppendUint16(b, typ)
	b = binary.BigEndian.AppendUint64(b, cookie)
	b = binary.BigEndian.AppendUint64(b, off)
	b = binary.BigEndian.AppendUint32(b, length)
	return append(b, payload...)
}

var clientFlags = binary.BigEndian.AppendUint32(nil, flagFixedNewstyle|flagNoZeroes)

func concat(parts ...[]byte) []byte { return bytes.Join(parts, nil) }

// FuzzHandshake feeds arbitrary bytes as everything the client sends.
func FuzzHandshake(f *testing.F) {
	f.Add([]byte{})
	f.Add([]byte{0, 0, 0, 3})
	f.Add([]byte{0xff, 0xff, 0xff, 0xff})
	f.Add(concat(clientFlags, opt(optExportName, []byte("disk")), req(0, cmdRead, 1, 0, 512, nil)))
	f.Add(concat(clientFlags, opt(optGo, goData("disk")), req(0, cmdDisc, 1, 0, 0, nil)))
	f.Add(concat(clientFlags, opt(optList, nil), opt(optAbort, nil)))
	f.Add(concat(clientFlags, opt(optStartTLS, nil)))
	f.Add(concat(clientFlags, opt(optGo, nil)))
	f.Fuzz(func(t *testing.T, input []byte) {
		fuzzServe(t, input)
	})
}

// FuzzOptions fuzzes the option sequence after valid client flags.
func FuzzOptions(f *testing.F) {
	f.Add(opt(optList, nil))
	f.Add(opt(optInfo, goData("disk", infoName, infoDescription, infoBlockSize)))
	f.Add(concat(opt(optStructuredReply, nil), opt(optSetMetaContext, metaData("disk", baseAllocation)), opt(optGo, goData("disk"))))
	f.Add(opt(optListMetaContext, metaData("disk", "base:", "qemu:")))
	f.Add(opt(optSetMetaContext, metaData("disk", baseAllocation)))
	f.Add(opt(optGo, goData("nope")))
	f.Add(opt(optExportName, []byte("ro")))
	f.Add(opt(12345, []byte("x")))
	f.Add(concat(opt(optInfo, []byte{0, 0, 0, 4, 'd', 'i', 's', 'k', 0, 1}), opt(optAbort, nil)))
	f.Fuzz(func(t *testing.T, options []byte) {
		fuzzServe(t, concat(clientFlags, options))
	})
}

// FuzzRequest fuzzes the transmission phase after a complete negotiation; the first
// byte picks structured replies (bit 0) and the read-only export (bit 1).
func FuzzRequest(f *testing.F) {
	pay := bytes.Repeat([]byte{0xab}, 700)
	for _, mode := range []byte{0, 1, 2} {
		f.Add(mode, concat(req(0, cmdWrite, 1, 100, 700, pay), req(0, cmdRead, 2, 0, 4096, nil), req(0, cmdFlush, 3, 0, 0, nil)))
		f.Add(mode, concat(req(cmdFlagReqOne, cmdBlockStatus, 1, 0, 1<<20, nil), req(0, cmdBlockStatus, 2, 1000, 300000, nil)))
		f.Add(mode, concat(req(0, cmdRead, 1, 0, 256<<10, nil), req(cmdFlagDF, cmdRead, 2, 0, 256<<10, nil)))
		f.Add(mode, concat(req(cmdFlagFastZero|cmdFlagNoHole, cmdWriteZeroes, 1, 0, 1<<20, nil), req(cmdFlagFUA, cmdTrim, 2, 5, 70000, nil), req(0, cmdCache, 3, 0, 1, nil)))
		f.Add(mode, concat(req(0, cmdRead, 1, 1<<20, 1, nil), req(0, cmdWrite, 2, 1<<20-1, 2, []byte{1, 2}), req(0, 99, 3, 0, 0, nil)))
		f.Add(mode, req(0, cmdWrite, 1, 0, MaxPayload+1, nil))
		f.Add(mode, req(0, cmdDisc, 1, 0, 0, nil))
	}
	f.Fuzz(func(t *testing.T, mode byte, requests []byte) {
		name := "disk"
		if mode&2 != 0 {
			name = "ro"
		}
		var hs []byte
		if mode&1 != 0 {
			hs = concat(opt(optStructuredReply, nil), opt(optSetMetaContext, metaData(name, baseAllocation)))
		}
		fuzzServe(t, concat(clientFlags, hs, opt(optGo, goData(name)), requests))
	})
}

// FuzzOptionParsers checks that the option data parsers never panic and accept
// exactly what re-encodes to the same bytes.
func FuzzOptionParsers(f *testing.F) {
	f.Add(goData("disk", 1, 2, 3))
	f.Add(metaData("disk", baseAllocation, "qemu:"))
	f.Add([]byte{0, 0, 0, 0, 0, 0})
	f.Add([]byte{0xff, 0xff, 0xff, 0xff})
	f.Fuzz(func(t *testing.T, data []byte) {
		if r, err := parseInfoRequest(data); err == nil {
			if enc := goData(r.name, r.infos...); !bytes.Equal(enc, data) {
				t.Fatalf("info request %x parsed as %+v which encodes to %x", data, r, enc)
			}
		}
		if r, err := parseMetaRequest(data); err == nil {
			if enc := metaData(r.name, r.queries...); !bytes.Equal(enc, data) {
				t.Fatalf("meta request %x parsed as %+v which encodes to %x", data, r, enc)
			}
		}
		if len(data) >= requestHeaderLen {
			h, err := parseRequestHeader(data)
			if (err == nil) != (binary.BigEndian.Uint32(data) == requestMagic) {
				t.Fatalf("request magic check wrong for %x", data[:4])
			}
			if err == nil && !bytes.Equal(req(h.flags, h.typ, h.cookie, h.off, h.length, nil), data[:requestHeaderLen]) {
				t.Fatalf("request header %x round trip gave %+v", data[:requestHeaderLen], h)
			}
		}
	})
}
