package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"math"
)

// ErrBadGrant reports a witness grant request without a key, holder or valid epoch.
var ErrBadGrant = errors.New("invalid witness grant")

// WitnessRecord is the highest epoch the witness granted for a key, and to whom.
type WitnessRecord struct {
	Epoch  uint64 `json:"epoch"`
	Holder string `json:"holder"`
}

// WitnessRecords returns every key's record.
func (s *Store) WitnessRecords(ctx context.Context) (map[string]WitnessRecord, error) {
	rows, err := s.query(ctx, `SELECT key, epoch, holder FROM witness_grants`)
	if err != nil {
		return nil, fmt.Errorf("Failed to list witness grants: %w", err)
	}
	defer rows.Close()
	out := map[string]WitnessRecord{}
	for rows.Next() {
		var k string
		var e int64
		var r WitnessRecord
		if err := rows.Scan(&k, &e, &r.Holder); err != nil {
			return nil, fmt.Errorf("Failed to read witness grants: %w", err)
		}
		r.Epoch = uint64(e)
		out[k] = r
	}
	return out, rows.Err()
}

// WitnessRecord returns key's record; a key never granted has epoch 0.
func (s *Store) WitnessRecord(ctx context.Context, key string) (WitnessRecord, error) {
	var e int64
	var r WitnessRecord
	err := s.queryRow(ctx, `SELECT epoch, holder FROM witness_grants WHERE key = ?`, key).Scan(&e, &r.Holder)
	if errors.Is(err, sql.ErrNoRows) || errors.Is(err, ErrNotFound) {
		return WitnessRecord{}, nil
	}
	if err != nil {
		return WitnessRecord{}, fmt.Errorf("Failed to read witness grant %q: %w", key, err)
	}
	r.Epoch = uint64(e)
	return r, nil
}

// WitnessGrant gives epoch of key to holder only if it is higher than every epoch
// granted for key before (one atomic compare-and-set in the database, so several control
// planes on one PostgreSQL are still one witness); asking again for the epoch one holds
// is granted. It returns whether it granted and the record now held.
func (s *Store) WitnessGrant(ctx context.Context, key, holder string, epoch uint64) (bool, WitnessRecord, error) {
	if key == "" || holder == "" || epoch == 0 || epoch > math.MaxInt64 || len(key) > 1024 || len(holder) > 256 {
		return false, WitnessRecord{}, fmt.Errorf("%w: a grant needs a key, a holder and an epoch from 1 to 2^63-1", ErrBadGrant)
	}
	cur, err := s.WitnessRecord(ctx, key)
	if err != nil {
		return false, cur, err
	}
	if cur.Epoch == epoch && cur.Holder == holder {
		return true, cur, nil
	}
	res, err := s.exec(ctx, `INSERT INTO witness_grants (key, epoch, holder) VALUES (?, ?, ?)
		ON CONFLICT (key) DO UPDATE SET epoch = excluded.epoch, holder = excluded.holder WHERE witness_grants.epoch < excluded.epoch`,
		key, int64(epoch), holder)
	if err != nil {
		return false, cur, fmt.Errorf("Failed to record witness grant %q: %w", key, err)
	}
	n, err := res.RowsAffected()
	if err != nil {
		return false, cur, fmt.Errorf("Failed to count witness grant rows: %w", err)
	}
	now, err := s.WitnessRecord(ctx, key)
	return n == 1, now, err
}
