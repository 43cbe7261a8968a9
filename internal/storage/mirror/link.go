package mirror

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/growserver/grow/internal/accept"
	"github.com/growserver/grow/internal/lograte"
	"github.com/growserver/grow/internal/storage/nbd"
)

// Wire format of the mirror link (all integers big endian):
//
//	hello   client->server: "GROWMIRH" | epoch u64 | size u64 | name length u16 | name
//	welcome server->client: magic u32 | status u32 | role u32 | 0 u32 | epoch u64 | size u64
//	request client->server: magic u32 | op u16 | flags u16 | cookie u64 | offset u64 | length u32 | epoch u64 | payload (writes)
//	reply   server->client: magic u32 | status u32 | cookie u64
//
// Replies may come in any order. Status stale carries no state; the client learns the
// server's state from a new hello.
const (
	helloMagic    = "GROWMIRH"
	welcomeMagic  = 0x474d5257 // "GMRW"
	requestMagic  = 0x474d5251 // "GMRQ"
	replyMagic    = 0x474d5250 // "GMRP"
	requestLen    = 36
	replyLen      = 16
	welcomeLen    = 32
	maxNameLen    = 1024
	maxPayloadLen = 32 << 20
	maxServerJobs = 64
	// maxServerBytes bounds the write payload one connection holds in memory at once.
	maxServerBytes = 64 << 20
)

// Operations of the mirror link.
const (
	opWrite      = 1
	opFlush      = 2
	opTrim       = 3
	opZero       = 4
	opResyncDone = 5
)

// Request flags of the mirror link.
const (
	flagFUA    = 1
	flagNoHole = 2
)

// Status codes of the mirror link.
const (
	statusOK      = 0
	statusIO      = 1
	statusStale   = 2
	statusInvalid = 3
	statusUnknown = 4
	statusNoSpace = 5
)

// Errors of the mirror link.
var (
	// ErrPeerLost means the link to the peer failed; the caller must treat the peer as gone.
	ErrPeerLost = errors.New("mirror peer lost")
	// ErrPeerIO means the peer answered with an error for one request.
	ErrPeerIO = errors.New("mirror peer I/O error")
)

// StaleError is returned when the peer refuses this side's epoch; Peer is the peer's
// state when Known (a hello tells it, a refused request does not).
type StaleError struct {
	Peer  State
	Known bool
}

func (e *StaleError) Error() string {
	if !e.Known {
		return "mirror peer refuses this epoch"
	}
	return fmt.Sprintf("mirror peer is %v at epoch %d and refuses this epoch", e.Peer.Role, e.Peer.Epoch)
}

// Peer is the primary's view of the secondary: what the replicating export sends it.
type Peer interface {
	WriteAt(p []byte, off int64, fua bool) error
	Trim(off, length int64, fua bool) error
	WriteZeroes(off, length int64, noHole, fua bool) error
	Flush() error
	// ResyncDone tells the peer it now holds every write of this side's epoch.
	ResyncDone() error
	Close() error
}

// Target is the secondary side of one volume: the local export the link writes to and
// its role/epoch, which gate every request.
type Target struct {
	export nbd.Export
	mu     sync.Mutex
	state  State
	// BytesWritten counts payload bytes applied through the link.
	BytesWritten atomic.Int64
	// Persist, if set, makes a state change the link causes (resync done) durable
	// before it takes effect; an error refuses the change.
	Persist func(State) error
}

// NewTarget makes export reachable over the link in state s.
func NewTarget(export nbd.Export, s State) *Target {
	return &Target{export: export, state: s}
}

// State returns the target's current role and epoch.
func (t *Target) State() State {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.state
}

// SetState replaces the target's role and epoch (after the controller persisted it).
func (t *Target) SetState(s State) {
	t.mu.Lock()
	t.state = s
	t.mu.Unlock()
}

func (t *Target) admits(epoch uint64) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.state.AcceptsPeerWrite(epoch)
}

// LinkServer serves the secondary side of the mirror link.
type LinkServer struct {
	// Lookup finds the target of a volume name.
	Lookup func(name string) (*Target, bool)
	// Logger receives connection errors; nil means slog.Default().
	Logger *slog.Logger

	mu     sync.Mutex
	lns    map[net.Listener]struct{}
	conns  map[net.Conn]struct{}
	closed bool
	wg     sync.WaitGroup
}

func (s *LinkServer) logger() *slog.Logger {
	if s.Logger != nil {
		return s.Logger
	}
	return slog.Default()
}

// Serve accepts link connections on l until Close.
func (s *LinkServer) Serve(l net.Listener) error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return errors.New("mirror link server is closed")
	}
	if s.lns == nil {
		s.lns, s.conns = map[net.Listener]struct{}{}, map[net.Conn]struct{}{}
	}
	s.lns[l] = struct{}{}
	s.mu.Unlock()
	var backoff accept.Backoff
	var acceptLog lograte.Limiter
	for {
		c, err := l.Accept()
		if err != nil {
			s.mu.Lock()
			closed := s.closed
			s.mu.Unlock()
			if closed {
				return nil
			}
			if n, ok := acceptLog.Allow(time.Now()); ok {
				s.logger().Warn("Mirror link accept failed, retrying", "err", err, "suppressed", n)
			}
			if !backoff.Retry(err) {
				return fmt.Errorf("Failed to accept mirror link connection: %w", err)
			}
			continue
		}
		backoff.Reset()
		s.mu.Lock()
		if s.closed {
			s.mu.Unlock()
			c.Close()
			return nil
		}
		s.conns[c] = struct{}{}
		s.wg.Add(1)
		s.mu.Unlock()
		go func() {
			defer s.wg.Done()
			if err := s.serveConn(c); err != nil && !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) {
				s.logger().Warn("mirror link connection ended", "remote", c.RemoteAddr().String(), "err", err)
			}
			s.mu.Lock()
			delete(s.conns, c)
			s.mu.Unlock()
			c.Close()
		}()
	}
}

// Close stops every listener and connection at once, as a crash of the secondary would.
func (s *LinkServer) Close() error {
	s.mu.Lock()
	s.closed = true
	for l := range s.lns {
		l.Close()
	}
	for c := range s.conns {
		c.Close()
	}
	s.mu.Unlock()
	s.wg.Wait()
	return nil
}

func (s *LinkServer) welcome(w io.Writer, status uint32, st State, size int64) error {
	var b [welcomeLen]byte
	binary.BigEndian.PutUint32(b[0:], welcomeMagic)
	binary.BigEndian.PutUint32(b[4:], status)
	binary.BigEndian.PutUint32(b[8:], uint32(st.Role))
	binary.BigEndian.PutUint64(b[16:], st.Epoch)
	binary.BigEndian.PutUint64(b[24:], uint64(size))
	_, err := w.Write(b[:])
	return err
}

func (s *LinkServer) serveConn(c net.Conn) error {
	r := bufio.NewReaderSize(c, 256<<10)
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	var h [26]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return fmt.Errorf("Failed to read mirror hello: %w", err)
	}
	if string(h[:8]) != helloMagic {
		return errors.New("mirror hello has a bad magic")
	}
	epoch := binary.BigEndian.Uint64(h[8:])
	size := int64(binary.BigEndian.Uint64(h[16:]))
	nl := int(binary.BigEndian.Uint16(h[24:]))
	if nl == 0 || nl > maxNameLen {
		return fmt.Errorf("mirror hello names a volume of %d bytes", nl)
	}
	name := make([]byte, nl)
	if _, err := io.ReadFull(r, name); err != nil {
		return fmt.Errorf("Failed to read mirror hello: %w", err)
	}
	c.SetReadDeadline(time.Time{})
	t, ok := s.Lookup(string(name))
	if !ok {
		s.welcome(c, statusUnknown, State{}, 0)
		return fmt.Errorf("mirror hello for unknown volume %q", name)
	}
	st := t.State()
	if t.export.Size() != size {
		s.welcome(c, statusInvalid, st, t.export.Size())
		return fmt.Errorf("mirror hello for volume %q of %d bytes, local size is %d", name, size, t.export.Size())
	}
	if !st.AcceptsPeerWrite(epoch) {
		s.welcome(c, statusStale, st, size)
		return fmt.Errorf("mirror hello for volume %q at epoch %d refused: this side is %v at epoch %d", name, epoch, st.Role, st.Epoch)
	}
	if err := s.welcome(c, statusOK, st, size); err != nil {
		return fmt.Errorf("Failed to answer mirror hello: %w", err)
	}
	return s.serveRequests(c, r, t)
}

// linkJob is one request read from the link, waiting for a worker.
type linkJob struct {
	op, flags uint16
	cookie    uint64
	off, n    int64
	epoch     uint64
	payload   []byte
}

// inlineKeep is the largest payload buffer a connection keeps for writes it applies
// itself (see serveRequests); a larger write uses a pooled buffer once.
const inlineKeep = 4 << 20

// repliesPerWrite is how many replies of writes applied by the reader may wait for the
// next reply write while more requests are already buffered.
const repliesPerWrite = 32

// serveRequests reads requests and applies plain writes itself, in the order they
// arrive, from one reused buffer; FLUSH, FUA writes, trims and zeroes (which may wait
// for the disks) run on up to maxServerJobs workers, which stay for the connection's
// life. Replies that complete together go out in one write: those of the reader's
// writes when it has no further request buffered (or repliesPerWrite of them wait).
func (s *LinkServer) serveRequests(c net.Conn, r *bufio.Reader, t *Target) error {
	// Replies are written by whoever finds no write in progress, together with every
	// reply queued meanwhile (the others just queue theirs and go on).
	var rmu sync.Mutex
	var replies, spare []byte
	writing := false
	queueReply := func(cookie uint64, status uint32) {
		var b [replyLen]byte
		binary.BigEndian.PutUint32(b[0:], replyMagic)
		binary.BigEndian.PutUint32(b[4:], status)
		binary.BigEndian.PutUint64(b[8:], cookie)
		rmu.Lock()
		replies = append(replies, b[:]...)
		rmu.Unlock()
	}
	sendReplies := func() {
		rmu.Lock()
		if writing || len(replies) == 0 {
			rmu.Unlock()
			return
		}
		writing = true
		rmu.Unlock()
		for {
			rmu.Lock()
			if len(replies) == 0 {
				writing = false
				rmu.Unlock()
				return
			}
			buf := replies
			replies = spare[:0]
			rmu.Unlock()
			_, err := c.Write(buf)
			spare = buf
			if err != nil {
				c.Close()
				rmu.Lock()
				writing, replies = false, replies[:0]
				rmu.Unlock()
				return
			}
		}
	}
	mem := newByteBudget(maxServerBytes)
	jobs := make(chan linkJob, maxServerJobs)
	var idle atomic.Int32
	workers := 0
	var wg sync.WaitGroup
	worker := func() {
		defer wg.Done()
		for {
			idle.Add(1)
			j, ok := <-jobs
			idle.Add(-1)
			if !ok {
				return
			}
			st := s.execute(t, j.op, j.flags, j.off, j.n, j.epoch, j.payload)
			mem.release(int64(len(j.payload)))
			putPayload(j.payload)
			queueReply(j.cookie, st)
			runtime.Gosched() // as in Link.flush: let ready workers add their replies
			sendReplies()
		}
	}
	defer func() {
		close(jobs)
		wg.Wait()
	}()
	var inline []byte // the reader's payload buffer, reused
	unsent := 0       // replies of the reader's writes not yet handed to sendReplies
	for {
		if unsent > 0 && (unsent >= repliesPerWrite || !nextBuffered(r)) {
			// Nothing more to apply without waiting for the peer: answer first.
			sendReplies()
			unsent = 0
		}
		var q [requestLen]byte
		if _, err := io.ReadFull(r, q[:]); err != nil {
			return err
		}
		if binary.BigEndian.Uint32(q[0:]) != requestMagic {
			return errors.New("mirror request has a bad magic")
		}
		j := linkJob{
			op:     binary.BigEndian.Uint16(q[4:]),
			flags:  binary.BigEndian.Uint16(q[6:]),
			cookie: binary.BigEndian.Uint64(q[8:]),
			off:    int64(binary.BigEndian.Uint64(q[16:])),
			n:      int64(binary.BigEndian.Uint32(q[24:])),
			epoch:  binary.BigEndian.Uint64(q[28:]),
		}
		if j.op == opWrite && j.n > maxPayloadLen {
			return fmt.Errorf("mirror write of %d bytes exceeds %d", j.n, maxPayloadLen)
		}
		if j.op == opWrite && j.flags&flagFUA == 0 {
			// A plain write only copies into the page cache: applying it here saves a
			// hand-off to a worker and a buffer per write. The primary never has two
			// overlapping writes in flight, so the order among writes does not matter.
			var p []byte
			if j.n <= inlineKeep {
				if int64(cap(inline)) < j.n {
					inline = make([]byte, j.n)
				}
				p = inline[:j.n]
			} else {
				p = getPayload(int(j.n))
			}
			_, err := io.ReadFull(r, p)
			if err == nil {
				queueReply(j.cookie, s.execute(t, j.op, j.flags, j.off, j.n, j.epoch, p))
				unsent++
			}
			if j.n > inlineKeep {
				putPayload(p)
			}
			if err != nil {
				return err
			}
			continue
		}
		if j.op == opWrite {
			mem.acquire(j.n)
			j.payload = getPayload(int(j.n))
			if _, err := io.ReadFull(r, j.payload); err != nil {
				putPayload(j.payload)
				mem.release(j.n)
				return err
			}
		}
		if unsent > 0 {
			sendReplies()
			unsent = 0
		}
		if idle.Load() == 0 && workers < maxServerJobs {
			workers++
			wg.Add(1)
			go worker()
		}
		jobs <- j
	}
}

// nextBuffered reports whether r holds the whole next request (header and payload).
func nextBuffered(r *bufio.Reader) bool {
	if r.Buffered() < requestLen {
		return false
	}
	q, _ := r.Peek(requestLen)
	n := requestLen
	if binary.BigEndian.Uint16(q[4:]) == opWrite {
		n += int(binary.BigEndian.Uint32(q[24:]))
	}
	return r.Buffered() >= n
}

func (s *LinkServer) execute(t *Target, op, flags uint16, off, n int64, epoch uint64, payload []byte) uint32 {
	if !t.admits(epoch) {
		return statusStale
	}
	size := t.export.Size()
	if op != opFlush && op != opResyncDone && (off < 0 || n < 0 || off > size || n > size-off) {
		return statusInvalid
	}
	fua := flags&flagFUA != 0
	var err error
	switch op {
	case opWrite:
		err = t.export.WriteAt(payload, off, fua)
		if err == nil {
			t.BytesWritten.Add(int64(len(payload)))
		}
	case opFlush:
		err = t.export.Flush()
	case opTrim:
		err = t.export.Trim(off, n, fua)
	case opZero:
		err = t.export.WriteZeroes(off, n, nbd.ZeroFlags{NoHole: flags&flagNoHole != 0, FUA: fua})
	case opResyncDone:
		// The caller flushed before; this side now holds every write of epoch.
		t.mu.Lock()
		next, _ := Step(t.state, Event{Kind: EvResyncDone, Epoch: epoch})
		if next != t.state && t.Persist != nil {
			err = t.Persist(next)
		}
		if err == nil {
			t.state = next
		}
		t.mu.Unlock()
	default:
		return statusInvalid
	}
	switch {
	case err == nil:
		return statusOK
	case errors.Is(err, nbd.ErrNoSpace):
		return statusNoSpace
	case errors.Is(err, nbd.ErrInvalid):
		return statusInvalid
	}
	s.logger().Warn("mirror link request failed", "op", op, "offset", off, "length", n, "err", err)
	return statusIO
}

// Link is the primary's client side of the mirror link for one volume; safe for concurrent use.
//
// A sender that finds no write in progress writes its request and every one queued
// meanwhile in one writev (see flush); replies are read in bulk by one reader
// goroutine. A watchdog kills the link when a request has waited longer than the
// timeout, which also unblocks a write to a peer that stopped reading; it runs only
// while requests are in flight, so an idle link costs no CPU.
type Link struct {
	conn    net.Conn
	name    string
	epoch   uint64
	timeout time.Duration

	mu      sync.Mutex
	pending map[uint64]*call
	queue   []*call // requests not yet handed to the writer
	next    uint64
	err     error // set once the link is dead
	done    chan struct{}
	// writing is set while a sender writes the queue for everyone (see flush); wdone
	// signals its end. Only the writer touches the batch buffers below.
	writing bool
	wdone   *sync.Cond
	// wd is the watchdog's timer, armed (watching) while requests are pending.
	wd       *time.Timer
	watching bool
	batch    []*call
	big      []*call
	small    []byte
	cuts     []int
	bufs     net.Buffers
	// BytesSent counts write payload bytes sent over the link.
	BytesSent atomic.Int64
}

// call is one request in flight; reused once its reply was received.
type call struct {
	hdr     [requestLen]byte
	payload []byte
	start   time.Time
	reply   chan uint32
}

var callPool = sync.Pool{New: func() any { return &call{reply: make(chan uint32, 1)} }}

// bigPayload is the size from which a payload is written from the caller's buffer
// instead of being copied into the writer's batch buffer.
const bigPayload = 64 << 10

// DialLink connects to the peer's link server at addr for volume name of size bytes at epoch.
// A refusal of the epoch returns a *StaleError carrying the peer's state. timeout bounds every
// request; a request that takes longer kills the link (the peer is then treated as lost).
func DialLink(ctx context.Context, addr, name string, size int64, epoch uint64, timeout time.Duration) (*Link, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("Failed to dial mirror peer %s: %w: %w", addr, ErrPeerLost, err)
	}
	return NewLink(ctx, c, name, size, epoch, timeout)
}

// NewLink runs the hello on an established connection c (plain TCP, or TLS from
// tls.Client for a link that must be encrypted) and returns the link; on error c is closed.
func NewLink(ctx context.Context, c net.Conn, name string, size int64, epoch uint64, timeout time.Duration) (*Link, error) {
	addr := c.RemoteAddr().String()
	if name == "" || len(name) > maxNameLen || timeout <= 0 {
		c.Close()
		return nil, fmt.Errorf("Failed to open mirror link to %s: invalid volume name %q or timeout %v", addr, name, timeout)
	}
	hello := make([]byte, 26+len(name))
	copy(hello, helloMagic)
	binary.BigEndian.PutUint64(hello[8:], epoch)
	binary.BigEndian.PutUint64(hello[16:], uint64(size))
	binary.BigEndian.PutUint16(hello[24:], uint16(len(name)))
	copy(hello[26:], name)
	if dl, ok := ctx.Deadline(); ok {
		c.SetDeadline(dl)
	} else {
		c.SetDeadline(time.Now().Add(timeout))
	}
	var wb [welcomeLen]byte
	_, err := c.Write(hello)
	if err == nil {
		_, err = io.ReadFull(c, wb[:])
	}
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("Failed mirror hello with %s for %q: %w: %w", addr, name, ErrPeerLost, err)
	}
	c.SetDeadline(time.Time{})
	if binary.BigEndian.Uint32(wb[0:]) != welcomeMagic {
		c.Close()
		return nil, fmt.Errorf("Failed mirror hello with %s for %q: bad answer magic", addr, name)
	}
	peer := State{Role: Role(binary.BigEndian.Uint32(wb[8:])), Epoch: binary.BigEndian.Uint64(wb[16:])}
	switch status := binary.BigEndian.Uint32(wb[4:]); status {
	case statusOK:
	case statusStale:
		c.Close()
		return nil, fmt.Errorf("Failed mirror hello with %s for %q: %w", addr, name, &StaleError{Peer: peer, Known: true})
	case statusUnknown:
		c.Close()
		return nil, fmt.Errorf("Failed mirror hello with %s: the peer has no volume %q", addr, name)
	default:
		c.Close()
		return nil, fmt.Errorf("Failed mirror hello with %s for %q: refused with status %d (peer size %d, ours %d)", addr, name, status, binary.BigEndian.Uint64(wb[24:]), size)
	}
	l := &Link{conn: c, name: name, epoch: epoch, timeout: timeout, pending: map[uint64]*call{},
		done: make(chan struct{})}
	l.wdone = sync.NewCond(&l.mu)
	l.wd = time.AfterFunc(time.Hour, l.watchdog)
	l.wd.Stop()
	go l.readLoop()
	return l, nil
}

// Epoch is the epoch this link sends with every request.
func (l *Link) Epoch() uint64 { return l.epoch }

func (l *Link) readLoop() {
	r := bufio.NewReaderSize(l.conn, 64<<10)
	var b [replyLen]byte
	for {
		if _, err := io.ReadFull(r, b[:]); err != nil {
			l.kill(err)
			return
		}
		if binary.BigEndian.Uint32(b[0:]) != replyMagic {
			l.kill(errors.New("bad reply magic"))
			return
		}
		cookie := binary.BigEndian.Uint64(b[8:])
		l.mu.Lock()
		c, ok := l.pending[cookie]
		delete(l.pending, cookie)
		l.mu.Unlock()
		if !ok {
			l.kill(fmt.Errorf("reply for unknown request %d", cookie))
			return
		}
		c.reply <- binary.BigEndian.Uint32(b[4:])
	}
}

// flushBatches is how many batches one sender writes for the others before it hands
// the rest of the queue to a goroutine and goes back to its own request.
const flushBatches = 4

// flush writes the queue until it is empty: the sender that found no write in progress
// writes, in one writev per batch, its own request and every one queued meanwhile (the
// others just queue and leave), so there is no hand-off when idle and a batch under
// load. l.writing is set by the caller.
func (l *Link) flush() {
	// Let the goroutines that are ready to run queue their requests too: under load
	// they join this write; when idle this returns at once.
	runtime.Gosched()
	for i := 0; ; i++ {
		l.mu.Lock()
		if len(l.queue) == 0 || l.err != nil {
			l.writing = false
			l.wdone.Broadcast()
			l.mu.Unlock()
			return
		}
		if i == flushBatches {
			l.mu.Unlock()
			go l.flush()
			return
		}
		l.batch, l.queue = l.queue, l.batch[:0]
		l.mu.Unlock()
		if err := l.writeBatch(); err != nil {
			l.kill(err)
		}
	}
}

// writeBatch sends l.batch. Headers and small payloads are copied into one buffer; a
// big payload is written from the caller's memory, which stays untouched until its
// reply (or, if the link dies, until wait saw the writer finish).
func (l *Link) writeBatch() error {
	l.small, l.big, l.cuts = l.small[:0], l.big[:0], l.cuts[:0]
	var sent int64
	for _, c := range l.batch {
		l.small = append(l.small, c.hdr[:]...)
		if len(c.payload) < bigPayload {
			l.small = append(l.small, c.payload...)
		} else {
			l.cuts = append(l.cuts, len(l.small))
			l.big = append(l.big, c)
		}
		if binary.BigEndian.Uint16(c.hdr[4:]) == opWrite {
			sent += int64(len(c.payload))
		}
	}
	l.bufs = l.bufs[:0]
	from := 0
	for i, cut := range l.cuts {
		l.bufs = append(l.bufs, l.small[from:cut], l.big[i].payload)
		from = cut
	}
	if from < len(l.small) {
		l.bufs = append(l.bufs, l.small[from:])
	}
	w := l.bufs // WriteTo consumes its receiver; l.bufs keeps the backing array
	_, err := w.WriteTo(l.conn)
	clear(l.batch)
	clear(l.big)
	if err != nil {
		return err
	}
	l.BytesSent.Add(sent)
	return nil
}

// watchdogPeriod is how often the watchdog looks at the requests in flight.
func (l *Link) watchdogPeriod() time.Duration { return max(l.timeout/8, time.Millisecond) }

// watchdog kills the link when a request has waited longer than the timeout; it
// re-arms itself while requests are pending (send arms it for the first one).
func (l *Link) watchdog() {
	now := time.Now()
	l.mu.Lock()
	late := false
	for _, c := range l.pending {
		if now.Sub(c.start) > l.timeout {
			late = true
			break
		}
	}
	l.watching = l.err == nil && !late && len(l.pending) > 0
	if l.watching {
		l.wd.Reset(l.watchdogPeriod())
	}
	l.mu.Unlock()
	if late {
		l.kill(fmt.Errorf("request timed out after %v", l.timeout))
	}
}

// kill marks the link dead and fails every request in flight.
func (l *Link) kill(err error) {
	l.mu.Lock()
	if l.err == nil {
		l.err = err
		close(l.done)
		l.wd.Stop()
		l.watching = false
	}
	l.mu.Unlock()
	l.conn.Close()
}

func (l *Link) lostErr() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	return fmt.Errorf("%w: %w", ErrPeerLost, l.err)
}

// send queues one request; payload must stay unchanged until wait returns.
func (l *Link) send(op, flags uint16, off, n int64, payload []byte) (*call, error) {
	c := callPool.Get().(*call)
	binary.BigEndian.PutUint32(c.hdr[0:], requestMagic)
	binary.BigEndian.PutUint16(c.hdr[4:], op)
	binary.BigEndian.PutUint16(c.hdr[6:], flags)
	binary.BigEndian.PutUint64(c.hdr[16:], uint64(off))
	binary.BigEndian.PutUint32(c.hdr[24:], uint32(n))
	binary.BigEndian.PutUint64(c.hdr[28:], l.epoch)
	c.payload, c.start = payload, time.Now()
	l.mu.Lock()
	if l.err != nil {
		err := l.err
		l.mu.Unlock()
		c.payload = nil
		callPool.Put(c)
		return nil, fmt.Errorf("%w: %w", ErrPeerLost, err)
	}
	l.next++
	binary.BigEndian.PutUint64(c.hdr[8:], l.next)
	l.pending[l.next] = c
	l.queue = append(l.queue, c)
	if !l.watching {
		l.watching = true
		l.wd.Reset(l.watchdogPeriod())
	}
	write := !l.writing
	l.writing = true
	l.mu.Unlock()
	switch {
	case !write:
	case len(payload) >= bigPayload:
		// Sending it may wait for the peer's window: the caller's local write goes on meanwhile.
		go l.flush()
	default:
		l.flush()
	}
	return c, nil
}

// wait waits for the reply to c. When the link died instead, it returns only once no
// write is in progress, so that the caller may reuse the payload's memory.
func (l *Link) wait(c *call) error {
	select {
	case st := <-c.reply:
		c.payload = nil
		callPool.Put(c)
		switch st {
		case statusOK:
			return nil
		case statusStale:
			return &StaleError{}
		case statusNoSpace:
			return fmt.Errorf("%w: %w", ErrPeerIO, nbd.ErrNoSpace)
		default:
			return fmt.Errorf("%w: status %d", ErrPeerIO, st)
		}
	case <-l.done:
		// c is not reused: the read loop may still hold it.
		l.mu.Lock()
		for l.writing {
			l.wdone.Wait()
		}
		l.mu.Unlock()
		return l.lostErr()
	}
}

func (l *Link) call(op, flags uint16, off, n int64, payload []byte) error {
	c, err := l.send(op, flags, off, n, payload)
	if err != nil {
		return err
	}
	return l.wait(c)
}

func fuaFlag(fua bool) uint16 {
	if fua {
		return flagFUA
	}
	return 0
}

// WriteAt writes p at off on the peer.
func (l *Link) WriteAt(p []byte, off int64, fua bool) error {
	if len(p) > maxPayloadLen {
		return fmt.Errorf("mirror write of %d bytes exceeds %d: %w", len(p), maxPayloadLen, nbd.ErrInvalid)
	}
	return l.call(opWrite, fuaFlag(fua), off, int64(len(p)), p)
}

// startWrite sends a write of p at off and returns the function that waits for its
// reply; p must stay unchanged until that function returned.
func (l *Link) startWrite(p []byte, off int64, fua bool) func() error {
	if len(p) > maxPayloadLen {
		return func() error {
			return fmt.Errorf("mirror write of %d bytes exceeds %d: %w", len(p), maxPayloadLen, nbd.ErrInvalid)
		}
	}
	c, err := l.send(opWrite, fuaFlag(fua), off, int64(len(p)), p)
	if err != nil {
		return func() error { return err }
	}
	return func() error { return l.wait(c) }
}

func checkLength(op string, length int64) error {
	if length < 0 || length > 0xffffffff {
		return fmt.Errorf("mirror %s of %d bytes does not fit a request: %w", op, length, nbd.ErrInvalid)
	}
	return nil
}

// Trim discards a range on the peer.
func (l *Link) Trim(off, length int64, fua bool) error {
	if err := checkLength("trim", length); err != nil {
		return err
	}
	return l.call(opTrim, fuaFlag(fua), off, length, nil)
}

// WriteZeroes zeroes a range on the peer.
func (l *Link) WriteZeroes(off, length int64, noHole, fua bool) error {
	if err := checkLength("zero", length); err != nil {
		return err
	}
	f := fuaFlag(fua)
	if noHole {
		f |= flagNoHole
	}
	return l.call(opZero, f, off, length, nil)
}

// Flush makes every write the peer acknowledged durable on the peer.
func (l *Link) Flush() error { return l.call(opFlush, 0, 0, 0, nil) }

// ResyncDone tells the peer it holds every write of this link's epoch.
func (l *Link) ResyncDone() error { return l.call(opResyncDone, 0, 0, 0, nil) }

// Close ends the link; requests in flight fail with ErrPeerLost.
func (l *Link) Close() error {
	l.kill(net.ErrClosed)
	return nil
}

// Payload buffers of the link server are reused (one pool per power-of-two size from
// 4 KiB to maxPayloadLen), so a stream of large writes neither zeroes nor collects
// a new buffer per request. The export never keeps a payload after WriteAt returns.
const minPayloadShift = 12

var payloadPools [26 - minPayloadShift + 1]sync.Pool

func payloadClass(n int) int {
	c := 0
	for (1 << (minPayloadShift + c)) < n {
		c++
	}
	return c
}

func getPayload(n int) []byte {
	if n == 0 {
		return nil
	}
	c := payloadClass(n)
	if c >= len(payloadPools) {
		return make([]byte, n)
	}
	if b, ok := payloadPools[c].Get().(*[]byte); ok {
		return (*b)[:n]
	}
	return make([]byte, n, 1<<(minPayloadShift+c))
}

func putPayload(b []byte) {
	if cap(b) == 0 {
		return
	}
	c := payloadClass(cap(b))
	if c >= len(payloadPools) || cap(b) != 1<<(minPayloadShift+c) {
		return
	}
	b = b[:cap(b)]
	payloadPools[c].Put(&b)
}

// byteBudget bounds bytes held at once; one request larger than the budget waits for all others.
type byteBudget struct {
	mu   sync.Mutex
	cond *sync.Cond
	max  int64
	used int64
}

func newByteBudget(max int64) *byteBudget {
	b := &byteBudget{max: max}
	b.cond = sync.NewCond(&b.mu)
	return b
}

func (b *byteBudget) acquire(n int64) {
	b.mu.Lock()
	for b.used > 0 && b.used+n > b.max {
		b.cond.Wait()
	}
	b.used += n
	b.mu.Unlock()
}

func (b *byteBudget) release(n int64) {
	if n == 0 {
		return
	}
	b.mu.Lock()
	b.used -= n
	b.mu.Unlock()
	b.cond.Broadcast()
}
