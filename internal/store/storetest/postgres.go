// Package storetest gives tests a private database: SQLite in a temp dir, or a private
// PostgreSQL 15 started with initdb + pg_ctl on a temp dir and a free port.
//
// It is for tests and CI only; it must never touch a database it did not create.
package storetest

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/growserver/grow/internal/store"
)

// PGBinDir is where Debian 12 installs the PostgreSQL 15 server binaries.
const PGBinDir = "/usr/lib/postgresql/15/bin"

// Postgres is a private PostgreSQL server.
type Postgres struct {
	Dir  string
	Port int
	DSN  string
	run  []string // command prefix that drops root
}

// StartPostgres initialises and starts a private PostgreSQL in a new directory under
// parent, listening on 127.0.0.1 at a free port. As root it runs the server as nobody
// (PostgreSQL refuses to run as root).
func StartPostgres(parent string) (*Postgres, error) { return StartPostgresIn(parent, "") }

// StartPostgresIn is StartPostgres inside the network namespace netns ("" for the
// current one); its DSN then works only from inside that namespace.
func StartPostgresIn(parent, netns string) (*Postgres, error) {
	if _, err := os.Stat(filepath.Join(PGBinDir, "initdb")); err != nil {
		return nil, fmt.Errorf("PostgreSQL 15 is not installed in %s: %w", PGBinDir, err)
	}
	dir, err := os.MkdirTemp(parent, "grow-pg-")
	if err != nil {
		return nil, fmt.Errorf("Failed to create PostgreSQL directory: %w", err)
	}
	p := &Postgres{Dir: dir}
	if os.Geteuid() == 0 {
		u, err := user.Lookup("nobody")
		if err != nil {
			return nil, fmt.Errorf("Failed to find user nobody to run PostgreSQL as: %w", err)
		}
		uid, _ := strconv.Atoi(u.Uid)
		gid, _ := strconv.Atoi(u.Gid)
		if err := os.Chown(dir, uid, gid); err != nil {
			return nil, fmt.Errorf("Failed to hand %s to nobody: %w", dir, err)
		}
		// nobody must be able to reach the directory through its parents.
		for d := filepath.Dir(dir); d != "/" && d != "."; d = filepath.Dir(d) {
			if fi, err := os.Stat(d); err == nil && fi.Mode().Perm()&0o001 == 0 {
				_ = os.Chmod(d, fi.Mode().Perm()|0o011)
			}
		}
		p.run = []string{"runuser", "-u", "nobody", "--"}
	}
	if netns != "" {
		p.run = append([]string{"ip", "netns", "exec", netns}, p.run...)
	}
	if out, err := p.cmd("initdb", "-D", filepath.Join(dir, "data"), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync").CombinedOutput(); err != nil {
		return nil, fmt.Errorf("initdb failed: %w\n%s", err, out)
	}
	var lastErr error
	for attempt := 0; attempt < 5; attempt++ {
		port, err := freePort() // probed in this namespace; a clash in netns is retried below
		if err != nil {
			return nil, err
		}
		opts := fmt.Sprintf("-p %d -k %s -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=100", port, dir)
		out, err := p.cmd("pg_ctl", "-D", filepath.Join(dir, "data"), "-o", opts, "-l", filepath.Join(dir, "log"), "-w", "-t", "60", "start").CombinedOutput()
		if err == nil {
			p.Port = port
			p.DSN = fmt.Sprintf("postgres://postgres@127.0.0.1:%d/postgres?sslmode=disable", port)
			return p, nil
		}
		log, _ := os.ReadFile(filepath.Join(dir, "log"))
		lastErr = fmt.Errorf("pg_ctl start failed: %w\n%s\n%s", err, out, log)
		if !strings.Contains(string(log), "in use") {
			break
		}
	}
	_ = os.RemoveAll(dir)
	return nil, lastErr
}

// Stop shuts the server down at once and removes its directory.
func (p *Postgres) Stop() error {
	out, err := p.cmd("pg_ctl", "-D", filepath.Join(p.Dir, "data"), "-m", "immediate", "-w", "stop").CombinedOutput()
	_ = os.RemoveAll(p.Dir)
	if err != nil {
		return fmt.Errorf("pg_ctl stop failed: %w\n%s", err, out)
	}
	return nil
}

// CreateDatabase makes a fresh empty database and returns its DSN.
func (p *Postgres) CreateDatabase(name string) (string, error) {
	out, err := p.cmd("createdb", "-h", "127.0.0.1", "-p", strconv.Itoa(p.Port), "-U", "postgres", name).CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("createdb %s failed: %w\n%s", name, err, out)
	}
	return fmt.Sprintf("postgres://postgres@127.0.0.1:%d/%s?sslmode=disable", p.Port, name), nil
}

func (p *Postgres) cmd(tool string, args ...string) *exec.Cmd {
	argv := append(append([]string{}, p.run...), append([]string{filepath.Join(PGBinDir, tool)}, args...)...)
	c := exec.Command(argv[0], argv[1:]...)
	c.Dir = "/"
	return c
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("Failed to find a free port: %w", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// PostgresDSN returns a DSN of a fresh database: on $GROW_TEST_POSTGRES (a server CI
// started) if set, else on a private server started for this test and stopped after it.
func PostgresDSN(t testing.TB) string {
	t.Helper()
	name := fmt.Sprintf("grow_%d_%d", os.Getpid(), time.Now().UnixNano()%1e9)
	if base := os.Getenv("GROW_TEST_POSTGRES"); base != "" {
		return createOn(t, base, name)
	}
	p, err := StartPostgres("")
	if err != nil {
		t.Fatalf("Failed to start PostgreSQL: %v", err)
	}
	t.Cleanup(func() {
		if err := p.Stop(); err != nil {
			t.Errorf("Failed to stop PostgreSQL: %v", err)
		}
	})
	dsn, err := p.CreateDatabase(name)
	if err != nil {
		t.Fatal(err)
	}
	return dsn
}

func createOn(t testing.TB, base, name string) string {
	t.Helper()
	s, err := store.Open(context.Background(), base, "")
	if err != nil {
		t.Fatalf("Failed to reach $GROW_TEST_POSTGRES: %v", err)
	}
	defer s.Close()
	if err := s.ExecAdmin(context.Background(), "CREATE DATABASE "+name); err != nil {
		t.Fatalf("Failed to create database %s: %v", name, err)
	}
	i := strings.LastIndex(base, "/")
	q := ""
	if j := strings.Index(base[i:], "?"); j >= 0 {
		q = base[i+j:]
	}
	return base[:i+1] + name + q
}

// Backends lists the store backends every store-level test runs on.
var Backends = []string{"sqlite", "postgres"}

// Open opens a fresh store of the given backend ("sqlite" or "postgres") for t.
func Open(t testing.TB, backend string) *store.Store {
	t.Helper()
	dsn := ""
	switch backend {
	case "sqlite":
	case "postgres":
		dsn = PostgresDSN(t)
	default:
		t.Fatalf("Unknown backend %q", backend)
	}
	s, err := store.Open(context.Background(), dsn, t.TempDir())
	if err != nil {
		t.Fatalf("Failed to open %s store: %v", backend, err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s
}

// Attach returns a handle on a server StartPostgres started earlier (possibly in another
// process), so that it can be stopped.
func Attach(dir string, port int, dsn string) *Postgres {
	p := &Postgres{Dir: dir, Port: port, DSN: dsn}
	if os.Geteuid() == 0 {
		p.run = []string{"runuser", "-u", "nobody", "--"}
	}
	return p
}
