package testbed

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/growserver/grow/guest/seed"
)

// Seed is a cloud-init NoCloud seed built from Go values.
type Seed struct {
	Meta    seed.MetaData
	Network *seed.NetworkConfig // nil: no network-config file
	User    *seed.UserData      // nil: RawUserData (or no user-data)
	// RawUserData is used verbatim when User is nil (for example a "#!" script).
	RawUserData string
}

// Files renders the seed's files: meta-data, user-data and network-config ("" when absent).
// hostd takes these strings in its VM spec.
func (s Seed) Files() (meta, user, network string, err error) {
	m, err := s.Meta.Marshal()
	if err != nil {
		return "", "", "", err
	}
	meta = string(m)
	user = s.RawUserData
	if s.User != nil {
		u, err := s.User.Marshal()
		if err != nil {
			return "", "", "", err
		}
		user = string(u)
	}
	if s.Network != nil {
		n, err := s.Network.Marshal()
		if err != nil {
			return "", "", "", err
		}
		network = string(n)
	}
	return meta, user, network, nil
}

// WriteISO writes the seed as an ISO9660 image labelled cidata (genisoimage -J -r) to path.
func (s Seed) WriteISO(path string) error {
	meta, user, network, err := s.Files()
	if err != nil {
		return err
	}
	dir, err := os.MkdirTemp(filepath.Dir(path), ".seed-")
	if err != nil {
		return fmt.Errorf("Failed to create a seed directory: %w", err)
	}
	defer os.RemoveAll(dir)
	files := map[string]string{"meta-data": meta, "user-data": user}
	if s.Network != nil {
		files["network-config"] = network
	}
	for name, content := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o644); err != nil {
			return fmt.Errorf("Failed to write seed file %s: %w", name, err)
		}
	}
	cmd := exec.Command("genisoimage", "-quiet", "-output", path, "-volid", "cidata", "-joliet", "-rock", dir)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("genisoimage failed: %w: %s", err, bytes.TrimSpace(out.Bytes()))
	}
	return nil
}

// SeedISO writes the seed into the test's temporary directory and returns its path.
func SeedISO(t testing.TB, s Seed) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "seed.iso")
	if err := s.WriteISO(p); err != nil {
		t.Fatalf("Failed to build the seed ISO: %v", err)
	}
	return p
}

// StaticNetwork returns a network-config that gives the NIC with mac the addresses
// (CIDR) and, if set, an IPv4 default gateway.
func StaticNetwork(mac string, addrs []string, gateway4 string) *seed.NetworkConfig {
	return &seed.NetworkConfig{Version: 2, Ethernets: map[string]seed.Ethernet{
		"eth0": {Match: &seed.Match{MACAddress: mac}, Addresses: addrs, Gateway4: gateway4},
	}}
}

// Workloads returns user-data that runs the given test workloads (counter, diskwriter,
// responder, verify).
func Workloads(run ...string) *seed.UserData {
	return &seed.UserData{GrowTest: &seed.GrowTest{Run: run}}
}
