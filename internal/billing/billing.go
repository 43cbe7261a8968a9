// Package billing holds the default plans S–E and computes monthly invoices from plan
// prices and metered traffic.
//
// It is pure: no I/O, no clock (the caller passes the month and the usage). It must
// never round in the customer's disfavour: prorated amounts round down to the yen.
package billing

import (
	"fmt"
	"sort"
	"time"

	"github.com/growserver/grow/internal/store"
)

const (
	mib = int64(1) << 20
	gib = int64(1) << 30
	gb  = int64(1e9)
	tb  = int64(1e12)
)

// DefaultPlans are the grades an installation starts with; `grow plan set` edits them.
func DefaultPlans() []store.Plan {
	return []store.Plan{
		{Name: "S", VCPUs: 4, MemoryBytes: 8 * gib, DiskBytes: 200 * gib, TrafficBytes: 2 * tb, PriceYen: 300000},
		{Name: "A", VCPUs: 4, MemoryBytes: 4 * gib, DiskBytes: 120 * gib, TrafficBytes: 1 * tb, PriceYen: 180000},
		{Name: "B", VCPUs: 2, MemoryBytes: 2 * gib, DiskBytes: 80 * gib, TrafficBytes: 500 * gb, PriceYen: 100000},
		{Name: "C", VCPUs: 2, MemoryBytes: 1 * gib, DiskBytes: 40 * gib, TrafficBytes: 300 * gb, PriceYen: 60000},
		{Name: "D", VCPUs: 1, MemoryBytes: 512 * mib, DiskBytes: 20 * gib, TrafficBytes: 200 * gb, PriceYen: 40000},
		{Name: "E", VCPUs: 1, MemoryBytes: 256 * mib, DiskBytes: 10 * gib, TrafficBytes: 100 * gb, PriceYen: 30000},
	}
}

// Rates are the prices that are not part of a plan.
type Rates struct {
	// OverageYenPerGB is charged for each started GB (10^9 bytes) beyond the plan's traffic.
	OverageYenPerGB int64
}

// DefaultRates charges ¥100 per GB of traffic beyond the plan.
var DefaultRates = Rates{OverageYenPerGB: 100}

// Segment is a period during which a server ran on one plan; To is zero while it still does.
type Segment struct {
	ServerID     string
	ServerName   string
	Plan         string
	PriceYen     int64 // monthly price of the plan
	TrafficBytes int64 // monthly traffic included in the plan
	From, To     time.Time
}

// Line is one item of an invoice.
type Line struct {
	ServerID    string    `json:"server_id"`
	ServerName  string    `json:"server_name"`
	Description string    `json:"description"`
	From        time.Time `json:"from"`
	To          time.Time `json:"to"`
	AmountYen   int64     `json:"amount_yen"`
}

// Invoice is what a customer owes for one calendar month (UTC).
type Invoice struct {
	CustomerID string    `json:"customer_id"`
	Month      string    `json:"month"` // "2026-11"
	Lines      []Line    `json:"lines"`
	TotalYen   int64     `json:"total_yen"`
	From       time.Time `json:"from"`
	To         time.Time `json:"to"`
}

// MonthBounds returns the first instant of month m ("YYYY-MM") and of the next month.
func MonthBounds(m string) (time.Time, time.Time, error) {
	from, err := time.Parse("2006-01", m)
	if err != nil {
		return time.Time{}, time.Time{}, fmt.Errorf("Invalid month %q (want YYYY-MM): %w", m, err)
	}
	return from, from.AddDate(0, 1, 0), nil
}

// Compute builds the invoice of customerID for month ("YYYY-MM") from the plan segments
// of its servers and the traffic (received plus sent bytes) each server moved that month.
// A segment is charged its plan price prorated by the seconds it overlaps the month;
// a server's traffic allowance is the largest of its plans that month.
func Compute(customerID, month string, segments []Segment, traffic map[string]int64, rates Rates) (Invoice, error) {
	from, to, err := MonthBounds(month)
	if err != nil {
		return Invoice{}, err
	}
	inv := Invoice{CustomerID: customerID, Month: month, From: from, To: to}
	monthSecs := int64(to.Sub(from) / time.Second)
	allowance := map[string]int64{}
	names := map[string]string{}
	for _, s := range segments {
		if s.PriceYen < 0 || s.TrafficBytes < 0 {
			return Invoice{}, fmt.Errorf("Segment of server %q has a negative price or allowance", s.ServerName)
		}
		if !s.To.IsZero() && s.To.Before(s.From) {
			return Invoice{}, fmt.Errorf("Segment of server %q ends before it starts", s.ServerName)
		}
		start, end := s.From, s.To
		if start.Before(from) {
			start = from
		}
		if end.IsZero() || end.After(to) {
			end = to
		}
		if !end.After(start) {
			continue
		}
		secs := int64(end.Sub(start) / time.Second)
		amount := s.PriceYen * secs / monthSecs
		desc := fmt.Sprintf("Plan %s", s.Plan)
		if secs < monthSecs {
			desc = fmt.Sprintf("Plan %s, %s to %s (prorated)", s.Plan, start.Format("2006-01-02 15:04"), end.Format("2006-01-02 15:04"))
		}
		inv.Lines = append(inv.Lines, Line{ServerID: s.ServerID, ServerName: s.ServerName, Description: desc, From: start, To: end, AmountYen: amount})
		if s.TrafficBytes > allowance[s.ServerID] {
			allowance[s.ServerID] = s.TrafficBytes
		}
		names[s.ServerID] = s.ServerName
	}
	ids := make([]string, 0, len(traffic))
	for id := range traffic {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	for _, id := range ids {
		used := traffic[id]
		if used < 0 {
			return Invoice{}, fmt.Errorf("Server %q has negative traffic", id)
		}
		over := used - allowance[id]
		if over <= 0 {
			continue
		}
		started := (over + gb - 1) / gb
		inv.Lines = append(inv.Lines, Line{ServerID: id, ServerName: names[id], From: from, To: to,
			Description: fmt.Sprintf("Traffic beyond plan: %d GB at ¥%d/GB", started, rates.OverageYenPerGB),
			AmountYen:   started * rates.OverageYenPerGB})
	}
	for _, l := range inv.Lines {
		inv.TotalYen += l.AmountYen
	}
	return inv, nil
}
