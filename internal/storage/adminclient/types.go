package adminclient

import "time"

// Volume describes one volume, image or snapshot on a storage controller.
type Volume struct {
	Name string `json:"name"`
	// Kind is "volume" (writable), "image" (read-only gold master) or "snapshot" (read-only, "vol@snap").
	Kind string `json:"kind"`
	// Size is the virtual size in bytes.
	Size int64 `json:"size"`
	// Allocated is the space the volume's own layer holds on the pool, in bytes.
	Allocated int64 `json:"allocated"`
	// Parent is the image or snapshot this volume was cloned from ("" if none).
	Parent string `json:"parent,omitempty"`
	// ReadOnly is true for images and snapshots.
	ReadOnly bool `json:"read_only"`
	// Children counts the clones and snapshots that depend on this volume.
	Children int `json:"children"`
	// Created is when the volume was created.
	Created time.Time `json:"created,omitzero"`
	// NBDAddress is "IP:PORT" where NBD clients should open this volume (on a mirrored
	// pair: its home's service address, which follows the primary).
	NBDAddress string `json:"nbd_address,omitempty"`
	// Mirror is the volume's mirror state on this controller (mirrored pairs only).
	Mirror *VolumeMirror `json:"mirror,omitempty"`
}

// Mirror states of a volume, as VolumeMirror.State.
const (
	MirrorSynced    = "synced"
	MirrorDegraded  = "degraded"
	MirrorResyncing = "resyncing"
	MirrorStale     = "stale"
	MirrorFrozen    = "frozen"
	MirrorSplit     = "split"
)

// VolumeMirror is one controller's view of a mirrored volume.
type VolumeMirror struct {
	// Role is "primary" (serves NBD clients) or "secondary" on this controller.
	Role string `json:"role"`
	// Epoch changes whenever the pair splits or the primary moves.
	Epoch uint64 `json:"epoch"`
	// State is synced, degraded, resyncing, stale, frozen or split.
	State string `json:"state"`
	// Home is the controller that is the volume's primary in the normal state.
	Home string `json:"home"`
	// Primary is the controller currently serving the volume ("" if none is known).
	Primary string `json:"primary"`
	// DirtyBytes is how much of the volume is known to differ from the partner.
	DirtyBytes int64 `json:"dirty_bytes"`
	// Resync is the progress of the running (or last) resync.
	Resync MirrorResync `json:"resync"`
}

// MirrorResync is the progress of a resync, in bytes.
type MirrorResync struct {
	Done  int64 `json:"done"`
	Total int64 `json:"total"`
	// Rate is the resync rate limit in bytes per second (0: unlimited).
	Rate int64 `json:"rate"`
}

// PeerVolume is what a controller tells its partner about one volume.
type PeerVolume struct {
	// Role is the mirror role name (secondary, primary-synced, primary-degraded, stale, frozen-split).
	Role  string `json:"role"`
	Epoch uint64 `json:"epoch"`
	Home  string `json:"home"`
	// Mode is the replicating export's mode on a primary (synced, degraded, resyncing, held, fenced).
	Mode string `json:"mode,omitempty"`
}

// MirrorStatus is GET /v1/mirror: the pair as one controller sees it.
type MirrorStatus struct {
	Name              string `json:"name"`
	Partner           string `json:"partner"`
	PartnerURL        string `json:"partner_url"`
	PartnerReachable  bool   `json:"partner_reachable"`
	WitnessConfigured bool   `json:"witness_configured"`
	WitnessReachable  bool   `json:"witness_reachable"`
	// LinkAddress is where this controller serves the mirror link.
	LinkAddress string `json:"link_address"`
	// ServiceAddress is this controller's own service address (IP/PREFIX, "" if none).
	ServiceAddress string `json:"service_address,omitempty"`
	// NBDPort is the NBD TCP port hosts use with a service address.
	NBDPort int `json:"nbd_port"`
	// NBDAddress is this controller's own advertised NBD address.
	NBDAddress string `json:"nbd_address"`
	// Serves lists the homes whose volumes this controller serves now (and whose service address it holds).
	Serves []string `json:"serves"`
	// Fenced is true while this controller lost partner and witness for longer than the fence timeout.
	Fenced     bool  `json:"fenced"`
	ResyncRate int64 `json:"resync_rate"`
	// States counts this controller's volumes per mirror state.
	States map[string]int `json:"states"`
	// Resync sums the progress of running resyncs.
	Resync  MirrorResync          `json:"resync"`
	Volumes map[string]PeerVolume `json:"volumes"`
	// VolumesGen names this version of Volumes: it changes whenever a volume's entry does.
	VolumesGen string `json:"volumes_gen,omitempty"`
	// VolumesSame: asked with the current VolumesGen (MirrorHeartbeat), the controller
	// left Volumes out (null) because they are the ones the caller already has.
	VolumesSame bool `json:"volumes_same,omitempty"`
	// ResyncBytes counts bytes copied by resync since start (as mirror_resync_bytes in the stats).
	ResyncBytes int64 `json:"resync_bytes"`
	// MetaEpoch is the pair's metadata epoch as this controller knows it: the witness
	// grants the next one to a controller that creates or deletes volumes alone.
	MetaEpoch uint64 `json:"meta_epoch"`
	// MetaPending counts volume creations and deletions this controller made while its
	// partner was away and has not yet replayed to it.
	MetaPending int `json:"meta_pending"`
}

// MetaAdoptRequest is POST /v1/mirror/meta (pair-internal): the partner replayed every
// change it made alone up to Epoch.
type MetaAdoptRequest struct {
	Epoch uint64 `json:"epoch"`
}

// DirtyRegions is GET /v1/mirror/volumes/{name}/dirty: the regions this side marked.
type DirtyRegions struct {
	RegionSize int64    `json:"region_size"`
	Regions    []uint64 `json:"regions"`
}

// MoveResult answers drain and resume: what moved and what still waits.
type MoveResult struct {
	Moved   []string `json:"moved"`
	Waiting []string `json:"waiting"`
	Done    bool     `json:"done"`
	Message string   `json:"message"`
	// Resync is the progress of resyncs the move waits for.
	Resync MirrorResync `json:"resync"`
}

// ResolveRequest is the body of POST /v1/volumes/{name}/resolve.
type ResolveRequest struct {
	// Keep names the controller whose data is kept.
	Keep string `json:"keep"`
}

// RateRequest is the body of POST /v1/mirror/rate.
type RateRequest struct {
	// Rate is the resync rate limit in bytes per second (0: unlimited).
	Rate int64 `json:"rate"`
}

// CreateVolumeRequest is the body of POST /v1/volumes.
type CreateVolumeRequest struct {
	Name string `json:"name"`
	Size int64  `json:"size"`
}

// ResizeVolumeRequest is the body of POST /v1/volumes/{name}/resize.
type ResizeVolumeRequest struct {
	Size int64 `json:"size"`
}

// CloneVolumeRequest is the body of POST /v1/volumes/{name}/clone.
type CloneVolumeRequest struct {
	// Name is the new volume.
	Name string `json:"name"`
}

// SnapshotRequest is the body of POST /v1/volumes/{name}/snapshots.
type SnapshotRequest struct {
	// Name is the snapshot name; the snapshot is then addressed as "volume@name".
	Name string `json:"name"`
}

// CloneResult is the answer to a clone or snapshot: the new volume and how long the controller took.
type CloneResult struct {
	Volume   Volume `json:"volume"`
	Duration string `json:"duration"`
	// Nanoseconds is Duration in nanoseconds, for programs.
	Nanoseconds int64 `json:"nanoseconds"`
}

// CheckReport is the result of a consistency check of the controller's on-disk state.
type CheckReport struct {
	OK       bool     `json:"ok"`
	Volumes  int      `json:"volumes"`
	Clusters int64    `json:"clusters"`
	Problems []string `json:"problems"`
	Duration string   `json:"duration"`
}

// Disk is the state of one pool disk.
type Disk struct {
	Index int    `json:"index"`
	Path  string `json:"path"`
	// Pair is the mirror pair the disk belongs to.
	Pair int `json:"pair"`
	// State is "ok", "failed" or "rebuilding".
	State string `json:"state"`
	Error string `json:"error,omitempty"`
	// RebuildDone and RebuildTotal are bytes copied so far and to copy, while rebuilding.
	RebuildDone  int64 `json:"rebuild_done"`
	RebuildTotal int64 `json:"rebuild_total"`
}

// PoolStatus is the state of the controller's disk pool.
type PoolStatus struct {
	// State is "ok", "degraded", "rebuilding" or "failed".
	State string `json:"state"`
	// Size is the usable size in bytes.
	Size  int64  `json:"size"`
	Disks []Disk `json:"disks"`
}

// ReplaceDiskRequest is the body of POST /v1/pool/replace.
type ReplaceDiskRequest struct {
	Old string `json:"old"`
	New string `json:"new"`
}

// Stats are the controller's space, cache and I/O counters.
type Stats struct {
	Pool PoolStatus `json:"pool"`
	// Space on the pool, in bytes.
	Capacity int64 `json:"capacity"`
	Used     int64 `json:"used"`
	Free     int64 `json:"free"`
	// PendingFree is space freed but not yet reusable (its freeing record is not yet durable).
	PendingFree  int64 `json:"pending_free"`
	JournalBytes int64 `json:"journal_bytes"`
	Volumes      int   `json:"volumes"`
	// CacheSize is the RAM cache's capacity and CacheBytes what it holds now.
	CacheSize  int64 `json:"cache_size"`
	CacheBytes int64 `json:"cache_bytes"`
	// CacheHits and CacheMisses count reads served from and past the RAM cache.
	CacheHits   int64 `json:"cache_hits"`
	CacheMisses int64 `json:"cache_misses"`
	// NBD counters since the controller started.
	Connections int64  `json:"connections"`
	OpenExports int64  `json:"open_exports"`
	ReadBytes   int64  `json:"read_bytes"`
	WriteBytes  int64  `json:"write_bytes"`
	ReadOps     int64  `json:"read_ops"`
	WriteOps    int64  `json:"write_ops"`
	FlushOps    int64  `json:"flush_ops"`
	TrimOps     int64  `json:"trim_ops"`
	ZeroOps     int64  `json:"zero_ops"`
	Uptime      string `json:"uptime"`
	NBDAddress  string `json:"nbd_address"`
	NBDSocket   string `json:"nbd_socket,omitempty"`
	// NBDTLS is "required" or "offered" when the controller speaks NBD over TLS, and
	// NBDTLSName the name hosts must verify its certificate against.
	NBDTLS     string `json:"nbd_tls,omitempty"`
	NBDTLSName string `json:"nbd_tls_name,omitempty"`
	// MirrorResyncBytes counts bytes copied by mirror resync since start.
	MirrorResyncBytes int64 `json:"mirror_resync_bytes"`
}

// Error is the JSON body of every error answer: a stable code and a human message.
type Error struct {
	Code    string `json:"code"`
	Message string `json:"message"`
}

// Error codes the controller answers with.
const (
	CodeInvalid      = "invalid"
	CodeNotFound     = "not_found"
	CodeExists       = "exists"
	CodeInUse        = "in_use"
	CodeReadOnly     = "read_only"
	CodeNoSpace      = "no_space"
	CodeUnauthorized = "unauthorized"
	CodeConflict     = "conflict"
	CodeInternal     = "internal"
	// CodeUnavailable: the mirror partner is unreachable, so metadata operations wait.
	CodeUnavailable = "unavailable"
)
