package pool

import (
	"errors"
	"fmt"
	"os"
	"syscall"
	"time"
)

// healthLoop notices disks that vanish or shrink without an I/O error: on Linux an open
// descriptor keeps working after its path is deleted or replaced, so the pool compares
// each path's identity and each disk's size with what it opened.
func (p *Pool) healthLoop() {
	defer p.wg.Done()
	t := time.NewTicker(p.opts.HealthInterval)
	defer t.Stop()
	for {
		select {
		case <-p.stop:
			return
		case <-t.C:
			p.checkHealth()
		}
	}
}

// checkHealth checks every live disk once.
func (p *Pool) checkHealth() {
	for i := range p.disks {
		d := p.disks[i].Load()
		if !d.live() {
			continue
		}
		if reason := p.diskProblem(d); reason != "" {
			if err := p.diskFailed(d, reason); err != nil && !errors.Is(err, ErrClosed) {
				p.log.Error("Failed to record disk failure", "disk", d.path, "error", err)
			}
		}
	}
}

// diskProblem describes what is wrong with d's path or size, or returns "".
func (p *Pool) diskProblem(d *disk) string {
	fi, err := os.Stat(d.path)
	if errors.Is(err, os.ErrNotExist) {
		return fmt.Sprintf("path %q was deleted", d.path)
	}
	if err != nil {
		return fmt.Sprintf("cannot check path %q: %v", d.path, err)
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok && (uint64(st.Dev) != d.dev || st.Ino != d.ino) {
		return fmt.Sprintf("path %q now names another file or device", d.path)
	}
	sz, err := d.size()
	if err != nil {
		return fmt.Sprintf("cannot size disk: %v", err)
	}
	if sz < p.l.diskBytes() {
		return fmt.Sprintf("disk shrank to %d bytes, the pool needs %d", sz, p.l.diskBytes())
	}
	if err := d.checkTail(p.l.tailOff(), p.uuid); err != nil {
		return err.Error()
	}
	return ""
}

// Status reports the health of the pool and of each disk.
func (p *Pool) Status() Status {
	p.mu.Lock()
	defer p.mu.Unlock()
	st := Status{State: StateOK, UUID: p.uuid, Size: p.l.size(), StripeUnit: p.l.unit, DiskSize: p.l.diskBytes()}
	for i := range p.disks {
		d := p.disks[i].Load()
		s := d.state.Load()
		d.mu.Lock()
		ds := DiskStatus{Index: i, Path: d.path, Pair: d.pair, State: stateName(s), Error: d.err}
		if s == stRebuilding {
			ds.RebuildDone, ds.RebuildTotal = d.rebuildDone, p.l.unitsPerDisk*p.l.unit
		}
		d.mu.Unlock()
		if s != stOK {
			st.State = StateDegraded
		}
		st.Disks = append(st.Disks, ds)
	}
	for pair := 0; pair < int(p.l.pairs); pair++ {
		if !p.pairOK(pair) {
			st.State = StateFailed
		}
	}
	return st
}

// Close stops the health check and any rebuild (whose progress is kept for the next
// Open), syncs the disks, records the clean shutdown and closes the disks. I/O after
// Close returns ErrClosed.
func (p *Pool) Close() error {
	if p.closed.Swap(true) {
		return nil
	}
	close(p.stop)
	p.wg.Wait()
	defer p.lock.Close()
	defer p.closeDisks()
	ds, errs := p.syncLive()
	for i, err := range errs {
		if err != nil {
			return fmt.Errorf("Failed to sync disk %q at close (the next start after a machine restart will resync): %w", ds[i].path, err)
		}
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.clean = true
	if err := p.persistLocked(false); err != nil {
		return fmt.Errorf("Failed to record the clean shutdown: %w", err)
	}
	return nil
}

func (p *Pool) closeDisks() {
	for i := range p.disks {
		if d := p.disks[i].Load(); d != nil {
			d.close()
		}
	}
	p.dirty.close()
}
