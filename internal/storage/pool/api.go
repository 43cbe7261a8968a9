package pool

import (
	"errors"
	"log/slog"
	"time"
)

// DefaultStripeUnit is the stripe unit used when Options.StripeUnit is zero; it equals
// the volume cluster size so that one cluster lives on exactly one mirror pair.
const DefaultStripeUnit = 64 << 10

// Options tunes a Pool; the zero value is valid.
type Options struct {
	// StripeUnit is the size of one stripe unit in bytes (a power of two, at least 4 KiB).
	// It is fixed when the pool is created; reopening with another value is an error.
	StripeUnit int64
	// Logger receives disk failures, rebuild progress and health-check findings.
	Logger *slog.Logger
	// RebuildRate bounds the rebuild copy in bytes per second (0 = DefaultRebuildRate, <0 = unlimited).
	RebuildRate int64
	// HealthInterval is how often each disk's path, identity and size are checked (default 1 s).
	HealthInterval time.Duration
	// Fault, when set, is called before every disk I/O (op is "read", "write", "sync"
	// or "discard"); a non-nil error is used in place of the I/O. Tests only.
	Fault func(disk int, op string, off int64) error
}

// DefaultRebuildRate is the rebuild copy rate when Options.RebuildRate is zero.
const DefaultRebuildRate = 256 << 20

// Pool states reported by Status.
const (
	StateOK       = "ok"
	StateDegraded = "degraded"
	StateFailed   = "failed"
)

// Disk states reported by Status.
const (
	DiskOK         = "ok"
	DiskFailed     = "failed"
	DiskRebuilding = "rebuilding"
	DiskMissing    = "missing"
)

// Status is a snapshot of the pool's health.
type Status struct {
	State      string `json:"state"`
	UUID       string `json:"uuid"`
	Size       int64  `json:"size"`
	StripeUnit int64  `json:"stripe_unit"`
	// DiskSize is the smallest size in bytes a disk of the pool (or a replacement) needs.
	DiskSize int64        `json:"disk_size"`
	Disks    []DiskStatus `json:"disks"`
}

// DiskStatus is the health of one disk of the pool.
type DiskStatus struct {
	Index        int    `json:"index"`
	Path         string `json:"path"`
	Pair         int    `json:"pair"`
	State        string `json:"state"`
	Error        string `json:"error,omitempty"`
	RebuildDone  int64  `json:"rebuild_done,omitempty"`
	RebuildTotal int64  `json:"rebuild_total,omitempty"`
}

// ErrRebuildRunning is returned by Replace while another rebuild is in progress.
var ErrRebuildRunning = errors.New("A rebuild is already running")
