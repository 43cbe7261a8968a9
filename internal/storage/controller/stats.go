package controller

import (
	"net/http"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/growserver/grow/internal/storage/adminclient"
	"github.com/growserver/grow/internal/storage/pool"
)

// stats gathers space, cache, pool and NBD counters.
func (c *Controller) stats() adminclient.Stats {
	vs := c.mgr.Stats()
	s := adminclient.Stats{
		Pool:         toAPIPool(c.pool.Status()),
		Capacity:     vs.BytesTotal,
		Used:         vs.BytesUsed,
		Free:         vs.BytesFree,
		PendingFree:  vs.ClustersPendingFree * vs.ClusterSize,
		JournalBytes: vs.JournalBytes,
		Volumes:      len(c.mgr.List()),
		Connections:  c.io.connections.Load(),
		OpenExports:  c.io.open.Load(),
		ReadBytes:    c.io.readBytes.Load(),
		WriteBytes:   c.io.writeBytes.Load(),
		ReadOps:      c.io.readOps.Load(),
		WriteOps:     c.io.writeOps.Load(),
		FlushOps:     c.io.flushOps.Load(),
		TrimOps:      c.io.trimOps.Load(),
		ZeroOps:      c.io.zeroOps.Load(),
		Uptime:       time.Since(c.started).Round(time.Second).String(),
		NBDAddress:   c.advertisedNBD(),
		NBDSocket:    c.NBDSocket(),
		NBDTLS:       c.nbdTLS(),
	}
	if s.NBDTLS != "" {
		s.NBDTLSName = c.cfg.TLSName
	}
	if c.mir != nil {
		s.MirrorResyncBytes = c.mir.resyncBytes()
	}
	if c.cache != nil {
		cs := c.cache.Stats()
		s.CacheSize, s.CacheBytes, s.CacheHits, s.CacheMisses = cs.Capacity, cs.Bytes, cs.Hits, cs.Misses
	}
	return s
}

// metrics exposes the controller's counters to Prometheus, read at scrape time so the
// data path only touches atomics.
type metrics struct {
	c   *Controller
	reg *prometheus.Registry

	bytes, used, free, pending, journal, volumes *prometheus.Desc
	cacheSize, cacheBytes, cacheHits, cacheMiss  *prometheus.Desc
	poolState, diskState, rebuildDone            *prometheus.Desc
	ops, ioBytes, conns, open, ioErrors          *prometheus.Desc
	memWaits, streamed, streamPauses, blocking   *prometheus.Desc

	// Mirroring (only on a paired controller).
	mirResync, mirVolumes, mirDirty, mirPartner, mirWitness, mirPending *prometheus.Desc
}

func newMetrics(c *Controller) *metrics {
	d := func(name, help string, labels ...string) *prometheus.Desc {
		return prometheus.NewDesc("grow_storage_"+name, help, labels, nil)
	}
	m := &metrics{
		c:            c,
		reg:          prometheus.NewRegistry(),
		bytes:        d("capacity_bytes", "Usable pool capacity for volume data."),
		used:         d("used_bytes", "Pool space holding volume data."),
		free:         d("free_bytes", "Pool space free for new data."),
		pending:      d("pending_free_bytes", "Space freed but not reusable until its freeing record is durable."),
		journal:      d("journal_bytes", "Size of the metadata journal."),
		volumes:      d("volumes", "Volumes, images and snapshots."),
		cacheSize:    d("cache_capacity_bytes", "RAM read cache capacity."),
		cacheBytes:   d("cache_bytes", "Bytes held in the RAM read cache."),
		cacheHits:    d("cache_hits_total", "Reads served by the RAM cache."),
		cacheMiss:    d("cache_misses_total", "Reads that missed the RAM cache."),
		poolState:    d("pool_state", "1 for the pool's current state.", "state"),
		diskState:    d("disk_state", "1 for each disk's current state.", "disk", "path", "state"),
		rebuildDone:  d("disk_rebuild_ratio", "Fraction of a rebuilding disk copied so far.", "disk", "path"),
		ops:          d("nbd_requests_total", "NBD requests served, by command.", "op"),
		ioBytes:      d("nbd_bytes_total", "NBD payload bytes, by direction.", "direction"),
		conns:        d("nbd_connections_total", "NBD exports opened since start."),
		open:         d("nbd_open_exports", "NBD exports open now."),
		ioErrors:     d("nbd_errors_total", "NBD requests answered with an error."),
		memWaits:     d("nbd_memory_waits_total", "NBD requests that waited because --nbd-buffer-memory was in use."),
		streamed:     d("nbd_streamed_reads_total", "Large NBD READs served one after another by their connection's streamer thread."),
		blocking:     d("nbd_blocking_modes_total", "Times a connection's reader switched to blocking reads for a stream of large WRITEs over a unix socket."),
		streamPauses: d("nbd_stream_pauses_total", "Times a connection's streamed READs were slow (disk rather than memory) and went to parallel workers for a while."),
	}
	md := func(name, help string, labels ...string) *prometheus.Desc {
		return prometheus.NewDesc("grow_mirror_"+name, help, labels, nil)
	}
	m.mirResync = md("resync_bytes_total", "Bytes copied to the partner by resync since start.")
	m.mirVolumes = md("volumes", "Mirrored volumes on this controller, by role and state.", "role", "state")
	m.mirDirty = md("dirty_bytes", "Bytes of mirrored volumes known to differ from the partner.")
	m.mirPartner = md("partner_up", "1 while the mirror partner answers.")
	m.mirWitness = md("witness_up", "1 while the witness answers.")
	m.mirPending = md("meta_pending", "Volume changes made while the partner was away, not yet replayed to it.")
	m.reg.MustRegister(m, collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

func (m *metrics) handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{})
}

// Describe implements prometheus.Collector.
func (m *metrics) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{m.bytes, m.used, m.free, m.pending, m.journal, m.volumes,
		m.cacheSize, m.cacheBytes, m.cacheHits, m.cacheMiss, m.poolState, m.diskState, m.rebuildDone,
		m.ops, m.ioBytes, m.conns, m.open, m.ioErrors, m.memWaits, m.streamed, m.streamPauses, m.blocking} {
		ch <- d
	}
	if m.c.mir != nil {
		for _, d := range []*prometheus.Desc{m.mirResync, m.mirVolumes, m.mirDirty, m.mirPartner, m.mirWitness, m.mirPending} {
			ch <- d
		}
	}
}

// Collect implements prometheus.Collector.
func (m *metrics) Collect(ch chan<- prometheus.Metric) {
	s := m.c.stats()
	g := func(d *prometheus.Desc, v int64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, float64(v), labels...)
	}
	ctr := func(d *prometheus.Desc, v int64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), labels...)
	}
	g(m.bytes, s.Capacity)
	g(m.used, s.Used)
	g(m.free, s.Free)
	g(m.pending, s.PendingFree)
	g(m.journal, s.JournalBytes)
	g(m.volumes, int64(s.Volumes))
	g(m.cacheSize, s.CacheSize)
	g(m.cacheBytes, s.CacheBytes)
	ctr(m.cacheHits, s.CacheHits)
	ctr(m.cacheMiss, s.CacheMisses)
	for _, st := range []string{pool.StateOK, pool.StateDegraded, pool.StateFailed} {
		v := int64(0)
		if s.Pool.State == st {
			v = 1
		}
		g(m.poolState, v, st)
	}
	for _, d := range s.Pool.Disks {
		idx := strconv.Itoa(d.Index)
		g(m.diskState, 1, idx, d.Path, d.State)
		if d.RebuildTotal > 0 {
			ch <- prometheus.MustNewConstMetric(m.rebuildDone, prometheus.GaugeValue, float64(d.RebuildDone)/float64(d.RebuildTotal), idx, d.Path)
		}
	}
	ctr(m.ops, s.ReadOps, "read")
	ctr(m.ops, s.WriteOps, "write")
	ctr(m.ops, s.FlushOps, "flush")
	ctr(m.ops, s.TrimOps, "trim")
	ctr(m.ops, s.ZeroOps, "write_zeroes")
	ctr(m.ops, m.c.io.cacheOps.Load(), "cache")
	ctr(m.ioBytes, s.ReadBytes, "read")
	ctr(m.ioBytes, s.WriteBytes, "write")
	ctr(m.conns, s.Connections)
	g(m.open, s.OpenExports)
	ctr(m.ioErrors, m.c.io.errors.Load())
	ns := m.c.nbd.Stats()
	ctr(m.memWaits, ns.MemoryWaits)
	ctr(m.streamed, ns.Streamed)
	ctr(m.streamPauses, ns.StreamPauses)
	ctr(m.blocking, ns.BlockingModes)
	if mir := m.c.mir; mir != nil {
		ms := mir.status("")
		ctr(m.mirResync, ms.ResyncBytes)
		pv := mir.view()
		counts := map[[2]string]int64{}
		var dirty int64
		for _, v := range mir.volList() {
			vm := v.apiMirror(pv)
			counts[[2]string{vm.Role, vm.State}]++
			dirty += vm.DirtyBytes
		}
		for _, role := range []string{"primary", "secondary"} {
			for _, st := range []string{adminclient.MirrorSynced, adminclient.MirrorDegraded, adminclient.MirrorResyncing,
				adminclient.MirrorStale, adminclient.MirrorFrozen, adminclient.MirrorSplit} {
				g(m.mirVolumes, counts[[2]string{role, st}], role, st)
			}
		}
		g(m.mirDirty, dirty)
		up := func(b bool) int64 {
			if b {
				return 1
			}
			return 0
		}
		g(m.mirPartner, up(ms.PartnerReachable))
		g(m.mirWitness, up(ms.WitnessReachable))
		g(m.mirPending, int64(ms.MetaPending))
	}
}
