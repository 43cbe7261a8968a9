package controller

import (
	"context"
	"fmt"
	"time"

	"github.com/growserver/grow/internal/storage/adminclient"
	"github.com/growserver/grow/internal/storage/mirror"
	"github.com/growserver/grow/internal/storage/volume"
)

// Rebuilding a partner that lacks volumes.
//
// A controller whose data was lost (a dead system disk, or new hardware taking an old
// controller's name) comes back empty, and the volumes its partner took over would stay
// degraded for ever. The partner gives it everything back: every image it lacks is
// copied to it, then every volume is made there as a stale copy (a clone of the same
// image when the volume has one, so that the copy shares the image's clusters as the
// original does) with the ranges the volume itself changed marked in its bitmap, and
// the ordinary resync copies them. Snapshots cannot be rebuilt (their point in time is
// gone) and are reported.
//
// It runs only when neither side has volume changes made alone waiting to be replayed,
// so a volume the partner lacks was never deleted there on purpose.

// seedIfLacking rebuilds, in the background, the volumes this side serves alone that
// the partner does not have at all.
func (m *mirrorMgr) seedIfLacking(pv peerView) {
	if !pv.up || pv.info == nil || pv.info.MetaPending > 0 || m.metaAloneNow() || pv.info.MetaEpoch > m.metaEpoch.Load() {
		return
	}
	var lacking []*mvol
	for _, v := range m.volList() {
		if _, ok := pv.info.Volumes[v.name]; ok {
			continue
		}
		if v.target.State().Role == mirror.RolePrimaryDegraded && v.vol.Load() != nil {
			lacking = append(lacking, v)
		}
	}
	if len(lacking) == 0 || !m.seeding.CompareAndSwap(false, true) {
		return
	}
	go func() {
		defer m.seeding.Store(false)
		m.metaMu.Lock()
		defer m.metaMu.Unlock()
		ctx, cancel := context.WithTimeout(m.ctx, pairTimeout)
		defer cancel()
		if err := m.seedPartner(ctx, lacking); err != nil {
			m.c.log.Warn("Rebuilding volumes on the partner failed; retrying", "err", err)
		}
	}()
}

// seedPartner makes the partner's copies of the lacking volumes (and the images they
// need) as stale copies to be resynced; metaMu is held.
func (m *mirrorMgr) seedPartner(ctx context.Context, lacking []*mvol) error {
	if m.metaAloneNow() {
		return nil // changes made alone go first (replayAlone)
	}
	list, err := m.peer.ListVolumes(ctx)
	if err != nil {
		return fmt.Errorf("Failed to list the partner's volumes: %w", err)
	}
	has := map[string]bool{}
	for _, v := range list {
		has[v.Name] = true
	}
	var lost []string
	for _, info := range m.c.mgr.List() {
		switch {
		case has[info.Name]:
		case info.Kind == volume.KindImage:
			if err := m.pushImage(ctx, info.Name); err != nil {
				return err
			}
			has[info.Name] = true
			m.c.log.Info("Image copied to the partner, which lacked it", "image", info.Name)
		case info.Kind == volume.KindSnapshot:
			lost = append(lost, info.Name)
		}
	}
	if len(lost) > 0 {
		m.seedWarnOnce.Do(func() {
			m.c.log.Warn("The partner lacks snapshots that cannot be rebuilt there; they exist on this controller only", "snapshots", lost)
		})
	}
	for _, v := range lacking {
		if has[v.name] {
			continue
		}
		if err := m.seedVolume(ctx, v, has); err != nil {
			return fmt.Errorf("Failed to rebuild %q on the partner: %w", v.name, err)
		}
	}
	if epoch := m.metaEpoch.Load(); epoch > 0 {
		if err := m.fwd.AdoptMeta(ctx, epoch); err != nil {
			return fmt.Errorf("Failed to hand the metadata epoch to the partner: %w", err)
		}
	}
	return nil
}

// seedVolume marks what v changed relative to its image (everything it holds, without
// one the partner has) and makes the partner's stale copy.
func (m *mirrorMgr) seedVolume(ctx context.Context, v *mvol, has map[string]bool) error {
	image, changed, err := v.exp.h.Origin()
	if err != nil {
		return err
	}
	if image != "" && !has[image] {
		// Without the image there, the copy starts empty (reading zeroes): copy all the
		// volume's data.
		image = ""
		if changed, err = dataRanges(v.exp.h, v.exp.Size()); err != nil {
			return err
		}
	}
	var bytes int64
	for _, r := range changed {
		if _, err := v.bm.Mark(r[0], r[1]); err != nil {
			return err
		}
		bytes += r[1]
	}
	if err := v.bm.Persist(); err != nil {
		return err
	}
	fw := m.fwd.WithHeader(hdrHome, v.home).WithHeader(hdrPrimary, m.cfg.Name).WithHeader(hdrInitial, "stale")
	size := v.exp.Size()
	if image != "" {
		_, err = fw.CloneVolume(ctx, image, v.name)
		if err == nil {
			if info, gerr := m.c.mgr.Get(image); gerr == nil && info.Size != size {
				_, err = m.fwd.ResizeVolume(ctx, v.name, size)
			}
		}
	} else {
		_, err = fw.CreateVolume(ctx, v.name, size)
	}
	if err != nil && !adminclient.IsCode(err, adminclient.CodeExists) {
		return err
	}
	m.c.log.Info("Volume rebuilt on the partner, which lacked it; the resync copies what it changed", "volume", v.name, "image", image, "bytes", bytes)
	m.kick()
	return nil
}

// adoptIfOnly makes this side the degraded primary of a volume that had no mirror state
// (made before the controller was paired) once the partner answers without a copy of it,
// or at once on the controller's first start with a partner (its volumes exist nowhere
// else, and its VMs must not stall until the partner is up): this copy is then the only
// one, and the partner receives it (seedIfLacking). Otherwise, while the partner is
// silent or has a copy (which wins), the volume stays stale. v.mu is held.
func (v *mvol) adoptIfOnly(pv peerView, partnerHas bool) {
	m := v.m
	first := m.firstPairing && !pv.up
	if m.wit == nil || (!first && (!pv.up || pv.info == nil || partnerHas || pv.info.MetaPending > 0)) {
		return
	}
	ctx, cancel := context.WithTimeout(m.ctx, 2*time.Second)
	defer cancel()
	epoch, err := m.electNewVolume(ctx, v.name)
	if err != nil {
		m.c.log.Warn("Failed to adopt a volume made before pairing", "volume", v.name, "err", err)
		return
	}
	st := aloneState(epoch)
	if err := v.setState(st); err != nil {
		m.c.log.Error("Failed to record mirror state", "volume", v.name, "err", err)
		return
	}
	if err := v.makeVolume(st); err != nil {
		m.c.log.Error("Failed to open replicating export", "volume", v.name, "err", err)
		return
	}
	v.unpaired = false
	m.c.log.Warn("Volume made before pairing adopted: the partner has no copy and receives this one", "volume", v.name, "epoch", epoch)
	m.kick()
}
