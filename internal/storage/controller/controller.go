// Package controller is the storage controller daemon, `grow storaged`: it opens the
// disk pool, puts the shared RAM cache on it, opens the thin volume manager on the
// cache, serves every volume over NBD (TCP and a unix socket) and offers the admin
// HTTP/JSON API behind a bearer token.
//
// With a partner (Config.Mirror, `--peer`) it is one of a mirrored pair (mirror*.go):
// every volume exists on both controllers, its primary replicates each write to the
// secondary over the mirror link, roles and epochs are settled through a witness, and
// a moving service address per home leads hosts to the current primary (see the
// internal/storage/mirror package documentation for the whole design).
//
// It only wires the storage layers together and translates between them and the
// outside world; it must never interpret on-disk data itself, never serve the admin
// API without the token, never log the token, and never serve a mirrored volume over
// NBD on a controller that is not its current primary.
package controller

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/growserver/grow/internal/authtoken"
	"github.com/growserver/grow/internal/revert"
	"github.com/growserver/grow/internal/storage/cache"
	"github.com/growserver/grow/internal/storage/dev"
	"github.com/growserver/grow/internal/storage/nbd"
	"github.com/growserver/grow/internal/storage/pool"
	"github.com/growserver/grow/internal/storage/volume"
)

// Defaults of `grow storaged`.
const (
	DefaultNBDAddr   = "127.0.0.1:10809"
	DefaultAPIAddr   = "127.0.0.1:7480"
	DefaultCacheSize = 1 << 30
	// DefaultPoolSize is the size of the sparse file disks the controller creates when
	// a --disk path (or the default DATA/disk0.img) does not exist yet.
	DefaultPoolSize = 100 << 30
)

// Config is what `grow storaged` is started with.
type Config struct {
	// DataDir holds admin.token, pool.json, meta/ and, without Disks, disk0.img.
	DataDir string
	// NBDAddr is the NBD TCP listen address ("" disables TCP).
	NBDAddr string
	// NBDAdvertise is the host:port that hosts should use to reach NBD, reported in the
	// stats (needed when NBDAddr is a wildcard such as 0.0.0.0:10809); "" means NBDAddr.
	NBDAdvertise string
	// NBDSocket is the NBD unix socket path ("" means DATA/nbd.sock, "none" disables it).
	NBDSocket string
	// NBDMaxConns bounds live NBD connections; 0 means the server's default (4096).
	NBDMaxConns int
	// NBDBufferMemory bounds the payload memory of all NBD connections together; 0 means
	// the server's default (1 GiB).
	NBDBufferMemory int64
	// APIAddr is the admin API listen address.
	APIAddr string
	// Disks are the pool's disks (files or block devices); none means DATA/disk0.img.
	Disks []string
	// PoolSize is the size of each file disk created because its path did not exist.
	PoolSize int64
	// CacheSize is the shared read cache size in bytes (0 disables the cache).
	CacheSize int64
	// TLSCert and TLSKey enable NBD STARTTLS (and HTTPS on the admin API).
	TLSCert, TLSKey string
	// TLSClientCA, if set, makes NBD clients present a certificate signed by it.
	TLSClientCA string
	// RequireTLS refuses NBD clients that do not upgrade to TLS.
	RequireTLS bool
	// TLSName is the name hosts verify the NBD certificate against (default: the
	// certificate's first DNS name); both controllers of a pair should carry it.
	TLSName string
	// Logger receives the daemon's logs; nil means slog.Default().
	Logger *slog.Logger
	// Mirror pairs the controller with a partner (Mirror.Peer "" means unpaired).
	Mirror MirrorConfig
}

// Controller is a running storage controller.
type Controller struct {
	cfg     Config
	log     *slog.Logger
	token   string
	pool    *pool.Pool
	cache   *cache.Cache
	mgr     *volume.Manager
	nbd     *nbd.Server
	exports *exports
	io      ioCounters
	linkIO  ioCounters // I/O of the mirror's own handles (link target, replicating export)
	mir     *mirrorMgr // nil unless paired
	started time.Time
	metrics *metrics

	nbdTCP  net.Listener
	nbdUnix net.Listener
	apiLn   net.Listener
	api     *http.Server

	// opMu serialises long admin operations that must not overlap (import spooling, replace).
	opMu sync.Mutex

	closeOnce sync.Once
	closeErr  error
	wg        sync.WaitGroup
}

// Open opens the storage stack and binds every listener; call Serve to start serving.
func Open(cfg Config) (*Controller, error) {
	if cfg.DataDir == "" {
		return nil, errors.New("No data directory given")
	}
	if cfg.APIAddr == "" {
		cfg.APIAddr = DefaultAPIAddr
	}
	if cfg.PoolSize <= 0 {
		cfg.PoolSize = DefaultPoolSize
	}
	if cfg.NBDAdvertise != "" {
		if _, _, err := net.SplitHostPort(cfg.NBDAdvertise); err != nil {
			return nil, fmt.Errorf("Invalid NBD address to advertise %q (want host:port): %w", cfg.NBDAdvertise, err)
		}
	}
	if cfg.CacheSize < 0 {
		return nil, fmt.Errorf("Invalid cache size %d", cfg.CacheSize)
	}
	if cfg.NBDSocket == "" {
		cfg.NBDSocket = filepath.Join(cfg.DataDir, "nbd.sock")
	}
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return nil, fmt.Errorf("Failed to create data directory %q: %w", cfg.DataDir, err)
	}

	r := revert.New()
	defer r.Fail()

	c := &Controller{cfg: cfg, log: log, started: time.Now()}
	tok, err := authtoken.LoadOrCreate(filepath.Join(cfg.DataDir, "admin.token"))
	if err != nil {
		return nil, err
	}
	c.token = tok

	// Certificates and listeners first: they fail for operator mistakes (a bad path, a
	// busy port) and cost nothing to undo, unlike a pool created on fresh disks.
	tlsCfg, err := c.tlsConfig()
	if err != nil {
		return nil, err
	}
	if cfg.NBDAddr != "" {
		l, err := net.Listen("tcp", cfg.NBDAddr)
		if err != nil {
			return nil, fmt.Errorf("Failed to listen for NBD on %q: %w", cfg.NBDAddr, err)
		}
		r.Add(func() { _ = l.Close() })
		c.nbdTCP = l
	}
	if cfg.NBDSocket != "none" {
		// A stale socket from a crash is removed; a live one belongs to another controller.
		if conn, err := net.DialTimeout("unix", cfg.NBDSocket, time.Second); err == nil {
			conn.Close()
			return nil, fmt.Errorf("Failed to listen for NBD on %q: another process is serving it", cfg.NBDSocket)
		}
		_ = os.Remove(cfg.NBDSocket)
		l, err := net.Listen("unix", cfg.NBDSocket)
		if err != nil {
			return nil, fmt.Errorf("Failed to listen for NBD on %q: %w", cfg.NBDSocket, err)
		}
		r.Add(func() { _ = l.Close() })
		c.nbdUnix = l
	}
	l, err := net.Listen("tcp", cfg.APIAddr)
	if err != nil {
		return nil, fmt.Errorf("Failed to listen for the admin API on %q: %w", cfg.APIAddr, err)
	}
	r.Add(func() { _ = l.Close() })
	c.apiLn = l
	if cfg.Mirror.Peer != "" {
		m, err := newMirror(c, cfg.Mirror, tlsCfg)
		if err != nil {
			return nil, err
		}
		r.Add(func() { _ = m.linkLn.Close() })
		c.mir = m
	}

	disks := cfg.Disks
	if len(disks) == 0 {
		disks = []string{filepath.Join(cfg.DataDir, "disk0.img")}
	}
	// File disks are created only for a new pool: once DATA/pool.json exists it names
	// the members, and a missing path is a lost disk, not one to create empty.
	_, statErr := os.Stat(filepath.Join(cfg.DataDir, "pool.json"))
	newPool := errors.Is(statErr, os.ErrNotExist)
	for _, d := range disks {
		if _, err := os.Stat(d); errors.Is(err, os.ErrNotExist) && newPool {
			if err := pool.CreateFileDisk(d, cfg.PoolSize); err != nil {
				return nil, fmt.Errorf("Failed to create disk %q: %w", d, err)
			}
			r.Add(func() { _ = os.Remove(d) })
			log.Info("Created file disk", "path", d, "size", cfg.PoolSize)
		} else if err != nil && !errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("Failed to inspect disk %q: %w", d, err)
		}
	}
	p, err := pool.Open(cfg.DataDir, disks, pool.Options{Logger: log.With("component", "pool")})
	if err != nil {
		return nil, fmt.Errorf("Failed to open pool: %w", err)
	}
	r.Add(func() {
		_ = p.Close()
		if newPool {
			// Forget the pool whose fresh disks are being removed again.
			_ = os.Remove(filepath.Join(cfg.DataDir, "pool.json"))
		}
	})
	c.pool = p

	var d dev.Device = p
	if cfg.CacheSize > 0 {
		c.cache = cache.New(p, cfg.CacheSize)
		d = c.cache
	}
	mgr, err := volume.Open(filepath.Join(cfg.DataDir, "meta"), d, volume.Options{})
	if err != nil {
		return nil, fmt.Errorf("Failed to open volume manager: %w", err)
	}
	r.Add(func() { _ = mgr.Close() })
	c.mgr = mgr
	c.exports = &exports{mgr: mgr, io: &c.io}
	if c.mir != nil {
		if err := c.mir.load(); err != nil {
			return nil, err
		}
		c.exports.mir = c.mir
	}

	c.nbd = &nbd.Server{Exports: c.exports, TLSConfig: tlsCfg, RequireTLS: cfg.RequireTLS, Logger: log.With("component", "nbd"),
		MaxConns: cfg.NBDMaxConns, MaxTotalBufferBytes: cfg.NBDBufferMemory}

	c.metrics = newMetrics(c)
	c.api = &http.Server{
		Handler:           authtoken.Require(c.token, c.routes()),
		ReadHeaderTimeout: 10 * time.Second,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}
	if tlsCfg != nil {
		c.api.TLSConfig = &tls.Config{Certificates: tlsCfg.Certificates, MinVersion: tls.VersionTLS12}
	}
	r.Success()
	return c, nil
}

func (c *Controller) tlsConfig() (*tls.Config, error) {
	if c.cfg.TLSCert == "" && c.cfg.TLSKey == "" {
		if c.cfg.TLSClientCA != "" || c.cfg.RequireTLS {
			return nil, errors.New("TLS client verification or required TLS needs --tls-cert and --tls-key")
		}
		return nil, nil
	}
	if c.cfg.TLSCert == "" || c.cfg.TLSKey == "" {
		return nil, errors.New("TLS needs both --tls-cert and --tls-key")
	}
	cert, err := tls.LoadX509KeyPair(c.cfg.TLSCert, c.cfg.TLSKey)
	if err != nil {
		return nil, fmt.Errorf("Failed to load TLS certificate %q: %w", c.cfg.TLSCert, err)
	}
	if c.cfg.TLSName == "" && cert.Leaf != nil && len(cert.Leaf.DNSNames) > 0 {
		c.cfg.TLSName = cert.Leaf.DNSNames[0]
	}
	cfg := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	if c.cfg.TLSClientCA != "" {
		pem, err := os.ReadFile(c.cfg.TLSClientCA)
		if err != nil {
			return nil, fmt.Errorf("Failed to read client CA %q: %w", c.cfg.TLSClientCA, err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("No certificate found in client CA %q", c.cfg.TLSClientCA)
		}
		cfg.ClientCAs = pool
		cfg.ClientAuth = tls.RequireAndVerifyClientCert
	}
	return cfg, nil
}

// nbdTLS says whether NBD clients must ("required"), may ("offered") or cannot ("") use TLS.
func (c *Controller) nbdTLS() string {
	switch {
	case c.nbd == nil || c.nbd.TLSConfig == nil:
		return ""
	case c.cfg.RequireTLS:
		return "required"
	default:
		return "offered"
	}
}

// Token is the admin API bearer token.
func (c *Controller) Token() string { return c.token }

// APIAddr is the address the admin API listens on.
func (c *Controller) APIAddr() string { return c.apiLn.Addr().String() }

// NBDAddr is the NBD TCP address ("" if disabled).
func (c *Controller) NBDAddr() string {
	if c.nbdTCP == nil {
		return ""
	}
	return c.nbdTCP.Addr().String()
}

// advertisedNBD is the NBD address reported to clients of the admin API.
func (c *Controller) advertisedNBD() string {
	if c.cfg.NBDAdvertise != "" {
		return c.cfg.NBDAdvertise
	}
	return c.NBDAddr()
}

// NBDSocket is the NBD unix socket path ("" if disabled).
func (c *Controller) NBDSocket() string {
	if c.nbdUnix == nil {
		return ""
	}
	return c.cfg.NBDSocket
}

// Serve serves NBD and the admin API until ctx is cancelled, then shuts down gracefully:
// it stops accepting, lets in-flight requests finish, and flushes everything to disk.
func (c *Controller) Serve(ctx context.Context) error {
	errc := make(chan error, 3)
	serve := func(name string, f func() error) {
		c.wg.Add(1)
		go func() {
			defer c.wg.Done()
			if err := f(); err != nil && !errors.Is(err, net.ErrClosed) && !errors.Is(err, http.ErrServerClosed) {
				errc <- fmt.Errorf("%s: %w", name, err)
			}
		}()
	}
	nbdTCP, nbdUnix := c.nbdTCP, c.nbdUnix
	if c.mir != nil {
		// Track NBD connections so a deposed primary can close them (QEMU reconnects).
		if nbdTCP != nil {
			nbdTCP = &trackListener{Listener: nbdTCP, t: c.mir.conns, allow: c.mir.allowLocal, log: c.log}
		}
		if nbdUnix != nil {
			nbdUnix = &trackListener{Listener: nbdUnix, t: c.mir.conns}
		}
		c.mir.start()
	}
	if nbdTCP != nil {
		serve("NBD over TCP", func() error { return c.nbd.Serve(nbdTCP) })
	}
	if nbdUnix != nil {
		serve("NBD over unix socket", func() error { return c.nbd.Serve(nbdUnix) })
	}
	apiTLS, nbdTLS := c.api.TLSConfig != nil, c.nbd.TLSConfig != nil
	if apiTLS {
		serve("admin API", func() error { return c.api.ServeTLS(c.apiLn, "", "") })
	} else {
		serve("admin API", func() error { return c.api.Serve(c.apiLn) })
	}
	c.log.Info("Storage controller ready", "nbd", c.NBDAddr(), "nbd_socket", c.NBDSocket(), "api", c.APIAddr(), "api_tls", apiTLS, "nbd_tls", nbdTLS, "data", c.cfg.DataDir)

	var serveErr error
	select {
	case <-ctx.Done():
	case serveErr = <-errc:
		c.log.Error("Listener failed, shutting down", "err", serveErr)
	}
	if err := c.Close(); err != nil && serveErr == nil {
		serveErr = err
	}
	return serveErr
}

// Close stops the listeners, waits for in-flight requests (up to 30 s) and flushes and
// closes the volume manager, the cache and the pool. It is safe to call more than once.
func (c *Controller) Close() error {
	c.closeOnce.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		var errs []error
		if err := c.api.Shutdown(ctx); err != nil {
			errs = append(errs, fmt.Errorf("Failed to stop the admin API: %w", err))
		}
		if c.mir != nil {
			c.mir.stop()
		}
		if err := c.nbd.Shutdown(ctx); err != nil {
			c.log.Warn("NBD connections did not finish in time; closing them", "err", err)
			_ = c.nbd.Close()
		}
		for _, l := range []net.Listener{c.nbdTCP, c.nbdUnix} {
			if l != nil {
				_ = l.Close()
			}
		}
		c.wg.Wait()
		if c.nbdUnix != nil {
			_ = os.Remove(c.cfg.NBDSocket)
		}
		if c.mir != nil {
			c.mir.close()
		}
		if err := c.mgr.Close(); err != nil {
			errs = append(errs, fmt.Errorf("Failed to close volumes: %w", err))
		}
		if c.cache != nil {
			if err := c.cache.Sync(); err != nil {
				errs = append(errs, fmt.Errorf("Failed to flush cache: %w", err))
			}
		}
		if err := c.pool.Close(); err != nil {
			errs = append(errs, fmt.Errorf("Failed to close pool: %w", err))
		}
		c.closeErr = errors.Join(errs...)
		if c.closeErr == nil {
			c.log.Info("Storage controller stopped cleanly")
		}
	})
	return c.closeErr
}
