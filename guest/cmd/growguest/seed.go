package main

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/growserver/grow/guest/seed"
)

const seedMount = "/run/seed"

// seedData is what the NoCloud seed said.
type seedData struct {
	found    bool
	seedDisk string // the block device the seed was read from, e.g. "vdb"
	meta     seed.MetaData
	network  seed.NetworkConfig
	user     seed.UserData
	script   []byte
}

func (s seedData) hostname() string {
	switch {
	case s.meta.LocalHostname != "":
		return s.meta.LocalHostname
	case s.user.Hostname != "":
		return s.user.Hostname
	}
	if b, err := os.ReadFile("/etc/hostname"); err == nil && strings.TrimSpace(string(b)) != "" {
		return strings.TrimSpace(string(b))
	}
	return "grow-guest"
}

// isoLabel returns the volume identifier of an ISO9660 image on dev, or "".
func isoLabel(dev string) string {
	f, err := os.Open(dev)
	if err != nil {
		return ""
	}
	defer f.Close()
	var pvd [72]byte
	if _, err := f.ReadAt(pvd[:], 32768); err != nil {
		return ""
	}
	if pvd[0] != 1 || string(pvd[1:6]) != "CD001" {
		return ""
	}
	return strings.TrimRight(string(pvd[40:72]), " \x00")
}

// virtioDisks lists vd* block devices in name order.
func virtioDisks() []string {
	m, _ := filepath.Glob("/sys/block/vd*")
	var names []string
	for _, p := range m {
		names = append(names, filepath.Base(p))
	}
	// Glob sorts lexically: vda..vdz before vdaa, which is the kernel's order too for < 27 disks.
	return names
}

// loadSeed finds the disk labelled cidata, mounts it read-only and parses its files.
func loadSeed() (seedData, error) {
	var sd seedData
	for _, name := range virtioDisks() {
		if !strings.EqualFold(isoLabel("/dev/"+name), "cidata") {
			continue
		}
		sd.found, sd.seedDisk = true, name
		if err := os.MkdirAll(seedMount, 0o755); err != nil {
			return sd, fmt.Errorf("Failed to create %s: %w", seedMount, err)
		}
		_ = syscall.Unmount(seedMount, 0)
		if err := syscall.Mount("/dev/"+name, seedMount, "iso9660", syscall.MS_RDONLY, ""); err != nil {
			return sd, fmt.Errorf("Failed to mount seed /dev/%s: %w", name, err)
		}
		defer func() { _ = syscall.Unmount(seedMount, 0) }()
		var errs []error
		if b, err := readSeedFile("meta-data"); err != nil {
			errs = append(errs, err)
		} else if b != nil {
			m, err := seed.ParseMetaData(b)
			errs = append(errs, err)
			sd.meta = m
		}
		if b, err := readSeedFile("network-config"); err != nil {
			errs = append(errs, err)
		} else if b != nil {
			n, err := seed.ParseNetworkConfig(b)
			errs = append(errs, err)
			sd.network = n
		}
		if b, err := readSeedFile("user-data"); err != nil {
			errs = append(errs, err)
		} else if b != nil {
			u, ok, err := seed.ParseUserData(b)
			errs = append(errs, err)
			if ok {
				sd.user = u
			} else if bytes.HasPrefix(b, []byte("#!")) {
				sd.script = b
			}
		}
		return sd, errors.Join(errs...)
	}
	return sd, nil
}

func readSeedFile(name string) ([]byte, error) {
	b, err := os.ReadFile(filepath.Join(seedMount, name))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("Failed to read seed file %s: %w", name, err)
	}
	return b, nil
}
