package controller

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"sort"

	"github.com/growserver/grow/internal/storage/adminclient"
	"github.com/growserver/grow/internal/storage/mirror"
)

// Volume changes while the partner is away.
//
// Normally a volume is created, cloned or deleted on both controllers at once. While the
// partner is unreachable (its maintenance window, a dead machine) a controller still
// creates, clones and deletes volumes alone, so that customers can order and cancel
// servers meanwhile, under two rules:
//   - Only one side of a pair changes volumes alone. Before its first change alone it
//     must win the pair's metadata key at the witness with the next metadata epoch;
//     the other side can win the epoch after that only once it has learned every change.
//   - Every change made alone is journaled durably (DATA/mirror/meta.json) before it is
//     made, and replayed to the partner when it returns, before anything else is changed.
//     Replay follows what is on disk here: a creation is replayed only if the volume
//     exists, a deletion only if it does not, so a crash between journal and change, or
//     an interrupted replay, replays correctly.
//
// A volume made alone starts as a degraded primary whose every write is marked in its
// bitmap; the partner receives it as a stale copy (empty, or the same clone of the
// same image) and the ordinary resync copies the marked regions. A volume this side
// serves may also be grown alone (its marks carry over to the larger bitmap). Snapshots
// and images still need both controllers.

// metaFileName is the journal of changes made alone, in DATA/mirror.
const metaFileName = "meta.json"

// hdrInitial on a forwarded create or clone asks for the new volume's initial role
// ("stale": a copy made by replay, which the partner's resync fills).
const hdrInitial = "X-Grow-Mirror-Initial"

// Operations journaled while alone.
const (
	metaCreate = "create"
	metaClone  = "clone"
	metaDelete = "delete"
	metaResize = "resize"
)

// metaOp is one volume change made alone.
type metaOp struct {
	Op     string `json:"op"`
	Name   string `json:"name"`
	Size   int64  `json:"size,omitempty"`
	Source string `json:"source,omitempty"`
}

// metaFile is this side's knowledge of the pair's metadata epoch and its journal.
type metaFile struct {
	// Epoch is the last metadata epoch this side knows of.
	Epoch uint64 `json:"epoch"`
	// Alone: this side holds Epoch at the witness and Pending must reach the partner.
	Alone   bool     `json:"alone"`
	Pending []metaOp `json:"pending,omitempty"`
}

// loadMeta reads the journal (none yet is epoch 0, nothing pending).
func (m *mirrorMgr) loadMeta() error {
	var mf metaFile
	if err := readJSON(filepath.Join(m.dir, metaFileName), &mf); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("Failed to read the journal of volume changes made alone: %w", err)
	}
	m.meta = mf
	m.publishMeta()
	return nil
}

// saveMetaLocked makes mf durable, then current; metaFileMu is held.
func (m *mirrorMgr) saveMetaLocked(mf metaFile) error {
	if err := writeJSONFile(filepath.Join(m.dir, metaFileName), mf); err != nil {
		return fmt.Errorf("Failed to record the journal of volume changes made alone: %w", err)
	}
	m.meta = mf
	m.publishMeta()
	return nil
}

// publishMeta copies the journal's summary where the heartbeat reads it without locks.
func (m *mirrorMgr) publishMeta() {
	m.metaEpoch.Store(m.meta.Epoch)
	m.metaPending.Store(int64(len(m.meta.Pending)))
	m.metaAlone.Store(m.meta.Alone)
}

// metaKey is the witness key of the pair's metadata: one per pair, whoever asks.
func metaKey(a, b string) string {
	names := []string{a, b}
	sort.Strings(names)
	return "meta:" + names[0] + "," + names[1]
}

// recordAlone journals op, first winning the pair's metadata epoch at the witness if
// this side does not hold it yet. It refuses (unavailable) when the witness cannot
// decide or the partner holds changes this side has not seen; metaMu is held.
func (m *mirrorMgr) recordAlone(op metaOp) error {
	peer := m.peerNameNow()
	switch {
	case m.wit == nil:
		return fmt.Errorf("%w: the mirror partner %s is unreachable and there is no witness to let one side change volumes alone; volume changes wait until it returns (data I/O continues)", errUnavailable, m.cfg.Peer)
	case peer == "":
		return fmt.Errorf("%w: this controller has never reached its mirror partner %s; volume changes wait until it has", errUnavailable, m.cfg.Peer)
	}
	m.metaFileMu.Lock()
	defer m.metaFileMu.Unlock()
	next := m.meta
	if op.Op != metaDelete && slices.ContainsFunc(next.Pending, func(o metaOp) bool { return o.Op == metaDelete && o.Name == op.Name }) {
		return fmt.Errorf("%w: %q was deleted while the partner is away; its name can be used again once the partner has returned", errConflict, op.Name)
	}
	if !next.Alone {
		epoch := next.Epoch + 1
		granted, ok := m.elect(metaKey(m.cfg.Name, peer), m.cfg.Name, epoch)
		switch {
		case !ok:
			return fmt.Errorf("%w: the mirror partner %s and the witness are both unreachable; volume changes wait until one returns (data I/O continues)", errUnavailable, peer)
		case !granted:
			return fmt.Errorf("%w: the mirror partner %s changed volumes while this controller was away; volume changes wait until it returns and replays them", errUnavailable, peer)
		}
		next.Epoch, next.Alone = epoch, true
		m.c.log.Warn("Partner unreachable: volumes are created and deleted here alone and replayed to it when it returns", "partner", peer, "meta_epoch", epoch)
	}
	next.Pending = append(slices.Clone(next.Pending), op)
	return m.saveMetaLocked(next)
}

// metaAloneNow reports whether changes made alone wait for the partner.
func (m *mirrorMgr) metaAloneNow() bool { return m.metaAlone.Load() }

// replayAlone sends the changes made alone to the returned partner and hands it the
// metadata epoch, after which volumes are changed on both sides again; metaMu is held.
func (m *mirrorMgr) replayAlone(ctx context.Context) error {
	m.metaFileMu.Lock()
	mf := m.meta
	m.metaFileMu.Unlock()
	if !mf.Alone {
		return nil
	}
	for _, op := range mf.Pending {
		if err := m.replayOp(ctx, op); err != nil {
			return fmt.Errorf("%w: Failed to replay the %s of %q to the returned partner: %w", errUnavailable, op.Op, op.Name, err)
		}
	}
	if err := m.fwd.AdoptMeta(ctx, mf.Epoch); err != nil {
		return fmt.Errorf("%w: Failed to hand the metadata epoch to the returned partner: %w", errUnavailable, err)
	}
	m.metaFileMu.Lock()
	defer m.metaFileMu.Unlock()
	if err := m.saveMetaLocked(metaFile{Epoch: mf.Epoch}); err != nil {
		return err
	}
	m.c.log.Info("Volume changes made alone replayed to the partner", "changes", len(mf.Pending), "meta_epoch", mf.Epoch)
	m.kick()
	return nil
}

// replayOp makes one change made alone on the partner, as far as it still holds here.
func (m *mirrorMgr) replayOp(ctx context.Context, op metaOp) error {
	v := m.get(op.Name)
	switch op.Op {
	case metaCreate, metaClone:
		if v == nil {
			return nil // never made (a crash or a refusal after journaling) or deleted since
		}
		v.mu.Lock()
		if v.unpaired {
			// Made here alone but a crash came before its mirror state was written: it
			// is this side's, and the partner is about to get a stale copy of it.
			v.adoptIfOnly(m.view(), false)
		}
		adopted := !v.unpaired
		v.mu.Unlock()
		if !adopted {
			return fmt.Errorf("%q has no mirror state yet", op.Name)
		}
		fw := m.fwd.WithHeader(hdrHome, v.home).WithHeader(hdrPrimary, m.cfg.Name).WithHeader(hdrInitial, "stale")
		var err error
		if op.Op == metaCreate {
			_, err = fw.CreateVolume(ctx, op.Name, op.Size)
		} else {
			_, err = fw.CloneVolume(ctx, op.Source, op.Name)
		}
		if adminclient.IsCode(err, adminclient.CodeExists) {
			return nil // replayed before an interruption
		}
		return err
	case metaResize:
		if v == nil {
			return nil
		}
		// The partner takes this side's size (never smaller than the journaled one,
		// unless the resize failed here after journaling, then it keeps its own).
		size := v.exp.Size()
		if size < op.Size {
			return nil
		}
		_, err := m.fwd.ResizeVolume(ctx, op.Name, size)
		return err
	case metaDelete:
		if v != nil {
			return nil // the deletion failed here: the partner keeps its copy too
		}
		if _, err := m.c.mgr.Get(op.Name); err == nil {
			return nil
		}
		if err := m.fwd.DeleteVolume(ctx, op.Name); err != nil && !adminclient.IsNotFound(err) {
			return err
		}
		return nil
	}
	return fmt.Errorf("unknown journaled operation %q", op.Op)
}

// replayIfReturned replays changes made alone once the partner answers again; run by
// the reconcile loop in the background (never twice at once).
func (m *mirrorMgr) replayIfReturned(pv peerView) {
	if !m.metaAloneNow() || !pv.up || !m.replaying.CompareAndSwap(false, true) {
		return
	}
	go func() {
		defer m.replaying.Store(false)
		m.metaMu.Lock()
		defer m.metaMu.Unlock()
		ctx, cancel := context.WithTimeout(m.ctx, pairTimeout)
		defer cancel()
		if err := m.replayAlone(ctx); err != nil {
			m.c.log.Warn("Replay of volume changes made alone failed; retrying", "err", err)
		}
	}()
}

// handleMetaAdopt is POST /v1/mirror/meta: the partner replayed its changes made alone
// up to an epoch, which this side takes as its own.
func (c *Controller) handleMetaAdopt(w http.ResponseWriter, r *http.Request) {
	var req adminclient.MetaAdoptRequest
	if err := decode(r, &req); err != nil {
		c.fail(w, r, err)
		return
	}
	m := c.mir
	m.metaFileMu.Lock()
	defer m.metaFileMu.Unlock()
	if m.meta.Alone {
		// Cannot happen while the witness grants each epoch once; never drop a journal.
		c.fail(w, r, fmt.Errorf("%w: this controller holds its own volume changes made alone at metadata epoch %d (offered %d)", errConflict, m.meta.Epoch, req.Epoch))
		return
	}
	if req.Epoch > m.meta.Epoch {
		if err := m.saveMetaLocked(metaFile{Epoch: req.Epoch}); err != nil {
			c.fail(w, r, err)
			return
		}
	}
	c.log.Info("Volume changes made alone by the partner received", "meta_epoch", req.Epoch)
	w.WriteHeader(http.StatusNoContent)
}

// electNewVolume wins a fresh epoch for a volume made alone: 1, or one above what the
// witness remembers of an earlier volume of the same name.
func (m *mirrorMgr) electNewVolume(ctx context.Context, name string) (uint64, error) {
	epoch := uint64(1)
	for range 2 {
		ans, err := m.wit.Grant(ctx, name, m.cfg.Name, epoch)
		if err != nil {
			return 0, fmt.Errorf("%w: the witness is unreachable: %w", errUnavailable, err)
		}
		if ans.Granted {
			return epoch, nil
		}
		epoch = ans.Record.Epoch + 1
	}
	return 0, fmt.Errorf("%w: the witness did not grant volume %q a new epoch", errConflict, name)
}

// aloneState is the role of a volume made alone (degraded primary at epoch).
func aloneState(epoch uint64) mirror.State {
	return mirror.State{Role: mirror.RolePrimaryDegraded, Epoch: epoch}
}

// peerOrAlone is requirePeer for the changes that may be made alone: alone reports a
// partner that is unreachable (rather than one that answers but refuses for now). The
// partner is asked once more right now, so that a change asked just after it went away
// is made alone rather than failing on the way to it.
func (m *mirrorMgr) peerOrAlone() (pv peerView, alone bool, err error) {
	pv, err = m.requirePeer()
	switch {
	case err != nil && !pv.up:
		return pv, true, nil
	case err == nil && !m.peerAnswers():
		return pv, true, nil
	}
	return pv, false, err
}

// beforeChange prepares an originated volume change: alone, it is journaled; with the
// partner back, changes made alone are replayed to it first. metaMu is held.
func (m *mirrorMgr) beforeChange(ctx context.Context, alone bool, op metaOp) error {
	if alone {
		return m.recordAlone(op)
	}
	return m.replayAlone(ctx)
}
