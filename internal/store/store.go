// Package store is the control plane's persistent state: one SQL schema, applied by
// versioned migrations on open, on SQLite (default, embedded, pure Go) or PostgreSQL.
//
// It only reads and writes rows. It must never call a host agent or a storage
// controller, never decide placement, and never hold a secret in clear except the
// daemon tokens it needs to reach registered agents (user API tokens are stored hashed).
package store

import (
	"context"
	"crypto/rand"
	"database/sql"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	_ "github.com/jackc/pgx/v5/stdlib" // registers the "pgx" database/sql driver
	_ "modernc.org/sqlite"             // registers the "sqlite" database/sql driver
)

// ErrNotFound means the requested row does not exist.
var ErrNotFound = errors.New("not found")

// ErrConflict means the write conflicts with existing rows (duplicate name, row still referenced).
var ErrConflict = errors.New("conflict")

// Dialect names the SQL backend in use.
type Dialect string

// Supported dialects.
const (
	SQLite   Dialect = "sqlite"
	Postgres Dialect = "postgres"
)

// querier is what both *sql.DB and *sql.Tx offer.
type querier interface {
	ExecContext(ctx context.Context, query string, args ...any) (sql.Result, error)
	QueryContext(ctx context.Context, query string, args ...any) (*sql.Rows, error)
	QueryRowContext(ctx context.Context, query string, args ...any) *sql.Row
}

// Store is a handle on the control-plane database; it is safe for concurrent use.
type Store struct {
	db      *sql.DB
	q       querier
	dialect Dialect
	inTx    bool
}

// Open connects to the database named by dsn and applies pending migrations.
// An empty dsn means SQLite in dataDir/grow.db; "postgres://..." or "postgresql://..."
// means PostgreSQL; "sqlite:PATH" or a plain path means SQLite at PATH.
func Open(ctx context.Context, dsn, dataDir string) (*Store, error) {
	var (
		db      *sql.DB
		err     error
		dialect Dialect
	)
	switch {
	case strings.HasPrefix(dsn, "postgres://"), strings.HasPrefix(dsn, "postgresql://"):
		dialect = Postgres
		db, err = sql.Open("pgx", dsn)
		if err != nil {
			return nil, fmt.Errorf("Failed to open PostgreSQL database: %w", err)
		}
		db.SetMaxOpenConns(16)
	default:
		dialect = SQLite
		path := strings.TrimPrefix(dsn, "sqlite:")
		if path == "" {
			if dataDir == "" {
				return nil, errors.New("No database given and no data directory to put grow.db in")
			}
			path = filepath.Join(dataDir, "grow.db")
		}
		if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
			return nil, fmt.Errorf("Failed to create directory for database %q: %w", path, err)
		}
		db, err = sql.Open("sqlite", "file:"+path+"?_pragma=foreign_keys(1)&_pragma=journal_mode(WAL)&_pragma=busy_timeout(10000)&_pragma=synchronous(NORMAL)&_txlock=immediate")
		if err != nil {
			return nil, fmt.Errorf("Failed to open SQLite database %q: %w", path, err)
		}
		// One writer at a time is how SQLite works; a single connection avoids SQLITE_BUSY.
		db.SetMaxOpenConns(1)
	}
	if err := db.PingContext(ctx); err != nil {
		_ = db.Close()
		return nil, fmt.Errorf("Failed to connect to the %s database: %w", dialect, err)
	}
	s := &Store{db: db, q: db, dialect: dialect}
	if err := s.migrate(ctx); err != nil {
		_ = db.Close()
		return nil, err
	}
	return s, nil
}

// Close releases the database connection.
func (s *Store) Close() error { return s.db.Close() }

// Dialect reports which backend this store uses.
func (s *Store) Dialect() Dialect { return s.dialect }

// InTx runs fn with a store bound to one transaction, committed if fn returns nil.
func (s *Store) InTx(ctx context.Context, fn func(tx *Store) error) error {
	if s.inTx {
		return fn(s)
	}
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("Failed to begin transaction: %w", err)
	}
	ts := &Store{db: s.db, q: tx, dialect: s.dialect, inTx: true}
	if err := fn(ts); err != nil {
		_ = tx.Rollback()
		return err
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("Failed to commit transaction: %w", mapErr(err))
	}
	return nil
}

// rebind turns '?' placeholders into '$n' for PostgreSQL.
func (s *Store) rebind(query string) string {
	if s.dialect != Postgres {
		return query
	}
	var b strings.Builder
	n := 0
	for _, c := range query {
		if c == '?' {
			n++
			b.WriteByte('$')
			b.WriteString(strconv.Itoa(n))
			continue
		}
		b.WriteRune(c)
	}
	return b.String()
}

func (s *Store) exec(ctx context.Context, query string, args ...any) (sql.Result, error) {
	res, err := s.q.ExecContext(ctx, s.rebind(query), args...)
	return res, mapErr(err)
}

func (s *Store) query(ctx context.Context, query string, args ...any) (*sql.Rows, error) {
	rows, err := s.q.QueryContext(ctx, s.rebind(query), args...)
	return rows, mapErr(err)
}

func (s *Store) queryRow(ctx context.Context, query string, args ...any) *sql.Row {
	return s.q.QueryRowContext(ctx, s.rebind(query), args...)
}

// mapErr turns backend-specific constraint errors into ErrConflict and no rows into ErrNotFound.
func mapErr(err error) error {
	if err == nil {
		return nil
	}
	if errors.Is(err, sql.ErrNoRows) {
		return ErrNotFound
	}
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		switch pgErr.Code {
		case "23505", "23503", "23514":
			return fmt.Errorf("%w: %s", ErrConflict, pgErr.Message)
		}
		return err
	}
	msg := err.Error()
	if strings.Contains(msg, "UNIQUE constraint failed") || strings.Contains(msg, "FOREIGN KEY constraint failed") || strings.Contains(msg, "CHECK constraint failed") {
		return fmt.Errorf("%w: %s", ErrConflict, msg)
	}
	return err
}

// affected returns ErrNotFound when an UPDATE or DELETE touched no row.
func affected(res sql.Result, err error) error {
	if err != nil {
		return err
	}
	n, err := res.RowsAffected()
	if err != nil {
		return fmt.Errorf("Failed to count affected rows: %w", err)
	}
	if n == 0 {
		return ErrNotFound
	}
	return nil
}

var idSeq atomic.Uint32

// NewID returns a new identifier "prefix-<time><random>" that sorts by creation time.
func NewID(prefix string) string {
	var r [5]byte
	_, _ = rand.Read(r[:])
	seq := idSeq.Add(1)
	return fmt.Sprintf("%s-%012x%04x%s", prefix, time.Now().UnixMilli(), seq&0xffff, hex.EncodeToString(r[:]))
}

// Page selects a slice of a list: rows whose key sorts after After, at most Limit of them.
type Page struct {
	After string
	Limit int
}

// DefaultLimit and MaxLimit bound a page's size.
const (
	DefaultLimit = 100
	MaxLimit     = 1000
)

func (p Page) limit() int {
	switch {
	case p.Limit <= 0:
		return DefaultLimit
	case p.Limit > MaxLimit:
		return MaxLimit
	}
	return p.Limit
}

func ts(t time.Time) int64 {
	if t.IsZero() {
		return 0
	}
	return t.UnixNano()
}

func fromTS(n int64) time.Time {
	if n == 0 {
		return time.Time{}
	}
	return time.Unix(0, n).UTC()
}

func nullStr(s string) any {
	if s == "" {
		return nil
	}
	return s
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}

// ExecAdmin runs one administrative statement (CREATE DATABASE in test helpers).
func (s *Store) ExecAdmin(ctx context.Context, stmt string) error {
	if _, err := s.db.ExecContext(ctx, stmt); err != nil {
		return fmt.Errorf("Failed to run %q: %w", stmt, err)
	}
	return nil
}

// LockPlacement serialises placement decisions across control planes for the rest of
// the transaction tx: a PostgreSQL advisory lock; SQLite transactions already take the
// database's single write lock at BEGIN.
func (s *Store) LockPlacement(ctx context.Context) error {
	if !s.inTx {
		return errors.New("LockPlacement needs a transaction")
	}
	if s.dialect != Postgres {
		return nil
	}
	if _, err := s.exec(ctx, `SELECT pg_advisory_xact_lock(7471)`); err != nil {
		return fmt.Errorf("Failed to take the placement lock: %w", err)
	}
	return nil
}
