package nbd

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"runtime"
	"sync"
	"time"
)

const (
	// holeProbeMin is the smallest structured READ for which the export's extents
	// are consulted so that zero ranges go out as OFFSET_HOLE chunks.
	holeProbeMin = 64 << 10
	// maxReadChunks bounds the chunks of one structured READ reply.
	maxReadChunks = 256
	// maxStatusDescriptors bounds the descriptors of one BLOCK_STATUS reply.
	maxStatusDescriptors = 64 << 10
	// copyThreshold: payloads up to this size are copied into the output buffer,
	// larger ones are written straight from their buffer with writev.
	copyThreshold = 32 << 10
	// outBufferSize is the writer's output buffer; it flushes when full or idle.
	outBufferSize = 128 << 10
)

// request is one transmission-phase request and, once served, its reply.
type request struct {
	c *conn
	requestHeader
	buf    *[]byte // WRITE payload or READ data
	pipe   *pipe   // READ data to splice to the socket, or WRITE payload (instead of buf)
	cost   int64   // budget held
	errno  uint32
	chunks []readChunk                   // structured READ split around zero ranges; empty means one data chunk
	desc   []uint32                      // BLOCK_STATUS (length, flags) pairs
	hdrOut [structuredReadHeaderLen]byte // reply header when a worker sends the reply itself
	vec    net.Buffers                   // header and data of such a reply
	vecArr [2][]byte                     // backing array of vec
}

// structuredReadHeaderLen is the length of an OFFSET_DATA chunk's header and offset.
const structuredReadHeaderLen = 20 + 8

// readChunk is one OFFSET_DATA (data != nil) or OFFSET_HOLE chunk of a READ reply.
type readChunk struct {
	off  uint64
	data []byte
	hole uint32
}

var requestPool = sync.Pool{New: func() any { return new(request) }}

func (c *conn) maxInFlight() int {
	if c.srv.MaxInFlight > 0 {
		return c.srv.MaxInFlight
	}
	return defaultMaxInFlight
}

func (c *conn) maxBufferBytes() int64 {
	if c.srv.MaxBufferBytes > 0 {
		return c.srv.MaxBufferBytes
	}
	return defaultMaxBufferBytes
}

// transmit runs the transmission phase until the client disconnects or misbehaves.
func (c *conn) transmit() error {
	n := c.maxInFlight()
	c.maxWorkers = n
	c.budget = newBudget(n, c.maxBufferBytes())
	c.replies = make(chan *request, n)
	c.work = make(chan *request)
	c.writerDone = make(chan struct{})
	c.out = make([]byte, 0, outBufferSize)
	c.initSplice()
	c.initBlocking()
	go c.writer()
	err := c.readLoop()
	// Every request already read is served and answered before the connection closes.
	c.handlers.Wait()
	close(c.work)
	if c.streamq != nil {
		close(c.streamq)
	}
	c.workers.Wait()
	close(c.replies)
	<-c.writerDone
	c.closeExport()
	if c.writeErr != nil {
		// The failed write is the cause; the reader only saw its consequence.
		err = fmt.Errorf("Failed to send replies: %w", c.writeErr)
	}
	return err
}

func (c *conn) readLoop() error {
	defer c.leaveBlocking()
	for {
		if _, err := io.ReadFull(c.br, c.hdr[:]); err != nil {
			if c.isStopping() && (errors.Is(err, os.ErrDeadlineExceeded) || err == io.EOF) {
				return nil // stopped by stopReading (a deadline, or shutdown in blocking mode)
			}
			if errors.Is(err, io.ErrUnexpectedEOF) {
				return violation("truncated request header")
			}
			return err
		}
		h, err := parseRequestHeader(c.hdr[:])
		if err != nil {
			return violation("%v (%#x)", err, binary.BigEndian.Uint32(c.hdr[:]))
		}
		if h.typ == cmdDisc {
			return errClientDone
		}
		c.adaptBlocking(&h)
		var cost int64
		switch h.typ {
		case cmdWrite:
			if h.length > MaxPayload {
				return violation("write payload of %d bytes exceeds %d", h.length, MaxPayload)
			}
			cost = int64(h.length)
		case cmdRead:
			if h.length <= MaxPayload {
				cost = int64(h.length)
			}
		}
		c.budget.acquire(cost)
		if err := c.acquireMemory(cost); err != nil {
			c.budget.release(cost)
			if c.isStopping() {
				return nil
			}
			return err
		}
		r := requestPool.Get().(*request)
		r.c = c
		r.requestHeader = h
		r.cost = cost
		if h.typ == cmdWrite {
			c.payloads++
			c.payloadSeq.Store(c.payloads)
			err := c.readPayload(r)
			c.payloadSeq.Store(0)
			if err != nil {
				c.finish(r)
				if c.isStopping() && errors.Is(err, os.ErrDeadlineExceeded) {
					return nil
				}
				return fmt.Errorf("Failed to read write payload of %d bytes: %w", h.length, err)
			}
		}
		if h.typ != cmdWrite {
			c.expectSpliced(false)
		}
		c.handlers.Add(1)
		if !c.stream(r) {
			c.dispatch(r)
		}
	}
}

// dispatch hands r to an idle worker of the connection, or starts a new worker when
// none is idle. Workers live as long as the connection, so their stacks, grown once
// by the deep export call chain, are reused instead of being grown again (copied) for
// every request. There are never more than MaxInFlight: when that many exist and none
// is idle, one has just sent its reply (which is what freed the budget for r) and is on
// its way back, so r waits for it. The reader calls it, and the streamer for the READs
// it hands back (see stream).
func (c *conn) dispatch(r *request) {
	select {
	case c.work <- r:
		return
	default:
	}
	c.workerMu.Lock()
	if c.nworkers < c.maxWorkers {
		c.nworkers++
		c.workerMu.Unlock()
		c.workers.Add(1)
		go c.worker(r)
		return
	}
	c.workerMu.Unlock()
	c.work <- r
}

// worker serves r, then every request handed to it, until the connection ends.
func (c *conn) worker(r *request) {
	defer c.workers.Done()
	for ok := true; ok; r, ok = <-c.work {
		r.serve()
	}
}

func (r *request) serve() {
	c := r.c
	c.srv.stats.requests.Add(1)
	r.errno = c.execute(r)
	c.reply(r)
}

// reply sends r's reply, or hands it to the writer, once r is served.
func (c *conn) reply(r *request) {
	if !c.sendOwn(r) {
		c.replies <- r
	}
	c.handlers.Done()
}

// sendOwn sends the reply of a large READ served from a buffer from the worker that read
// the data, when no other reply is being sent, and reports whether it did. The data then
// goes to the socket from the CPU whose cache holds it, without a hand-off to the
// writer; replies that gain nothing from batching (one write each anyway) are the only
// ones sent this way.
func (c *conn) sendOwn(r *request) bool {
	if r.typ != cmdRead || r.errno != 0 || r.buf == nil || len(r.chunks) != 0 || int(r.length) <= copyThreshold {
		return false
	}
	if !c.sendMu.TryLock() {
		return false
	}
	if c.writeErr == nil {
		var hdr []byte
		if c.structured {
			hdr = appendChunkHeader(r.hdrOut[:0], chunkFlagDone, chunkOffsetData, r.cookie, 8+r.length)
			hdr = binary.BigEndian.AppendUint64(hdr, r.off)
		} else {
			hdr = appendSimpleHeader(r.hdrOut[:0], 0, r.cookie)
		}
		c.srv.stats.writes.Add(1)
		c.srv.stats.ownReplies.Add(1)
		c.nc.SetWriteDeadline(time.Now().Add(c.srv.writeTimeout()))
		r.vec = append(r.vecArr[:0], hdr, *r.buf)
		if _, err := r.vec.WriteTo(c.nc); err != nil {
			c.writeFailed(err)
		}
		r.vec, r.vecArr = nil, [2][]byte{} // the pooled request keeps no hold on the buffer
	}
	c.sendMu.Unlock()
	c.finish(r)
	return true
}

// acquireMemory takes n bytes of the server-wide payload memory, waiting while other
// requests hold it all, until the connection must stop.
func (c *conn) acquireMemory(n int64) error {
	if n == 0 {
		return nil
	}
	mem := c.srv.memory()
	if mem.TryAcquire(n) {
		return nil
	}
	c.srv.stats.memWaits.Add(1)
	if err := mem.Acquire(c.stop, n); err != nil {
		return fmt.Errorf("Stopped while waiting for payload memory: %w", net.ErrClosed)
	}
	return nil
}

// finish returns a request's buffers and budget once its reply is out.
func (c *conn) finish(r *request) {
	if r.buf != nil {
		putBuf(r.buf)
		r.buf = nil
	}
	if r.pipe != nil {
		r.pipe.put()
		r.pipe = nil
	}
	c.budget.release(r.cost)
	if r.cost > 0 {
		c.srv.memory().Release(r.cost)
	}
	r.c = nil
	r.errno = 0
	r.chunks = r.chunks[:0]
	r.desc = r.desc[:0]
	requestPool.Put(r)
}

var cmdNames = [...]string{"READ", "WRITE", "DISC", "FLUSH", "TRIM", "CACHE", "WRITE_ZEROES", "BLOCK_STATUS"}

func cmdName(t uint16) string {
	if int(t) < len(cmdNames) {
		return cmdNames[t]
	}
	return fmt.Sprintf("command %d", t)
}

// fail maps an Export error to an NBD error, logging the unexpected ones (at most
// a few per second per connection, so a failing disk cannot flood the log).
func (c *conn) fail(r *request, err error) uint32 {
	code := errorCode(err)
	if code == errIO {
		if n, ok := c.errLog.Allow(time.Now()); ok {
			c.log.Error("NBD request failed", "cmd", cmdName(r.typ), "offset", r.off, "length", r.length, "err", err, "suppressed", n)
		}
	}
	return code
}

// inRange reports whether [off, off+length) lies inside the export.
func (c *conn) inRange(h *requestHeader) bool {
	size := uint64(c.size)
	return h.off <= size && uint64(h.length) <= size-h.off
}

// execute serves one request and returns its NBD error value.
func (c *conn) execute(r *request) uint32 {
	h := &r.requestHeader
	allowed := uint16(cmdFlagFUA)
	switch h.typ {
	case cmdRead:
		if c.structured {
			allowed |= cmdFlagDF
		}
	case cmdWriteZeroes:
		allowed |= cmdFlagNoHole | cmdFlagFastZero
	case cmdBlockStatus:
		allowed |= cmdFlagReqOne
	}
	if h.flags&^allowed != 0 {
		return errInval
	}
	fua := h.flags&cmdFlagFUA != 0
	off, length := int64(h.off), int64(h.length)
	switch h.typ {
	case cmdRead:
		if h.length == 0 || h.length > MaxPayload || !c.inRange(h) {
			return errInval
		}
		return c.read(r)
	case cmdWrite:
		switch {
		case c.readOnly:
			return errPerm
		case h.length == 0:
			return errInval
		case !c.inRange(h):
			return errNoSpc
		}
		if r.pipe != nil {
			return c.writeSpliced(r, off, fua)
		}
		if err := c.export.WriteAt(*r.buf, off, fua); err != nil {
			return c.fail(r, err)
		}
	case cmdFlush:
		if err := c.export.Flush(); err != nil {
			return c.fail(r, err)
		}
	case cmdTrim:
		switch {
		case c.readOnly:
			return errPerm
		case !c.inRange(h):
			return errInval
		case length == 0:
			return 0
		}
		if err := c.export.Trim(off, length, fua); err != nil {
			return c.fail(r, err)
		}
	case cmdWriteZeroes:
		switch {
		case c.readOnly:
			return errPerm
		case !c.inRange(h):
			return errNoSpc
		case length == 0:
			return 0
		}
		f := ZeroFlags{NoHole: h.flags&cmdFlagNoHole != 0, Fast: h.flags&cmdFlagFastZero != 0, FUA: fua}
		if err := c.export.WriteZeroes(off, length, f); err != nil {
			return c.fail(r, err)
		}
	case cmdCache:
		switch {
		case !c.inRange(h):
			return errInval
		case length == 0:
			return 0
		}
		if err := c.export.Cache(off, length); err != nil {
			return c.fail(r, err)
		}
	case cmdBlockStatus:
		if !c.metaAlloc || h.length == 0 || !c.inRange(h) {
			return errInval
		}
		return c.blockStatus(r)
	default:
		return errInval
	}
	return 0
}

// read fills r.buf, or r.pipe when the data can be spliced; a large structured READ
// without DF is split around zero ranges.
func (c *conn) read(r *request) uint32 {
	if c.structured && r.flags&cmdFlagDF == 0 && r.length >= holeProbeMin {
		r.buf = getBuf(int(r.length))
		if c.planRead(r) {
			for _, ch := range r.chunks {
				if ch.data == nil {
					continue
				}
				if err := c.export.ReadAt(ch.data, int64(ch.off)); err != nil {
					r.chunks = r.chunks[:0]
					return c.fail(r, err)
				}
			}
			return 0
		}
	}
	if c.spliceRead(r) {
		if r.buf != nil {
			putBuf(r.buf)
			r.buf = nil
		}
		return 0
	}
	if r.buf == nil {
		r.buf = getBuf(int(r.length))
	}
	if err := c.export.ReadAt(*r.buf, int64(r.off)); err != nil {
		return c.fail(r, err)
	}
	return 0
}

// planRead splits a READ into data and hole chunks from the export's extents. It
// returns false (read everything as data) when there is no zero range or the
// extents cannot be had.
func (c *conn) planRead(r *request) bool {
	buf := *r.buf
	start, end := r.off, r.off+uint64(r.length)
	off := start
	holes := false
	for off < end {
		exts, err := c.export.Extents(int64(off), int64(end-off))
		if err != nil || len(exts) == 0 {
			r.chunks = r.chunks[:0]
			return false
		}
		for _, e := range exts {
			if e.Length <= 0 {
				r.chunks = r.chunks[:0]
				return false
			}
			l := uint64(e.Length)
			if l > end-off {
				l = end - off
			}
			last := len(r.chunks) - 1
			switch {
			case e.Zero && last >= 0 && r.chunks[last].data == nil:
				r.chunks[last].hole += uint32(l)
			case !e.Zero && last >= 0 && r.chunks[last].data != nil:
				ch := &r.chunks[last]
				ch.data = buf[ch.off-start : off+l-start]
			case len(r.chunks) >= maxReadChunks:
				// Too fragmented: the rest goes out as one data chunk.
				if r.chunks[last].data != nil {
					r.chunks[last].data = buf[r.chunks[last].off-start:]
				} else {
					r.chunks = append(r.chunks, readChunk{off: off, data: buf[off-start:]})
				}
				return true
			case e.Zero:
				holes = true
				r.chunks = append(r.chunks, readChunk{off: off, hole: uint32(l)})
			default:
				r.chunks = append(r.chunks, readChunk{off: off, data: buf[off-start : off+l-start]})
			}
			off += l
			if off >= end {
				break
			}
		}
	}
	if !holes {
		r.chunks = r.chunks[:0]
		return false
	}
	return true
}

// blockStatus fills r.desc with base:allocation descriptors for the request range.
func (c *conn) blockStatus(r *request) uint32 {
	reqOne := r.flags&cmdFlagReqOne != 0
	off, end := r.off, r.off+uint64(r.length)
	for off < end && len(r.desc)/2 < maxStatusDescriptors {
		exts, err := c.export.Extents(int64(off), int64(end-off))
		if err != nil {
			r.desc = r.desc[:0]
			return c.fail(r, err)
		}
		if len(exts) == 0 {
			r.desc = r.desc[:0]
			return c.fail(r, fmt.Errorf("export returned no extents at offset %d", off))
		}
		for _, e := range exts {
			if e.Length <= 0 {
				r.desc = r.desc[:0]
				return c.fail(r, fmt.Errorf("export returned an extent of length %d at offset %d", e.Length, off))
			}
			l := min(uint64(e.Length), end-off)
			var flags uint32
			if e.Hole {
				flags |= stateHole
			}
			if e.Zero {
				flags |= stateZero
			}
			if n := len(r.desc); n >= 2 && r.desc[n-1] == flags {
				r.desc[n-2] += uint32(l)
			} else if (reqOne && n >= 2) || n/2 >= maxStatusDescriptors {
				return 0 // REQ_ONE asks for one descriptor; others are capped
			} else {
				r.desc = append(r.desc, uint32(l), flags)
			}
			off += l
			if off >= end {
				break
			}
		}
	}
	return 0
}

// writer sends replies in completion order, batching small ones into one write. It
// holds sendMu from the first reply it takes until its output buffer is empty again.
func (c *conn) writer() {
	defer close(c.writerDone)
	locked := false
	for r := range c.replies {
		if !locked {
			c.sendMu.Lock()
			locked = true
		}
		if c.writeErr == nil {
			c.encode(r)
			if len(c.replies) == 0 && len(c.out) < outBufferSize-4096 {
				// Let handlers that are runnable finish first so their replies
				// share this write: one yield, so a slow handler never delays
				// the replies already here.
				runtime.Gosched()
			}
			if len(c.replies) == 0 || len(c.out) >= outBufferSize-4096 {
				c.flush()
			}
		}
		if len(c.out) == 0 || c.writeErr != nil {
			c.sendMu.Unlock()
			locked = false
		}
		c.finish(r)
	}
	if locked {
		c.sendMu.Unlock()
	}
}

func (c *conn) flush() {
	if len(c.out) == 0 || c.writeErr != nil {
		return
	}
	c.srv.stats.writes.Add(1)
	c.nc.SetWriteDeadline(time.Now().Add(c.srv.writeTimeout()))
	if _, err := c.nc.Write(c.out); err != nil {
		c.writeFailed(err)
	}
	c.out = c.out[:0]
}

// flushWith sends the buffered replies followed by p in one writev.
func (c *conn) flushWith(p []byte) {
	if c.writeErr != nil {
		return
	}
	c.srv.stats.writes.Add(1)
	c.nc.SetWriteDeadline(time.Now().Add(c.srv.writeTimeout()))
	c.vec = append(c.vecArr[:0], c.out, p)
	if _, err := c.vec.WriteTo(c.nc); err != nil {
		c.writeFailed(err)
	}
	c.out = c.out[:0]
}

func (c *conn) writeFailed(err error) {
	if errors.Is(err, os.ErrDeadlineExceeded) {
		err = violation("client did not read its replies for %v", c.srv.writeTimeout())
	}
	c.writeErr = err
	// Unblock the reader; the connection is unusable.
	c.interruptReads(true)
	c.raw.Close()
}

// payload appends p to the output, copying small payloads and writing large ones directly.
func (c *conn) payload(p []byte) {
	if len(p) <= copyThreshold {
		if len(c.out)+len(p) > cap(c.out) {
			c.flush()
		}
		c.out = append(c.out, p...)
		return
	}
	c.flushWith(p)
}

// readData sends the data of a successful READ after its header.
func (c *conn) readData(r *request) {
	if r.pipe != nil {
		c.spliceOut(r.pipe, int(r.length))
		return
	}
	c.payload(*r.buf)
}

func (c *conn) simpleHeader(errno uint32, cookie uint64) {
	c.out = appendSimpleHeader(c.out, errno, cookie)
}

func (c *conn) chunkHeader(flags, typ uint16, cookie uint64, length uint32) {
	c.out = appendChunkHeader(c.out, flags, typ, cookie, length)
}

// appendSimpleHeader appends a simple reply header to b.
func appendSimpleHeader(b []byte, errno uint32, cookie uint64) []byte {
	b = binary.BigEndian.AppendUint32(b, simpleMagic)
	b = binary.BigEndian.AppendUint32(b, errno)
	return binary.BigEndian.AppendUint64(b, cookie)
}

// appendChunkHeader appends a structured reply chunk header to b.
func appendChunkHeader(b []byte, flags, typ uint16, cookie uint64, length uint32) []byte {
	b = binary.BigEndian.AppendUint32(b, structuredMagic)
	b = binary.BigEndian.AppendUint16(b, flags)
	b = binary.BigEndian.AppendUint16(b, typ)
	b = binary.BigEndian.AppendUint64(b, cookie)
	return binary.BigEndian.AppendUint32(b, length)
}

// encode appends r's reply to the output.
func (c *conn) encode(r *request) {
	if !c.structured || (r.typ != cmdRead && r.typ != cmdBlockStatus) {
		c.simpleHeader(r.errno, r.cookie)
		if r.typ == cmdRead && r.errno == 0 {
			c.readData(r)
		}
		return
	}
	if r.errno != 0 {
		c.chunkHeader(chunkFlagDone, chunkError, r.cookie, 6)
		c.out = binary.BigEndian.AppendUint32(c.out, r.errno)
		c.out = binary.BigEndian.AppendUint16(c.out, 0)
		return
	}
	if r.typ == cmdBlockStatus {
		c.chunkHeader(chunkFlagDone, chunkBlockStat, r.cookie, uint32(4+4*len(r.desc)))
		c.out = binary.BigEndian.AppendUint32(c.out, metaContextBaseAllocation)
		for _, v := range r.desc {
			if len(c.out)+4 > cap(c.out) {
				c.flush()
			}
			c.out = binary.BigEndian.AppendUint32(c.out, v)
		}
		return
	}
	if len(r.chunks) == 0 {
		c.chunkHeader(chunkFlagDone, chunkOffsetData, r.cookie, 8+r.length)
		c.out = binary.BigEndian.AppendUint64(c.out, r.off)
		c.readData(r)
		return
	}
	for i, ch := range r.chunks {
		var flags uint16
		if i == len(r.chunks)-1 {
			flags = chunkFlagDone
		}
		if len(c.out)+32 > cap(c.out) {
			c.flush()
		}
		if ch.data == nil {
			c.chunkHeader(flags, chunkOffsetHole, r.cookie, 12)
			c.out = binary.BigEndian.AppendUint64(c.out, ch.off)
			c.out = binary.BigEndian.AppendUint32(c.out, ch.hole)
			continue
		}
		c.chunkHeader(flags, chunkOffsetData, r.cookie, uint32(8+len(ch.data)))
		c.out = binary.BigEndian.AppendUint64(c.out, ch.off)
		c.payload(ch.data)
	}
}
