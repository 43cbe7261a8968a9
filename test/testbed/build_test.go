package testbed

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestGuestBuildIsReproducible builds the guest from the current sources into a new
// directory (reusing the downloaded kernel package) and checks that every output is
// byte for byte the one in GuestDir, and that a second run skips the build.
func TestGuestBuildIsReproducible(t *testing.T) {
	// Mostly waiting (or unrelated to the others): overlap with the other parallel tests.
	t.Parallel()
	if testing.Short() {
		t.Skip("builds the guest: skipped with -short")
	}
	g := GuestDir(t)
	// The downloaded package and the kernel extracted from it (the extraction itself
	// runs on every fresh `make guest`).
	debs, _ := filepath.Glob(filepath.Join(g, "cache", "linux-image-*.deb"))
	if len(debs) == 0 {
		t.Fatalf("no kernel package cached in %s/cache", g)
	}
	kernels, _ := filepath.Glob(filepath.Join(g, "cache", "kernel-*"))
	debs = append(debs, kernels...)
	dir := t.TempDir()
	if err := os.MkdirAll(filepath.Join(dir, "cache"), 0o755); err != nil {
		t.Fatal(err)
	}
	for _, d := range debs {
		if err := os.Symlink(d, filepath.Join(dir, "cache", filepath.Base(d))); err != nil {
			t.Fatal(err)
		}
	}
	build := func() string {
		cmd := exec.Command("bash", filepath.Join(RepoRoot(), "scripts", "build-guest.sh"), dir)
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("build-guest.sh failed: %v\n%s", err, out)
		}
		return string(out)
	}
	build()
	want, err := os.ReadFile(filepath.Join(g, "VERSION"))
	if err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(filepath.Join(dir, "VERSION"))
	if err != nil {
		t.Fatal(err)
	}
	if string(got) != string(want) {
		t.Fatalf("a fresh build differs from %s (stale guest? run `make guest`):\nfresh:\n%s\nexisting:\n%s", g, got, want)
	}
	if out := build(); !strings.Contains(out, "up to date") {
		t.Fatalf("the second build did not skip:\n%s", out)
	}
}
