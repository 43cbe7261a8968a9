// Command growpg starts and stops a private PostgreSQL 15 for CI, with the same helper
// the tests use (initdb + pg_ctl in a new directory, 127.0.0.1 on a free port, run as
// nobody when started as root):
//
//	dsn=$(go run ./internal/store/storetest/growpg start /tmp/ci-pg)   # prints the DSN
//	GROW_TEST_POSTGRES=$dsn go test ./...                             # tests make their own databases on it
//	go run ./internal/store/storetest/growpg stop /tmp/ci-pg
//
// It only ever touches the server it started in that directory.
package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/growserver/grow/internal/store/storetest"
)

func main() {
	if len(os.Args) != 3 || (os.Args[1] != "start" && os.Args[1] != "stop") {
		fmt.Fprintln(os.Stderr, "usage: growpg start|stop STATE-DIR")
		os.Exit(2)
	}
	state := os.Args[2]
	if err := run(os.Args[1], state); err != nil {
		fmt.Fprintln(os.Stderr, "growpg:", err)
		os.Exit(1)
	}
}

func run(verb, state string) error {
	if err := os.MkdirAll(state, 0o755); err != nil {
		return fmt.Errorf("Failed to create %q: %w", state, err)
	}
	info := filepath.Join(state, "growpg.info")
	switch verb {
	case "start":
		if _, err := os.Stat(info); err == nil {
			return fmt.Errorf("A server started from %s runs already (stop it first)", state)
		}
		p, err := storetest.StartPostgres(state)
		if err != nil {
			return err
		}
		if err := os.WriteFile(info, []byte(fmt.Sprintf("%s\n%d\n%s\n", p.Dir, p.Port, p.DSN)), 0o644); err != nil {
			_ = p.Stop()
			return fmt.Errorf("Failed to record the server: %w", err)
		}
		fmt.Println(p.DSN)
	case "stop":
		b, err := os.ReadFile(info)
		if err != nil {
			return fmt.Errorf("No server was started from %s: %w", state, err)
		}
		f := strings.Split(strings.TrimSpace(string(b)), "\n")
		if len(f) != 3 {
			return fmt.Errorf("%s is corrupt", info)
		}
		port, _ := strconv.Atoi(f[1])
		p := storetest.Attach(f[0], port, f[2])
		if err := p.Stop(); err != nil {
			return err
		}
		return os.Remove(info)
	}
	return nil
}
