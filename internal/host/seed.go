package host

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"

	"github.com/growserver/grow/internal/host/hostapi"
)

// writeSeedISO writes a cloud-init NoCloud seed (volume label cidata) with genisoimage.
// A seed already written from the same contents (its digest in PATH.sha256) is kept:
// every start of a VM would otherwise rewrite it, and replacing a file costs ext4 a
// flush of its data.
func writeSeedISO(path string, s hostapi.Seed) error {
	sum := sha256.Sum256([]byte(s.MetaData + "\x00" + s.UserData + "\x00" + s.NetworkConfig))
	digest := hex.EncodeToString(sum[:])
	if old, err := os.ReadFile(path + ".sha256"); err == nil && string(old) == digest {
		if _, err := os.Stat(path); err == nil {
			return nil
		}
	}
	dir, err := os.MkdirTemp(filepath.Dir(path), "seed-")
	if err != nil {
		return fmt.Errorf("Failed to create seed directory: %w", err)
	}
	defer os.RemoveAll(dir)
	files := []string{"meta-data", "user-data"}
	contents := map[string]string{"meta-data": s.MetaData, "user-data": s.UserData}
	if s.NetworkConfig != "" {
		files = append(files, "network-config")
		contents["network-config"] = s.NetworkConfig
	}
	args := []string{"-quiet", "-output", path + ".tmp", "-volid", "cidata", "-joliet", "-rock"}
	for _, f := range files {
		p := filepath.Join(dir, f)
		if err := os.WriteFile(p, []byte(contents[f]), 0o600); err != nil {
			return fmt.Errorf("Failed to write seed file %s: %w", f, err)
		}
		args = append(args, p)
	}
	cmd := exec.Command("genisoimage", args...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("genisoimage failed: %w: %s", err, bytes.TrimSpace(out.Bytes()))
	}
	_ = os.Remove(path + ".sha256") // never a digest naming other contents
	if err := os.Rename(path+".tmp", path); err != nil {
		return fmt.Errorf("Failed to install seed ISO: %w", err)
	}
	if err := os.WriteFile(path+".sha256", []byte(digest), 0o600); err != nil {
		return fmt.Errorf("Failed to record the seed ISO's digest: %w", err)
	}
	return nil
}

func removeAll(dir string) error { return os.RemoveAll(dir) }
