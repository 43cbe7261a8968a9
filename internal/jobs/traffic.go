package jobs

import (
	"context"
	"time"

	"github.com/growserver/grow/internal/store"
)

// CollectTraffic samples every running server's traffic counters each interval and
// records the bytes moved since the previous sample, for billing. Counters seen for the
// first time after a start only set the baseline, so traffic while the control plane was
// down is not billed.
func (m *Manager) CollectTraffic(ctx context.Context, every time.Duration) {
	if every <= 0 {
		return
	}
	last := map[string][2]uint64{}
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
		now := time.Now().UTC()
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
			prev, seen := last[sv.ID]
			last[sv.ID] = [2]uint64{c.RxBytes, c.TxBytes}
			if !seen || c.RxBytes < prev[0] || c.TxBytes < prev[1] {
				continue
			}
			s := store.TrafficSample{ServerID: sv.ID, At: now, RxBytes: int64(c.RxBytes - prev[0]), TxBytes: int64(c.TxBytes - prev[1])}
			if err := m.st.AddTraffic(ctx, s); err != nil {
				m.log.Warn("Traffic sampling: failed to record", "server", sv.Name, "err", err)
			}
		}
	}
}
