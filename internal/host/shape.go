package host

import (
	"fmt"

	"github.com/growserver/grow/internal/host/hostapi"
	"github.com/growserver/grow/internal/network"
)

// Shape sets the rates of every NIC of a VM (0 = unlimited), in its record (so a restart
// or a migration keeps them) and, while it runs, on its taps at once; the control plane
// uses it to slow a server that used up its plan's monthly traffic, and to lift that.
func (a *Agent) Shape(name string, req hostapi.ShapeRequest) error {
	v, err := a.get(name)
	if err != nil {
		return err
	}
	v.opMu.Lock()
	defer v.opMu.Unlock()
	v.mu.Lock()
	for i := range v.rec.Spec.NICs {
		v.rec.Spec.NICs[i].InRate, v.rec.Spec.NICs[i].OutRate = req.InRate, req.OutRate
	}
	taps := append([]string(nil), v.rec.Taps...)
	running := v.inst != nil
	err = v.persistDurableLocked()
	v.mu.Unlock()
	if err != nil {
		return err
	}
	if !running {
		return nil
	}
	for _, tap := range taps {
		if err := network.Reshape(tap, req.InRate, req.OutRate); err != nil {
			return fmt.Errorf("Failed to shape VM %q: %w", name, err)
		}
	}
	a.log.Info("VM shaped", "vm", name, "in_bps", req.InRate, "out_bps", req.OutRate)
	return nil
}
