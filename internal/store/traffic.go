package store

import (
	"context"
	"fmt"
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
