package jobs

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"

	"github.com/growserver/grow/internal/store"
)

// KindEvacuate is the host-level operation that moves every server off a host.
const KindEvacuate = "host.evacuate"

// evacuateRequest names the host an evacuation empties.
type evacuateRequest struct {
	Host string `json:"host"`
}

// EvacuateHost puts a host in maintenance and starts an operation that live-migrates
// its running servers away one at a time (placement picks each target). It runs in
// grow serve, so a dropped CLI session does not stop it; after a restart it goes on
// where it was. Servers that are not running are reported, not moved.
func (m *Manager) EvacuateHost(ctx context.Context, actor store.User, hostID string) (store.Operation, error) {
	var op store.Operation
	err := m.st.InTx(ctx, func(tx *store.Store) error {
		h, err := tx.GetHost(ctx, hostID)
		if err != nil {
			return err
		}
		busy, err := tx.ListOperations(ctx, store.OperationFilter{Unfinished: true}, store.Page{Limit: store.MaxLimit})
		if err != nil {
			return err
		}
		for _, b := range busy {
			if b.Kind == KindEvacuate && decodeEvacuate(b.Request).Host == h.ID {
				return fmt.Errorf("Host %q is already being evacuated by operation %s: %w", h.Name, b.ID, ErrConflict)
			}
		}
		if h.State == store.StateActive {
			h.State = store.StateMaintenance
			if err := tx.UpdateHost(ctx, h); err != nil {
				return err
			}
		}
		op = store.Operation{Kind: KindEvacuate, UserID: actor.ID, Request: encodeEvacuate(evacuateRequest{Host: h.ID}), Owner: m.cfg.Instance}
		return tx.CreateOperation(ctx, &op)
	})
	if err != nil {
		return store.Operation{}, err
	}
	m.launch(op, m.runEvacuate)
	return op, nil
}

// runEvacuate migrates the host's running servers one by one, each as its own
// server.migrate operation (so each has its progress, errors and recovery), and fails
// at the end, naming every server it could not move.
func (m *Manager) runEvacuate(r *opRun) error {
	ctx := r.ctx
	h, err := m.st.GetHost(ctx, decodeEvacuate(r.op.Request).Host)
	if err != nil {
		return err
	}
	all, err := m.st.AllServers(ctx)
	if err != nil {
		return err
	}
	var on []store.Server
	for _, sv := range all {
		if sv.HostID == h.ID {
			on = append(on, sv)
		}
	}
	var left []string
	for i, sv := range on {
		if err := ctx.Err(); err != nil {
			return err
		}
		r.progress(fmt.Sprintf("migrate %s (%d of %d)", sv.Name, i+1, len(on)), 100*i/max(len(on), 1))
		if err := m.evacuateOne(ctx, r, sv); err != nil {
			if errors.Is(err, context.Canceled) {
				return err
			}
			left = append(left, fmt.Sprintf("%s (%v)", sv.Name, err))
		}
	}
	if len(left) > 0 {
		return fmt.Errorf("Host %s is in maintenance but still carries: %s", h.Name, strings.Join(left, "; "))
	}
	r.op.Message = fmt.Sprintf("Host %s is in maintenance and carries no server", h.Name)
	return nil
}

// evacuateOne moves one server off the host: it waits for an operation already running
// on the server (a migration from before a restart, say), then migrates it if it is
// still there.
func (m *Manager) evacuateOne(ctx context.Context, r *opRun, sv store.Server) error {
	for attempt := 0; attempt < 2; attempt++ {
		cur, err := m.st.GetServer(ctx, sv.ID)
		if errors.Is(err, store.ErrNotFound) {
			return nil // deleted meanwhile
		}
		if err != nil {
			return err
		}
		if cur.HostID != sv.HostID {
			return nil // moved meanwhile
		}
		if cur.State != store.ServerRunning {
			return fmt.Errorf("%s, not running: start it or move it cold", cur.State)
		}
		actor := store.User{ID: r.op.UserID, Role: store.RoleAdmin}
		op, err := m.ServerAction(ctx, actor, sv.ID, KindMigrate, ActionRequest{})
		if errors.Is(err, ErrConflict) {
			busy, lerr := m.st.ListOperations(ctx, store.OperationFilter{ServerID: sv.ID, Unfinished: true}, store.Page{Limit: 1})
			if lerr != nil || len(busy) == 0 {
				return err
			}
			if _, err := m.Wait(ctx, busy[0].ID); err != nil {
				return err
			}
			continue
		}
		if err != nil {
			return err
		}
		done, err := m.Wait(ctx, op.ID)
		if err != nil {
			// An evacuation cancelled by an admin stops the migration under way; one
			// interrupted by a shutdown leaves it to Recover, like any other operation.
			if errors.Is(err, context.Canceled) && !m.isClosing() {
				_ = m.Cancel(context.WithoutCancel(ctx), op.ID)
			}
			return err
		}
		if done.State != store.OpSucceeded {
			return fmt.Errorf("migration %s %s: %s", done.ID, done.State, done.Error)
		}
		return nil
	}
	return fmt.Errorf("busy with other operations")
}

func encodeEvacuate(e evacuateRequest) string {
	b, _ := json.Marshal(e) // a plain struct of strings always encodes
	return string(b)
}

func decodeEvacuate(s string) evacuateRequest {
	var e evacuateRequest
	_ = json.Unmarshal([]byte(s), &e) // written by encodeEvacuate
	return e
}
