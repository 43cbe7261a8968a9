package store

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// Operation states.
const (
	OpPending   = "pending"
	OpRunning   = "running"
	OpSucceeded = "succeeded"
	OpFailed    = "failed"
	OpCancelled = "cancelled"
)

// Operation is a long-running change (create, resize, migrate, delete, import...) that
// survives a restart of the control plane.
type Operation struct {
	ID              string `json:"id"`
	Kind            string `json:"kind"`
	State           string `json:"state"`
	ServerID        string `json:"server_id,omitempty"`
	CustomerID      string `json:"customer_id,omitempty"`
	UserID          string `json:"user_id,omitempty"`
	Step            string `json:"step,omitempty"`
	Progress        int    `json:"progress"`
	Message         string `json:"message,omitempty"`
	Error           string `json:"error,omitempty"`
	IdempotencyKey  string `json:"-"`
	Request         string `json:"-"`
	CancelRequested bool   `json:"cancel_requested"`
	// Owner is the control-plane instance running the operation; it renews Heartbeat.
	Owner     string    `json:"owner,omitempty"`
	Heartbeat time.Time `json:"-"`
	CreatedAt time.Time `json:"created_at"`
	UpdatedAt time.Time `json:"updated_at"`
}

// Done reports whether the operation reached a final state.
func (o Operation) Done() bool {
	return o.State == OpSucceeded || o.State == OpFailed || o.State == OpCancelled
}

// CreateOperation inserts op. A duplicate idempotency key gives ErrConflict.
func (s *Store) CreateOperation(ctx context.Context, op *Operation) error {
	if op.ID == "" {
		op.ID = NewID("op")
	}
	if op.State == "" {
		op.State = OpPending
	}
	op.CreatedAt = time.Now().UTC()
	op.UpdatedAt = op.CreatedAt
	_, err := s.exec(ctx, `INSERT INTO operations (id, kind, state, server_id, customer_id, user_id, step, progress, message, error,
		idempotency_key, request, cancel_requested, created_at, updated_at, owner, heartbeat) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`,
		op.ID, op.Kind, op.State, op.ServerID, op.CustomerID, op.UserID, op.Step, op.Progress, op.Message, op.Error,
		nullStr(op.IdempotencyKey), op.Request, boolInt(op.CancelRequested), ts(op.CreatedAt), ts(op.UpdatedAt), op.Owner, ts(op.CreatedAt))
	if err != nil {
		return fmt.Errorf("Failed to create %s operation: %w", op.Kind, err)
	}
	return nil
}

// UpdateOperation saves state, step, progress, message and error of op.
func (s *Store) UpdateOperation(ctx context.Context, op *Operation) error {
	op.UpdatedAt = time.Now().UTC()
	err := affected(s.exec(ctx, `UPDATE operations SET state = ?, server_id = ?, step = ?, progress = ?, message = ?, error = ?, updated_at = ? WHERE id = ?`,
		op.State, op.ServerID, op.Step, op.Progress, op.Message, op.Error, ts(op.UpdatedAt), op.ID))
	if err != nil {
		return fmt.Errorf("Failed to update operation %q: %w", op.ID, err)
	}
	return nil
}

// RequestCancel flags an unfinished operation for cancellation.
func (s *Store) RequestCancel(ctx context.Context, id string) error {
	err := affected(s.exec(ctx, `UPDATE operations SET cancel_requested = 1, updated_at = ? WHERE id = ? AND state IN ('pending', 'running')`, ts(time.Now()), id))
	if err != nil {
		return fmt.Errorf("Failed to cancel operation %q: %w", id, err)
	}
	return nil
}

const opCols = `id, kind, state, server_id, customer_id, user_id, step, progress, message, error, COALESCE(idempotency_key, ''), request, cancel_requested, created_at, updated_at, owner, heartbeat`

func scanOp(sc interface{ Scan(...any) error }) (Operation, error) {
	var op Operation
	var cancel int
	var created, updated, beat int64
	if err := sc.Scan(&op.ID, &op.Kind, &op.State, &op.ServerID, &op.CustomerID, &op.UserID, &op.Step, &op.Progress, &op.Message, &op.Error,
		&op.IdempotencyKey, &op.Request, &cancel, &created, &updated, &op.Owner, &beat); err != nil {
		return Operation{}, mapErr(err)
	}
	op.Heartbeat = fromTS(beat)
	op.CancelRequested = cancel != 0
	op.CreatedAt, op.UpdatedAt = fromTS(created), fromTS(updated)
	return op, nil
}

// GetOperation returns the operation with the given ID.
func (s *Store) GetOperation(ctx context.Context, id string) (Operation, error) {
	op, err := scanOp(s.queryRow(ctx, `SELECT `+opCols+` FROM operations WHERE id = ?`, id))
	if err != nil {
		return Operation{}, fmt.Errorf("Failed to load operation %q: %w", id, err)
	}
	return op, nil
}

// OperationByKey returns the operation created with an idempotency key.
func (s *Store) OperationByKey(ctx context.Context, key string) (Operation, error) {
	op, err := scanOp(s.queryRow(ctx, `SELECT `+opCols+` FROM operations WHERE idempotency_key = ?`, key))
	if err != nil {
		return Operation{}, fmt.Errorf("Failed to load operation with key %q: %w", key, err)
	}
	return op, nil
}

// OperationFilter narrows ListOperations; empty fields match everything.
type OperationFilter struct {
	CustomerID string
	ServerID   string
	Unfinished bool
}

// ListOperations returns a page of operations ordered by ID.
func (s *Store) ListOperations(ctx context.Context, f OperationFilter, p Page) ([]Operation, error) {
	rows, err := s.query(ctx, `SELECT `+opCols+` FROM operations WHERE id > ? AND (? = '' OR customer_id = ?) AND (? = '' OR server_id = ?)
		AND (? = 0 OR state IN ('pending', 'running')) ORDER BY id LIMIT ?`,
		p.After, f.CustomerID, f.CustomerID, f.ServerID, f.ServerID, boolInt(f.Unfinished), p.limit())
	if err != nil {
		return nil, fmt.Errorf("Failed to list operations: %w", err)
	}
	defer rows.Close()
	var out []Operation
	for rows.Next() {
		op, err := scanOp(rows)
		if err != nil {
			return nil, fmt.Errorf("Failed to read operation: %w", err)
		}
		out = append(out, op)
	}
	return out, rows.Err()
}

// ClaimOperation makes owner the runner of an unfinished operation if it has no owner,
// is owner's already (a restarted instance), or its owner's heartbeat is older than
// staleBefore (a dead instance). It reports whether owner now holds it.
func (s *Store) ClaimOperation(ctx context.Context, id, owner string, staleBefore time.Time) (bool, error) {
	now := time.Now()
	err := affected(s.exec(ctx, `UPDATE operations SET owner = ?, heartbeat = ? WHERE id = ? AND state IN ('pending', 'running')
		AND (owner = '' OR owner = ? OR heartbeat < ?)`, owner, ts(now), id, owner, ts(staleBefore)))
	if errors.Is(err, ErrNotFound) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("Failed to claim operation %q: %w", id, err)
	}
	return true, nil
}

// Heartbeat renews owner's lease on its unfinished operations.
func (s *Store) Heartbeat(ctx context.Context, owner string) error {
	if _, err := s.exec(ctx, `UPDATE operations SET heartbeat = ? WHERE owner = ? AND state IN ('pending', 'running')`, ts(time.Now()), owner); err != nil {
		return fmt.Errorf("Failed to renew operation leases: %w", err)
	}
	return nil
}
