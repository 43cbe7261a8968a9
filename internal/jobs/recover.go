package jobs

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/growserver/grow/internal/host/hostapi"
	"github.com/growserver/grow/internal/revert"
	"github.com/growserver/grow/internal/store"
)

// Recover settles the operations this control plane may take: its own from before a
// restart, unowned ones, and those whose owner stopped renewing its lease (a dead
// control plane). A create whose VM is running is followed to its ready report, any
// other create is undone completely; a delete is redone; power actions and resizes are
// marked failed after the server's state is read back from its host; a migration
// records the host the VM actually runs on. Recover then keeps renewing this instance's
// leases and taking over stale operations until ctx ends or the manager is closed.
func (m *Manager) Recover(ctx context.Context) error {
	if err := m.recoverOnce(ctx); err != nil {
		return err
	}
	m.wg.Add(1)
	go func() {
		defer m.wg.Done()
		t := time.NewTicker(m.cfg.Lease / 3)
		defer t.Stop()
		for n := 1; ; n++ {
			select {
			case <-ctx.Done():
				return
			case <-m.baseCtx.Done():
				return
			case <-t.C:
			}
			if err := m.st.Heartbeat(ctx, m.cfg.Instance); err != nil {
				m.log.Warn("Failed to renew operation leases", "err", err)
			}
			if n%3 == 0 {
				if err := m.recoverOnce(ctx); err != nil {
					m.log.Warn("Failed to look for stale operations", "err", err)
				}
			}
		}
	}()
	return nil
}

func (m *Manager) recoverOnce(ctx context.Context) error {
	ops, err := m.st.ListOperations(ctx, store.OperationFilter{Unfinished: true}, store.Page{Limit: store.MaxLimit})
	if err != nil {
		return fmt.Errorf("Failed to list unfinished operations: %w", err)
	}
	for _, op := range ops {
		m.mu.Lock()
		mine := m.running[op.ID] != nil
		m.mu.Unlock()
		if mine {
			continue
		}
		ok, err := m.st.ClaimOperation(ctx, op.ID, m.cfg.Instance, time.Now().Add(-m.cfg.Lease))
		if err != nil {
			return err
		}
		if !ok {
			continue // a live control plane runs it
		}
		m.log.Info("Recovering operation", "op", op.ID, "kind", op.Kind, "step", op.Step, "previous_owner", op.Owner)
		switch op.Kind {
		case KindCreate:
			m.launch(op, m.recoverCreate)
		case KindDelete:
			m.launch(op, m.runDelete)
		case KindMigrate:
			m.launch(op, m.recoverMigrate)
		case KindEvacuate:
			m.launch(op, m.runEvacuate) // idempotent: it goes on with what is still on the host
		default:
			m.launch(op, func(r *opRun) error {
				m.refreshState(r.ctx, r.op.ServerID)
				return fmt.Errorf("Interrupted by a restart of grow serve at step %q; the server's state was read back from its host", r.op.Step)
			})
		}
	}
	return nil
}

func (m *Manager) recoverCreate(r *opRun) error {
	ctx := r.ctx
	sv, err := m.st.GetServer(ctx, r.op.ServerID)
	if errors.Is(err, store.ErrNotFound) {
		return fmt.Errorf("Interrupted by a restart of grow serve before the server was recorded")
	}
	if err != nil {
		return err
	}
	var agent Host
	if sv.HostID != "" {
		if _, agent, err = m.hostOf(ctx, sv.HostID); err != nil {
			return err
		}
		if vm, err := agent.Get(ctx, sv.ID); err == nil && vm.State == hostapi.StateRunning && !r.op.CancelRequested {
			rev := revert.New()
			defer func() {
				if !m.isClosing() {
					rev.Fail()
				}
			}()
			rev.Add(func() { m.undoCreate(sv) })
			if err := m.finishCreate(r, agent, sv); err != nil {
				return err
			}
			rev.Success()
			return nil
		}
	}
	m.undoCreate(sv)
	return fmt.Errorf("Interrupted by a restart of grow serve at step %q before the server ran; every step was undone", r.op.Step)
}

// undoCreate removes whatever a create may have made, tolerating what never was.
func (m *Manager) undoCreate(sv store.Server) {
	c, cancel := cleanup()
	defer cancel()
	if sv.HostID != "" {
		if _, agent, err := m.hostOf(c, sv.HostID); err == nil {
			if err := agent.Delete(c, sv.ID); err != nil {
				m.log.Error("Undo: failed to delete VM", "vm", sv.ID, "err", err)
			}
		}
	}
	if sv.StorageID != "" && sv.Volume != "" {
		if _, stor, err := m.storageOf(c, sv.StorageID); err == nil {
			if err := stor.DeleteVolume(c, sv.Volume); err != nil {
				m.log.Error("Undo: failed to delete volume", "volume", sv.Volume, "err", err)
			}
		}
	}
	m.forgetServer(sv)
}

func (m *Manager) recoverMigrate(r *opRun) error {
	req := decodeAction(r.op.Request)
	sv, err := m.st.GetServer(r.ctx, r.op.ServerID)
	if err != nil {
		return err
	}
	if id, ok := m.locateVM(r.ctx, sv.ID, req.To, sv.HostID); ok {
		sv.HostID, sv.State = id, store.ServerRunning
		if err := m.st.UpdateServer(context.Background(), &sv); err != nil {
			return err
		}
		if id == req.To {
			return nil // the migration had completed
		}
		return fmt.Errorf("Interrupted by a restart of grow serve; the server still runs on its source host")
	}
	_ = m.st.SetServerState(context.Background(), sv.ID, store.ServerError)
	return fmt.Errorf("Interrupted by a restart of grow serve; the VM runs on neither host")
}

// refreshState reads a server's VM state back from its host.
func (m *Manager) refreshState(ctx context.Context, serverID string) {
	sv, err := m.st.GetServer(ctx, serverID)
	if err != nil || sv.HostID == "" {
		return
	}
	_, agent, err := m.hostOf(ctx, sv.HostID)
	if err != nil {
		return
	}
	state := store.ServerError
	if vm, err := agent.Get(ctx, sv.ID); err == nil {
		switch vm.State {
		case hostapi.StateRunning:
			state = store.ServerRunning
		case hostapi.StateStopped, hostapi.StateDefined:
			state = store.ServerStopped
		}
	}
	_ = m.st.SetServerState(context.Background(), sv.ID, state)
}
