package store

import (
	"context"
	"fmt"
	"time"
)

// Plan is a sellable server size with its monthly price.
type Plan struct {
	Name         string    `json:"name"`
	VCPUs        int       `json:"vcpus"`
	MemoryBytes  int64     `json:"memory_bytes"`
	DiskBytes    int64     `json:"disk_bytes"`
	TrafficBytes int64     `json:"traffic_bytes"`
	PriceYen     int64     `json:"price_yen"`
	UpdatedAt    time.Time `json:"updated_at"`
}

// PutPlan creates or replaces a plan.
func (s *Store) PutPlan(ctx context.Context, p Plan) error {
	if p.UpdatedAt.IsZero() {
		p.UpdatedAt = time.Now()
	}
	_, err := s.exec(ctx, `INSERT INTO plans (name, vcpus, memory_bytes, disk_bytes, traffic_bytes, price_yen, updated_at)
		VALUES (?, ?, ?, ?, ?, ?, ?)
		ON CONFLICT (name) DO UPDATE SET vcpus = excluded.vcpus, memory_bytes = excluded.memory_bytes,
		disk_bytes = excluded.disk_bytes, traffic_bytes = excluded.traffic_bytes, price_yen = excluded.price_yen,
		updated_at = excluded.updated_at`,
		p.Name, p.VCPUs, p.MemoryBytes, p.DiskBytes, p.TrafficBytes, p.PriceYen, ts(p.UpdatedAt))
	if err != nil {
		return fmt.Errorf("Failed to save plan %q: %w", p.Name, err)
	}
	return nil
}

// EnsurePlan inserts p only if no plan of that name exists (used to seed defaults).
func (s *Store) EnsurePlan(ctx context.Context, p Plan) error {
	_, err := s.exec(ctx, `INSERT INTO plans (name, vcpus, memory_bytes, disk_bytes, traffic_bytes, price_yen, updated_at)
		VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (name) DO NOTHING`,
		p.Name, p.VCPUs, p.MemoryBytes, p.DiskBytes, p.TrafficBytes, p.PriceYen, ts(time.Now()))
	if err != nil {
		return fmt.Errorf("Failed to seed plan %q: %w", p.Name, err)
	}
	return nil
}

// GetPlan returns the plan called name.
func (s *Store) GetPlan(ctx context.Context, name string) (Plan, error) {
	var p Plan
	var at int64
	err := s.queryRow(ctx, `SELECT name, vcpus, memory_bytes, disk_bytes, traffic_bytes, price_yen, updated_at FROM plans WHERE name = ?`, name).
		Scan(&p.Name, &p.VCPUs, &p.MemoryBytes, &p.DiskBytes, &p.TrafficBytes, &p.PriceYen, &at)
	if err != nil {
		return Plan{}, fmt.Errorf("Failed to load plan %q: %w", name, mapErr(err))
	}
	p.UpdatedAt = fromTS(at)
	return p, nil
}

// ListPlans returns every plan, ordered by price then name.
func (s *Store) ListPlans(ctx context.Context) ([]Plan, error) {
	rows, err := s.query(ctx, `SELECT name, vcpus, memory_bytes, disk_bytes, traffic_bytes, price_yen, updated_at FROM plans ORDER BY price_yen DESC, name`)
	if err != nil {
		return nil, fmt.Errorf("Failed to list plans: %w", err)
	}
	defer rows.Close()
	var out []Plan
	for rows.Next() {
		var p Plan
		var at int64
		if err := rows.Scan(&p.Name, &p.VCPUs, &p.MemoryBytes, &p.DiskBytes, &p.TrafficBytes, &p.PriceYen, &at); err != nil {
			return nil, fmt.Errorf("Failed to read plan: %w", err)
		}
		p.UpdatedAt = fromTS(at)
		out = append(out, p)
	}
	return out, rows.Err()
}

// DeletePlan removes a plan no server uses.
func (s *Store) DeletePlan(ctx context.Context, name string) error {
	if err := affected(s.exec(ctx, `DELETE FROM plans WHERE name = ?`, name)); err != nil {
		return fmt.Errorf("Failed to delete plan %q: %w", name, err)
	}
	return nil
}
