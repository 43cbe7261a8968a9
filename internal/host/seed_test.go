package host

import (
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/growserver/grow/internal/host/hostapi"
)

// TestSeedISOKeptWhenUnchanged checks that a seed with the same contents is not
// rewritten, and that a changed seed is.
func TestSeedISOKeptWhenUnchanged(t *testing.T) {
	if _, err := exec.LookPath("genisoimage"); err != nil {
		t.Skip("genisoimage is not installed")
	}
	p := filepath.Join(t.TempDir(), "seed.iso")
	seed := hostapi.Seed{MetaData: "instance-id: a\n", UserData: "#cloud-config\n"}
	if err := writeSeedISO(p, seed); err != nil {
		t.Fatal(err)
	}
	st1, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	old := time.Now().Add(-time.Hour)
	if err := os.Chtimes(p, old, old); err != nil {
		t.Fatal(err)
	}
	if err := writeSeedISO(p, seed); err != nil {
		t.Fatal(err)
	}
	if st2, _ := os.Stat(p); !st2.ModTime().Equal(old) || st2.Size() != st1.Size() {
		t.Fatal("an unchanged seed was rewritten")
	}
	seed.UserData = "#cloud-config\nhostname: b\n"
	if err := writeSeedISO(p, seed); err != nil {
		t.Fatal(err)
	}
	if st3, _ := os.Stat(p); st3.ModTime().Equal(old) {
		t.Fatal("a changed seed was not rewritten")
	}
	if err := os.Remove(p); err != nil {
		t.Fatal(err)
	}
	if err := writeSeedISO(p, seed); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(p); err != nil {
		t.Fatalf("a missing seed with a digest on record was not written again: %v", err)
	}
}
