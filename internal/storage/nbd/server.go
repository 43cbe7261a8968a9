package nbd

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/growserver/grow/internal/accept"
	"github.com/growserver/grow/internal/lograte"
	"golang.org/x/sync/semaphore"
)

// Defaults for Server fields left zero.
const (
	defaultHandshakeTimeout = 30 * time.Second
	defaultWriteTimeout     = 60 * time.Second
	defaultPayloadTimeout   = 60 * time.Second
	defaultMaxConns         = 4096
	defaultMaxInFlight      = 128
	defaultMaxBufferBytes   = 64 << 20
	defaultMaxTotalBuffer   = 1 << 30
)

// unixSendBuffer is the send buffer asked for on unix socket connections: room for
// the largest read replies a client usually asks for (a few MiB).
const unixSendBuffer = 4 << 20

// ErrServerClosed is returned by Serve after Shutdown or Close; it wraps
// net.ErrClosed, so callers that ignore closed listeners ignore it too.
var ErrServerClosed = fmt.Errorf("nbd: server closed: %w", net.ErrClosed)

// Server serves Exports over NBD on any number of listeners.
type Server struct {
	// Exports is the catalogue of names served.
	Exports Exports
	// TLSConfig enables NBD_OPT_STARTTLS; set ClientAuth to verify client certificates.
	TLSConfig *tls.Config
	// RequireTLS refuses everything but STARTTLS and ABORT before TLS is up.
	RequireTLS bool
	// Logger receives connection-level events; nil means slog.Default().
	Logger *slog.Logger
	// HandshakeTimeout bounds option negotiation (and the TLS handshake); zero means 30 s.
	HandshakeTimeout time.Duration
	// WriteTimeout drops a client that leaves replies unread this long; zero means 60 s.
	WriteTimeout time.Duration
	// MaxInFlight bounds concurrent requests per connection; zero means 128.
	MaxInFlight int
	// MaxBufferBytes bounds payload memory held per connection; zero means 64 MiB.
	MaxBufferBytes int64
	// MaxTotalBufferBytes bounds the payload memory held by all connections together
	// (WRITE payloads read and READ data not yet sent); zero means 1 GiB, and less than
	// MaxPayload counts as MaxPayload. A connection whose next request does not fit
	// waits, reading nothing more, until other requests finish.
	MaxTotalBufferBytes int64
	// MaxConns bounds live connections (handshaking ones included); zero means 4096.
	// A connection beyond it is closed at once, with a warning in the log.
	MaxConns int
	// PayloadTimeout drops a client that takes longer than this to send one WRITE's
	// payload (whose buffer it holds meanwhile); zero means 60 s.
	PayloadTimeout time.Duration

	stats     serverStats
	memOnce   sync.Once
	mem       *semaphore.Weighted // payload memory of all connections (MaxTotalBufferBytes)
	mu        sync.Mutex
	listeners map[net.Listener]struct{}
	conns     map[*conn]struct{}
	closed    bool
	connWG    sync.WaitGroup
	sweeping  bool            // the stalled-payload sweeper runs; guarded by mu
	refuseLog lograte.Limiter // warnings about connections beyond MaxConns
}

func (s *Server) logger() *slog.Logger {
	if s.Logger != nil {
		return s.Logger
	}
	return slog.Default()
}

func (s *Server) handshakeTimeout() time.Duration {
	if s.HandshakeTimeout > 0 {
		return s.HandshakeTimeout
	}
	return defaultHandshakeTimeout
}

func (s *Server) payloadTimeout() time.Duration {
	if s.PayloadTimeout > 0 {
		return s.PayloadTimeout
	}
	return defaultPayloadTimeout
}

// memory returns the server-wide payload memory semaphore.
func (s *Server) memory() *semaphore.Weighted {
	s.memOnce.Do(func() {
		n := s.MaxTotalBufferBytes
		if n <= 0 {
			n = defaultMaxTotalBuffer
		}
		s.mem = semaphore.NewWeighted(max(n, MaxPayload))
	})
	return s.mem
}

func (s *Server) maxConns() int {
	if s.MaxConns > 0 {
		return s.MaxConns
	}
	return defaultMaxConns
}

func (s *Server) writeTimeout() time.Duration {
	if s.WriteTimeout > 0 {
		return s.WriteTimeout
	}
	return defaultWriteTimeout
}

// Serve accepts connections on l until l is closed or Shutdown/Close is called.
func (s *Server) Serve(l net.Listener) error {
	if s.Exports == nil {
		return errors.New("nbd: Server.Exports is nil")
	}
	if s.RequireTLS && s.TLSConfig == nil {
		return errors.New("nbd: RequireTLS set without a TLSConfig")
	}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return ErrServerClosed
	}
	if s.listeners == nil {
		s.listeners = make(map[net.Listener]struct{})
	}
	s.listeners[l] = struct{}{}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.listeners, l)
		s.mu.Unlock()
	}()

	var backoff accept.Backoff
	var acceptLog lograte.Limiter
	for {
		nc, err := l.Accept()
		if err != nil {
			s.mu.Lock()
			closed := s.closed
			s.mu.Unlock()
			if closed {
				return ErrServerClosed
			}
			if n, ok := acceptLog.Allow(time.Now()); ok {
				s.logger().Warn("NBD accept failed, retrying", "err", err, "suppressed", n)
			}
			if !backoff.Retry(err) {
				return nil // the listener was closed
			}
			continue
		}
		backoff.Reset()
		if uc, ok := nc.(*net.UnixConn); ok {
			// A unix socket holds at most its send buffer of replies in flight: make
			// room for a whole large read reply, so that it is one write instead of
			// several, each after waiting for the client to drain the last. The kernel
			// caps the size at net.core.wmem_max; failing changes nothing else.
			_ = uc.SetWriteBuffer(unixSendBuffer)
		}
		c := newConn(s, nc)
		switch err := s.track(c); {
		case errors.Is(err, ErrServerClosed):
			return err
		case err != nil:
			continue
		}
		go s.serveTracked(c)
	}
}

// ServeConn serves one already-accepted connection and returns when it ends.
func (s *Server) ServeConn(nc net.Conn) {
	c := newConn(s, nc)
	if s.track(c) == nil {
		s.serveTracked(c)
	}
}

// errTooManyConns refuses a connection beyond MaxConns.
var errTooManyConns = errors.New("too many NBD connections")

// track registers c as live, or closes it when the server is closed or already holds
// MaxConns connections.
func (s *Server) track(c *conn) error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		c.raw.Close()
		return ErrServerClosed
	}
	if len(s.conns) >= s.maxConns() {
		s.mu.Unlock()
		// Counted and logged before the client sees the close.
		s.stats.refused.Add(1)
		if n, ok := s.refuseLog.Allow(time.Now()); ok {
			s.logger().Warn("NBD connection refused: the controller already serves the most it may (--nbd-max-connections)",
				"remote", remoteName(c.raw), "max", s.maxConns(), "suppressed", n)
		}
		c.raw.Close()
		return errTooManyConns
	}
	if s.conns == nil {
		s.conns = make(map[*conn]struct{})
	}
	s.conns[c] = struct{}{}
	s.connWG.Add(1)
	if !s.sweeping {
		s.sweeping = true
		go s.sweepStalled()
	}
	s.mu.Unlock()
	return nil
}

// serveTracked serves a tracked connection until it ends, then forgets it.
func (s *Server) serveTracked(c *conn) {
	defer s.connWG.Done()
	c.serve()
	s.mu.Lock()
	delete(s.conns, c)
	s.mu.Unlock()
}

// sweepStalled drops, until the server closes, every connection that has been sending
// the same WRITE payload for PayloadTimeout: such a client would otherwise hold the
// payload's buffer (up to MaxBufferBytes per connection) for as long as it likes.
func (s *Server) sweepStalled() {
	timeout := s.payloadTimeout()
	t := time.NewTicker(max(timeout/4, 10*time.Millisecond))
	defer t.Stop()
	var stalled []*conn
	for now := range t.C {
		s.mu.Lock()
		if s.closed {
			s.sweeping = false
			s.mu.Unlock()
			return
		}
		stalled = stalled[:0]
		for c := range s.conns {
			if c.payloadStalled(now, timeout) {
				stalled = append(stalled, c)
			}
		}
		s.mu.Unlock()
		for _, c := range stalled {
			s.stats.stalled.Add(1)
			c.log.Warn("NBD client stopped sending a write's payload; dropping it", "export", c.exportName, "after", timeout)
			c.abort()
		}
	}
}

// closeListeners marks the server closed and closes every listener; it returns the live connections.
func (s *Server) closeListeners() []*conn {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closed = true
	for l := range s.listeners {
		l.Close()
	}
	conns := make([]*conn, 0, len(s.conns))
	for c := range s.conns {
		conns = append(conns, c)
	}
	return conns
}

// Shutdown stops accepting, stops reading new requests, lets in-flight requests finish
// and their replies go out, then closes every connection. If ctx ends first, the
// remaining connections are closed at once and ctx's error is returned.
func (s *Server) Shutdown(ctx context.Context) error {
	for _, c := range s.closeListeners() {
		c.stopReading()
	}
	done := make(chan struct{})
	go func() {
		s.connWG.Wait()
		close(done)
	}()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		s.Close()
		return ctx.Err()
	}
}

// Close stops accepting, closes every connection at once and waits for their
// in-flight Export calls to return.
func (s *Server) Close() error {
	for _, c := range s.closeListeners() {
		c.abort()
	}
	s.connWG.Wait()
	return nil
}

// serverStats are counters kept across all connections.
type serverStats struct {
	connections   atomic.Int64 // accepted
	requests      atomic.Int64 // transmission-phase requests served
	writes        atomic.Int64 // write system calls carrying replies
	ownReplies    atomic.Int64 // replies sent by the worker that served the request
	streamed      atomic.Int64 // large READs served by their connection's streamer
	streamPauses  atomic.Int64 // times a streamer was slow and handed READs to the workers
	blockingModes atomic.Int64 // times a reader went into blocking mode
	refused       atomic.Int64 // connections closed at once: MaxConns reached
	stalled       atomic.Int64 // connections dropped for a stalled WRITE payload
	memWaits      atomic.Int64 // requests that waited for server-wide payload memory
}

// Stats is a snapshot of the server's counters.
type Stats struct {
	// Connections is the number of connections accepted so far.
	Connections int64
	// Requests is the number of transmission-phase requests served so far.
	Requests int64
	// ReplyWrites is the number of socket writes that carried replies (batching makes it lower than Requests).
	ReplyWrites int64
	// OwnReplies is the number of large READ replies sent by the worker that read their
	// data rather than by the connection's writer.
	OwnReplies int64
	// Streamed is the number of large READs served by their connection's streamer, and
	// StreamPauses the number of times a streamer was slow and handed the next READs to
	// the workers.
	Streamed, StreamPauses int64
	// BlockingModes is the number of times a reader went into blocking mode for a
	// stream of large WRITEs over a unix socket.
	BlockingModes int64
	// Refused is the number of connections closed at once because MaxConns were live.
	Refused int64
	// Stalled is the number of connections dropped because a WRITE payload stopped arriving.
	Stalled int64
	// MemoryWaits is the number of requests that waited because MaxTotalBufferBytes of
	// payload memory were held.
	MemoryWaits int64
}

// Stats returns the server's counters.
func (s *Server) Stats() Stats {
	return Stats{Connections: s.stats.connections.Load(), Requests: s.stats.requests.Load(), ReplyWrites: s.stats.writes.Load(),
		OwnReplies: s.stats.ownReplies.Load(), Streamed: s.stats.streamed.Load(), StreamPauses: s.stats.streamPauses.Load(), BlockingModes: s.stats.blockingModes.Load(), Refused: s.stats.refused.Load(), Stalled: s.stats.stalled.Load(), MemoryWaits: s.stats.memWaits.Load()}
}
