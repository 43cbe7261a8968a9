// Package testbed gives end-to-end tests what an operator has: the grow binary, the
// tiny test guest, and (in netns.go) hosts in network namespaces with real QEMU.
package testbed

import (
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sync"
	"testing"
)

var (
	buildOnce sync.Once
	builtBin  string
	buildErr  error
)

// RepoRoot returns the repository's top directory.
func RepoRoot() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Clean(filepath.Join(filepath.Dir(file), "..", ".."))
}

// GrowBinary returns the grow binary under test: $GROW_BIN if set, else one built once per test process.
func GrowBinary(t testing.TB) string {
	t.Helper()
	if p := os.Getenv("GROW_BIN"); p != "" {
		return p
	}
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "grow-bin-")
		if err != nil {
			buildErr = err
			return
		}
		builtBin = filepath.Join(dir, "grow")
		cmd := exec.Command("go", "build", "-o", builtBin, "./cmd/grow")
		cmd.Dir = RepoRoot()
		if out, err := cmd.CombinedOutput(); err != nil {
			buildErr = &buildError{out: string(out), err: err}
		}
	})
	if buildErr != nil {
		t.Fatalf("Failed to build grow: %v", buildErr)
	}
	return builtBin
}

type buildError struct {
	out string
	err error
}

func (e *buildError) Error() string { return e.err.Error() + "\n" + e.out }

// GuestDir returns the directory holding the tiny test guest built by `make guest`
// ($GROW_GUEST_DIR, else <repo>/.cache/guest). It fails the test if the guest is missing.
func GuestDir(t testing.TB) string {
	t.Helper()
	dir := os.Getenv("GROW_GUEST_DIR")
	if dir == "" {
		dir = filepath.Join(RepoRoot(), ".cache", "guest")
	}
	if _, err := os.Stat(filepath.Join(dir, "vmlinux")); err != nil {
		t.Fatalf("The test guest is missing in %s (run `make guest`): %v", dir, err)
	}
	return dir
}
