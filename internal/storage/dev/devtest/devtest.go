// Package devtest holds test helpers for the storage packages' pipe and disk code.
package devtest

import (
	"testing"

	"golang.org/x/sys/unix"
)

// Pipe returns a non-blocking pipe of 1 MiB, closed at cleanup; the test is skipped
// where a pipe cannot grow that large.
func Pipe(t testing.TB) (r, w int) {
	t.Helper()
	var fds [2]int
	if err := unix.Pipe2(fds[:], unix.O_NONBLOCK|unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fds[0]); unix.Close(fds[1]) })
	if _, err := unix.FcntlInt(uintptr(fds[1]), unix.F_SETPIPE_SZ, 1<<20); err != nil {
		t.Skipf("cannot grow a pipe to 1 MiB: %v", err)
	}
	return fds[0], fds[1]
}
