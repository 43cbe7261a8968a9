// Package jobs runs the control plane's long operations: provisioning a server
// (admission, placement, O(1) clone of the gold master, cloud-init seed, start, wait
// for the guest's ready report), resize, migrate, delete, power actions and image
// imports. Each operation is a row in the store with state and progress, can be
// cancelled, and after a restart of `grow serve` is resumed or cleanly undone.
//
// Every multi-step change registers its undo with internal/revert so a failure leaves
// no orphan volume, IP lease or QEMU. It must never talk HTTP to its callers (that is
// internal/api) nor decide placement itself (that is internal/scheduler).
package jobs

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"time"

	"github.com/growserver/grow/internal/scheduler"
	"github.com/growserver/grow/internal/store"
)

// Errors that callers map to API error codes.
var (
	ErrInvalid    = errors.New("invalid request")
	ErrConflict   = errors.New("conflict")
	ErrNoCapacity = scheduler.ErrNoCapacity
	ErrQuota      = errors.New("quota exceeded")
	ErrNoAddress  = store.ErrExhausted
)

// Operation kinds.
const (
	KindCreate  = "server.create"
	KindDelete  = "server.delete"
	KindStart   = "server.start"
	KindStop    = "server.stop"
	KindReboot  = "server.reboot"
	KindResize  = "server.resize"
	KindMigrate = "server.migrate"
)

// Config configures a Manager.
type Config struct {
	Store     *store.Store
	Connector Connector
	Policy    scheduler.Policy
	// ReadyTimeout bounds the wait for a new guest's ready report (default 5 minutes).
	ReadyTimeout time.Duration
	// StopTimeout is how long a guest gets to power off before QEMU is killed (default 30 s).
	StopTimeout time.Duration
	// Instance names this control plane in operation leases; keep it across restarts
	// (grow serve stores it in its data directory) so a restarted instance takes its own
	// operations back at once. Empty means a random one.
	Instance string
	// Lease is how long an operation whose owner stopped renewing it waits before another
	// control plane takes it over (default 15 s).
	Lease time.Duration
	// OverAllowanceBps is the rate (bits per second, both directions) of a server whose
	// traffic this month exceeds its plan's allowance; 0 leaves such servers unlimited
	// (the overage is billed either way).
	OverAllowanceBps uint64
	Logger           *slog.Logger
}

// Manager starts, follows, cancels and recovers operations.
type Manager struct {
	cfg     Config
	st      *store.Store
	log     *slog.Logger
	placeMu sync.Mutex // one placement at a time in this control plane

	mu       sync.Mutex
	running  map[string]context.CancelFunc
	closing  bool
	wg       sync.WaitGroup
	baseCtx  context.Context
	shutdown context.CancelFunc

	healthMu sync.Mutex
	health   map[string]Health // host or storage controller ID -> last probe

	shapedMu sync.Mutex
	shaped   map[string]uint64 // server ID -> NIC rate last applied (traffic.go)
}

// New returns a Manager; call Recover once before serving requests.
func New(cfg Config) *Manager {
	if cfg.ReadyTimeout <= 0 {
		cfg.ReadyTimeout = 5 * time.Minute
	}
	if cfg.StopTimeout <= 0 {
		cfg.StopTimeout = 30 * time.Second
	}
	if cfg.Policy.CPUOvercommit == 0 {
		cfg.Policy = scheduler.DefaultPolicy
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.NewTextHandler(os.Stderr, nil))
	}
	if cfg.Instance == "" {
		cfg.Instance = store.NewID("cp")
	}
	if cfg.Lease <= 0 {
		cfg.Lease = 15 * time.Second
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Manager{cfg: cfg, st: cfg.Store, log: cfg.Logger, running: map[string]context.CancelFunc{}, baseCtx: ctx, shutdown: cancel,
		shaped: map[string]uint64{}}
}

// Close stops running operations without undoing them (the next Recover decides) and waits.
func (m *Manager) Close() {
	m.mu.Lock()
	m.closing = true
	m.mu.Unlock()
	m.shutdown()
	m.wg.Wait()
}

func (m *Manager) isClosing() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.closing
}

// Cancel asks a running operation to stop; its finished steps are undone.
func (m *Manager) Cancel(ctx context.Context, id string) error {
	op, err := m.st.GetOperation(ctx, id)
	if err != nil {
		return err
	}
	if op.Done() {
		return fmt.Errorf("Operation %s is already %s: %w", id, op.State, ErrConflict)
	}
	if op.Kind == KindDelete {
		return fmt.Errorf("A delete cannot be cancelled once started: %w", ErrConflict)
	}
	if err := m.st.RequestCancel(ctx, id); err != nil {
		return err
	}
	m.mu.Lock()
	cancel := m.running[id]
	m.mu.Unlock()
	if cancel != nil {
		cancel()
	}
	return nil
}

// Wait blocks until operation id is finished (or ctx ends) and returns it.
func (m *Manager) Wait(ctx context.Context, id string) (store.Operation, error) {
	for {
		op, err := m.st.GetOperation(ctx, id)
		if err != nil || op.Done() {
			return op, err
		}
		select {
		case <-ctx.Done():
			return op, ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// opRun is one operation being executed.
type opRun struct {
	m   *Manager
	op  store.Operation
	ctx context.Context
}

// progress records the current step and percentage.
func (r *opRun) progress(step string, pct int) {
	r.op.Step, r.op.Progress, r.op.State = step, pct, store.OpRunning
	if err := r.m.st.UpdateOperation(context.Background(), &r.op); err != nil {
		r.m.log.Error("Failed to record progress", "op", r.op.ID, "err", err)
	}
}

// Instance is the name this control plane uses in operation leases.
func (m *Manager) Instance() string { return m.cfg.Instance }

// launch runs fn for op in the background; fn's error fails the operation.
func (m *Manager) launch(op store.Operation, fn func(r *opRun) error) {
	m.mu.Lock()
	if m.closing || m.running[op.ID] != nil {
		m.mu.Unlock()
		return
	}
	ctx, cancel := context.WithCancel(m.baseCtx)
	m.running[op.ID] = cancel
	m.wg.Add(1)
	m.mu.Unlock()
	go func() {
		defer m.wg.Done()
		defer func() {
			m.mu.Lock()
			delete(m.running, op.ID)
			m.mu.Unlock()
			cancel()
		}()
		r := &opRun{m: m, op: op, ctx: ctx}
		r.op.State = store.OpRunning
		err := fn(r)
		if err != nil && m.isClosing() {
			// Shut down mid-way: leave the row running; the next Recover handles it.
			m.log.Info("Operation interrupted by shutdown", "op", op.ID, "kind", op.Kind)
			return
		}
		m.finish(&r.op, err)
	}()
}

func (m *Manager) finish(op *store.Operation, err error) {
	switch {
	case err == nil:
		op.State, op.Progress, op.Error = store.OpSucceeded, 100, ""
	case errors.Is(err, context.Canceled) && op.Kind == KindEvacuate:
		op.State, op.Error = store.OpCancelled, "cancelled; servers already moved stay where they are"
	case errors.Is(err, context.Canceled):
		op.State, op.Error = store.OpCancelled, "cancelled; finished steps were undone"
	default:
		op.State, op.Error = store.OpFailed, err.Error()
	}
	if uerr := m.st.UpdateOperation(context.Background(), op); uerr != nil {
		m.log.Error("Failed to record end of operation", "op", op.ID, "err", uerr)
	}
	if err != nil {
		m.log.Warn("Operation failed", "op", op.ID, "kind", op.Kind, "err", err)
	} else {
		m.log.Info("Operation succeeded", "op", op.ID, "kind", op.Kind, "server", op.ServerID)
	}
}

// cleanup returns a context for undo steps that outlives a cancelled operation.
func cleanup() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), 2*time.Minute)
}

func (m *Manager) hostOf(ctx context.Context, id string) (store.Host, Host, error) {
	h, err := m.st.GetHost(ctx, id)
	if err != nil {
		return store.Host{}, nil, err
	}
	c, err := m.cfg.Connector.Host(h)
	return h, c, err
}

func (m *Manager) storageOf(ctx context.Context, id string) (store.StorageController, Storage, error) {
	s, err := m.st.GetStorage(ctx, id)
	if err != nil {
		return store.StorageController{}, nil, err
	}
	c, err := m.cfg.Connector.Storage(s)
	return s, c, err
}

// Snapshot builds the placement snapshot from the store.
func (m *Manager) Snapshot(ctx context.Context, st *store.Store) (*scheduler.Snapshot, error) {
	hosts, err := st.ListHosts(ctx)
	if err != nil {
		return nil, err
	}
	servers, err := st.AllServers(ctx)
	if err != nil {
		return nil, err
	}
	snap := &scheduler.Snapshot{}
	idx := map[string]int{}
	for _, h := range hosts {
		if h.State == store.StateOffline {
			continue
		}
		idx[h.ID] = len(snap.Hosts)
		// A host whose agent does not answer gets no new servers, like one in maintenance.
		down := !m.Health(h.ID).Reachable
		snap.Hosts = append(snap.Hosts, scheduler.Host{ID: h.ID, CPUs: h.CPUs, MemoryBytes: h.MemoryBytes, Maintenance: h.State == store.StateMaintenance || down})
	}
	for _, sv := range servers {
		i, ok := idx[sv.HostID]
		if !ok {
			continue
		}
		snap.Assign(i, requestOf(sv))
	}
	return snap, nil
}

func requestOf(sv store.Server) scheduler.Request {
	r := scheduler.Request{VCPUs: sv.VCPUs, MemoryBytes: sv.MemoryBytes}
	if sv.Group != "" {
		r.Group = sv.CustomerID + "/" + sv.Group
	}
	return r
}
