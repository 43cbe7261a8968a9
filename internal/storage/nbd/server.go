package nbd

import (
	"context"
	"crypto/tls"
	"errors"
	"log/slog"
	"net"
)

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
}

// Serve accepts connections on l until l is closed or Shutdown/Close is called.
func (s *Server) Serve(l net.Listener) error {
	return errors.New("nbd server not implemented yet")
}

// Shutdown stops accepting, lets in-flight requests finish, then closes connections.
func (s *Server) Shutdown(ctx context.Context) error { return nil }

// Close stops accepting and closes every connection at once.
func (s *Server) Close() error { return nil }
