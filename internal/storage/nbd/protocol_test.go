package nbd

import (
	"bytes"
	"encoding/binary"
	"errors"
	"log/slog"
	"net"
	"strings"
	"testing"
	"time"
)

// TestSimpleReplies drives a client that never asks for structured replies, using the
// old NBD_OPT_EXPORT_NAME path with and without the 124 zero bytes.
func TestSimpleReplies(t *testing.T) {
	ex := newMemExports()
	m := ex.add("disk", "", newMemExport(1<<20))
	s := startServer(t, ex, nil)
	for _, zeroes := range []bool{false, true} {
		c := dialRaw(t, "unix", s.sock)
		flags := uint32(flagFixedNewstyle | flagNoZeroes)
		if zeroes {
			flags = flagFixedNewstyle
		}
		c.greet(flags)
		c.option(optExportName, []byte("disk"))
		if size := c.u64(); size != 1<<20 {
			t.Fatalf("size %d", size)
		}
		tf := c.u16()
		if tf&tflagSendDF != 0 {
			t.Errorf("DF advertised without structured replies: %#x", tf)
		}
		want := uint16(tflagHasFlags | tflagSendFlush | tflagSendFUA | tflagSendTrim | tflagSendWriteZeroes | tflagSendFastZero | tflagSendCache | tflagCanMultiConn)
		if tf != want {
			t.Errorf("transmission flags %#x, want %#x", tf, want)
		}
		if zeroes {
			if z := c.read(124); !bytes.Equal(z, make([]byte, 124)) {
				t.Fatal("124 trailing bytes are not zero")
			}
		}
		payload := bytes.Repeat([]byte{0xc3}, 5000)
		c.request(cmdFlagFUA, cmdWrite, 1, 777, uint32(len(payload)), payload)
		if e, h := c.simpleReply(); e != 0 || h != 1 {
			t.Fatalf("write reply err=%d cookie=%d", e, h)
		}
		c.request(0, cmdRead, 2, 777, 5000, nil)
		if e, h := c.simpleReply(); e != 0 || h != 2 {
			t.Fatalf("read reply err=%d cookie=%d", e, h)
		}
		if got := c.read(5000); !bytes.Equal(got, payload) {
			t.Fatal("read back differs")
		}
		// Errors: out-of-range read (EINVAL, no data follows), write past the end
		// (ENOSPC), unknown command and flag (EINVAL), block status without a
		// negotiated context (EINVAL).
		cases := []struct {
			flags, typ uint16
			off        uint64
			length     uint32
			payload    []byte
			want       uint32
		}{
			{0, cmdRead, 1<<20 - 10, 11, nil, errInval},
			{0, cmdRead, 1 << 62, 1, nil, errInval},
			{0, cmdRead, 0, MaxPayload + 1, nil, errInval},
			{0, cmdWrite, 1<<20 - 1, 2, []byte{1, 2}, errNoSpc},
			{0, cmdWriteZeroes, 1 << 20, 1, nil, errNoSpc},
			{0, cmdTrim, 1<<64 - 1, 2, nil, errInval},
			{0, cmdCache, 1 << 20, 4096, nil, errInval},
			{0, 42, 0, 0, nil, errInval},
			{cmdFlagReqOne, cmdWrite, 0, 1, []byte{9}, errInval},
			{1 << 9, cmdFlush, 0, 0, nil, errInval},
			{cmdFlagDF, cmdRead, 0, 512, nil, errInval},
			{0, cmdBlockStatus, 0, 4096, nil, errInval},
			{0, cmdRead, 0, 0, nil, errInval},
		}
		for i, tc := range cases {
			c.request(tc.flags, tc.typ, uint64(100+i), tc.off, tc.length, tc.payload)
			e, h := c.simpleReply()
			if e != tc.want || h != uint64(100+i) {
				t.Errorf("case %d (cmd %d): err=%d cookie=%d, want err=%d", i, tc.typ, e, h, tc.want)
			}
		}
		// The connection still works after the errors.
		c.request(0, cmdFlush, 3, 0, 0, nil)
		if e, _ := c.simpleReply(); e != 0 {
			t.Fatalf("flush err=%d", e)
		}
		c.request(0, cmdDisc, 4, 0, 0, nil)
		c.expectClosed()
	}
	if m.fuas.Load() != 2 || m.flushes.Load() != 2 {
		t.Errorf("fuas=%d flushes=%d, want 2 and 2", m.fuas.Load(), m.flushes.Load())
	}
}

// structuredSession opens name with structured replies and base:allocation.
func structuredSession(t *testing.T, s *testServer, name string) (*rawClient, uint16) {
	t.Helper()
	c := dialRaw(t, "tcp", s.tcp)
	c.greet(flagFixedNewstyle | flagNoZeroes)
	c.option(optStructuredReply, nil)
	if typ, _ := c.optReply(optStructuredReply); typ != repAck {
		t.Fatalf("structured reply refused: %#x", typ)
	}
	c.option(optSetMetaContext, metaData(name, "qemu:dirty-bitmap:x", baseAllocation))
	typ, data := c.optReply(optSetMetaContext)
	if typ != repMetaContext || binary.BigEndian.Uint32(data) != metaContextBaseAllocation || string(data[4:]) != baseAllocation {
		t.Fatalf("meta context reply %#x %q", typ, data)
	}
	if typ, _ := c.optReply(optSetMetaContext); typ != repAck {
		t.Fatalf("meta context not acked: %#x", typ)
	}
	_, flags := c.goExport(name)
	return c, flags
}

// TestStructuredReads checks OFFSET_DATA/OFFSET_HOLE chunks, DF, errors and block status.
func TestStructuredReads(t *testing.T) {
	ex := newMemExports()
	m := ex.add("thin", "", newMemExport(8*memCluster))
	pat := bytes.Repeat([]byte{0x77}, memCluster)
	m.WriteAt(pat, 0, false)
	m.WriteAt(pat, 3*memCluster, false)
	m.failAt = 7*memCluster + 5
	s := startServer(t, ex, nil)
	c, flags := structuredSession(t, s, "thin")
	if flags&tflagSendDF == 0 {
		t.Errorf("DF not advertised with structured replies: %#x", flags)
	}

	// A read over data, hole, hole, data comes back as data, hole, data chunks.
	c.request(0, cmdRead, 10, 0, 4*memCluster, nil)
	type piece struct {
		typ    uint16
		off    uint64
		length int
	}
	var got []piece
	content := make([]byte, 4*memCluster)
	for {
		ch := c.chunk()
		if ch.cookie != 10 {
			t.Fatalf("chunk for cookie %d", ch.cookie)
		}
		off := binary.BigEndian.Uint64(ch.data)
		switch ch.typ {
		case chunkOffsetData:
			copy(content[off:], ch.data[8:])
			got = append(got, piece{ch.typ, off, len(ch.data) - 8})
		case chunkOffsetHole:
			got = append(got, piece{ch.typ, off, int(binary.BigEndian.Uint32(ch.data[8:]))})
		default:
			t.Fatalf("unexpected chunk type %d", ch.typ)
		}
		if ch.flags&chunkFlagDone != 0 {
			break
		}
	}
	want := []piece{{chunkOffsetData, 0, memCluster}, {chunkOffsetHole, memCluster, 2 * memCluster}, {chunkOffsetData, 3 * memCluster, memCluster}}
	if len(got) != len(want) {
		t.Fatalf("chunks %+v, want %+v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("chunk %d: %+v, want %+v", i, got[i], want[i])
		}
	}
	if !bytes.Equal(content, m.content(0, 4*memCluster)) {
		t.Error("reassembled read differs from the export")
	}

	// With DF the same read is one data chunk.
	c.request(cmdFlagDF, cmdRead, 11, 0, 4*memCluster, nil)
	ch := c.chunk()
	if ch.typ != chunkOffsetData || ch.flags&chunkFlagDone == 0 || len(ch.data) != 8+4*memCluster || !bytes.Equal(ch.data[8:], m.content(0, 4*memCluster)) {
		t.Fatalf("DF read: type %d flags %d len %d", ch.typ, ch.flags, len(ch.data))
	}

	// An export I/O error is an ERROR chunk with EIO, and is logged.
	c.request(0, cmdRead, 12, 7*memCluster, 4096, nil)
	ch = c.chunk()
	if ch.typ != chunkError || ch.flags&chunkFlagDone == 0 || binary.BigEndian.Uint32(ch.data) != errIO {
		t.Fatalf("failed read: chunk type %d data %x", ch.typ, ch.data)
	}
	// Out of range is EINVAL.
	c.request(0, cmdRead, 13, 8*memCluster, 1, nil)
	ch = c.chunk()
	if ch.typ != chunkError || binary.BigEndian.Uint32(ch.data) != errInval {
		t.Fatalf("out-of-range read: chunk type %d data %x", ch.typ, ch.data)
	}

	// Block status: full map, then REQ_ONE.
	c.request(0, cmdBlockStatus, 14, memCluster/2, 4*memCluster, nil)
	ch = c.chunk()
	if ch.typ != chunkBlockStat || ch.flags&chunkFlagDone == 0 || binary.BigEndian.Uint32(ch.data) != metaContextBaseAllocation {
		t.Fatalf("block status chunk type %d", ch.typ)
	}
	desc := ch.data[4:]
	wantDesc := []uint32{memCluster / 2, 0, 2 * memCluster, stateHole | stateZero, memCluster, 0, memCluster / 2, stateHole | stateZero}
	for i, w := range wantDesc {
		if g := binary.BigEndian.Uint32(desc[4*i:]); g != w {
			t.Errorf("descriptor word %d = %d, want %d", i, g, w)
		}
	}
	if len(desc) != 4*len(wantDesc) {
		t.Errorf("%d descriptor bytes, want %d", len(desc), 4*len(wantDesc))
	}
	c.request(cmdFlagReqOne, cmdBlockStatus, 15, memCluster, 4*memCluster, nil)
	ch = c.chunk()
	if len(ch.data) != 12 || binary.BigEndian.Uint32(ch.data[4:]) != 2*memCluster || binary.BigEndian.Uint32(ch.data[8:]) != stateHole|stateZero {
		t.Errorf("REQ_ONE block status: %x", ch.data)
	}
	// Writes and friends still get simple replies.
	c.request(cmdFlagFastZero, cmdWriteZeroes, 16, 0, 4096, nil)
	if e, h := c.simpleReply(); e != 0 || h != 16 {
		t.Fatalf("write zeroes: err %d cookie %d", e, h)
	}
	if f := m.lastZero.Load().(ZeroFlags); !f.Fast || f.NoHole {
		t.Errorf("zero flags %+v", f)
	}
	m.noFast.Store(true)
	c.request(cmdFlagFastZero|cmdFlagNoHole, cmdWriteZeroes, 17, 0, 4096, nil)
	if e, _ := c.simpleReply(); e != errNotSup {
		t.Fatalf("unsupported fast zero: err %d, want ENOTSUP", e)
	}
	c.request(0, cmdCache, 18, 0, 4096, nil)
	if e, _ := c.simpleReply(); e != 0 || m.caches.Load() != 1 {
		t.Fatalf("cache: err %d, caches %d", e, m.caches.Load())
	}
	c.request(0, cmdDisc, 19, 0, 0, nil)
	c.expectClosed()
	if !strings.Contains(s.logs.String(), "simulated media error") {
		t.Error("the EIO cause was not logged")
	}
}

// TestOutOfOrder checks that a slow request does not hold back faster ones behind it.
func TestOutOfOrder(t *testing.T) {
	ex := newMemExports()
	m := ex.add("disk", "", newMemExport(1<<20))
	m.delay = func(off int64) time.Duration {
		if off == 0 {
			return 300 * time.Millisecond
		}
		return 0
	}
	s := startServer(t, ex, nil)
	c := dialRaw(t, "unix", s.sock)
	c.greet(flagFixedNewstyle | flagNoZeroes)
	c.goExport("disk")
	c.request(0, cmdRead, 1000, 0, 4096, nil)
	const n = 100
	for i := 1; i <= n; i++ {
		c.request(0, cmdRead, uint64(i), uint64(i)*4096, 4096, nil)
	}
	var order []uint64
	for range n + 1 {
		e, h := c.simpleReply()
		if e != 0 {
			t.Fatalf("read %d: err %d", h, e)
		}
		c.read(4096)
		order = append(order, h)
	}
	if order[len(order)-1] != 1000 {
		t.Errorf("the slow read was not answered last: %v", order)
	}
	seen := map[uint64]bool{}
	for _, h := range order {
		if seen[h] {
			t.Fatalf("cookie %d answered twice", h)
		}
		seen[h] = true
	}
}

// TestOptions checks option haggling details against a raw client.
func TestOptions(t *testing.T) {
	ex := newMemExports()
	ex.add("disk", "the disk", newMemExport(1<<20))
	s := startServer(t, ex, nil)
	c := dialRaw(t, "unix", s.sock)
	c.greet(flagFixedNewstyle | flagNoZeroes)

	// Unknown options, including extended headers, are unsupported but harmless.
	for _, opt := range []uint32{4, 11, 12, 0xdeadbeef} {
		c.option(opt, []byte("whatever"))
		if typ, _ := c.optReply(opt); typ != repErrUnsup {
			t.Errorf("option %d: reply %#x, want ERR_UNSUP", opt, typ)
		}
	}
	// STARTTLS without TLS configured is refused by policy.
	c.option(optStartTLS, nil)
	if typ, _ := c.optReply(optStartTLS); typ != repErrPolicy {
		t.Errorf("STARTTLS without TLS: %#x", typ)
	}
	// Malformed GO data, unknown export.
	c.option(optGo, []byte{0, 0, 0, 9, 'x'})
	if typ, _ := c.optReply(optGo); typ != repErrInvalid {
		t.Errorf("malformed GO: %#x", typ)
	}
	c.option(optInfo, goData("nope"))
	if typ, _ := c.optReply(optInfo); typ != repErrUnknown {
		t.Errorf("INFO of unknown export: %#x", typ)
	}
	// SET_META_CONTEXT needs structured replies; LIST does not.
	c.option(optSetMetaContext, metaData("disk", baseAllocation))
	if typ, _ := c.optReply(optSetMetaContext); typ != repErrInvalid {
		t.Errorf("SET_META_CONTEXT before STRUCTURED_REPLY: %#x", typ)
	}
	c.option(optListMetaContext, metaData("disk"))
	if typ, data := c.optReply(optListMetaContext); typ != repMetaContext || string(data[4:]) != baseAllocation {
		t.Errorf("LIST_META_CONTEXT: %#x %q", typ, data)
	}
	if typ, _ := c.optReply(optListMetaContext); typ != repAck {
		t.Errorf("LIST_META_CONTEXT end: %#x", typ)
	}
	c.option(optListMetaContext, metaData("disk", "qemu:"))
	if typ, _ := c.optReply(optListMetaContext); typ != repAck {
		t.Errorf("LIST_META_CONTEXT for an unknown namespace: %#x", typ)
	}
	c.option(optStructuredReply, []byte{1})
	if typ, _ := c.optReply(optStructuredReply); typ != repErrInvalid {
		t.Errorf("STRUCTURED_REPLY with data: %#x", typ)
	}
	// INFO with name, description and block size requests.
	c.option(optInfo, goData("disk", infoName, infoDescription, infoBlockSize, 99))
	infos := map[uint16][]byte{}
	for {
		typ, data := c.optReply(optInfo)
		if typ == repAck {
			break
		}
		if typ != repInfo {
			t.Fatalf("INFO reply %#x", typ)
		}
		infos[binary.BigEndian.Uint16(data)] = data[2:]
	}
	if string(infos[infoName]) != "disk" || string(infos[infoDescription]) != "the disk" || len(infos[infoExport]) != 10 || len(infos[infoBlockSize]) != 12 {
		t.Errorf("INFO replies: %v", infos)
	}
	// ABORT is acknowledged and the server closes.
	c.option(optAbort, nil)
	if typ, _ := c.optReply(optAbort); typ != repAck {
		t.Errorf("ABORT: %#x", typ)
	}
	c.expectClosed()
}

// TestShutdownDrains checks that Shutdown answers requests already in flight.
func TestShutdownDrains(t *testing.T) {
	ex := newMemExports()
	m := ex.add("disk", "", newMemExport(1<<20))
	m.delay = func(int64) time.Duration { return 200 * time.Millisecond }
	s := startServer(t, ex, nil)
	c := dialRaw(t, "unix", s.sock)
	c.greet(flagFixedNewstyle | flagNoZeroes)
	c.goExport("disk")
	for i := range 4 {
		c.request(0, cmdRead, uint64(i), uint64(i)*4096, 4096, nil)
	}
	time.Sleep(50 * time.Millisecond)
	done := make(chan error, 1)
	go func() { done <- s.srv.Shutdown(t.Context()) }()
	for range 4 {
		if e, _ := c.simpleReply(); e != 0 {
			t.Fatalf("in-flight read failed during shutdown: %d", e)
		}
		c.read(4096)
	}
	c.expectClosed()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

// describedHandle is an export that carries its own description.
type describedHandle struct{ *memHandle }

func (describedHandle) Description() string { return "from the export itself" }

type describedExports struct{ *memExports }

func (d describedExports) Open(name string) (Export, error) {
	e, err := d.memExports.Open(name)
	if err != nil {
		return nil, err
	}
	return describedHandle{e.(*memHandle)}, nil
}

// TestDescriber checks that an Export's own description wins over the catalogue's.
func TestDescriber(t *testing.T) {
	inner := newMemExports()
	inner.add("disk", "from the list", newMemExport(1<<20))
	c := dialRaw(t, "unix", startServerWith(t, &Server{Exports: describedExports{inner}}))
	c.greet(flagFixedNewstyle | flagNoZeroes)
	c.option(optInfo, goData("disk", infoDescription))
	var desc string
	for {
		typ, data := c.optReply(optInfo)
		if typ == repAck {
			break
		}
		if binary.BigEndian.Uint16(data) == infoDescription {
			desc = string(data[2:])
		}
	}
	if desc != "from the export itself" {
		t.Errorf("description %q", desc)
	}
}

// TestServeReturns checks what Serve returns after Shutdown and when its listener is closed.
func TestServeReturns(t *testing.T) {
	srv := &Server{Exports: newMemExports(), Logger: slog.New(slog.DiscardHandler)}
	l1, _ := net.Listen("tcp", "127.0.0.1:0")
	l2, _ := net.Listen("tcp", "127.0.0.1:0")
	errs := make(chan error, 2)
	go func() { errs <- srv.Serve(l1) }()
	go func() { errs <- srv.Serve(l2) }()
	time.Sleep(50 * time.Millisecond)
	l2.Close()
	if err := <-errs; err != nil {
		t.Errorf("Serve after its listener was closed: %v", err)
	}
	if err := srv.Shutdown(t.Context()); err != nil {
		t.Fatal(err)
	}
	err := <-errs
	if !errors.Is(err, ErrServerClosed) || !errors.Is(err, net.ErrClosed) {
		t.Errorf("Serve after Shutdown: %v", err)
	}
	if err := srv.Serve(l1); !errors.Is(err, ErrServerClosed) {
		t.Errorf("Serve on a shut-down server: %v", err)
	}
}
