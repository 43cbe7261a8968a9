package jobs

import (
	"context"
	"time"

	"github.com/growserver/grow/internal/store"
)

// CollectTraffic reads every running server's traffic counters each interval and
// records the bytes moved since the previous reading, for billing. The previous reading
// is kept in the store (RecordCounters), so what moved while the control plane was down
// is billed at the first reading after it is back.
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
		svs, err := m.st.AllServers(ctx)
		if err != nil {
			m.log.Warn("Traffic sampling: failed to list servers", "err", err)
			continue
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
			if _, err := m.st.RecordCounters(ctx, sv.ID, time.Now().UTC(), c.RxBytes, c.TxBytes); err != nil {
				m.log.Warn("Traffic sampling: failed to record", "server", sv.Name, "err", err)
			}
		}
	}
}
