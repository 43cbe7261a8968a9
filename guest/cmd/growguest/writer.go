package main

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/growserver/grow/guest/block"
)

// rootDisk returns the block device mounted on / (e.g. "vda"), or "".
func rootDisk() string {
	f, err := os.Open("/proc/mounts")
	if err != nil {
		return ""
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fs := strings.Fields(sc.Text())
		if len(fs) >= 2 && fs[1] == "/" && strings.HasPrefix(fs[0], "/dev/") {
			return strings.TrimPrefix(fs[0], "/dev/")
		}
	}
	return ""
}

// hasFilesystem reports whether dev starts with an ext2/3/4 superblock.
func hasFilesystem(dev string) bool {
	f, err := os.Open(dev)
	if err != nil {
		return false
	}
	defer f.Close()
	var magic [2]byte
	if _, err := f.ReadAt(magic[:], 1080); err != nil {
		return false
	}
	return binary.LittleEndian.Uint16(magic[:]) == 0xEF53
}

// dataDisk picks the writer's disk: the one named in the configuration ("vdb",
// "/dev/vdb", "serial:NAME"), else the first virtio disk that is neither the root
// disk, nor the seed, nor holds a filesystem.
func dataDisk(spec, seedDisk string) (string, error) {
	switch {
	case strings.HasPrefix(spec, "serial:"):
		want := strings.TrimPrefix(spec, "serial:")
		for _, d := range virtioDisks() {
			s, _ := os.ReadFile(filepath.Join("/sys/block", d, "serial"))
			if strings.TrimSpace(string(s)) == want {
				return d, nil
			}
		}
		return "", fmt.Errorf("no virtio disk has serial %q", want)
	case spec != "":
		d := strings.TrimPrefix(spec, "/dev/")
		if _, err := os.Stat("/sys/block/" + d); err != nil {
			return "", fmt.Errorf("data disk %q does not exist", spec)
		}
		if d == rootDisk() || d == seedDisk {
			return "", fmt.Errorf("refusing to write to %s: it is the root or seed disk", d)
		}
		return d, nil
	}
	root := rootDisk()
	// A disk whose serial is "data" (as hostd names disks by their ID) comes first.
	for _, d := range virtioDisks() {
		s, _ := os.ReadFile(filepath.Join("/sys/block", d, "serial"))
		if strings.TrimSpace(string(s)) == "data" && d != root && d != seedDisk {
			return d, nil
		}
	}
	for _, d := range virtioDisks() {
		if d == root || d == seedDisk || isoLabel("/dev/"+d) != "" || hasFilesystem("/dev/"+d) {
			continue
		}
		return d, nil
	}
	return "", errors.New("no data disk for the disk writer (attach a blank virtio disk or set grow.disk)")
}

func diskSize(d string) (int64, error) {
	b, err := os.ReadFile(filepath.Join("/sys/block", d, "size"))
	if err != nil {
		return 0, fmt.Errorf("Failed to read size of %s: %w", d, err)
	}
	var sectors int64
	if _, err := fmt.Sscan(strings.TrimSpace(string(b)), &sectors); err != nil {
		return 0, fmt.Errorf("Bad size of %s: %w", d, err)
	}
	return sectors * 512, nil
}

// prepareDisk resolves the data disk and the slot count that fits on it.
func prepareDisk(cfg config, seedDisk string) (string, uint64, error) {
	d, err := dataDisk(cfg.disk, seedDisk)
	if err != nil {
		return "", 0, err
	}
	size, err := diskSize(d)
	if err != nil {
		return "", 0, err
	}
	slots := min(cfg.slots, uint64(size)/block.Size)
	if slots == 0 {
		return "", 0, fmt.Errorf("data disk %s is too small (%d bytes)", d, size)
	}
	return d, slots, nil
}

// scanDisk finds the newest block already on the disk and checks the history.
func scanDisk(dev string, slots uint64) (uint64, error) {
	f, err := os.Open(dev)
	if err != nil {
		return 0, fmt.Errorf("Failed to open %s: %w", dev, err)
	}
	defer f.Close()
	return block.Scan(f, slots)
}

// runVerify checks the blocks already on the data disk and reports the result.
func runVerify(cfg config, seedDisk string) error {
	d, slots, err := prepareDisk(cfg, seedDisk)
	if err != nil {
		return err
	}
	newest, err := scanDisk("/dev/"+d, slots)
	if err != nil {
		return fmt.Errorf("disk=%s slots=%d newest=%d: %w", d, slots, newest, err)
	}
	out.printf("GROW-VERIFY ok disk=%s slots=%d newest=%d", d, slots, newest)
	return nil
}

// runWriter writes sequence-numbered blocks with O_DIRECT|O_DSYNC, resuming after
// the newest block already on the disk, and reports every acknowledged one.
func runWriter(st *state, cfg config, seedDisk string) error {
	d, slots, err := prepareDisk(cfg, seedDisk)
	if err != nil {
		return err
	}
	dev := "/dev/" + d
	newest, err := scanDisk(dev, slots)
	if err != nil {
		return fmt.Errorf("existing blocks on %s do not verify (newest %d): %w", dev, newest, err)
	}
	fd, err := syscall.Open(dev, syscall.O_RDWR|syscall.O_DIRECT|syscall.O_DSYNC|syscall.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("Failed to open %s for direct writes: %w", dev, err)
	}
	defer syscall.Close(fd)
	// O_DIRECT needs an aligned buffer: an anonymous mapping is page aligned.
	buf, err := syscall.Mmap(-1, 0, block.Size, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_ANON|syscall.MAP_PRIVATE)
	if err != nil {
		return fmt.Errorf("Failed to allocate an aligned buffer: %w", err)
	}
	defer syscall.Munmap(buf)

	st.acked.Store(newest)
	out.printf("GROW-WRITER disk=%s slots=%d start=%d", d, slots, newest+1)
	for seq := newest + 1; ; seq++ {
		slot := block.Slot(seq, slots)
		block.Encode(buf, seq, slot, time.Now().UnixNano())
		for {
			n, err := syscall.Pwrite(fd, buf, int64(slot)*block.Size)
			if err == nil && n == block.Size {
				break
			}
			// A stalled or failing disk: keep trying the same sequence, never skip it.
			out.printf("GROW-WRITER-RETRY seq=%d n=%d err=%v", seq, n, err)
			time.Sleep(time.Second)
		}
		st.acked.Store(seq)
		out.printf("GROW-ACK seq=%d", seq)
		if cfg.writeInterval > 0 {
			time.Sleep(cfg.writeInterval)
		}
	}
}
