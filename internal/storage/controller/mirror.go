package controller

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/growserver/grow/internal/storage/adminclient"
	"github.com/growserver/grow/internal/storage/mirror"
	"github.com/growserver/grow/internal/storage/volume"
	"github.com/growserver/grow/internal/storage/witness"
)

// MirrorConfig pairs the controller with a partner (see internal/storage/mirror's doc).
type MirrorConfig struct {
	// Name is this controller's name in the pair.
	Name string
	// Peer is the partner's admin API URL; "" means no mirroring.
	Peer string
	// PeerTokenFile holds the partner's admin token.
	PeerTokenFile string
	// Listen is the IP:PORT of the mirror link server.
	Listen string
	// Witness is the witness URL; WitnessTokenFile holds its token.
	Witness, WitnessTokenFile string
	// ServiceAddress (IP/PREFIX) is added to ServiceDev while this controller serves its home.
	ServiceAddress, ServiceDev string
	// ResyncRate limits resync in bytes per second (0: unlimited).
	ResyncRate int64
	// PeerTimeout declares the partner lost after this long without an answer
	// (default 1 s); the fence timeout is PeerTimeout+0.5 s and the takeover delay
	// PeerTimeout+1.5 s.
	PeerTimeout time.Duration
}

// Headers of requests one controller forwards to its partner.
const (
	hdrForwarded = "X-Grow-Mirror-Forwarded"
	hdrHome      = "X-Grow-Mirror-Home"
	hdrPrimary   = "X-Grow-Mirror-Primary"
	hdrEpoch     = "X-Grow-Mirror-Epoch"
)

const heartbeatInterval = 250 * time.Millisecond

// deadAfter is how long the partner's API must refuse connections before the partner
// counts as dead (no process) rather than merely silent, which allows a quick takeover.
const deadAfter = 200 * time.Millisecond

// addrReleaseGrace is how long a service address stays, refusing connections, before
// it is removed.
const addrReleaseGrace = 200 * time.Millisecond

// refusedRepoll is how soon the partner is asked again after a refused connection.
const refusedRepoll = 100 * time.Millisecond

// errUnavailable answers metadata operations while the partner is unreachable.
var errUnavailable = errors.New("unavailable")

// peerFile keeps what this controller last learned about its partner, for a restart
// while the partner is down.
type peerFile struct {
	Name           string `json:"name"`
	ServiceAddress string `json:"service_address"`
}

// ctrlFile is the controller's own persistent mirror state.
type ctrlFile struct {
	// Drained: every primary was moved off this controller; it serves nothing until resumed.
	Drained bool `json:"drained"`
}

// mirrorMgr pairs this controller with its partner: per-volume roles and epochs, the
// link server, heartbeats, elections through the witness, service addresses.
type mirrorMgr struct {
	c       *Controller
	cfg     MirrorConfig
	dir     string
	peer    *adminclient.Client // partner's admin API
	fwd     *adminclient.Client // the same, marking requests as forwarded
	wit     *witness.Client     // nil without a witness
	ownTok  string
	peerTok string

	linkLn     net.Listener
	linkSrv    *mirror.LinkServer
	linkTLS    *tls.Config // server side, nil without TLS material
	linkClient *tls.Config // client side
	svc        netip.Prefix
	nbdPort    int
	conns      *connTracker

	// linkDials bounds the links being opened to the partner at once to half its bound
	// on pending connections (maxPendingLinks), so that a burst of links (at startup)
	// is not dropped there and its TLS handshakes are not wasted.
	linkDials chan struct{}

	peerTimeout, fenceTimeout, takeover time.Duration
	rate                                atomic.Int64
	retiredResync                       atomic.Int64

	// metaMu serialises the metadata operations this side originates (never the
	// forwarded ones, which the partner serialises).
	metaMu sync.Mutex
	// meta is the journal of volume changes made alone (mirror_alone.go), under
	// metaFileMu; its summary is published in the atomics for the heartbeat.
	metaFileMu  sync.Mutex
	meta        metaFile
	metaEpoch   atomic.Uint64
	metaPending atomic.Int64
	metaAlone   atomic.Bool
	replaying   atomic.Bool
	// seeding is set while volumes the partner lacks are rebuilt there (mirror_seed.go).
	seeding atomic.Bool
	// firstPairing: this start is the controller's first with a partner (DATA/mirror did
	// not exist), so its volumes exist nowhere else and are adopted at once.
	firstPairing bool
	// seedWarnOnce: the snapshots a rebuilt partner cannot get are reported once per run.
	seedWarnOnce sync.Once

	// hbVols is the volume part of the heartbeat (status), kept to answer "unchanged".
	hbVols peerVolumes

	mu     sync.Mutex
	vols   map[string]*mvol
	info   *adminclient.MirrorStatus // partner's last answer
	infoAt time.Time                 // when the poll that got info was sent
	// refusedSince is when the partner's API began refusing connections (its machine
	// answers but no process listens: the controller is dead); zero otherwise.
	refusedSince time.Time
	peerName     string
	peerSvc      string
	lastPeerOK   time.Time
	lastWitOK    time.Time
	started      time.Time
	fenced       bool
	drained      bool
	serving      map[string]bool // homes served (addresses held or, without addresses, claimed)
	addrs        map[string]bool // service addresses currently added, by home
	// addrMu serialises changes and renewals of service addresses.
	addrMu sync.Mutex
	// releasing names the homes whose address is being given up right now.
	releasing map[string]bool

	kickCh chan struct{}
	cancel context.CancelFunc
	ctx    context.Context
	wg     sync.WaitGroup
}

// newMirror validates the mirror flags and binds the link listener; volumes are loaded by load.
func newMirror(c *Controller, cfg MirrorConfig, serverTLS *tls.Config) (*mirrorMgr, error) {
	if cfg.Name == "" {
		return nil, errors.New("Mirroring needs --name")
	}
	if err := validCtrlName(cfg.Name); err != nil {
		return nil, err
	}
	if cfg.Listen == "" {
		return nil, errors.New("Mirroring needs --mirror-listen IP:PORT")
	}
	host, _, err := net.SplitHostPort(cfg.Listen)
	if err != nil {
		return nil, fmt.Errorf("Invalid --mirror-listen %q: %w", cfg.Listen, err)
	}
	if ip := net.ParseIP(host); ip == nil || ip.IsUnspecified() {
		return nil, fmt.Errorf("Invalid --mirror-listen %q: give the IP address the partner dials, not a wildcard", cfg.Listen)
	}
	if cfg.PeerTokenFile == "" {
		return nil, errors.New("Mirroring needs --peer-token-file (the partner's DATA/admin.token)")
	}
	b, err := os.ReadFile(cfg.PeerTokenFile)
	if err != nil {
		return nil, fmt.Errorf("Failed to read the partner's token: %w", err)
	}
	m := &mirrorMgr{c: c, cfg: cfg, dir: filepath.Join(c.cfg.DataDir, "mirror"), peerTok: strings.TrimSpace(string(b)),
		ownTok: c.token, vols: map[string]*mvol{}, serving: map[string]bool{}, addrs: map[string]bool{}, releasing: map[string]bool{},
		kickCh: make(chan struct{}, 1), conns: newConnTracker(), linkTLS: serverTLS, linkDials: make(chan struct{}, maxPendingLinks/2)}
	if m.peerTok == "" {
		return nil, fmt.Errorf("The partner's token file %q is empty", cfg.PeerTokenFile)
	}
	if m.peer, err = adminclient.New(cfg.Peer, m.peerTok); err != nil {
		return nil, fmt.Errorf("Invalid --peer: %w", err)
	}
	// No overall timeout: an image copy takes as long as it takes. Heartbeats and
	// elections carry their own deadlines; a partner that stops answering in the middle
	// of a request is cut off by the transport's keep-alive and header timeouts.
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.DialContext = (&net.Dialer{Timeout: 5 * time.Second, KeepAlive: 5 * time.Second}).DialContext
	tr.ResponseHeaderTimeout = 10 * time.Minute
	if strings.HasPrefix(cfg.Peer, "https:") {
		tr.TLSClientConfig = m.clientTLS()
	}
	hc := &http.Client{Transport: tr}
	m.peer = m.peer.WithHTTPClient(hc)
	m.fwd = m.peer.WithHeader(hdrForwarded, cfg.Name)
	if cfg.Witness != "" {
		if cfg.WitnessTokenFile == "" {
			return nil, errors.New("--witness needs --witness-token-file")
		}
		wb, err := os.ReadFile(cfg.WitnessTokenFile)
		if err != nil {
			return nil, fmt.Errorf("Failed to read the witness token: %w", err)
		}
		if m.wit, err = witness.NewClient(cfg.Witness, strings.TrimSpace(string(wb))); err != nil {
			return nil, err
		}
	}
	if cfg.ResyncRate < 0 {
		return nil, fmt.Errorf("Invalid resync rate %d", cfg.ResyncRate)
	}
	m.rate.Store(cfg.ResyncRate)
	m.peerTimeout = cfg.PeerTimeout
	if m.peerTimeout <= 0 {
		m.peerTimeout = time.Second
	}
	m.fenceTimeout = m.peerTimeout + 500*time.Millisecond
	m.takeover = m.peerTimeout + 1500*time.Millisecond
	if (cfg.ServiceAddress == "") != (cfg.ServiceDev == "") {
		return nil, errors.New("--service-address and --service-dev go together")
	}
	if cfg.ServiceAddress != "" {
		if m.svc, err = netip.ParsePrefix(cfg.ServiceAddress); err != nil || !m.svc.Addr().Is4() {
			return nil, fmt.Errorf("Invalid --service-address %q: want an IPv4 IP/PREFIX such as 10.0.0.10/24", cfg.ServiceAddress)
		}
		if err := checkDev(cfg.ServiceDev); err != nil {
			return nil, err
		}
		if c.cfg.NBDAddr == "" {
			return nil, errors.New("--service-address needs NBD over TCP (--nbd)")
		}
		h, _, _ := net.SplitHostPort(c.cfg.NBDAddr)
		if ip := net.ParseIP(h); h != "" && (ip == nil || !ip.IsUnspecified()) {
			return nil, fmt.Errorf("--service-address needs --nbd on the wildcard address (e.g. 0.0.0.0:10809), so that the partner's address is served after a takeover; got %q", c.cfg.NBDAddr)
		}
	}
	if c.cfg.NBDAddr != "" {
		_, p, _ := net.SplitHostPort(c.cfg.NBDAddr)
		m.nbdPort, _ = strconv.Atoi(p)
	}
	if _, err := os.Stat(m.dir); errors.Is(err, os.ErrNotExist) {
		m.firstPairing = true
	}
	if err := os.MkdirAll(m.dir, 0o700); err != nil {
		return nil, fmt.Errorf("Failed to create %q: %w", m.dir, err)
	}
	var pf peerFile
	if readJSON(filepath.Join(m.dir, "peer.json"), &pf) == nil {
		m.peerName, m.peerSvc = pf.Name, pf.ServiceAddress
	}
	var cf ctrlFile
	if readJSON(filepath.Join(m.dir, "controller.json"), &cf) == nil {
		m.drained = cf.Drained
	}
	if err := m.loadMeta(); err != nil {
		return nil, err
	}
	l, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return nil, fmt.Errorf("Failed to listen for the mirror link on %q: %w", cfg.Listen, err)
	}
	m.linkLn = l
	m.linkSrv = &mirror.LinkServer{Lookup: m.lookupTarget, Logger: c.log.With("component", "mirror-link")}
	return m, nil
}

func validCtrlName(n string) error {
	if len(n) == 0 || len(n) > 64 {
		return fmt.Errorf("Invalid controller name %q: 1-64 characters", n)
	}
	for _, r := range n {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '_' || r == '.') {
			return fmt.Errorf("Invalid controller name %q: use letters, digits, '-', '_' and '.'", n)
		}
	}
	return nil
}

// clientTLS is the TLS configuration for dialling the partner (link and https API).
// With --tls-client-ca the partner's certificate must be signed by it; otherwise the
// link is encrypted and authenticated by the token challenge only.
func (m *mirrorMgr) clientTLS() *tls.Config {
	cfg := &tls.Config{MinVersion: tls.VersionTLS12}
	if m.linkTLS != nil {
		cfg.Certificates = m.linkTLS.Certificates
	}
	if ca := m.c.cfg.TLSClientCA; ca != "" {
		if pem, err := os.ReadFile(ca); err == nil {
			pool := x509.NewCertPool()
			if pool.AppendCertsFromPEM(pem) {
				cfg.RootCAs = pool
				return cfg
			}
		}
	}
	cfg.InsecureSkipVerify = true
	return cfg
}

func readJSON(path string, v any) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	return json.Unmarshal(b, v)
}

func writeJSONFile(path string, v any) error {
	b, err := json.MarshalIndent(v, "", " ")
	if err != nil {
		return err
	}
	return witness.WriteFileSync(path, b)
}

// load opens the mirror state of every volume.
func (m *mirrorMgr) load() error {
	// Addresses are re-added only once roles are settled: never start holding one.
	if m.svc.IsValid() {
		_ = delAddr(m.cfg.ServiceDev, m.svc)
		if p, err := netip.ParsePrefix(m.peerSvc); err == nil {
			_ = delAddr(m.cfg.ServiceDev, p)
		}
	}
	for _, info := range m.c.mgr.List() {
		if info.Kind != volume.KindVolume {
			continue
		}
		var sf stateFile
		st := mirror.State{Role: mirror.RoleStale}
		home := m.cfg.Name
		if err := readJSON(m.statePath(info.Name), &sf); err == nil {
			r, ok := parseRole(sf.Role)
			if !ok {
				return fmt.Errorf("Failed to load mirror state of %q: unknown role %q", info.Name, sf.Role)
			}
			st, home = mirror.State{Role: r, Epoch: sf.Epoch}, sf.Home
		} else if !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("Failed to load mirror state of %q: %w", info.Name, err)
		} else {
			// No state (made before pairing, or a crash during create): never write,
			// let the partner's copy win; if the partner has none, adopt it (adoptIfOnly).
			m.c.log.Warn("Volume has no mirror state; it starts stale until the partner shows whether it has a copy", "volume", info.Name)
		}
		v, err := m.openVol(info.Name, home, st, false)
		if err != nil {
			return err
		}
		v.unpaired = st == (mirror.State{Role: mirror.RoleStale})
	}
	return nil
}

func (m *mirrorMgr) statePath(name string) string  { return filepath.Join(m.dir, name+".json") }
func (m *mirrorMgr) bitmapPath(name string) string { return filepath.Join(m.dir, name+".bitmap") }

// start serves the link and runs the heartbeat and reconcile loops.
func (m *mirrorMgr) start() {
	m.ctx, m.cancel = context.WithCancel(context.Background())
	m.mu.Lock()
	m.started = time.Now()
	m.mu.Unlock()
	m.wg.Add(4)
	go func() { defer m.wg.Done(); m.renewLoop() }()
	go func() {
		defer m.wg.Done()
		if err := m.linkSrv.Serve(newAuthListener(m.linkLn, m.ownTok, m.linkTLS, m.c.log)); err != nil {
			m.c.log.Error("Mirror link server stopped", "err", err)
		}
	}()
	go func() { defer m.wg.Done(); m.pollLoop() }()
	go func() { defer m.wg.Done(); m.reconcileLoop() }()
}

// close closes every volume's mirror state and gives up the service addresses (after stop).
func (m *mirrorMgr) close() {
	vols := m.volList()
	for _, v := range vols {
		v.close()
	}
	if m.svc.IsValid() {
		m.addrMu.Lock()
		defer m.addrMu.Unlock()
		m.mu.Lock()
		addrs := maps2slice(m.addrs)
		m.addrs = map[string]bool{}
		m.mu.Unlock()
		for _, h := range addrs {
			if p, ok := m.addrOf(h); ok {
				_ = delAddr(m.cfg.ServiceDev, p)
			}
		}
	}
}

func maps2slice(mp map[string]bool) []string {
	out := make([]string, 0, len(mp))
	for k, v := range mp {
		if v {
			out = append(out, k)
		}
	}
	sort.Strings(out)
	return out
}

func (m *mirrorMgr) kick() {
	select {
	case m.kickCh <- struct{}{}:
	default:
	}
}

// pollLoop asks the partner for its state every heartbeat interval.
func (m *mirrorMgr) pollLoop() {
	t := time.NewTicker(heartbeatInterval)
	defer t.Stop()
	lastWit := time.Time{}
	answeredLast := false
	for {
		sent := time.Now()
		ctx, cancel := context.WithTimeout(m.ctx, m.peerTimeout)
		info, err := m.heartbeat(ctx)
		cancel()
		refused := err != nil && errors.Is(err, syscall.ECONNREFUSED)
		m.mu.Lock()
		switch {
		case refused:
			if m.refusedSince.IsZero() {
				m.refusedSince = sent
			}
		default:
			m.refusedSince = time.Time{}
		}
		m.mu.Unlock()
		if refused {
			m.kick()
		}
		answered := err == nil && info.Name != "" && info.Name != m.cfg.Name
		if answered {
			m.mu.Lock()
			prev := m.info
			m.info, m.infoAt, m.lastPeerOK = info, sent, time.Now()
			changed := m.peerName != info.Name || m.peerSvc != info.ServiceAddress
			m.peerName, m.peerSvc = info.Name, info.ServiceAddress
			m.mu.Unlock()
			if changed {
				if werr := writeJSONFile(filepath.Join(m.dir, "peer.json"), peerFile{Name: info.Name, ServiceAddress: info.ServiceAddress}); werr != nil {
					m.c.log.Error("Failed to record the partner's identity", "err", werr)
				}
			}
			// A pass now only if this answer can change one: the partner is back, or
			// said something new. Otherwise the next heartbeat's pass sees the same.
			if !answeredLast || prev == nil || !sameStatus(prev, info) {
				m.kick()
			}
		} else if err == nil {
			m.c.log.Error("The --peer URL answers with this controller's own name; check --peer", "name", info.Name)
		}
		answeredLast = answered
		if m.wit != nil && time.Since(lastWit) > time.Second {
			lastWit = time.Now()
			ctx, cancel := context.WithTimeout(m.ctx, time.Second)
			if m.wit.Health(ctx) == nil {
				m.mu.Lock()
				m.lastWitOK = time.Now()
				m.mu.Unlock()
			}
			cancel()
		}
		var quick <-chan time.Time
		if refused {
			// Confirm a dead partner quickly: a refusal is asked again in 100 ms.
			quick = time.After(refusedRepoll)
		}
		select {
		case <-m.ctx.Done():
			return
		case <-t.C:
		case <-quick:
		}
	}
}

// heartbeat asks the partner for its state. It names the volume states it already has
// (their generation), which the partner then leaves out if they did not change; they
// are taken from the last answer.
func (m *mirrorMgr) heartbeat(ctx context.Context) (*adminclient.MirrorStatus, error) {
	m.mu.Lock()
	prev := m.info
	m.mu.Unlock()
	since := ""
	if prev != nil {
		since = prev.VolumesGen
	}
	info, err := m.peer.MirrorHeartbeat(ctx, since)
	if err != nil {
		return nil, err
	}
	if info.VolumesSame {
		if since == "" || info.VolumesGen != since {
			return nil, fmt.Errorf("the partner left out volume states of generation %q, not the ones asked for (%q)", info.VolumesGen, since)
		}
		info.Volumes, info.VolumesSame = prev.Volumes, false
	}
	return info, nil
}

// sameStatus reports whether two answers of the partner say the same (volume states
// compare by generation, or in full from a partner that sends no generation).
func sameStatus(a, b *adminclient.MirrorStatus) bool {
	x, y := *a, *b
	if x.VolumesGen != "" && x.VolumesGen == y.VolumesGen {
		x.Volumes, y.Volumes = nil, nil
	}
	return reflect.DeepEqual(x, y)
}

// renewLoop renews the lifetime of the service addresses held, on its own so that a
// slow reconcile (a witness timing out) never lets a held address lapse.
func (m *mirrorMgr) renewLoop() {
	if !m.svc.IsValid() {
		return
	}
	t := time.NewTicker(heartbeatInterval)
	defer t.Stop()
	for {
		select {
		case <-m.ctx.Done():
			return
		case <-t.C:
		}
		m.addrMu.Lock()
		m.mu.Lock()
		held := maps2slice(m.addrs)
		m.mu.Unlock()
		for _, h := range held {
			if p, ok := m.addrOf(h); ok {
				if err := addAddr(m.cfg.ServiceDev, p); err != nil {
					m.c.log.Error("Failed to renew service address", "home", h, "err", err)
				}
			}
		}
		m.addrMu.Unlock()
	}
}

func (m *mirrorMgr) reconcileLoop() {
	t := time.NewTicker(heartbeatInterval)
	defer t.Stop()
	for {
		pv := m.view()
		m.replayIfReturned(pv)
		m.seedIfLacking(pv)
		m.reconcile()
		select {
		case <-m.ctx.Done():
			return
		case <-t.C:
		case <-m.kickCh:
		}
	}
}

// peerView is one reconcile pass's view of the partner.
type peerView struct {
	up       bool
	lostFor  time.Duration
	info     *adminclient.MirrorStatus
	infoAt   time.Time
	name     string
	witnessU bool
	// dead: the partner's machine refuses connections to its API (the process is gone).
	dead bool
}

func (m *mirrorMgr) view() peerView {
	m.mu.Lock()
	defer m.mu.Unlock()
	now := time.Now()
	last := m.lastPeerOK
	if last.IsZero() {
		last = m.started
	}
	pv := peerView{lostFor: now.Sub(last), info: m.info, infoAt: m.infoAt, name: m.peerName}
	pv.dead = !m.refusedSince.IsZero() && now.Sub(m.refusedSince) >= deadAfter
	pv.up = !m.lastPeerOK.IsZero() && pv.lostFor < m.peerTimeout && !pv.dead
	pv.witnessU = m.wit != nil && now.Sub(m.lastWitOK) < m.fenceTimeout
	return pv
}

// reconcile applies one heartbeat's rules to every volume. Those with nothing to do
// (mvol.idle, the steady state) are checked inline; the others each get a goroutine:
// a volume waiting for the witness or the partner (up to about a second) does not
// delay the others, so a controller with many volumes takes them over in the time of
// one election, not of one per volume.
func (m *mirrorMgr) reconcile() {
	pv := m.view()
	var wg sync.WaitGroup
	for _, v := range m.volList() {
		if v.idle(pv) {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			v.reconcile(pv)
		}()
	}
	wg.Wait()
	m.reconcileAddrs(pv)
}

// elect asks the witness for epoch of key on behalf of holder. ok reports an answer.
func (m *mirrorMgr) elect(key, holder string, epoch uint64) (granted, ok bool) {
	if m.wit == nil {
		return false, false
	}
	ctx, cancel := context.WithTimeout(m.ctx, time.Second)
	defer cancel()
	ans, err := m.wit.Grant(ctx, key, holder, epoch)
	if err != nil {
		m.c.log.Warn("Witness unreachable", "key", key, "epoch", epoch, "err", err)
		return false, false
	}
	m.mu.Lock()
	m.lastWitOK = time.Now()
	m.mu.Unlock()
	return ans.Granted, true
}

// peerAnswers asks the partner once, now, whether it is alive (and records it).
func (m *mirrorMgr) peerAnswers() bool {
	sent := time.Now()
	ctx, cancel := context.WithTimeout(m.ctx, 500*time.Millisecond)
	defer cancel()
	info, err := m.heartbeat(ctx)
	if err != nil || info.Name == "" || info.Name == m.cfg.Name {
		return false
	}
	m.mu.Lock()
	m.info, m.infoAt, m.lastPeerOK = info, sent, time.Now()
	m.mu.Unlock()
	return true
}

// homeOf is the volume's home: a stable hash of its name picks one of the two controllers.
func homeOf(name, a, b string) string {
	names := []string{a, b}
	sort.Strings(names)
	h := fnv.New32a()
	h.Write([]byte(name))
	return names[h.Sum32()%2]
}

// requirePeer refuses a metadata operation while the partner is unreachable.
func (m *mirrorMgr) requirePeer() (peerView, error) {
	pv := m.view()
	// Just started: give the first heartbeat a moment before refusing.
	for i := 0; i < 20 && !pv.up && m.neverSeenPeer(); i++ {
		time.Sleep(100 * time.Millisecond)
		pv = m.view()
	}
	if !pv.up || pv.name == "" {
		return pv, fmt.Errorf("%w: the mirror partner %s is unreachable; volume, image and snapshot changes are refused until it returns (data I/O continues)", errUnavailable, m.cfg.Peer)
	}
	if pv.info != nil && pv.info.MetaPending > 0 && pv.info.MetaEpoch > m.metaEpoch.Load() {
		return pv, fmt.Errorf("%w: the mirror partner %s is replaying the volume changes it made while this controller was away; try again in a moment", errUnavailable, pv.name)
	}
	return pv, nil
}

func (m *mirrorMgr) neverSeenPeer() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.lastPeerOK.IsZero() && time.Since(m.started) < 5*time.Second
}

// placePrimary is who should be primary of a new volume of home.
func (m *mirrorMgr) placePrimary(home string, pv peerView) string {
	m.mu.Lock()
	me := m.serving[home] && !m.drained
	m.mu.Unlock()
	if me {
		return m.cfg.Name
	}
	if pv.info != nil && slices.Contains(pv.info.Serves, home) {
		return pv.name
	}
	if m.drained {
		return pv.name
	}
	if pv.info != nil && pv.info.Fenced {
		return m.cfg.Name
	}
	return home
}

// allowLocal refuses NBD connections made to a service address this controller is
// giving up right now (they could not be answered once it is gone). Others go on to
// the handshake, where only the volume's primary serves it.
func (m *mirrorMgr) allowLocal(ip netip.Addr) bool {
	if !m.svc.IsValid() || !ip.IsValid() {
		return true
	}
	for _, h := range []string{m.cfg.Name, m.peerNameNow()} {
		if p, ok := m.addrOf(h); ok && p.Addr() == ip {
			m.mu.Lock()
			releasing := m.releasing[h]
			m.mu.Unlock()
			return !releasing
		}
	}
	return true
}

func (m *mirrorMgr) peerNameNow() string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.peerName
}

// addrOf is the service address of home.
func (m *mirrorMgr) addrOf(home string) (netip.Prefix, bool) {
	if home == m.cfg.Name {
		return m.svc, m.svc.IsValid()
	}
	m.mu.Lock()
	s := m.peerSvc
	m.mu.Unlock()
	p, err := netip.ParsePrefix(s)
	return p, err == nil
}

// reconcileAddrs adds and removes service addresses so that this controller holds
// exactly the addresses of the homes whose volumes it serves.
func (m *mirrorMgr) reconcileAddrs(pv peerView) {
	want := map[string]bool{}
	keep := map[string]bool{}
	hasHome := map[string]bool{}
	vols := m.volList()
	for _, v := range vols {
		hasHome[v.home] = true
		switch v.serveState() {
		case serveYes:
			want[v.home] = true
		case serveHeld:
			keep[v.home] = true
		}
	}
	m.mu.Lock()
	if !hasHome[m.cfg.Name] && !m.drained {
		switch {
		case pv.up && pv.info != nil && !slices.Contains(pv.info.Serves, m.cfg.Name):
			want[m.cfg.Name] = true
		case m.serving[m.cfg.Name]:
			keep[m.cfg.Name] = true
		}
	}
	// Fenced: partner and witness both lost for longer than the fence timeout.
	// Only held volumes (whose partner may take them over) make it fence itself; a side
	// that holds its epochs alone cannot be overtaken.
	m.fenced = !pv.up && pv.lostFor > m.fenceTimeout && !pv.witnessU && len(keep) > 0 && time.Since(m.started) > m.fenceTimeout
	if m.fenced {
		want, keep = map[string]bool{}, map[string]bool{}
	}
	next := map[string]bool{}
	for h := range want {
		next[h] = true
	}
	for h := range keep {
		if m.serving[h] {
			next[h] = true
		}
	}
	if m.drained {
		next = map[string]bool{}
	}
	m.serving = next
	m.mu.Unlock()
	if m.fenced {
		for _, v := range vols {
			if v.serveState() == serveHeld {
				m.conns.closeName(v.name)
			}
		}
	}
	if !m.svc.IsValid() {
		return
	}
	m.addrMu.Lock()
	defer m.addrMu.Unlock()
	for _, h := range []string{m.cfg.Name, pv.name} {
		if h == "" {
			continue
		}
		p, ok := m.addrOf(h)
		if !ok {
			continue
		}
		m.mu.Lock()
		has := m.addrs[h]
		m.mu.Unlock()
		switch {
		case next[h] && !has:
			if err := addAddr(m.cfg.ServiceDev, p); err != nil {
				m.c.log.Error("Failed to add service address", "home", h, "address", p.String(), "err", err)
				continue
			}
			m.mu.Lock()
			m.addrs[h] = true
			m.mu.Unlock()
			m.c.log.Info("Service address added", "home", h, "address", p.String())
			home := h
			go announce(m.cfg.ServiceDev, p.Addr(), func() bool {
				m.mu.Lock()
				defer m.mu.Unlock()
				return m.addrs[home]
			}, m.c.log)
		case !next[h] && has:
			// Refuse and reset its connections while the address is still here (a
			// reset sent after it is gone cannot leave, and the client would wait on a
			// dead connection), then remove it, then reset any that slipped in.
			m.mu.Lock()
			delete(m.addrs, h)
			m.releasing[h] = true
			m.mu.Unlock()
			m.conns.closeLocalIP(p.Addr())
			// Keep the address a moment while refusing: a client's immediate reconnect
			// lands now and gets a reset it can receive, instead of a connection the
			// kernel accepts just before the address goes, which could never be answered.
			time.Sleep(addrReleaseGrace)
			m.conns.closeLocalIP(p.Addr())
			err := delAddr(m.cfg.ServiceDev, p)
			m.conns.closeLocalIP(p.Addr())
			m.mu.Lock()
			delete(m.releasing, h)
			if err != nil {
				m.addrs[h] = true
			}
			m.mu.Unlock()
			if err != nil {
				m.c.log.Error("Failed to remove service address", "home", h, "address", p.String(), "err", err)
				continue
			}
			m.c.log.Info("Service address removed", "home", h, "address", p.String())
		}
	}
}

// status is GET /v1/mirror. Asked with volumesSince equal to the current generation of
// the volume states (the partner's heartbeat, MirrorHeartbeat), it leaves them out.
func (m *mirrorMgr) status(volumesSince string) adminclient.MirrorStatus {
	pv := m.view()
	m.mu.Lock()
	s := adminclient.MirrorStatus{
		Name: m.cfg.Name, Partner: m.peerName, PartnerURL: m.cfg.Peer, PartnerReachable: pv.up,
		WitnessConfigured: m.wit != nil, WitnessReachable: pv.witnessU, LinkAddress: m.linkLn.Addr().String(),
		NBDPort: m.nbdPort, NBDAddress: m.c.advertisedNBD(), Serves: maps2slice(m.serving), Fenced: m.fenced,
		ResyncRate: m.rate.Load(), States: map[string]int{},
	}
	if m.svc.IsValid() {
		s.ServiceAddress = m.svc.String()
	}
	vols := make([]*mvol, 0, len(m.vols))
	for _, v := range m.vols {
		vols = append(vols, v)
	}
	m.mu.Unlock()
	peer := make([]adminclient.PeerVolume, len(vols))
	for i, v := range vols {
		vm := v.apiMirror(pv)
		s.States[vm.State]++
		peer[i] = v.peerVolume()
		if vm.State == adminclient.MirrorResyncing {
			s.Resync.Done += vm.Resync.Done
			s.Resync.Total += vm.Resync.Total
		}
	}
	s.Volumes, s.VolumesGen = m.hbVols.update(vols, peer)
	if volumesSince != "" && volumesSince == s.VolumesGen {
		s.Volumes, s.VolumesSame = nil, true
	}
	s.Resync.Rate = s.ResyncRate
	s.ResyncBytes = m.resyncBytes()
	s.MetaEpoch, s.MetaPending = m.metaEpoch.Load(), int(m.metaPending.Load())
	return s
}

// peerVolumes is the volume part of the last status and its generation, which changes
// whenever a volume's entry does; the map is never modified once published.
type peerVolumes struct {
	mu   sync.Mutex
	base string // random per process: a restarted controller never repeats a generation
	n    uint64
	vols map[string]adminclient.PeerVolume
}

// update returns the map of the entries peer (of vols, in the same order) and its
// generation: the last ones if nothing changed.
func (p *peerVolumes) update(vols []*mvol, peer []adminclient.PeerVolume) (map[string]adminclient.PeerVolume, string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	same := p.vols != nil && len(p.vols) == len(vols)
	for i := 0; same && i < len(vols); i++ {
		old, ok := p.vols[vols[i].name]
		same = ok && old == peer[i]
	}
	if !same {
		if p.base == "" {
			var b [8]byte
			_, _ = rand.Read(b[:])
			p.base = hex.EncodeToString(b[:])
		}
		p.n++
		p.vols = make(map[string]adminclient.PeerVolume, len(vols))
		for i, v := range vols {
			p.vols[v.name] = peer[i]
		}
	}
	return p.vols, p.base + "-" + strconv.FormatUint(p.n, 10)
}

func (m *mirrorMgr) resyncBytes() int64 {
	n := m.retiredResync.Load()
	for _, v := range m.volList() {
		n += v.resyncBytes()
	}
	return n
}

// volList is every mirrored volume, in no particular order.
func (m *mirrorMgr) volList() []*mvol {
	m.mu.Lock()
	defer m.mu.Unlock()
	vols := make([]*mvol, 0, len(m.vols))
	for _, v := range m.vols {
		vols = append(vols, v)
	}
	return vols
}

func (m *mirrorMgr) get(name string) *mvol {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.vols[name]
}

// renameSync renames from over to and syncs the directory.
func renameSync(from, to string) error {
	if err := os.Rename(from, to); err != nil {
		return fmt.Errorf("Failed to replace %q: %w", to, err)
	}
	d, err := os.Open(filepath.Dir(to))
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// stop ends the loops and the link server; held writes fail (their connections are
// closed, so clients reconnect to whoever serves next).
func (m *mirrorMgr) stop() {
	if m.cancel != nil {
		m.cancel()
	}
	_ = m.linkSrv.Close()
	_ = m.linkLn.Close()
	m.wg.Wait()
	vols := m.volList()
	for _, v := range vols {
		v.mu.Lock()
		if vol := v.vol.Load(); vol != nil && vol.Mode() == mirror.ModeHeld {
			vol.Release(false)
			m.conns.closeName(v.name)
		}
		v.mu.Unlock()
	}
}
