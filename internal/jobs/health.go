package jobs

import (
	"context"
	"time"

	"github.com/growserver/grow/internal/store"
)

// Health is the outcome of the latest probe of a host agent or storage controller.
type Health struct {
	// Reachable is false once the daemon failed to answer its latest probe.
	Reachable bool `json:"reachable"`
	// Detail is what the daemon reported ("3 VMs", "pool degraded") or why it did not answer.
	Detail string `json:"detail,omitempty"`
	// Checked is when the latest probe finished; zero if never probed.
	Checked time.Time `json:"checked,omitzero"`
	// Since is when Reachable last changed (or the first probe).
	Since time.Time `json:"since,omitzero"`
}

// probeTimeout bounds one health probe, so that one hung daemon never delays the others' verdicts.
const probeTimeout = 3 * time.Second

// Health returns the latest probe of a host or storage controller by ID; one never
// probed counts as reachable, so a control plane that just started places normally.
func (m *Manager) Health(id string) Health {
	m.healthMu.Lock()
	defer m.healthMu.Unlock()
	h, ok := m.health[id]
	if !ok {
		return Health{Reachable: true}
	}
	return h
}

// WatchHealth probes every host agent and storage controller each interval until ctx
// ends. Hosts that do not answer get no new servers (see Snapshot); the API and CLI
// show every verdict with its reason.
func (m *Manager) WatchHealth(ctx context.Context, every time.Duration) {
	if every <= 0 {
		return
	}
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		m.ProbeAll(ctx)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// ProbeAll probes every registered host and storage controller once, concurrently.
func (m *Manager) ProbeAll(ctx context.Context) {
	hosts, err := m.st.ListHosts(ctx)
	if err != nil {
		m.log.Warn("Health probe: failed to list hosts", "err", err)
		return
	}
	ctrls, err := m.st.ListStorage(ctx)
	if err != nil {
		m.log.Warn("Health probe: failed to list storage controllers", "err", err)
		return
	}
	done := make(chan struct{}, len(hosts)+len(ctrls))
	for _, h := range hosts {
		go func(h store.Host) {
			defer func() { done <- struct{}{} }()
			c, err := m.cfg.Connector.Host(h)
			m.record(ctx, "host", h.ID, h.Name, c, err)
		}(h)
	}
	for _, s := range ctrls {
		go func(s store.StorageController) {
			defer func() { done <- struct{}{} }()
			c, err := m.cfg.Connector.Storage(s)
			m.record(ctx, "storage controller", s.ID, s.Name, c, err)
		}(s)
	}
	for range len(hosts) + len(ctrls) {
		<-done
	}
}

// prober is what Host and Storage share for health probes.
type prober interface {
	Health(ctx context.Context) (string, error)
}

func (m *Manager) record(ctx context.Context, kind, id, name string, p prober, err error) {
	detail := ""
	if err == nil {
		pctx, cancel := context.WithTimeout(ctx, probeTimeout)
		detail, err = p.Health(pctx)
		cancel()
	}
	if ctx.Err() != nil {
		return
	}
	now := time.Now().UTC()
	h := Health{Reachable: err == nil, Detail: detail, Checked: now}
	if err != nil {
		h.Detail = err.Error()
	}
	m.healthMu.Lock()
	prev, seen := m.health[id]
	h.Since = prev.Since
	if !seen || prev.Reachable != h.Reachable {
		h.Since = now
	}
	if m.health == nil {
		m.health = map[string]Health{}
	}
	m.health[id] = h
	m.healthMu.Unlock()
	switch {
	case seen && prev.Reachable && !h.Reachable:
		m.log.Warn("Daemon stopped answering", "kind", kind, "name", name, "err", h.Detail)
	case seen && !prev.Reachable && h.Reachable:
		m.log.Info("Daemon answers again", "kind", kind, "name", name, "detail", h.Detail)
	case !seen && !h.Reachable:
		m.log.Warn("Daemon does not answer", "kind", kind, "name", name, "err", h.Detail)
	}
}
