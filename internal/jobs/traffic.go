package jobs

import (
	"context"
	"time"

	"github.com/growserver/grow/internal/store"
)

// CollectTraffic reads every running server's traffic counters each interval and
// records the bytes moved since the previous reading, for billing. The previous reading
// is kept in the store (RecordCounters), so what moved while the control plane was down
// is billed at the first reading after it is back. A server whose traffic this month
// exceeds its plan's allowance is slowed to Config.OverAllowanceBps until it no longer
// does (a new month, a larger plan).
func (m *Manager) CollectTraffic(ctx context.Context, every time.Duration) {
	if every <= 0 {
		return
	}
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		m.SampleTraffic(ctx, time.Now().UTC())
	}
}

// SampleTraffic takes one reading of every running server's counters at now and
// applies the traffic limits.
func (m *Manager) SampleTraffic(ctx context.Context, now time.Time) {
	svs, err := m.st.AllServers(ctx)
	if err != nil {
		m.log.Warn("Traffic sampling: failed to list servers", "err", err)
		return
	}
	for _, sv := range svs {
		if sv.State != store.ServerRunning || sv.HostID == "" {
			continue
		}
		_, agent, err := m.hostOf(ctx, sv.HostID)
		if err != nil {
			continue
		}
		c, err := agent.Counters(ctx, sv.ID)
		if err != nil {
			continue
		}
		if _, err := m.st.RecordCounters(ctx, sv.ID, now, c.RxBytes, c.TxBytes); err != nil {
			m.log.Warn("Traffic sampling: failed to record", "server", sv.Name, "err", err)
			continue
		}
		m.limitTraffic(ctx, sv, agent, now)
	}
}

// trafficRate is the NIC rate a server is entitled to now: OverAllowanceBps once its
// traffic this month (UTC) exceeds its plan's allowance, else 0 (unlimited).
func (m *Manager) trafficRate(ctx context.Context, sv store.Server, now time.Time) (uint64, error) {
	if m.cfg.OverAllowanceBps == 0 {
		return 0, nil
	}
	p, err := m.st.GetPlan(ctx, sv.Plan)
	if err != nil || p.TrafficBytes <= 0 {
		return 0, err
	}
	from := time.Date(now.Year(), now.Month(), 1, 0, 0, 0, 0, time.UTC)
	rx, tx, err := m.st.TrafficTotal(ctx, sv.ID, from, now.Add(time.Second))
	if err != nil {
		return 0, err
	}
	if rx+tx > p.TrafficBytes {
		return m.cfg.OverAllowanceBps, nil
	}
	return 0, nil
}

// limitTraffic shapes a server's VM to the rate it is entitled to, when that changed
// since the last time (or is not known since this control plane started).
func (m *Manager) limitTraffic(ctx context.Context, sv store.Server, agent Host, now time.Time) {
	rate, err := m.trafficRate(ctx, sv, now)
	if err != nil {
		m.log.Warn("Traffic limit: failed to read the server's usage", "server", sv.Name, "err", err)
		return
	}
	m.shapedMu.Lock()
	prev, known := m.shaped[sv.ID]
	m.shapedMu.Unlock()
	if known && prev == rate {
		return
	}
	if err := agent.Shape(ctx, sv.ID, rate, rate); err != nil {
		m.log.Warn("Traffic limit: failed to shape the server", "server", sv.Name, "err", err)
		return
	}
	m.shapedMu.Lock()
	m.shaped[sv.ID] = rate
	m.shapedMu.Unlock()
	switch {
	case rate > 0:
		m.log.Info("Server used its plan's monthly traffic: slowed until the month ends or the plan grows", "server", sv.Name, "rate_bps", rate)
	case known:
		m.log.Info("Server's traffic limit lifted", "server", sv.Name)
	}
}
