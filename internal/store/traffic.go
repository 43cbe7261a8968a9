package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"math"
	"time"
)

// TrafficSample is a server's byte counters over one interval ending at At.
type TrafficSample struct {
	ServerID string    `json:"server_id"`
	At       time.Time `json:"at"`
	RxBytes  int64     `json:"rx_bytes"`
	TxBytes  int64     `json:"tx_bytes"`
}

// AddTraffic records one sample (bytes moved during the interval, not running totals).
func (s *Store) AddTraffic(ctx context.Context, t TrafficSample) error {
	if t.RxBytes < 0 || t.TxBytes < 0 {
		return fmt.Errorf("Traffic sample for %q has negative bytes", t.ServerID)
	}
	_, err := s.exec(ctx, `INSERT INTO traffic_samples (server_id, at, rx_bytes, tx_bytes) VALUES (?, ?, ?, ?)
		ON CONFLICT (server_id, at) DO UPDATE SET rx_bytes = excluded.rx_bytes, tx_bytes = excluded.tx_bytes`,
		t.ServerID, ts(t.At), t.RxBytes, t.TxBytes)
	if err != nil {
		return fmt.Errorf("Failed to record traffic of server %q: %w", t.ServerID, err)
	}
	return nil
}

// TrafficTotal sums a server's received and sent bytes with from <= At < to.
func (s *Store) TrafficTotal(ctx context.Context, serverID string, from, to time.Time) (rx, tx int64, err error) {
	err = s.queryRow(ctx, `SELECT COALESCE(SUM(rx_bytes), 0), COALESCE(SUM(tx_bytes), 0) FROM traffic_samples WHERE server_id = ? AND at >= ? AND at < ?`,
		serverID, ts(from), ts(to)).Scan(&rx, &tx)
	if err != nil {
		return 0, 0, fmt.Errorf("Failed to sum traffic of server %q: %w", serverID, err)
	}
	return rx, tx, nil
}

// RecordCounters turns a server's cumulative traffic counters (as its host agent keeps
// them over the VM's life) into a sample of what moved since the previous reading, and
// keeps this reading as the next baseline, in one transaction. The baseline lives in the
// database, so traffic while the control plane was down is billed at its next reading.
// A server read for the first time counts from zero; counters lower than the baseline
// (the VM was defined afresh) count from zero again. It returns the sample recorded.
func (s *Store) RecordCounters(ctx context.Context, serverID string, at time.Time, rx, tx uint64) (TrafficSample, error) {
	if rx > math.MaxInt64 || tx > math.MaxInt64 {
		return TrafficSample{}, fmt.Errorf("Traffic counters of %q out of range", serverID)
	}
	sample := TrafficSample{ServerID: serverID, At: at}
	err := s.InTx(ctx, func(st *Store) error {
		var prevRx, prevTx int64
		err := st.queryRow(ctx, `SELECT rx_total, tx_total FROM traffic_counters WHERE server_id = ?`, serverID).Scan(&prevRx, &prevTx)
		if err != nil && !errors.Is(err, sql.ErrNoRows) {
			return fmt.Errorf("Failed to read the traffic baseline of %q: %w", serverID, err)
		}
		sample.RxBytes, sample.TxBytes = int64(rx)-prevRx, int64(tx)-prevTx
		if sample.RxBytes < 0 || sample.TxBytes < 0 {
			sample.RxBytes, sample.TxBytes = int64(rx), int64(tx)
		}
		if _, err := st.exec(ctx, `INSERT INTO traffic_counters (server_id, rx_total, tx_total, at) VALUES (?, ?, ?, ?)
			ON CONFLICT (server_id) DO UPDATE SET rx_total = excluded.rx_total, tx_total = excluded.tx_total, at = excluded.at`,
			serverID, int64(rx), int64(tx), ts(at)); err != nil {
			return fmt.Errorf("Failed to keep the traffic baseline of %q: %w", serverID, err)
		}
		if sample.RxBytes == 0 && sample.TxBytes == 0 {
			return nil
		}
		return st.AddTraffic(ctx, sample)
	})
	return sample, err
}
