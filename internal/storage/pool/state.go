package pool

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
)

// stateFile is the name of the pool's persisted state inside stateDir.
const stateFile = "pool.json"

// persisted is the content of pool.json: the authority on which disks are members and
// which of them may be trusted. It is replaced atomically (write, fsync, rename, fsync dir).
type persisted struct {
	UUID         string `json:"uuid"`
	StripeUnit   int64  `json:"stripe_unit"`
	UnitsPerDisk int64  `json:"units_per_disk"`
	DataOffset   int64  `json:"data_offset"`
	Generation   uint64 `json:"generation"`
	// Unclean is true while the pool is open: found true at Open, the last run ended
	// without Close. BootID tells whether the machine restarted since (then unflushed
	// writes may have reached one disk of a pair and not the other).
	Unclean bool   `json:"unclean,omitempty"`
	BootID  string `json:"boot_id,omitempty"`
	// IntentDurable is true when the run that wrote this file made every write-intent
	// mark durable before the write (see dirtyFile), so that after a machine restart
	// the marked chunks are all that may differ. Files without it get a full resync.
	IntentDurable bool            `json:"intent_durable,omitempty"`
	Disks         []persistedDisk `json:"disks"`
}

type persistedDisk struct {
	Index int    `json:"index"`
	Path  string `json:"path"`
	// State is "ok", "rebuilding", "failed" or "missing"; failed and missing disks are never read.
	State       string `json:"state"`
	Error       string `json:"error,omitempty"`
	RebuildDone int64  `json:"rebuild_done,omitempty"`
}

func loadState(dir string) (*persisted, error) {
	b, err := os.ReadFile(filepath.Join(dir, stateFile))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("Failed to read pool state: %w", err)
	}
	var st persisted
	if err := json.Unmarshal(b, &st); err != nil {
		return nil, fmt.Errorf("Failed to parse pool state %q: %w", filepath.Join(dir, stateFile), err)
	}
	n := len(st.Disks)
	if st.UUID == "" || n == 0 || (n > 1 && n%2 != 0) || !validUnit(st.StripeUnit) ||
		st.UnitsPerDisk < 1 || st.DataOffset != dataOffsetFor(st.StripeUnit) {
		return nil, fmt.Errorf("Invalid pool state in %q", filepath.Join(dir, stateFile))
	}
	for i, d := range st.Disks {
		if d.Index != i || d.Path == "" {
			return nil, fmt.Errorf("Invalid pool state in %q: disk %d", filepath.Join(dir, stateFile), i)
		}
		switch d.State {
		case DiskOK, DiskRebuilding, DiskFailed, DiskMissing:
		default:
			return nil, fmt.Errorf("Invalid pool state in %q: disk %d has state %q", filepath.Join(dir, stateFile), i, d.State)
		}
	}
	return &st, nil
}

func saveState(dir string, st *persisted) error {
	b, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return fmt.Errorf("Failed to encode pool state: %w", err)
	}
	tmp, err := os.CreateTemp(dir, stateFile+".tmp*")
	if err != nil {
		return fmt.Errorf("Failed to write pool state: %w", err)
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(append(b, '\n')); err != nil {
		tmp.Close()
		return fmt.Errorf("Failed to write pool state: %w", err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return fmt.Errorf("Failed to sync pool state: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("Failed to write pool state: %w", err)
	}
	if err := os.Rename(tmp.Name(), filepath.Join(dir, stateFile)); err != nil {
		return fmt.Errorf("Failed to replace pool state: %w", err)
	}
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("Failed to sync state directory: %w", err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("Failed to sync state directory: %w", err)
	}
	return nil
}
