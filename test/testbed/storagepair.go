package testbed

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/growserver/grow/internal/authtoken"
)

// Ports of a pair controller and of the witness inside their namespaces.
const (
	PairAPIPort     = 7480
	PairNBDPort     = 10809
	PairMirrorPort  = 7481
	WitnessAPIPort  = 7490
	serviceIPOffset = 100 // a controller's service address is 10.99.0.(100+its storage index)
)

// StoragePairOptions configures Bed.StartStoragePair.
type StoragePairOptions struct {
	// DiskSize is the size of each of the four sparse file disks of each controller
	// (--pool-size); the pool (RAID 1+0 over two pairs) offers twice that. Default 2GiB.
	DiskSize string
	// Cache is --cache (default 64MiB).
	Cache string
	// ResyncRate is --resync-rate ("" = the daemon's default).
	ResyncRate string
	// Unpaired starts the two controllers alone, without the pair flags or a witness:
	// the same pools and addresses, for comparisons and for checking the bed itself.
	Unpaired bool
	// Extra flags for both controllers.
	Extra []string
	// TLS gives both controllers a certificate of a test CA (StoragePair.PKI) and makes
	// them require TLS with verified client certificates on NBD, the mirror link and the
	// admin API (https); tools and VMs then need PKI.ClientDir to reach a disk.
	TLS bool
}

// StoragePair is two `grow storaged` controllers mirroring each other, and a witness,
// each in its own namespace on the storage network (L2, bridge snet in the switch
// namespace), so that a service address can move from one controller to the other:
//
//	switch ns, bridge snet: port cI -- controller A (st0: 10.99.0.(2+I), service 10.99.0.(100+I))
//	                        port cJ -- controller B (st0: 10.99.0.(2+J), service 10.99.0.(100+J))
//	                        port cK -- witness      (st0: 10.99.0.(2+K))
//	                        ports sN -- hosts       (st0: 10.99.0.(11+N))
type StoragePair struct {
	Bed     *Bed
	Ctl     [2]*PairController
	Witness *Daemon // nil when Unpaired
	PKI     *PKI    // with StoragePairOptions.TLS

	client      *http.Client // for the controllers' admin APIs
	witnessPort string
	t           testing.TB
	mu          sync.Mutex
	partitioned bool
}

// PairController is one controller of a StoragePair.
type PairController struct {
	*Storaged
	Name       string // --name, e.g. "stor-a"
	Index      int    // storage index in the bed (namespace -sI, switch port cI)
	ServiceIP  string // the service address this controller is home of (without prefix)
	MirrorAddr string // --mirror-listen
	Port       string // its port on the switch's storage bridge
	pair       *StoragePair
}

// StartStoragePair starts a witness and two paired controllers, each with four file
// disks (RAID 1+0), and registers their teardown. The controllers' admin tokens are
// created before they start, so that each can be given the other's (--peer-token-file).
func (b *Bed) StartStoragePair(t testing.TB, opts StoragePairOptions) *StoragePair {
	t.Helper()
	if opts.DiskSize == "" {
		opts.DiskSize = "2GiB"
	}
	if opts.Cache == "" {
		opts.Cache = "64MiB"
	}
	p := &StoragePair{Bed: b, t: t, client: http.DefaultClient}
	// Cleanups run last-in first-out: the partition is lifted before the daemons
	// stop, so a clean shutdown does not wait for an unreachable peer.
	var witnessToken string
	if !opts.Unpaired {
		i, ns, ip, err := b.addStorageNetns()
		if err != nil {
			t.Fatal(err)
		}
		dir := shortTempDir(t, fmt.Sprintf("gtb-w%d-", i))
		addr := fmt.Sprintf("%s:%d", ip, WitnessAPIPort)
		p.Witness = newDaemon(t, &Daemon{Name: fmt.Sprintf("witness-s%d", i), Netns: ns, Addr: addr, DataDir: dir,
			Args: []string{"storage", "witness", "--data", dir, "--api", addr}})
		witnessToken = filepath.Join(dir, "admin.token")
		p.witnessPort = fmt.Sprintf("c%d", i)
	}
	type prepared struct {
		ns, dir string
		args    []string
	}
	var prep [2]prepared
	for k := range p.Ctl {
		i, ns, ip, err := b.addStorageNetns()
		if err != nil {
			t.Fatal(err)
		}
		dir := shortTempDir(t, fmt.Sprintf("gtb-s%d-", i))
		if _, err := authtoken.LoadOrCreate(filepath.Join(dir, "admin.token")); err != nil {
			t.Fatal(err)
		}
		c := &PairController{
			Name:       "stor-" + string(rune('a'+k)),
			Index:      i,
			ServiceIP:  fmt.Sprintf("%s%d", StoragePrefix, serviceIPOffset+i),
			MirrorAddr: fmt.Sprintf("%s:%d", ip, PairMirrorPort),
			Port:       fmt.Sprintf("c%d", i),
			pair:       p,
			Storaged:   &Storaged{IP: ip, NBDAddr: fmt.Sprintf("%s:%d", ip, PairNBDPort)},
		}
		p.Ctl[k] = c
		args := []string{"storaged", "--data", dir, "--api", fmt.Sprintf("%s:%d", ip, PairAPIPort),
			"--pool-size", opts.DiskSize, "--cache", opts.Cache}
		for d := 0; d < 4; d++ {
			args = append(args, "--disk", filepath.Join(dir, fmt.Sprintf("disk%d.img", d)))
		}
		if opts.Unpaired {
			args = append(args, "--nbd", c.NBDAddr)
		} else {
			// Any address of the namespace: the partner's service address lands here on
			// failover. Volumes carry their home's service address; the advertised
			// address is the controller's own.
			args = append(args, "--nbd", fmt.Sprintf("0.0.0.0:%d", PairNBDPort), "--nbd-advertise", c.NBDAddr)
		}
		prep[k] = prepared{ns: ns, dir: dir, args: args}
	}
	scheme := "http"
	if opts.TLS {
		scheme = "https"
		if err := p.setupTLS(shortTempDir(t, "gtb-pki-"), func(k int, args ...string) { prep[k].args = append(prep[k].args, args...) }); err != nil {
			t.Fatal(err)
		}
	}
	if !opts.Unpaired {
		for k, c := range p.Ctl {
			peer := p.Ctl[1-k]
			peerTok, err := os.ReadFile(filepath.Join(prep[1-k].dir, "admin.token"))
			if err != nil {
				t.Fatal(err)
			}
			tokFile := filepath.Join(prep[k].dir, "peer.token")
			if err := os.WriteFile(tokFile, peerTok, 0o600); err != nil {
				t.Fatalf("Failed to write the peer token of %s: %v", c.Name, err)
			}
			prep[k].args = append(prep[k].args,
				"--name", c.Name,
				"--peer", fmt.Sprintf("%s://%s:%d", scheme, peer.IP, PairAPIPort),
				"--peer-token-file", tokFile,
				"--mirror-listen", c.MirrorAddr,
				"--witness", p.Witness.PeerURL,
				"--witness-token-file", witnessToken,
				"--service-address", c.ServiceIP+"/24",
				"--service-dev", "st0")
			if opts.ResyncRate != "" {
				prep[k].args = append(prep[k].args, "--resync-rate", opts.ResyncRate)
			}
		}
	}
	// Both controllers start at once: each may wait for its partner before it answers.
	var wg sync.WaitGroup
	errs := make([]error, 2)
	for k, c := range p.Ctl {
		args := append(prep[k].args, opts.Extra...)
		d := &Daemon{Name: fmt.Sprintf("storaged-%s", c.Name), Netns: prep[k].ns,
			Addr: fmt.Sprintf("%s:%d", c.IP, PairAPIPort), DataDir: prep[k].dir, Args: args, t: t,
			PeerURL: fmt.Sprintf("%s://%s:%d", scheme, c.IP, PairAPIPort)}
		d.logPath = filepath.Join(shortTempDir(t, "gtb-log-"), d.Name+".log")
		c.Daemon = d
		t.Cleanup(func() {
			if err := d.Stop(10 * time.Second); err != nil {
				t.Logf("%v", err)
			}
			if t.Failed() {
				t.Logf("%s log:\n%s", d.Name, tail(d.Log(), 8000))
			}
		})
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[k] = d.start()
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		t.Fatal(err)
	}
	for _, c := range p.Ctl {
		c.URL = scheme + "://" + Forward(t, c.Netns, c.Addr)
	}
	if !opts.Unpaired {
		if err := p.WaitPaired(30 * time.Second); err != nil {
			t.Fatal(err)
		}
	}
	// VMs still connected would hold a controller's graceful shutdown; a partition
	// left in place would hold the controllers' farewell to each other.
	t.Cleanup(b.killHostProcesses)
	t.Cleanup(func() { _ = p.Heal() })
	return p
}

// setupTLS writes the pair's PKI into dir/pki (a certificate valid for both
// controllers' own and service addresses, and for the loopback forwarders of the
// admin APIs), passes each controller its TLS flags through add, and makes the bed's
// clients trust the CA and present the host certificate.
func (p *StoragePair) setupTLS(dir string, add func(k int, args ...string)) error {
	ips := []string{"127.0.0.1"}
	for _, c := range p.Ctl {
		ips = append(ips, c.IP, c.ServiceIP)
	}
	pki, err := NewPKI(filepath.Join(dir, "pki"), ips...)
	if err != nil {
		return fmt.Errorf("Failed to make the test PKI: %w", err)
	}
	p.PKI = pki
	for k, c := range p.Ctl {
		add(k, "--tls-cert", pki.ServerCert, "--tls-key", pki.ServerKey, "--tls-client-ca", pki.CA, "--tls-required")
		c.TLSClientDir = pki.ClientDir
	}
	caPEM, err := os.ReadFile(pki.CA)
	if err != nil {
		return err
	}
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(caPEM)
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.TLSClientConfig = &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12}
	p.client = &http.Client{Transport: tr}
	return nil
}

// addStorageNetns adds a namespace on the storage network with the next storage
// index I: namespace ID-sI, switch port cI, address 10.99.0.(2+I).
func (b *Bed) addStorageNetns() (int, string, string, error) {
	b.mu.Lock()
	i := b.storage
	b.storage++
	b.mu.Unlock()
	if 2+i >= 11 {
		return 0, "", "", fmt.Errorf("too many storage namespaces (%d): 10.99.0.11 and up are the hosts'", i+1)
	}
	ns := fmt.Sprintf("%s-s%d", b.ID, i)
	if err := b.addNetns(ns); err != nil {
		return 0, "", "", err
	}
	if err := b.plug(ns, "st0", "snet", fmt.Sprintf("c%d", i)); err != nil {
		return 0, "", "", err
	}
	ip := fmt.Sprintf("%s%d", StoragePrefix, 2+i)
	if err := b.ip(ns, "addr", "add", ip+"/24", "dev", "st0"); err != nil {
		return 0, "", "", err
	}
	// A moving service address is announced with gratuitous ARP; let neighbours take it.
	_ = runIn(ns, "sysctl", "-qw", "net.ipv4.conf.all.arp_notify=1")
	return i, ns, ip, nil
}

// Other returns the partner of c.
func (c *PairController) Other() *PairController {
	if c.pair.Ctl[0] == c {
		return c.pair.Ctl[1]
	}
	return c.pair.Ctl[0]
}

// ByName returns the controller called name, or nil.
func (p *StoragePair) ByName(name string) *PairController {
	for _, c := range p.Ctl {
		if c.Name == name {
			return c
		}
	}
	return nil
}

const partitionTable = "growpair"

// Partition cuts the link between the two controllers, and only that link: the
// switch drops every frame between their two ports (any address, ARP included), while
// both still reach the hosts and the witness.
func (p *StoragePair) Partition() error {
	return p.cut(fmt.Sprintf("the link between %s and %s", p.Ctl[0].Name, p.Ctl[1].Name),
		[2]string{p.Ctl[0].Port, p.Ctl[1].Port})
}

// Isolate cuts controller c off from its partner and from the witness, while it still
// reaches the hosts (and they it): the controller that must fence itself.
func (p *StoragePair) Isolate(c *PairController) error {
	if p.Witness == nil {
		return errors.New("an unpaired bed has no witness")
	}
	return p.cut(c.Name+" from its partner and the witness",
		[2]string{c.Port, c.Other().Port}, [2]string{c.Port, p.witnessPort})
}

// cut makes the switch drop every frame between the two ports of each pair, both ways.
func (p *StoragePair) cut(what string, pairs ...[2]string) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.partitioned {
		return errors.New("the bed is already partitioned: Heal first")
	}
	var rules strings.Builder
	for _, pr := range pairs {
		fmt.Fprintf(&rules, "\t\tiifname %q oifname %q drop\n\t\tiifname %q oifname %q drop\n", pr[0], pr[1], pr[1], pr[0])
	}
	script := fmt.Sprintf("table bridge %s {\n\tchain forward {\n\t\ttype filter hook forward priority -10; policy accept;\n%s\t}\n}\n",
		partitionTable, rules.String())
	if err := p.nft(script); err != nil {
		return fmt.Errorf("Failed to cut %s: %w", what, err)
	}
	p.partitioned = true
	return nil
}

// Heal lifts a Partition.
func (p *StoragePair) Heal() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.partitioned {
		return nil
	}
	if err := p.nft(fmt.Sprintf("delete table bridge %s\n", partitionTable)); err != nil {
		return fmt.Errorf("Failed to heal the link between the controllers: %w", err)
	}
	p.partitioned = false
	return nil
}

func (p *StoragePair) nft(script string) error {
	cmd := exec.Command("ip", "netns", "exec", p.Bed.Switch, "nft", "-f", "-")
	cmd.Stdin = strings.NewReader(script)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("nft in %s: %w: %s", p.Bed.Switch, err, bytes.TrimSpace(out))
	}
	return nil
}

// PairVolume is the part of a controller's volume JSON (GET /v1/volumes/NAME) that
// tests of mirroring look at.
type PairVolume struct {
	Name       string      `json:"name"`
	Kind       string      `json:"kind"`
	Size       int64       `json:"size"`
	NBDAddress string      `json:"nbd_address"`
	Mirror     *MirrorInfo `json:"mirror"`
}

// MirrorInfo is a volume's mirror state as one controller reports it.
type MirrorInfo struct {
	Role       string          `json:"role"`  // primary or secondary
	Epoch      uint64          `json:"epoch"` // changes when the pair splits or the primary moves
	State      string          `json:"state"` // synced, degraded, resyncing, stale, frozen, split
	Home       string          `json:"home"`
	Primary    string          `json:"primary"`
	DirtyBytes int64           `json:"dirty_bytes"`
	Resync     MirrorResync    `json:"resync"`
	Raw        json.RawMessage `json:"-"`
}

// MirrorResync is the progress of a volume's resync.
type MirrorResync struct {
	Done  int64 `json:"done"`
	Total int64 `json:"total"`
	Rate  int64 `json:"rate"` // bytes per second, 0 = unlimited
}

// NBDHostPort splits the volume's nbd_address.
func (v *PairVolume) NBDHostPort() (string, int, error) {
	host, port, ok := strings.Cut(v.NBDAddress, ":")
	if !ok || host == "" {
		return "", 0, fmt.Errorf("volume %s has no usable nbd_address %q", v.Name, v.NBDAddress)
	}
	var n int
	if _, err := fmt.Sscan(port, &n); err != nil || n <= 0 || n > 65535 {
		return "", 0, fmt.Errorf("volume %s: bad port in nbd_address %q", v.Name, v.NBDAddress)
	}
	return host, n, nil
}

// Get decodes the JSON answer of GET path on the controller's admin API into out.
func (c *PairController) Get(ctx context.Context, path string, out any) error {
	return c.call(ctx, http.MethodGet, path, nil, out)
}

// Post sends in as JSON to path on the controller's admin API and decodes the answer into out (if not nil).
func (c *PairController) Post(ctx context.Context, path string, in, out any) error {
	return c.call(ctx, http.MethodPost, path, in, out)
}

// Delete sends DELETE path to the controller's admin API.
func (c *PairController) Delete(ctx context.Context, path string) error {
	return c.call(ctx, http.MethodDelete, path, nil, nil)
}

// GetText returns the body of GET path on the controller's admin API (e.g. /metrics).
func (c *PairController) GetText(ctx context.Context, path string) (string, error) {
	var b rawBody
	if err := c.call(ctx, http.MethodGet, path, nil, &b); err != nil {
		return "", err
	}
	return string(b), nil
}

// rawBody receives an answer that is not JSON.
type rawBody []byte

func (c *PairController) call(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return fmt.Errorf("Failed to encode the request to %s: %w", c.Name, err)
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, c.URL+path, body)
	if err != nil {
		return err
	}
	req.Header.Set("Authorization", "Bearer "+c.Token)
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	client := http.DefaultClient
	if c.pair != nil && c.pair.client != nil {
		client = c.pair.client
	}
	resp, err := client.Do(req)
	if err != nil {
		return fmt.Errorf("%s %s on %s: %w", method, path, c.Name, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return fmt.Errorf("%s %s on %s: %w", method, path, c.Name, err)
	}
	if resp.StatusCode/100 != 2 {
		return fmt.Errorf("%s %s on %s: %s: %s", method, path, c.Name, resp.Status, bytes.TrimSpace(b))
	}
	if out == nil {
		return nil
	}
	if raw, ok := out.(*rawBody); ok {
		*raw = b
		return nil
	}
	if err := json.Unmarshal(b, out); err != nil {
		return fmt.Errorf("%s %s on %s: bad JSON answer: %w: %.300s", method, path, c.Name, err, b)
	}
	return nil
}

// Volume returns the controller's view of a volume.
func (c *PairController) Volume(ctx context.Context, name string) (*PairVolume, error) {
	var raw json.RawMessage
	if err := c.Get(ctx, "/v1/volumes/"+url.PathEscape(name), &raw); err != nil {
		return nil, err
	}
	var v PairVolume
	var m struct {
		Mirror json.RawMessage `json:"mirror"`
	}
	if err := json.Unmarshal(raw, &v); err != nil {
		return nil, fmt.Errorf("%s: bad volume JSON: %w: %.300s", c.Name, err, raw)
	}
	if err := json.Unmarshal(raw, &m); err == nil && v.Mirror != nil {
		v.Mirror.Raw = m.Mirror
	}
	return &v, nil
}

// Stats returns the controller's /v1/stats as a generic map (counters are float64).
func (c *PairController) Stats(ctx context.Context) (map[string]any, error) {
	var m map[string]any
	if err := c.Get(ctx, "/v1/stats", &m); err != nil {
		return nil, err
	}
	return m, nil
}

// ResyncBytes returns the controller's mirror_resync_bytes counter.
func (c *PairController) ResyncBytes(ctx context.Context) (int64, error) {
	m, err := c.Stats(ctx)
	if err != nil {
		return 0, err
	}
	v, ok := m["mirror_resync_bytes"].(float64)
	if !ok {
		return 0, fmt.Errorf("%s: /v1/stats has no numeric mirror_resync_bytes", c.Name)
	}
	return int64(v), nil
}

// CLI runs `grow storage --controller URL --token TOKEN ARGS...` against this
// controller and returns its combined output.
func (c *PairController) CLI(ctx context.Context, args ...string) (string, error) {
	argv := []string{"storage", "--controller", c.URL, "--token", c.Token}
	if c.pair != nil && c.pair.PKI != nil {
		argv = append(argv, "--ca-cert", c.pair.PKI.CA)
	}
	argv = append(argv, args...)
	cmd := exec.CommandContext(ctx, GrowBinary(c.t), argv...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("grow storage %s (on %s): %w: %s", strings.Join(args, " "), c.Name, err, bytes.TrimSpace(out))
	}
	return string(out), nil
}

// PairView is a volume as both controllers see it at one moment (nil where a
// controller is down or did not answer).
type PairView struct {
	Vol  [2]*PairVolume
	Errs [2]error
}

// View asks both running controllers about a volume.
func (p *StoragePair) View(ctx context.Context, name string) PairView {
	var v PairView
	var wg sync.WaitGroup
	for k, c := range p.Ctl {
		if !c.Running() {
			v.Errs[k] = fmt.Errorf("%s is not running", c.Name)
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			v.Vol[k], v.Errs[k] = c.Volume(ctx, name)
		}()
	}
	wg.Wait()
	return v
}

// Primary returns the controller that acts as primary of the volume: the one whose own
// report says role primary and, if both answer, on which both agree.
func (v PairView) Primary(p *StoragePair) (*PairController, error) {
	var found *PairController
	for k, vol := range v.Vol {
		if vol == nil || vol.Mirror == nil {
			continue
		}
		if vol.Mirror.Role == "primary" {
			if found != nil {
				return nil, fmt.Errorf("both controllers report themselves primary (epochs %d and %d)",
					v.Vol[0].Mirror.Epoch, v.Vol[1].Mirror.Epoch)
			}
			found = p.Ctl[k]
		}
	}
	if found == nil {
		return nil, fmt.Errorf("no running controller is primary: %s", v)
	}
	return found, nil
}

// Synced reports whether both controllers answer, agree on the primary and epoch,
// and both report the volume synced.
func (v PairView) Synced() bool {
	for _, vol := range v.Vol {
		if vol == nil || vol.Mirror == nil || vol.Mirror.State != "synced" {
			return false
		}
	}
	a, b := v.Vol[0].Mirror, v.Vol[1].Mirror
	return a.Primary == b.Primary && a.Epoch == b.Epoch && a.Role != b.Role
}

// String describes the view for test failures.
func (v PairView) String() string {
	var parts []string
	for k, vol := range v.Vol {
		switch {
		case v.Errs[k] != nil:
			parts = append(parts, fmt.Sprintf("[%d: %v]", k, v.Errs[k]))
		case vol == nil:
			parts = append(parts, fmt.Sprintf("[%d: -]", k))
		case vol.Mirror == nil:
			parts = append(parts, fmt.Sprintf("[%d: %s nbd=%s, no mirror object]", k, vol.Name, vol.NBDAddress))
		default:
			parts = append(parts, fmt.Sprintf("[%d: %s nbd=%s mirror=%s]", k, vol.Name, vol.NBDAddress, vol.Mirror.Raw))
		}
	}
	return strings.Join(parts, " ")
}

// WaitVolume polls both controllers until cond holds for the volume's view, and
// returns that view, or the last one with an error after timeout.
func (p *StoragePair) WaitVolume(name string, timeout time.Duration, what string, cond func(PairView) bool) (PairView, error) {
	deadline := time.Now().Add(timeout)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		v := p.View(ctx, name)
		cancel()
		if cond(v) {
			return v, nil
		}
		if time.Now().After(deadline) {
			return v, fmt.Errorf("volume %s: %s not reached within %s: %s", name, what, timeout, v)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// WaitSynced waits until both controllers report the volume synced.
func (p *StoragePair) WaitSynced(name string, timeout time.Duration) (PairView, error) {
	return p.WaitVolume(name, timeout, "synced on both controllers", PairView.Synced)
}

// PID returns the process id of the daemon's current process (0 if it never started).
func (d *Daemon) PID() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.cmd == nil || d.cmd.Process == nil {
		return 0
	}
	return d.cmd.Process.Pid
}

// PairStatus is the part of GET /v1/mirror that the bed looks at.
type PairStatus struct {
	Name             string `json:"name"`
	Partner          string `json:"partner"`
	PartnerReachable bool   `json:"partner_reachable"`
	WitnessReachable bool   `json:"witness_reachable"`
	Fenced           bool   `json:"fenced"`
}

// Status returns the controller's view of the pair (GET /v1/mirror).
func (c *PairController) Status(ctx context.Context) (*PairStatus, error) {
	var s PairStatus
	if err := c.Get(ctx, "/v1/mirror", &s); err != nil {
		return nil, err
	}
	return &s, nil
}

// WaitPaired waits until each controller reports its partner and the witness reachable.
func (p *StoragePair) WaitPaired(timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		var last []string
		ok := true
		for _, c := range p.Ctl {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			s, err := c.Status(ctx)
			cancel()
			switch {
			case err != nil:
				ok = false
				last = append(last, err.Error())
			case !s.PartnerReachable || !s.WitnessReachable:
				ok = false
				last = append(last, fmt.Sprintf("%s: partner reachable %v, witness reachable %v", c.Name, s.PartnerReachable, s.WitnessReachable))
			}
		}
		if ok {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("the controllers are not paired after %s: %s", timeout, strings.Join(last, "; "))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// CreateVolume creates a volume through controller c and waits until the pair reports it synced.
func (p *StoragePair) CreateVolume(c *PairController, name string, size int64) (PairView, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := c.Post(ctx, "/v1/volumes", map[string]any{"name": name, "size": size}, nil); err != nil {
		return PairView{}, fmt.Errorf("Failed to create volume %s on %s: %w", name, c.Name, err)
	}
	return p.WaitSynced(name, 60*time.Second)
}

// PrimaryOf returns the controller that is the volume's primary now.
func (p *StoragePair) PrimaryOf(name string) (*PairController, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	pc, err := p.View(ctx, name).Primary(p)
	if err != nil {
		return nil, fmt.Errorf("volume %s: %w", name, err)
	}
	return pc, nil
}
