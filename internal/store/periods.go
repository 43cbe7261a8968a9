package store

import (
	"context"
	"fmt"
	"time"
)

// PlanPeriod is a span of time a server ran on one plan, at that plan's price then.
// EndedAt is zero while the period is open.
type PlanPeriod struct {
	ServerID     string    `json:"server_id"`
	ServerName   string    `json:"server_name"`
	CustomerID   string    `json:"customer_id"`
	Plan         string    `json:"plan"`
	PriceYen     int64     `json:"price_yen"`
	TrafficBytes int64     `json:"traffic_bytes"`
	StartedAt    time.Time `json:"started_at"`
	EndedAt      time.Time `json:"ended_at"`
}

// StartPeriod closes the server's open period (if any) at at and opens one on plan p.
func (s *Store) StartPeriod(ctx context.Context, sv Server, p Plan, at time.Time) error {
	return s.InTx(ctx, func(tx *Store) error {
		if err := tx.EndPeriod(ctx, sv.ID, at); err != nil {
			return err
		}
		_, err := tx.exec(ctx, `INSERT INTO plan_periods (server_id, server_name, customer_id, plan, price_yen, traffic_bytes, started_at, ended_at)
			VALUES (?, ?, ?, ?, ?, ?, ?, 0)`, sv.ID, sv.Name, sv.CustomerID, p.Name, p.PriceYen, p.TrafficBytes, ts(at))
		if err != nil {
			return fmt.Errorf("Failed to start billing period of %q: %w", sv.Name, err)
		}
		return nil
	})
}

// EndPeriod closes the server's open period at at.
func (s *Store) EndPeriod(ctx context.Context, serverID string, at time.Time) error {
	if _, err := s.exec(ctx, `UPDATE plan_periods SET ended_at = ? WHERE server_id = ? AND ended_at = 0`, ts(at), serverID); err != nil {
		return fmt.Errorf("Failed to end billing period of %q: %w", serverID, err)
	}
	return nil
}

// ListPeriods returns a customer's periods that overlap [from, to).
func (s *Store) ListPeriods(ctx context.Context, customerID string, from, to time.Time) ([]PlanPeriod, error) {
	rows, err := s.query(ctx, `SELECT server_id, server_name, customer_id, plan, price_yen, traffic_bytes, started_at, ended_at FROM plan_periods
		WHERE customer_id = ? AND started_at < ? AND (ended_at = 0 OR ended_at > ?) ORDER BY server_id, started_at`, customerID, ts(to), ts(from))
	if err != nil {
		return nil, fmt.Errorf("Failed to list billing periods: %w", err)
	}
	defer rows.Close()
	var out []PlanPeriod
	for rows.Next() {
		var p PlanPeriod
		var st, en int64
		if err := rows.Scan(&p.ServerID, &p.ServerName, &p.CustomerID, &p.Plan, &p.PriceYen, &p.TrafficBytes, &st, &en); err != nil {
			return nil, fmt.Errorf("Failed to read billing period: %w", err)
		}
		p.StartedAt, p.EndedAt = fromTS(st), fromTS(en)
		out = append(out, p)
	}
	return out, rows.Err()
}
