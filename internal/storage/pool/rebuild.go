package pool

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"time"
)

// errStopped ends a rebuild interrupted by Close; it resumes at the next Open.
var errStopped = errors.New("rebuild interrupted by pool close")

// Replace swaps oldPath (a failed disk, or a healthy one being retired) for newPath and
// rebuilds the pair onto it from the other disk of the pair in the background. newPath
// must exist, be at least as large as the pool's disks, not be in use by the pool and
// hold no data the pool does not recognise. Progress is in Status; I/O continues.
func (p *Pool) Replace(oldPath, newPath string) error {
	if p.closed.Load() {
		return ErrClosed
	}
	oldAbs, err := filepath.Abs(oldPath)
	if err != nil {
		return fmt.Errorf("Invalid disk path %q: %w", oldPath, err)
	}
	newAbs, err := filepath.Abs(newPath)
	if err != nil {
		return fmt.Errorf("Invalid disk path %q: %w", newPath, err)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.rbRunning {
		return ErrRebuildRunning
	}
	var old *disk
	for i := range p.disks {
		d := p.disks[i].Load()
		if d.path == oldAbs {
			old = d
		}
	}
	if old == nil {
		return fmt.Errorf("Failed to replace %q: not a disk of this pool", oldPath)
	}
	for i := range p.disks {
		// A failed disk may be replaced by a new one at the same path (a hot-swapped device).
		if d := p.disks[i].Load(); d.path == newAbs && (d != old || old.live()) {
			return fmt.Errorf("Failed to replace %q: %q is already disk %d of the pool", oldPath, newPath, i)
		}
	}
	src := p.partner(old)
	if src == nil {
		return fmt.Errorf("Failed to replace %q: a single-disk pool has no mirror to rebuild from", oldPath)
	}
	if src.state.Load() != stOK {
		return fmt.Errorf("Failed to replace %q: its mirror %q is not healthy (%s), nothing to rebuild from", oldPath, src.path, stateName(src.state.Load()))
	}
	if newAbs == oldAbs {
		// A new device at the old path: let go of the old one first (it is not live).
		old.close()
	}
	nd, err := openDisk(newAbs)
	if err != nil {
		return fmt.Errorf("Failed to open new disk %q: %w", newPath, err)
	}
	nd.index, nd.pair = old.index, old.pair
	for i := range p.disks {
		if d := p.disks[i].Load(); d.live() && d.dev == nd.dev && d.ino == nd.ino {
			nd.close()
			return fmt.Errorf("Failed to replace %q: %q is the same file as disk %q", oldPath, newPath, d.path)
		}
	}
	if sz, err := nd.size(); err != nil || sz < p.l.diskBytes() {
		nd.close()
		return fmt.Errorf("Failed to replace %q: new disk %q has %d bytes, the pool needs %d (%v)", oldPath, newPath, sz, p.l.diskBytes(), err)
	}
	h, err := nd.readHeader()
	switch {
	case errors.Is(err, errNoHeader):
	case err != nil:
		nd.close()
		return fmt.Errorf("Refusing to overwrite %q: %w", newPath, err)
	case h.PoolUUID != p.uuid:
		nd.close()
		return fmt.Errorf("Refusing to overwrite %q: it is a disk of another pool (%s)", newPath, h.PoolUUID)
	}
	nd.punch = p.probePunch(nd)
	nd.state.Store(stRebuilding)
	if err := nd.writeTail(p.l.tailOff(), p.uuid); err != nil {
		nd.close()
		return fmt.Errorf("Failed to prepare new disk %q: %w", newPath, err)
	}
	if err := nd.writeHeader(p.headerFor(nd), true); err != nil {
		nd.close()
		return fmt.Errorf("Failed to prepare new disk %q: %w", newPath, err)
	}
	// From here every write also goes to the new disk.
	prev := old.state.Swap(stRemoved)
	p.disks[old.index].Store(nd)
	if err := p.persistLocked(true); err != nil {
		p.disks[old.index].Store(old)
		old.state.Store(prev)
		nd.close()
		return fmt.Errorf("Failed to replace %q: %w", oldPath, err)
	}
	old.close()
	p.log.Info("Replacing pool disk", "old", oldAbs, "new", newAbs, "pair", nd.pair, "source", src.path)
	p.startRebuildLocked()
	return nil
}

// WaitRebuild waits until no rebuild is running and returns the last rebuild's error.
func (p *Pool) WaitRebuild(ctx context.Context) error {
	for {
		p.mu.Lock()
		if !p.rbRunning {
			err := p.rbErr
			p.mu.Unlock()
			return err
		}
		ch := p.rbDone
		p.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// startRebuildLocked starts the rebuild worker unless it runs already; it rebuilds every
// disk in the rebuilding state, one after the other. p.mu is held.
func (p *Pool) startRebuildLocked() {
	if p.rbRunning {
		return
	}
	p.rbRunning = true
	p.rbErr = nil
	p.rbDone = make(chan struct{})
	p.wg.Add(1)
	go p.rebuildLoop()
}

func (p *Pool) rebuildLoop() {
	defer p.wg.Done()
	var firstErr error
	for {
		var d, src *disk
		p.mu.Lock()
		for i := range p.disks {
			c := p.disks[i].Load()
			if o := p.partner(c); c.state.Load() == stRebuilding && o != nil && o.state.Load() == stOK {
				d, src = c, o
				break
			}
		}
		p.mu.Unlock()
		if d == nil || p.closed.Load() {
			break
		}
		err := p.rebuildOne(d, src)
		if errors.Is(err, ErrClosed) {
			firstErr = err
			break
		}
		if err != nil && firstErr == nil {
			firstErr = err
		}
	}
	p.mu.Lock()
	p.rbErr = firstErr
	p.rbRunning = false
	close(p.rbDone)
	p.mu.Unlock()
}

// rebuildOne copies src onto d and makes d a healthy member.
func (p *Pool) rebuildOne(d, src *disk) error {
	start := time.Now()
	// Barrier: a write that chose its target disks before d joined the pair holds its
	// chunk locks until it is done. Waiting for every stripe once means such a write has
	// landed on the source before the copy (which skips holes without locking) looks.
	for i := range p.locks {
		p.locks[i].Lock()
		p.locks[i].Unlock()
	}
	err := p.copyPair(d, src)
	if err == nil {
		if serr := p.syncDisk(d); serr != nil {
			err = fmt.Errorf("Failed to sync rebuilt disk %q: %w", d.path, serr)
			p.diskFailed(d, fmt.Sprintf("sync after rebuild: %v", serr))
		}
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	switch {
	case err == nil && d.state.Load() == stRebuilding:
		d.state.Store(stOK)
		d.setErr("")
		if perr := p.persistLocked(true); perr != nil {
			// Without the record the disk must not be trusted: keep rebuilding state on disk.
			d.state.Store(stRebuilding)
			err = perr
			break
		}
		p.log.Info("Pool rebuild finished", "disk", d.path, "pair", d.pair, "duration", time.Since(start).Round(time.Millisecond))
	case err == nil:
		err = fmt.Errorf("Rebuild of %q failed: %s", d.path, d.errString())
	case errors.Is(err, errStopped):
		// Close: keep the watermark (already synced) for the next Open.
		if d.state.Load() == stRebuilding {
			p.persistLocked(false)
		}
		err = ErrClosed
	default:
		if d.state.Load() == stRebuilding {
			d.state.Store(stFailed)
			d.setErr(err.Error())
			p.persistLocked(true)
		}
		p.log.Error("Pool rebuild failed", "disk", d.path, "error", err)
	}
	return err
}

func (d *disk) errString() string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.err
}

func (d *disk) setDone(n int64) {
	d.mu.Lock()
	d.rebuildDone = n
	d.mu.Unlock()
}

// persistEvery is how often the rebuild watermark is made durable.
const persistEvery = 2 * time.Second

// copyPair copies the data area of src onto d from d's watermark to the end, one chunk
// at a time under that chunk's lock so that no concurrent write (which goes to both
// disks) is overwritten with older data. Ranges that are holes on both disks are skipped.
func (p *Pool) copyPair(d, src *disk) error {
	total := p.l.unitsPerDisk * p.l.unit
	base := p.l.dataOff
	d.mu.Lock()
	pos := d.rebuildDone / p.chunk * p.chunk
	d.mu.Unlock()
	rate := p.opts.RebuildRate
	if rate == 0 {
		rate = DefaultRebuildRate
	}
	buf := make([]byte, p.chunk)
	began, copied := time.Now(), int64(0)
	lastPersist := time.Now()
	for pos < total {
		select {
		case <-p.stop:
			if err := p.syncDisk(d); err == nil {
				// pos is durable on d: record it.
				d.setDone(pos)
			}
			return errStopped
		default:
		}
		if d.state.Load() != stRebuilding {
			return fmt.Errorf("Rebuild target %q failed: %s", d.path, d.errString())
		}
		if src.state.Load() != stOK {
			return fmt.Errorf("Rebuild source %q failed: %s", src.path, src.errString())
		}
		if next := min(src.nextData(base+pos, base+total), d.nextData(base+pos, base+total)) - base; next >= pos+p.chunk {
			pos = next / p.chunk * p.chunk
			d.setDone(pos)
			continue
		}
		n := min(p.chunk, total-pos)
		if err := p.copyChunk(d, src, buf[:n], base+pos); err != nil {
			return err
		}
		pos += n
		d.setDone(pos)
		copied += n
		if rate > 0 {
			if ahead := time.Duration(float64(copied)/float64(rate)*float64(time.Second)) - time.Since(began); ahead > 0 {
				select {
				case <-time.After(ahead):
				case <-p.stop:
				}
			}
		}
		if time.Since(lastPersist) > persistEvery {
			lastPersist = time.Now()
			if err := p.syncDisk(d); err != nil {
				p.diskFailed(d, fmt.Sprintf("sync during rebuild: %v", err))
				return fmt.Errorf("Failed to sync rebuild target %q: %w", d.path, err)
			}
			p.mu.Lock()
			err := p.persistLocked(false)
			p.mu.Unlock()
			if err != nil {
				return err
			}
			p.log.Info("Pool rebuild progress", "disk", d.path, "done", pos, "total", total)
		}
	}
	return nil
}

// copyChunk copies one chunk at disk offset doff from src to d under its chunk lock.
func (p *Pool) copyChunk(d, src *disk, buf []byte, doff int64) error {
	lk := &p.locks[p.lockIndex(d.pair, doff)]
	lk.Lock()
	defer lk.Unlock()
	if err := p.readDisk(src, buf, doff); err != nil {
		p.diskFailed(src, fmt.Sprintf("read during rebuild at %d: %v", doff, err))
		return fmt.Errorf("Failed to read rebuild source %q: %w", src.path, err)
	}
	var err error
	if allZero(buf) {
		if d.nextData(doff, doff+int64(len(buf))) < doff+int64(len(buf)) {
			err = p.discardDisk(d, doff, int64(len(buf)))
		}
	} else {
		err = p.writeDisk(d, buf, doff)
	}
	if err != nil {
		p.diskFailed(d, fmt.Sprintf("write during rebuild at %d: %v", doff, err))
		return fmt.Errorf("Failed to write rebuild target %q: %w", d.path, err)
	}
	return nil
}

func allZero(b []byte) bool {
	for len(b) >= len(zeroes) {
		if string(b[:len(zeroes)]) != string(zeroes) {
			return false
		}
		b = b[len(zeroes):]
	}
	return string(b) == string(zeroes[:len(b)])
}
