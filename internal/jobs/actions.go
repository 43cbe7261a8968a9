package jobs

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/growserver/grow/internal/host/agentclient"
	"github.com/growserver/grow/internal/host/hostapi"
	"github.com/growserver/grow/internal/scheduler"
	"github.com/growserver/grow/internal/store"
)

// ActionRequest carries the parameters of a server action.
type ActionRequest struct {
	Plan string `json:"plan,omitempty"` // resize
	To   string `json:"to,omitempty"`   // migrate: target host ("" lets placement choose)
}

// ServerAction starts kind (start, stop, reboot, delete, resize, migrate) on a server.
// Only one operation may run on a server at a time.
func (m *Manager) ServerAction(ctx context.Context, actor store.User, serverID, kind string, req ActionRequest) (store.Operation, error) {
	var run func(*opRun) error
	switch kind {
	case KindStart:
		run = m.runStart
	case KindStop:
		run = m.runStop
	case KindReboot:
		run = m.runReboot
	case KindDelete:
		run = m.runDelete
	case KindResize:
		run = m.runResize
	case KindMigrate:
		run = m.runMigrate
	default:
		return store.Operation{}, fmt.Errorf("Unknown action %q: %w", kind, ErrInvalid)
	}
	m.placeMu.Lock()
	defer m.placeMu.Unlock()
	var op store.Operation
	err := m.st.InTx(ctx, func(tx *store.Store) error {
		if err := tx.LockPlacement(ctx); err != nil {
			return err
		}
		sv, err := tx.GetServer(ctx, serverID)
		if err != nil {
			return err
		}
		busy, err := tx.ListOperations(ctx, store.OperationFilter{ServerID: sv.ID, Unfinished: true}, store.Page{Limit: 1})
		if err != nil {
			return err
		}
		if len(busy) > 0 {
			return fmt.Errorf("Server %q is busy with operation %s (%s): %w", sv.Name, busy[0].ID, busy[0].Kind, ErrConflict)
		}
		if sv.State == store.ServerCreating || sv.State == store.ServerDeleting {
			return fmt.Errorf("Server %q is %s: %w", sv.Name, sv.State, ErrConflict)
		}
		if err := m.admitAction(ctx, tx, sv, kind, &req); err != nil {
			return err
		}
		op = store.Operation{Kind: kind, ServerID: sv.ID, CustomerID: sv.CustomerID, UserID: actor.ID, Request: encodeAction(req), Owner: m.cfg.Instance}
		if kind == KindDelete {
			// Deleting is announced at once so nothing new is started on the server.
			if err := tx.SetServerState(ctx, sv.ID, store.ServerDeleting); err != nil {
				return err
			}
		}
		return tx.CreateOperation(ctx, &op)
	})
	if err != nil {
		return store.Operation{}, err
	}
	m.launch(op, run)
	return op, nil
}

// admitAction checks what can be checked before anything is done.
func (m *Manager) admitAction(ctx context.Context, tx *store.Store, sv store.Server, kind string, req *ActionRequest) error {
	switch kind {
	case KindResize:
		plan, err := tx.GetPlan(ctx, req.Plan)
		if err != nil {
			return err
		}
		if plan.DiskBytes < sv.DiskBytes {
			return fmt.Errorf("Plan %s has a %d GiB disk, smaller than the %d GiB of %q: disks never shrink: %w",
				plan.Name, plan.DiskBytes>>30, sv.DiskBytes>>30, sv.Name, ErrConflict)
		}
		if plan.MemoryBytes > sv.MemoryBytes || plan.VCPUs > sv.VCPUs {
			snap, err := m.Snapshot(ctx, tx)
			if err != nil {
				return err
			}
			i := snap.Index(sv.HostID)
			if i < 0 {
				return fmt.Errorf("Server %q has no host: %w", sv.Name, ErrConflict)
			}
			snap.Release(i, requestOf(sv))
			grown := requestOf(sv)
			grown.VCPUs, grown.MemoryBytes = plan.VCPUs, plan.MemoryBytes
			only := &scheduler.Snapshot{Hosts: snap.Hosts[i : i+1]}
			pol := m.cfg.Policy
			pol.NPlusOne = false
			if _, err := scheduler.Place(only, grown, pol); err != nil {
				return fmt.Errorf("Host of %q cannot take plan %s: %w", sv.Name, plan.Name, err)
			}
			// N+1 is a cluster-wide property: check it on the whole snapshot.
			snap.Assign(i, grown)
			if m.cfg.Policy.NPlusOne && len(snap.Hosts) > 1 && scheduler.EvacuationShortfall(snap) > 0 {
				return fmt.Errorf("Resizing %q to %s would leave too little memory to evacuate a host: %w", sv.Name, plan.Name, ErrNoCapacity)
			}
		}
	case KindMigrate:
		if sv.State != store.ServerRunning {
			return fmt.Errorf("Server %q is %s; only a running server migrates live: %w", sv.Name, sv.State, ErrConflict)
		}
		snap, err := m.Snapshot(ctx, tx)
		if err != nil {
			return err
		}
		src := snap.Index(sv.HostID)
		if src >= 0 {
			snap.Release(src, requestOf(sv))
		}
		want := requestOf(sv)
		want.Exclude = sv.HostID
		pol := m.cfg.Policy
		pol.NPlusOne = false // moving a server does not change the cluster's free memory
		if req.To != "" {
			h, err := tx.GetHost(ctx, req.To)
			if err != nil {
				return err
			}
			if h.ID == sv.HostID {
				return fmt.Errorf("Server %q already runs on %q: %w", sv.Name, h.Name, ErrConflict)
			}
			i := snap.Index(h.ID)
			if i < 0 {
				return fmt.Errorf("Host %q is offline: %w", h.Name, ErrConflict)
			}
			if _, err := scheduler.Place(&scheduler.Snapshot{Hosts: snap.Hosts[i : i+1]}, want, pol); err != nil {
				return fmt.Errorf("Host %q cannot take %q: %w", h.Name, sv.Name, err)
			}
			req.To = h.ID
		} else {
			i, err := scheduler.Place(snap, want, pol)
			if err != nil {
				return fmt.Errorf("No host can take %q: %w", sv.Name, err)
			}
			req.To = snap.Hosts[i].ID
		}
	case KindStart:
		if sv.State == store.ServerRunning {
			return fmt.Errorf("Server %q is already running: %w", sv.Name, ErrConflict)
		}
	case KindStop, KindReboot:
		if sv.State != store.ServerRunning {
			return fmt.Errorf("Server %q is %s, not running: %w", sv.Name, sv.State, ErrConflict)
		}
	}
	return nil
}

func (m *Manager) loadServerHost(r *opRun) (store.Server, store.Host, Host, error) {
	sv, err := m.st.GetServer(r.ctx, r.op.ServerID)
	if err != nil {
		return store.Server{}, store.Host{}, nil, err
	}
	h, agent, err := m.hostOf(r.ctx, sv.HostID)
	if err != nil {
		return store.Server{}, store.Host{}, nil, err
	}
	return sv, h, agent, nil
}

func (m *Manager) runStart(r *opRun) error {
	sv, _, agent, err := m.loadServerHost(r)
	if err != nil {
		return err
	}
	// A plan change that could not be applied online is applied now, on a fresh definition.
	if vm, err := agent.Get(r.ctx, sv.ID); err == nil && vm.State != hostapi.StateRunning &&
		(vm.Spec.MemoryMiB != int(sv.MemoryBytes>>20) || vm.Spec.VCPUs != sv.VCPUs) {
		r.progress("apply plan", 10)
		im, err := m.st.GetImage(r.ctx, sv.ImageID)
		if err != nil {
			return err
		}
		_, stor, err := m.storageOf(r.ctx, sv.StorageID)
		if err != nil {
			return err
		}
		spec, err := m.vmSpec(r.ctx, sv, im, stor)
		if err != nil {
			return err
		}
		if err := agent.Delete(r.ctx, sv.ID); err != nil {
			return err
		}
		if err := agent.Define(r.ctx, spec); err != nil {
			return fmt.Errorf("Failed to redefine %q with plan %s (the VM definition is gone; start again to retry): %w", sv.Name, sv.Plan, err)
		}
	}
	r.progress("start", 30)
	if err := agent.Start(r.ctx, sv.ID); err != nil {
		return err
	}
	return m.st.SetServerState(context.Background(), sv.ID, store.ServerRunning)
}

func (m *Manager) runStop(r *opRun) error {
	sv, _, agent, err := m.loadServerHost(r)
	if err != nil {
		return err
	}
	r.progress("stop", 30)
	if err := agent.Stop(r.ctx, sv.ID, m.cfg.StopTimeout); err != nil {
		return err
	}
	return m.st.SetServerState(context.Background(), sv.ID, store.ServerStopped)
}

func (m *Manager) runReboot(r *opRun) error {
	sv, _, agent, err := m.loadServerHost(r)
	if err != nil {
		return err
	}
	r.progress("reboot", 30)
	return agent.Reboot(r.ctx, sv.ID)
}

// runDelete frees the QEMU, the volume and the addresses, then the row. Every step
// tolerates what is already gone, so a delete interrupted by a restart is simply redone.
func (m *Manager) runDelete(r *opRun) error {
	ctx := r.ctx
	sv, err := m.st.GetServer(ctx, r.op.ServerID)
	if errors.Is(err, store.ErrNotFound) {
		return nil
	}
	if err != nil {
		return err
	}
	if sv.HostID != "" {
		r.progress("delete VM", 20)
		_, agent, err := m.hostOf(ctx, sv.HostID)
		if err != nil {
			return err
		}
		if err := agent.Delete(ctx, sv.ID); err != nil {
			return err
		}
	}
	if sv.StorageID != "" && sv.Volume != "" {
		r.progress("delete volume", 60)
		_, stor, err := m.storageOf(ctx, sv.StorageID)
		if err != nil {
			return err
		}
		if err := stor.DeleteVolume(ctx, sv.Volume); err != nil {
			return err
		}
	}
	r.progress("release addresses", 90)
	return m.st.InTx(ctx, func(tx *store.Store) error {
		if err := tx.EndPeriod(ctx, sv.ID, time.Now().UTC()); err != nil {
			return err
		}
		if err := tx.ReleaseIPs(ctx, sv.ID); err != nil {
			return err
		}
		return tx.DeleteServer(ctx, sv.ID)
	})
}

// runResize grows the disk online, then memory and vCPUs online where the guest
// allows; what cannot change online is announced for the next reboot.
func (m *Manager) runResize(r *opRun) error {
	req := decodeAction(r.op.Request)
	sv, _, agent, err := m.loadServerHost(r)
	if err != nil {
		return err
	}
	plan, err := m.st.GetPlan(r.ctx, req.Plan)
	if err != nil {
		return err
	}
	if plan.DiskBytes < sv.DiskBytes {
		return fmt.Errorf("Plan %s would shrink the disk of %q: %w", plan.Name, sv.Name, ErrConflict)
	}
	_, stor, err := m.storageOf(r.ctx, sv.StorageID)
	if err != nil {
		return err
	}
	oldState := sv.State
	var later []string
	if plan.DiskBytes > sv.DiskBytes {
		r.progress("grow volume", 20)
		if err := stor.ResizeVolume(r.ctx, sv.Volume, plan.DiskBytes); err != nil {
			return err
		}
		// The volume is larger now whatever happens next: record it before the guest sees it.
		sv.DiskBytes = plan.DiskBytes
		if err := m.st.UpdateServer(context.Background(), &sv); err != nil {
			return err
		}
		if oldState == store.ServerRunning {
			r.progress("grow guest disk", 40)
			if err := agent.Resize(r.ctx, sv.ID, hostapi.ResizeRequest{Disk: "root", DiskBytes: plan.DiskBytes}); err != nil {
				if errors.Is(err, context.Canceled) {
					return err
				}
				// The volume is larger already; QEMU learns the size again when it reconnects.
				later = append(later, fmt.Sprintf("the guest sees the %d GiB disk at the next stop and start (online growth refused by the host: %v)", plan.DiskBytes>>30, err))
			}
		}
	}
	if oldState == store.ServerRunning && (plan.MemoryBytes != sv.MemoryBytes || plan.VCPUs != sv.VCPUs) {
		r.progress("memory and vCPUs", 70)
		rr := hostapi.ResizeRequest{}
		if plan.MemoryBytes > sv.MemoryBytes {
			rr.MemoryMiB = int(plan.MemoryBytes >> 20)
		}
		if plan.VCPUs > sv.VCPUs {
			rr.VCPUs = plan.VCPUs
		}
		if rr.MemoryMiB != 0 || rr.VCPUs != 0 {
			if err := agent.Resize(r.ctx, sv.ID, rr); err != nil {
				later = append(later, fmt.Sprintf("memory %d MiB and %d vCPUs apply at the next stop and start (online change refused: %v)", plan.MemoryBytes>>20, plan.VCPUs, err))
			}
		}
		if plan.MemoryBytes < sv.MemoryBytes || plan.VCPUs < sv.VCPUs {
			later = append(later, "less memory or fewer vCPUs apply at the next stop and start")
		}
	}
	sv.Plan, sv.VCPUs, sv.MemoryBytes = plan.Name, plan.VCPUs, plan.MemoryBytes
	if err := m.st.UpdateServer(context.Background(), &sv); err != nil {
		return err
	}
	if err := m.st.StartPeriod(context.Background(), sv, plan, time.Now().UTC()); err != nil {
		m.log.Error("Failed to start billing period", "server", sv.Name, "err", err)
	}
	if len(later) > 0 {
		r.op.Message = fmt.Sprint(later)
	}
	return nil
}

func (m *Manager) runMigrate(r *opRun) error {
	req := decodeAction(r.op.Request)
	sv, _, agent, err := m.loadServerHost(r)
	if err != nil {
		return err
	}
	target, err := m.st.GetHost(r.ctx, req.To)
	if err != nil {
		return err
	}
	r.progress("migrate to "+target.Name, 20)
	if err := m.st.SetServerState(context.Background(), sv.ID, store.ServerMigrating); err != nil {
		return err
	}
	err = agent.Migrate(r.ctx, sv.ID, target)
	if err != nil {
		// The error may be only the answer's (the source agent restarted, a connection
		// broke) while the VM moved: where it runs now decides.
		ctx, cancel := cleanup()
		defer cancel()
		if at, ok := m.locateVM(ctx, sv.ID, target.ID, sv.HostID); ok && at == target.ID {
			m.log.Warn("Migration answered an error but the VM runs on the destination", "server", sv.ID, "host", target.Name, "err", err)
			sv.HostID, sv.State = target.ID, store.ServerRunning
			return m.st.UpdateServer(context.Background(), &sv)
		}
		_ = m.st.SetServerState(context.Background(), sv.ID, store.ServerRunning)
		return err
	}
	sv.HostID, sv.State = target.ID, store.ServerRunning
	return m.st.UpdateServer(context.Background(), &sv)
}

// locateVM asks the agents of hosts, in order, which one runs the VM.
func (m *Manager) locateVM(ctx context.Context, vm string, hosts ...string) (string, bool) {
	for _, id := range hosts {
		if id == "" {
			continue
		}
		_, agent, err := m.hostOf(ctx, id)
		if err != nil {
			continue
		}
		if v, err := agent.Get(ctx, vm); err == nil && v.State == hostapi.StateRunning {
			return id, true
		}
	}
	return "", false
}

// Console returns the recent console output of a server's VM.
func (m *Manager) Console(ctx context.Context, sv store.Server) ([]byte, error) {
	if sv.HostID == "" {
		return nil, fmt.Errorf("Server %q has no host yet: %w", sv.Name, ErrConflict)
	}
	_, agent, err := m.hostOf(ctx, sv.HostID)
	if err != nil {
		return nil, err
	}
	return agent.ConsoleLog(ctx, sv.ID)
}

// ConsoleEndpoint returns the websocket URL of a server's serial console on its host
// agent, the token to present there and the HTTP client that trusts the agent's
// certificate; only internal/api uses it, after checking the caller may see the server.
func (m *Manager) ConsoleEndpoint(ctx context.Context, sv store.Server) (string, string, *http.Client, error) {
	if sv.HostID == "" {
		return "", "", nil, fmt.Errorf("Server %q has no host yet: %w", sv.Name, ErrConflict)
	}
	h, err := m.st.GetHost(ctx, sv.HostID)
	if err != nil {
		return "", "", nil, err
	}
	c, err := agentclient.NewWithCAPEM(h.URL, h.Token, h.CACert)
	if err != nil {
		return "", "", nil, fmt.Errorf("Failed to reach host %q: %w", h.Name, err)
	}
	return c.ConsoleURL(sv.ID), h.Token, c.HTTPClient(), nil
}
