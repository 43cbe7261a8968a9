package nbd

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/growserver/grow/internal/lograte"
)

// conn is one client connection: the handshake, then the transmission phase.
type conn struct {
	srv *Server
	log *slog.Logger
	raw net.Conn // the accepted connection
	nc  net.Conn // raw, or the TLS connection over it
	br  *bufio.Reader
	// fill is what br reads from on a connection without TLS: the socket, with reads
	// capped while a spliced WRITE's payload may follow (see readLoop).
	fill *capReader
	bw   *bufio.Writer // handshake-phase writer

	mu       sync.Mutex
	stopping bool // Shutdown asked to stop reading new requests
	aborted  atomic.Bool
	// stop is cancelled when the reader must stop: by Shutdown, Close or the end of the
	// connection; it wakes a reader waiting for payload memory.
	stop       context.Context
	cancelStop context.CancelFunc

	// Negotiated state.
	tls        bool
	noZeroes   bool
	structured bool
	metaExport string // export name SET_META_CONTEXT applied to
	metaAlloc  bool   // base:allocation selected

	// Transmission state.
	exportName string
	export     Export
	size       int64
	readOnly   bool
	budget     *budget
	handlers   sync.WaitGroup
	work       chan *request // hands a request to an idle worker (unbuffered)
	workers    sync.WaitGroup
	workerMu   sync.Mutex
	nworkers   int // workers started, under workerMu (by the reader and the streamer)
	maxWorkers int // MaxInFlight: more workers could never all be busy
	replies    chan *request
	writerDone chan struct{}
	// sendMu orders everything written to the socket in transmission: the writer holds
	// it while its output buffer holds replies, a worker while it sends its own reply.
	sendMu   sync.Mutex
	out      []byte          // writer-owned output buffer
	vec      net.Buffers     // writer-owned scatter list
	vecArr   [2][]byte       // backing array of vec
	writeErr error           // under sendMu
	splicer  ReadSplicer     // the export, when READ replies may be spliced
	wsplicer WriteSplicer    // the export, when WRITE payloads may be spliced
	rawc     syscall.RawConn // the socket, for splicing
	hdr      [requestHeaderLen]byte
	errLog   lograte.Limiter
	// payloadSeq is non-zero while the reader waits for a WRITE's payload: the
	// number of that payload on the connection (see payloadStalled).
	payloadSeq atomic.Uint64
	payloads   uint64    // payloads read so far (reader-owned)
	seenSeq    uint64    // payloadSeq at the sweeper's last look (sweeper-owned)
	seenAt     time.Time // when the sweeper first saw seenSeq

	// streamq hands large copied READs to the streamer (see stream).
	streamq chan *request

	// Blocking mode of the reader (see blocking.go): the unix socket's RawConn (nil
	// when the connection cannot use it; set under mu), whether the reader is in it or
	// failed to enter it, and the counts of large WRITEs and other requests in a row
	// (reader-owned).
	blockRC        syscall.RawConn
	blocking       bool
	blockingFailed bool
	largeWrites    int
	otherReqs      int
}

func newConn(s *Server, nc net.Conn) *conn {
	s.stats.connections.Add(1)
	stop, cancel := context.WithCancel(context.Background())
	return &conn{
		srv:        s,
		log:        s.logger().With("remote", remoteName(nc)),
		raw:        nc,
		nc:         nc,
		stop:       stop,
		cancelStop: cancel,
	}
}

func remoteName(nc net.Conn) string {
	a := nc.RemoteAddr()
	if a == nil || a.Network() == "unix" {
		return "unix"
	}
	return a.String()
}

// stopReading makes the reader stop at the next request (graceful shutdown).
func (c *conn) stopReading() {
	c.mu.Lock()
	c.stopping = true
	c.mu.Unlock()
	c.cancelStop()
	c.raw.SetReadDeadline(time.Now())
	c.interruptReads(false)
}

// payloadStalled reports whether the reader has been waiting for the same WRITE payload
// for timeout, as seen by the sweeper's calls at now (the only caller).
func (c *conn) payloadStalled(now time.Time, timeout time.Duration) bool {
	seq := c.payloadSeq.Load()
	if seq == 0 || seq != c.seenSeq {
		c.seenSeq, c.seenAt = seq, now
		return false
	}
	return now.Sub(c.seenAt) >= timeout
}

// abort closes the connection at once.
func (c *conn) abort() {
	c.aborted.Store(true)
	c.cancelStop()
	c.interruptReads(true)
	c.raw.Close()
}

func (c *conn) isStopping() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.stopping
}

// protocolError is a reason to drop a connection that is worth a warning in the log.
type protocolError struct{ msg string }

func (e *protocolError) Error() string { return e.msg }

func violation(format string, args ...any) error {
	return &protocolError{msg: fmt.Sprintf(format, args...)}
}

// serve runs the whole life of the connection.
func (c *conn) serve() {
	defer c.cancelStop()
	defer c.raw.Close()
	if c.isStopping() {
		return
	}
	c.raw.SetDeadline(time.Now().Add(c.srv.handshakeTimeout()))
	c.fill = &capReader{r: c.nc}
	c.br = bufio.NewReaderSize(c.fill, 64<<10)
	c.bw = bufio.NewWriterSize(c.nc, 4096)
	err := c.handshake()
	if err != nil {
		c.logEnd("handshake", err)
		if c.export != nil {
			c.closeExport()
		}
		return
	}
	c.raw.SetDeadline(time.Time{})
	if c.isStopping() {
		c.raw.SetReadDeadline(time.Now())
	}
	err = c.transmit()
	c.logEnd("transmission", err)
}

// logEnd logs why a connection ended, as a warning when the client misbehaved.
func (c *conn) logEnd(phase string, err error) {
	var pe *protocolError
	switch {
	case err == nil || errors.Is(err, errClientDone):
		c.log.Debug("NBD connection closed", "phase", phase)
	case c.aborted.Load() || c.isStopping():
		c.log.Debug("NBD connection closed by server shutdown", "phase", phase)
	case errors.As(err, &pe):
		c.log.Warn("Closing NBD connection: protocol violation", "phase", phase, "reason", err)
	case errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, net.ErrClosed):
		c.log.Info("NBD client went away", "phase", phase, "err", err)
	default:
		c.log.Warn("Closing NBD connection", "phase", phase, "reason", err)
	}
}

// errClientDone marks an orderly end requested by the client (ABORT, DISC).
var errClientDone = errors.New("client ended the session")

// errEnterTransmission ends option haggling successfully.
var errEnterTransmission = errors.New("enter transmission")

func (c *conn) handshake() error {
	var b [18]byte
	binary.BigEndian.PutUint64(b[0:], nbdMagic)
	binary.BigEndian.PutUint64(b[8:], optMagic)
	binary.BigEndian.PutUint16(b[16:], flagFixedNewstyle|flagNoZeroes)
	c.bw.Write(b[:])
	if err := c.bw.Flush(); err != nil {
		return fmt.Errorf("Failed to send NBD greeting: %w", err)
	}
	if _, err := io.ReadFull(c.br, b[:4]); err != nil {
		return fmt.Errorf("Failed to read client flags: %w", err)
	}
	cflags := binary.BigEndian.Uint32(b[:4])
	if cflags&^uint32(flagFixedNewstyle|flagNoZeroes) != 0 {
		return violation("unknown client flags %#x", cflags)
	}
	if cflags&flagFixedNewstyle == 0 {
		return violation("client does not support fixed newstyle negotiation")
	}
	c.noZeroes = cflags&flagNoZeroes != 0

	var data []byte
	for i := 0; ; i++ {
		if i >= maxOptions {
			return violation("more than %d options", maxOptions)
		}
		var h [16]byte
		if _, err := io.ReadFull(c.br, h[:]); err != nil {
			return fmt.Errorf("Failed to read option header: %w", err)
		}
		if m := binary.BigEndian.Uint64(h[:]); m != optMagic {
			return violation("bad option magic %#x", m)
		}
		opt := binary.BigEndian.Uint32(h[8:])
		n := binary.BigEndian.Uint32(h[12:])
		if n > maxOptionLen {
			return violation("option %d data of %d bytes exceeds %d", opt, n, maxOptionLen)
		}
		if cap(data) < int(n) {
			data = make([]byte, n)
		}
		data = data[:n]
		if _, err := io.ReadFull(c.br, data); err != nil {
			return fmt.Errorf("Failed to read option %d data: %w", opt, err)
		}
		err := c.option(opt, data)
		if errors.Is(err, errEnterTransmission) {
			return nil
		}
		if err != nil {
			return err
		}
	}
}

// option handles one option; it returns errEnterTransmission after a successful GO/EXPORT_NAME.
func (c *conn) option(opt uint32, data []byte) error {
	if c.srv.RequireTLS && !c.tls {
		switch opt {
		case optStartTLS, optAbort:
		case optExportName:
			return violation("NBD_OPT_EXPORT_NAME before TLS on a server that requires TLS")
		default:
			return c.optError(opt, repErrTLSReqd, "TLS is required: use NBD_OPT_STARTTLS first")
		}
	}
	switch opt {
	case optExportName:
		return c.optExportName(data)
	case optAbort:
		// The client may not wait for the reply; ignore errors sending it.
		c.optReply(opt, repAck, nil)
		return errClientDone
	case optList:
		if len(data) != 0 {
			return c.optError(opt, repErrInvalid, "NBD_OPT_LIST takes no data")
		}
		for _, e := range c.srv.Exports.List() {
			if len(e.Name) > maxStringLen || len(e.Description) > maxStringLen {
				continue
			}
			p := make([]byte, 4, 4+len(e.Name)+len(e.Description))
			binary.BigEndian.PutUint32(p, uint32(len(e.Name)))
			p = append(p, e.Name...)
			p = append(p, e.Description...)
			if err := c.optReply(opt, repServer, p); err != nil {
				return err
			}
		}
		return c.optReply(opt, repAck, nil)
	case optStartTLS:
		return c.optStartTLS(data)
	case optInfo, optGo:
		return c.optInfoGo(opt, data)
	case optStructuredReply:
		if len(data) != 0 {
			return c.optError(opt, repErrInvalid, "NBD_OPT_STRUCTURED_REPLY takes no data")
		}
		c.structured = true
		return c.optReply(opt, repAck, nil)
	case optListMetaContext, optSetMetaContext:
		return c.optMetaContext(opt, data)
	default:
		return c.optError(opt, repErrUnsup, fmt.Sprintf("option %d is not supported", opt))
	}
}

func (c *conn) optReply(opt, typ uint32, data []byte) error {
	var h [20]byte
	binary.BigEndian.PutUint64(h[0:], optReplyMagic)
	binary.BigEndian.PutUint32(h[8:], opt)
	binary.BigEndian.PutUint32(h[12:], typ)
	binary.BigEndian.PutUint32(h[16:], uint32(len(data)))
	c.bw.Write(h[:])
	c.bw.Write(data)
	if err := c.bw.Flush(); err != nil {
		return fmt.Errorf("Failed to send reply to option %d: %w", opt, err)
	}
	return nil
}

// optError sends an error reply with a human-readable message; the session goes on.
func (c *conn) optError(opt, typ uint32, msg string) error {
	return c.optReply(opt, typ, []byte(msg))
}

func (c *conn) optStartTLS(data []byte) error {
	if len(data) != 0 {
		return c.optError(optStartTLS, repErrInvalid, "NBD_OPT_STARTTLS takes no data")
	}
	if c.tls {
		return c.optError(optStartTLS, repErrInvalid, "TLS is already active")
	}
	if c.srv.TLSConfig == nil {
		return c.optError(optStartTLS, repErrPolicy, "TLS is not configured on this server")
	}
	if err := c.optReply(optStartTLS, repAck, nil); err != nil {
		return err
	}
	if c.br.Buffered() != 0 {
		return violation("client sent %d bytes before the TLS handshake", c.br.Buffered())
	}
	tc := tls.Server(c.raw, c.srv.TLSConfig)
	ctx, cancel := context.WithTimeout(context.Background(), c.srv.handshakeTimeout())
	defer cancel()
	if err := tc.HandshakeContext(ctx); err != nil {
		return fmt.Errorf("TLS handshake failed: %w", err)
	}
	c.nc = tc
	c.tls = true
	c.br = bufio.NewReaderSize(tc, 64<<10)
	c.bw = bufio.NewWriterSize(tc, 4096)
	// Nothing negotiated in the clear carries over into TLS.
	c.structured = false
	c.metaAlloc = false
	c.metaExport = ""
	st := tc.ConnectionState()
	if len(st.PeerCertificates) > 0 {
		c.log = c.log.With("client_cert", st.PeerCertificates[0].Subject.String())
	}
	return nil
}

// openExport opens name, closing a previously opened export.
func (c *conn) openExport(name string) (Export, error) {
	e, err := c.srv.Exports.Open(name)
	if err != nil {
		return nil, err
	}
	if e == nil {
		return nil, fmt.Errorf("export %q opened as nil", name)
	}
	return e, nil
}

func (c *conn) closeExport() {
	if err := c.export.Close(); err != nil {
		c.log.Warn("Failed to close NBD export", "export", c.exportName, "err", err)
	}
	c.export = nil
}

// transmissionFlags are the flags advertised for an export on this connection.
func (c *conn) transmissionFlags(e Export) uint16 {
	f := uint16(tflagHasFlags | tflagSendFlush | tflagSendCache | tflagCanMultiConn)
	if e.ReadOnly() {
		f |= tflagReadOnly
	} else {
		f |= tflagSendFUA | tflagSendTrim | tflagSendWriteZeroes | tflagSendFastZero
	}
	if c.structured {
		f |= tflagSendDF
	}
	return f
}

func (c *conn) startTransmission(name string, e Export) {
	c.export = e
	c.exportName = name
	c.size = e.Size()
	c.readOnly = e.ReadOnly()
	if c.metaExport != name {
		c.metaAlloc = false
	}
	c.log = c.log.With("export", name)
}

func (c *conn) optExportName(data []byte) error {
	if len(data) > maxStringLen {
		return violation("export name of %d bytes", len(data))
	}
	name := string(data)
	e, err := c.openExport(name)
	if err != nil {
		// NBD_OPT_EXPORT_NAME has no error reply: the server must close the connection.
		return fmt.Errorf("Failed to open export %q for NBD_OPT_EXPORT_NAME: %w", name, err)
	}
	var b [10 + 124]byte
	binary.BigEndian.PutUint64(b[0:], uint64(e.Size()))
	binary.BigEndian.PutUint16(b[8:], c.transmissionFlags(e))
	n := len(b)
	if c.noZeroes {
		n = 10
	}
	c.bw.Write(b[:n])
	if err := c.bw.Flush(); err != nil {
		e.Close()
		return fmt.Errorf("Failed to send export details: %w", err)
	}
	c.startTransmission(name, e)
	return errEnterTransmission
}

func (c *conn) optInfoGo(opt uint32, data []byte) error {
	req, err := parseInfoRequest(data)
	if err != nil {
		return c.optError(opt, repErrInvalid, "malformed NBD_OPT_INFO/NBD_OPT_GO data")
	}
	e, err := c.openExport(req.name)
	if err != nil {
		if errors.Is(err, ErrUnknownExport) {
			return c.optError(opt, repErrUnknown, fmt.Sprintf("unknown export %q", req.name))
		}
		c.log.Warn("Failed to open NBD export", "export", req.name, "err", err)
		return c.optError(opt, repErrShutdown, fmt.Sprintf("export %q is unavailable", req.name))
	}
	keep := false
	defer func() {
		if !keep {
			if err := e.Close(); err != nil {
				c.log.Warn("Failed to close NBD export", "export", req.name, "err", err)
			}
		}
	}()
	var p [18]byte
	binary.BigEndian.PutUint16(p[0:], infoExport)
	binary.BigEndian.PutUint64(p[2:], uint64(e.Size()))
	binary.BigEndian.PutUint16(p[10:], c.transmissionFlags(e))
	if err := c.optReply(opt, repInfo, p[:12]); err != nil {
		return err
	}
	for _, t := range req.infos {
		switch t {
		case infoName:
			b := make([]byte, 2, 2+len(req.name))
			binary.BigEndian.PutUint16(b, infoName)
			if err := c.optReply(opt, repInfo, append(b, req.name...)); err != nil {
				return err
			}
		case infoDescription:
			desc := c.description(req.name, e)
			if desc == "" {
				continue
			}
			b := make([]byte, 2, 2+len(desc))
			binary.BigEndian.PutUint16(b, infoDescription)
			if err := c.optReply(opt, repInfo, append(b, desc...)); err != nil {
				return err
			}
		}
	}
	// Block sizes are always worth sending: minimum 1 (no alignment needed),
	// preferred 4 KiB, and the payload limit.
	binary.BigEndian.PutUint16(p[0:], infoBlockSize)
	binary.BigEndian.PutUint32(p[2:], 1)
	binary.BigEndian.PutUint32(p[6:], preferredBlock)
	binary.BigEndian.PutUint32(p[10:], MaxPayload)
	if err := c.optReply(opt, repInfo, p[:14]); err != nil {
		return err
	}
	if err := c.optReply(opt, repAck, nil); err != nil {
		return err
	}
	if opt == optInfo {
		return nil
	}
	keep = true
	c.startTransmission(req.name, e)
	return errEnterTransmission
}

// description is the export's own description, or the catalogue's for name.
func (c *conn) description(name string, ex Export) string {
	if d, ok := ex.(Describer); ok {
		desc := d.Description()
		if len(desc) > maxStringLen {
			desc = desc[:maxStringLen]
		}
		return desc
	}
	for _, e := range c.srv.Exports.List() {
		if e.Name == name {
			if len(e.Description) > maxStringLen {
				return e.Description[:maxStringLen]
			}
			return e.Description
		}
	}
	return ""
}

func (c *conn) optMetaContext(opt uint32, data []byte) error {
	if opt == optSetMetaContext && !c.structured {
		return c.optError(opt, repErrInvalid, "NBD_OPT_SET_META_CONTEXT needs structured replies")
	}
	req, err := parseMetaRequest(data)
	if err != nil {
		return c.optError(opt, repErrInvalid, "malformed meta context request")
	}
	match := false
	if opt == optListMetaContext && len(req.queries) == 0 {
		match = true
	}
	for _, q := range req.queries {
		if q == baseAllocation || (opt == optListMetaContext && q == "base:") {
			match = true
		}
	}
	if opt == optSetMetaContext {
		c.metaAlloc = match
		c.metaExport = req.name
	}
	if match {
		p := make([]byte, 4, 4+len(baseAllocation))
		binary.BigEndian.PutUint32(p, metaContextBaseAllocation)
		p = append(p, baseAllocation...)
		if err := c.optReply(opt, repMetaContext, p); err != nil {
			return err
		}
	}
	return c.optReply(opt, repAck, nil)
}
