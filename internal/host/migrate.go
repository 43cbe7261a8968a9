package host

import (
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/growserver/grow/internal/host/agentclient"
	"github.com/growserver/grow/internal/host/hostapi"
	"github.com/growserver/grow/internal/network"
	"golang.org/x/sys/unix"
)

// operation is a long-running task with progress that can be cancelled.
type operation struct {
	mu     sync.Mutex
	op     hostapi.Operation
	cancel context.CancelFunc
}

func (o *operation) snapshot() hostapi.Operation {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.op
}

func (o *operation) update(f func(op *hostapi.Operation)) {
	o.mu.Lock()
	defer o.mu.Unlock()
	f(&o.op)
	o.op.Updated = time.Now().UTC()
}

func newOpID() string {
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// Operation returns an operation by id.
func (a *Agent) Operation(id string) (hostapi.Operation, error) {
	a.mu.Lock()
	o := a.ops[id]
	a.mu.Unlock()
	if o == nil {
		return hostapi.Operation{}, fmt.Errorf("Operation %q: %w", id, ErrNotFound)
	}
	return o.snapshot(), nil
}

// CancelOperation asks a running operation to stop; it ends as "cancelled".
func (a *Agent) CancelOperation(id string) error {
	a.mu.Lock()
	o := a.ops[id]
	a.mu.Unlock()
	if o == nil {
		return fmt.Errorf("Operation %q: %w", id, ErrNotFound)
	}
	if o.snapshot().Status != hostapi.OpRunning {
		return fmt.Errorf("Operation %q already ended: %w", id, ErrConflict)
	}
	o.cancel()
	return nil
}

// migrationTLSFiles are the credentials of --migration-tls-dir, in QEMU's tls-creds-x509
// layout: the server pair for incoming streams, the client pair for outgoing ones.
var migrationTLSFiles = []string{"ca-cert.pem", "server-cert.pem", "server-key.pem", "client-cert.pem", "client-key.pem"}

// migrationTLSID is the id of the tls-creds-x509 object of a QEMU's migration stream.
const migrationTLSID = "grow-migration-tls"

// migrationTLS makes a QEMU's migration stream TLS when this host has credentials:
// endpoint "server" (incoming: the source must present a certificate of the CA) or
// "client" (outgoing: the destination's certificate must name peer).
func (a *Agent) migrationTLS(ctx context.Context, exec func(context.Context, string, any, any) error, endpoint, peer string) error {
	dir := a.cfg.MigrationTLSDir
	if dir == "" {
		return nil
	}
	// A QEMU that migrated out before (and came back, or failed) has the object already.
	_ = exec(ctx, "object-del", map[string]any{"id": migrationTLSID}, nil)
	obj := map[string]any{"qom-type": "tls-creds-x509", "id": migrationTLSID, "dir": dir, "endpoint": endpoint, "verify-peer": true}
	if err := exec(ctx, "object-add", obj, nil); err != nil {
		return fmt.Errorf("Failed to load the migration TLS credentials of %s: %w", dir, err)
	}
	params := map[string]any{"tls-creds": migrationTLSID}
	if peer != "" {
		params["tls-hostname"] = peer
	}
	if err := exec(ctx, "migrate-set-parameters", params, nil); err != nil {
		return fmt.Errorf("Failed to make the migration stream TLS: %w", err)
	}
	return nil
}

// PrepareIncoming defines a VM from spec and starts its QEMU waiting for a migration
// on listenHost; it returns the URI the source must migrate to.
func (a *Agent) PrepareIncoming(ctx context.Context, req hostapi.IncomingRequest) (hostapi.IncomingReply, error) {
	if net.ParseIP(req.ListenHost) == nil {
		return hostapi.IncomingReply{}, fmt.Errorf("%w: listen_host %q is not an IP address", ErrInvalid, req.ListenHost)
	}
	switch mine := a.cfg.MigrationTLSDir != ""; {
	case req.TLS && !mine:
		return hostapi.IncomingReply{}, fmt.Errorf("%w: the source migrates over TLS but this host has no --migration-tls-dir", ErrInvalid)
	case !req.TLS && mine:
		return hostapi.IncomingReply{}, fmt.Errorf("%w: this host accepts migrations only over TLS; give the source host --migration-tls-dir", ErrInvalid)
	}
	ph := newPhases()
	if _, err := a.defineAs(req.Spec, req.Counters, false); err != nil {
		return hostapi.IncomingReply{}, err
	}
	ph.mark("defined")
	v, err := a.get(req.Spec.Name)
	if err != nil {
		return hostapi.IncomingReply{}, err
	}
	uri, err := v.listenIncoming(ctx, req.ListenHost, ph)
	a.log.Info("Incoming migration prepared", "vm", req.Spec.Name, "uri", uri, "tls", req.TLS, "phases", ph.String(), "err", err)
	if err != nil {
		_ = a.Delete(context.Background(), req.Spec.Name, true)
		return hostapi.IncomingReply{}, err
	}
	return hostapi.IncomingReply{URI: uri}, nil
}

func (v *vm) listenIncoming(ctx context.Context, host string, ph *phases) (string, error) {
	v.opMu.Lock()
	defer v.opMu.Unlock()
	if err := v.startLockedTraced(ctx, true, ph); err != nil {
		return "", err
	}
	ph.mark("started")
	inst := v.instance()
	if err := setMigrationCaps(ctx, inst.Monitor.Execute); err != nil {
		return "", err
	}
	// Announce the guest's new port (RARP, and the guest's own gratuitous ARP) 5 ms
	// after it resumes here instead of QEMU's default 50 ms, then 4 more times.
	announce := map[string]any{"announce-initial": 5, "announce-step": 50, "announce-rounds": 5, "announce-max": 200}
	if err := inst.Monitor.Execute(ctx, "migrate-set-parameters", announce, nil); err != nil {
		return "", fmt.Errorf("Failed to set announce parameters: %w", err)
	}
	if err := v.a.migrationTLS(ctx, inst.Monitor.Execute, "server", ""); err != nil {
		return "", err
	}
	// The port is picked here and handed to QEMU: another process could take it in
	// between, in which case migrate-incoming fails and the source sees the error.
	port, err := freePort(host)
	if err != nil {
		return "", err
	}
	uri := "tcp:" + net.JoinHostPort(host, strconv.Itoa(port))
	if err := inst.Monitor.Execute(ctx, "migrate-incoming", map[string]any{"uri": uri}, nil); err != nil {
		return "", fmt.Errorf("Failed to listen for migration of %q on %s: %w", v.name, uri, err)
	}
	ph.mark("listening")
	v.armArrival(host, port, uri)
	ph.mark("armed")
	return uri, nil
}

// Announce points the network at this host for a VM that is arriving (its QEMU
// waits for or runs after a migration): frames for it then queue at its taps here
// until the guest runs.
func (a *Agent) Announce(name string) error {
	v, err := a.get(name)
	if err != nil {
		return err
	}
	info := v.info()
	if v.instance() == nil || (info.State != hostapi.StateIncoming && info.State != hostapi.StateRunning) {
		return fmt.Errorf("VM %q is %s: %w", name, info.State, ErrConflict)
	}
	t0 := time.Now()
	v.mu.Lock()
	arr := v.arrival
	v.mu.Unlock()
	if arr != nil {
		arr.announce()
	} else {
		v.announce(info.Spec.NICs, info.Taps)
	}
	a.log.Info("Announced arriving VM", "vm", name, "at", t0.Format("15:04:05.000000"), "us", time.Since(t0).Microseconds())
	return nil
}

// arrival is the announcement of a VM migrating in, prepared before the migration
// starts: at the source's switch-over signal (one UDP datagram) it points the network
// at this host's taps in a few system calls, without an HTTP request, a link lookup
// or a new socket while both QEMUs compete for the CPU.
type arrival struct {
	v    *vm
	anns []*network.Announcer
	conn *net.UDPConn // the switch-over signal's socket; nil without one
	want []byte       // the only datagram that fires it
	// reply is sent back to source, the sender of the signal, once the guest runs here.
	reply  []byte
	mu     sync.Mutex
	source *net.UDPAddr
	done   bool
}

// The two datagrams of a migration's switch-over: the source's "the guest stopped
// here" and the destination's reply "the guest runs here".
const (
	signalSwitchover = "SWITCHOVER"
	signalResumed    = "RESUMED"
)

// signalDatagram is datagram kind for VM name migrating to uri: keyed with the
// destination agent's API token, so that only a holder of the token (whoever may
// call its API) can make it.
func signalDatagram(kind, token, name, uri string) []byte {
	m := hmac.New(sha256.New, []byte(token))
	m.Write([]byte(kind + "\n" + name + "\n" + uri))
	return append([]byte("GROW-"+kind+"-1\n"), m.Sum(nil)...)
}

// apiToken is this agent's API token (DATA/admin.token, which `grow hostd` keeps).
func (a *Agent) apiToken() (string, error) {
	b, err := os.ReadFile(filepath.Join(a.cfg.DataDir, "admin.token"))
	if err != nil {
		return "", fmt.Errorf("Failed to read the API token: %w", err)
	}
	tok := strings.TrimSpace(string(b))
	if tok == "" {
		return "", fmt.Errorf("The API token file is empty")
	}
	return tok, nil
}

// armArrival prepares the announcement of this incoming VM and listens for the
// source's switch-over signal on UDP host:port (the port of the migration stream).
// What cannot be prepared is logged and left to the announcement when the guest
// resumes here.
func (v *vm) armArrival(host string, port int, uri string) {
	info := v.info()
	arr := &arrival{v: v}
	for i, n := range info.Spec.NICs {
		if i >= len(info.Taps) {
			break
		}
		an, err := network.NewAnnouncer(n.Bridge, info.Taps[i], n.MAC)
		if err != nil {
			v.a.log.Warn("Cannot prepare the announcement of an arriving NIC", "vm", v.name, "tap", info.Taps[i], "err", err)
			continue
		}
		arr.anns = append(arr.anns, an)
	}
	if tok, err := v.a.apiToken(); err != nil {
		v.a.log.Warn("No switch-over signal for an arriving VM", "vm", v.name, "err", err)
	} else if conn, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.ParseIP(host), Port: port}); err != nil {
		v.a.log.Warn("No switch-over signal for an arriving VM", "vm", v.name, "err", err)
	} else {
		arr.conn = conn
		arr.want = signalDatagram(signalSwitchover, tok, v.name, uri)
		arr.reply = signalDatagram(signalResumed, tok, v.name, uri)
		go arr.listen()
	}
	v.mu.Lock()
	old := v.arrival
	v.arrival = arr
	v.mu.Unlock()
	if old != nil {
		old.close()
	}
}

// listen waits for the switch-over signal and announces once it comes.
func (r *arrival) listen() {
	buf := make([]byte, 256)
	warned := false
	for {
		n, from, err := r.conn.ReadFromUDP(buf)
		if err != nil {
			return // closed
		}
		if !hmac.Equal(buf[:n], r.want) {
			if !warned {
				warned = true
				r.v.a.log.Warn("Ignoring a bad switch-over signal", "vm", r.v.name, "from", from.String())
			}
			continue
		}
		t0 := time.Now()
		r.announce()
		r.mu.Lock()
		r.source = from
		r.mu.Unlock()
		r.v.a.log.Info("Announced arriving VM at the source's switch-over", "vm", r.v.name,
			"at", t0.Format("15:04:05.000000"), "us", time.Since(t0).Microseconds())
		return // the socket stays open for the reply
	}
}

// announce points the network at this host for every prepared NIC.
func (r *arrival) announce() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.done {
		return
	}
	for _, an := range r.anns {
		if err := an.Announce(); err != nil {
			r.v.a.log.Warn("Failed to announce an arriving NIC", "vm", r.v.name, "err", err)
		}
	}
}

// resumed tells the source that signalled the switch-over that the guest runs here,
// so that it need not poll for it.
func (r *arrival) resumed() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.done || r.conn == nil || r.source == nil {
		return
	}
	if _, err := r.conn.WriteToUDP(r.reply, r.source); err != nil {
		r.v.a.log.Warn("Failed to tell the source that the guest runs here", "vm", r.v.name, "err", err)
	}
}

// close stops listening and releases the prepared sockets.
func (r *arrival) close() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.done {
		return
	}
	r.done = true
	if r.conn != nil {
		_ = r.conn.Close()
	}
	for _, an := range r.anns {
		_ = an.Close()
	}
}

// takeArrival detaches the VM's prepared announcement, if any (the caller closes it).
func (v *vm) takeArrival() *arrival {
	v.mu.Lock()
	defer v.mu.Unlock()
	arr := v.arrival
	v.arrival = nil
	return arr
}

// switchoverSignal is the source's side: a connected UDP socket, the datagram that
// makes the destination announce the guest, and the reply that says it runs there.
type switchoverSignal struct {
	conn    *net.UDPConn
	msg     []byte
	resumed []byte
	// noReply is set once the socket failed (nothing listens there): no reply will come.
	noReply bool
}

// newSwitchoverSignal prepares the signal for VM name migrating to uri ("tcp:HOST:PORT").
func newSwitchoverSignal(token, name, uri string) (*switchoverSignal, error) {
	hp, ok := strings.CutPrefix(uri, "tcp:")
	if !ok {
		return nil, fmt.Errorf("Migration URI %q is not tcp:HOST:PORT", uri)
	}
	addr, err := net.ResolveUDPAddr("udp", hp)
	if err != nil {
		return nil, fmt.Errorf("Bad migration address %q: %w", hp, err)
	}
	conn, err := net.DialUDP("udp", nil, addr)
	if err != nil {
		return nil, fmt.Errorf("Failed to open the switch-over signal to %s: %w", hp, err)
	}
	return &switchoverSignal{conn: conn, msg: signalDatagram(signalSwitchover, token, name, uri),
		resumed: signalDatagram(signalResumed, token, name, uri)}, nil
}

// send fires the signal (one datagram: the destination also announces when the guest
// resumes there, should this one be lost).
func (s *switchoverSignal) send() {
	_, _ = s.conn.Write(s.msg)
}

// waitResumed waits up to d for the destination's reply that the guest runs there;
// it returns at once (false) when none can come.
func (s *switchoverSignal) waitResumed(d time.Duration) bool {
	if s.noReply {
		time.Sleep(min(d, 5*time.Millisecond))
		return false
	}
	deadline := time.Now().Add(d)
	_ = s.conn.SetReadDeadline(deadline)
	buf := make([]byte, 256)
	for {
		n, err := s.conn.Read(buf)
		if err != nil {
			var ne net.Error
			if !errors.As(err, &ne) || !ne.Timeout() {
				s.noReply = true
			}
			return false
		}
		if hmac.Equal(buf[:n], s.resumed) {
			return true
		}
	}
}

func (s *switchoverSignal) close() { _ = s.conn.Close() }

// setMigrationCaps sets the capabilities both ends of a migration must agree on.
func setMigrationCaps(ctx context.Context, exec func(context.Context, string, any, any) error) error {
	caps := []map[string]any{
		{"capability": "events", "state": true},
	}
	if err := exec(ctx, "migrate-set-capabilities", map[string]any{"capabilities": caps}, nil); err != nil {
		return fmt.Errorf("Failed to set migration capabilities: %w", err)
	}
	return nil
}

// Migrate starts moving a running VM to the agent at req.TargetURL and returns the
// operation that tracks it. On any failure or cancel the VM keeps running here and the
// destination is cleaned up; on success the destination owns the VM and this agent
// forgets it.
func (a *Agent) Migrate(ctx context.Context, name string, req hostapi.MigrateRequest) (hostapi.Operation, error) {
	v, err := a.get(name)
	if err != nil {
		return hostapi.Operation{}, err
	}
	if net.ParseIP(req.ListenHost) == nil {
		return hostapi.Operation{}, fmt.Errorf("%w: listen_host %q is not an IP address", ErrInvalid, req.ListenHost)
	}
	target, err := agentclient.NewWithCAPEM(req.TargetURL, req.TargetToken, req.TargetCACert)
	if err != nil {
		return hostapi.Operation{}, fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	if req.DowntimeLimitMS == 0 {
		req.DowntimeLimitMS = 50
	}
	if req.DowntimeLimitMS < 1 || req.DowntimeLimitMS > 60000 || req.BandwidthMiBps < 0 {
		return hostapi.Operation{}, fmt.Errorf("%w: downtime_limit_ms must be 1-60000 and bandwidth_mibps >= 0", ErrInvalid)
	}
	if !v.opMu.TryLock() {
		return hostapi.Operation{}, fmt.Errorf("VM %q is busy with another operation: %w", name, ErrConflict)
	}
	if v.instance() == nil || v.state() != hostapi.StateRunning {
		st := v.state()
		v.opMu.Unlock()
		return hostapi.Operation{}, fmt.Errorf("VM %q is %s, not running: %w", name, st, ErrConflict)
	}
	v.mu.Lock()
	hot := v.hotplugged
	v.mu.Unlock()
	if hot {
		v.opMu.Unlock()
		return hostapi.Operation{}, fmt.Errorf("VM %q has hot-added memory or vCPUs; restart it before migrating: %w", name, ErrConflict)
	}
	octx, cancel := context.WithCancel(context.Background())
	now := time.Now().UTC()
	o := &operation{cancel: cancel, op: hostapi.Operation{ID: newOpID(), Kind: "migrate", VM: name,
		Status: hostapi.OpRunning, Created: now, Updated: now}}
	a.mu.Lock()
	a.ops[o.op.ID] = o
	a.mu.Unlock()
	go func() {
		defer v.opMu.Unlock()
		defer cancel()
		err := v.migrate(octx, o, target, req)
		o.update(func(op *hostapi.Operation) {
			switch {
			case err == nil:
				op.Status, op.Progress = hostapi.OpSucceeded, 1
			case octx.Err() != nil:
				op.Status, op.Error = hostapi.OpCancelled, err.Error()
			default:
				op.Status, op.Error = hostapi.OpFailed, err.Error()
			}
		})
		if err != nil {
			a.log.Warn("Migration failed; the VM stays here", "vm", name, "err", err)
		} else {
			a.log.Info("Migration done", "vm", name, "target", req.TargetURL)
		}
	}()
	return o.snapshot(), nil
}

func (v *vm) migrate(ctx context.Context, o *operation, target *agentclient.Client, req hostapi.MigrateRequest) (err error) {
	inst := v.instance()
	mon := inst.Monitor
	bg := context.Background()
	spec := v.info().Spec
	o.update(func(op *hostapi.Operation) { op.Message = "preparing destination" })
	ph := newPhases()
	defer func() { v.a.log.Info("Migration timing", "vm", v.name, "ok", err == nil, "phases", ph.String()) }()
	reply, err := target.PrepareIncoming(ctx, hostapi.IncomingRequest{Spec: spec, ListenHost: req.ListenHost, Counters: v.counters(),
		TLS: v.a.cfg.MigrationTLSDir != ""})
	if err != nil {
		return fmt.Errorf("Failed to prepare the destination: %w", err)
	}
	ph.mark("prepared")
	destOwns := false
	defer func() {
		if err != nil && !destOwns {
			cctx, cancel := context.WithTimeout(bg, 30*time.Second)
			defer cancel()
			if derr := target.Delete(cctx, spec.Name, true); derr != nil && !agentclient.IsNotFound(derr) {
				err = fmt.Errorf("%w (and cleaning the destination failed: %v)", err, derr)
			}
		}
	}()
	if err := setMigrationCaps(ctx, mon.Execute); err != nil {
		return err
	}
	caps := []map[string]any{{"capability": "auto-converge", "state": true}}
	if err := mon.Execute(ctx, "migrate-set-capabilities", map[string]any{"capabilities": caps}, nil); err != nil {
		return fmt.Errorf("Failed to enable auto-converge: %w", err)
	}
	bw := int64(req.BandwidthMiBps) << 20
	if bw == 0 {
		bw = 100 << 30 // effectively unlimited
	}
	params := map[string]any{"downtime-limit": req.DowntimeLimitMS, "max-bandwidth": bw}
	if err := mon.Execute(ctx, "migrate-set-parameters", params, nil); err != nil {
		return fmt.Errorf("Failed to set migration parameters: %w", err)
	}
	if err := v.a.migrationTLS(ctx, mon.Execute, "client", req.ListenHost); err != nil {
		return err
	}
	ph.mark("params")
	// Remember where the guest is going, so that a restarted agent can settle it.
	v.mu.Lock()
	v.rec.State = hostapi.StateMigrating
	v.rec.MigratingTo = &migrationTarget{URL: req.TargetURL, Token: req.TargetToken, CACert: req.TargetCACert}
	perr := v.persistDurableLocked()
	v.mu.Unlock()
	if perr != nil {
		v.setState(hostapi.StateRunning)
		return perr
	}
	ph.mark("persisted")
	// At the switch-over (the guest's STOP here) the destination is told at once, from
	// QEMU's event, to point the network at its taps; without the signal's socket
	// the agent asks through the destination's API instead (slower, off that path).
	sw, serr := newSwitchoverSignal(req.TargetToken, spec.Name, reply.URI)
	if serr != nil {
		v.a.log.Warn("No switch-over signal; announcing through the API", "vm", v.name, "err", serr)
	}
	events := make(chan migEvent, 16)
	v.mu.Lock()
	v.migEvents = events
	if sw != nil {
		v.onSwitchover = sw.send
	}
	v.mu.Unlock()
	announced := false
	defer func() {
		v.mu.Lock()
		v.migEvents = nil
		v.onSwitchover = nil
		v.mu.Unlock()
		if sw != nil {
			sw.close()
		}
		if err != nil && !destOwns {
			v.resumeAfterFailedMigration()
			if announced {
				// The network was pointed at the destination: point it back here.
				info := v.info()
				v.announce(info.Spec.NICs, info.Taps)
			}
		}
		v.mu.Lock()
		v.rec.MigratingTo = nil
		_ = v.persistLocked()
		v.mu.Unlock()
	}()
	o.update(func(op *hostapi.Operation) { op.Message = "migrating to " + reply.URI })
	if err := mon.Execute(ctx, "migrate", map[string]any{"uri": reply.URI}, nil); err != nil {
		return fmt.Errorf("Failed to start migration to %s: %w", reply.URI, err)
	}
	ph.mark("migrate")
	seen := false
	for {
		select {
		case <-ctx.Done():
			_ = mon.Execute(bg, "migrate_cancel", nil, nil)
			v.waitMigrationEnd(bg)
			return fmt.Errorf("Migration cancelled")
		case <-inst.Exited():
			return fmt.Errorf("QEMU exited during migration: %s", inst.ExitReason())
		case ev := <-events:
			st := ev.state
			ph.markAt("qemu_"+st, ev.at)
			ph.mark("seen_" + st)
			// "stop" (or "device"): the guest has just stopped here for the switch-over.
			// Point the network at the destination now, so that frames for the guest
			// wait in its taps there (QEMU reads them once the guest runs) instead of
			// being lost in ours.
			if (st == "stop" || st == "device") && !announced {
				announced = true
				if sw != nil {
					continue // signalled from QEMU's event already
				}
				go func() {
					actx, cancel := context.WithTimeout(bg, 5*time.Second)
					defer cancel()
					if err := target.Announce(actx, spec.Name); err != nil {
						v.a.log.Warn("Early announce on the destination failed", "vm", v.name, "err", err)
					}
					ph.mark("announced")
				}()
			}
			if st != "completed" && st != "failed" && st != "cancelled" {
				continue
			}
			// An end state: read the figures now rather than at the next poll.
		case <-time.After(migrationPoll):
		}
		info, err := mon.QueryMigrate(bg)
		if err != nil {
			_ = mon.Execute(bg, "migrate_cancel", nil, nil)
			return fmt.Errorf("Failed to query migration: %w", err)
		}
		if info.RAM != nil && info.RAM.Total > 0 {
			p := float64(info.RAM.Transferred) / float64(info.RAM.Total)
			if p > 0.99 {
				p = 0.99
			}
			o.update(func(op *hostapi.Operation) { op.Progress = p })
		}
		switch info.Status {
		case "setup", "active", "device", "pre-switchover":
			seen = true
		case "completed":
			// A QEMU that itself came in by migration reports that incoming
			// migration as completed (without a total time) until ours starts.
			if !seen && info.TotalTime == 0 {
				continue
			}
			// QEMU flags completion a moment before it records the times.
			for i := 0; i < 50 && info.TotalTime == 0; i++ {
				time.Sleep(2 * time.Millisecond)
				if again, err := mon.QueryMigrate(bg); err == nil {
					info = again
				}
			}
			ph.mark("completed")
			ph.note(fmt.Sprintf("qemu total=%d setup=%d down=%d", info.TotalTime, info.SetupTime, info.Downtime))
			o.update(func(op *hostapi.Operation) {
				op.TotalTimeMS, op.DowntimeMS, op.SetupTimeMS = info.TotalTime, info.Downtime, info.SetupTime
				if info.RAM != nil {
					op.TransferredBytes, op.DirtySyncs = info.RAM.Transferred, info.RAM.DirtySync
				}
			})
			return v.finishMigration(bg, o, target, spec.Name, &destOwns, ph, sw)
		case "failed", "cancelled":
			return fmt.Errorf("Migration %s: %s", info.Status, info.ErrorDesc)
		}
	}
}

// waitMigrationEnd waits (briefly) for a cancelled migration to settle.
func (v *vm) waitMigrationEnd(ctx context.Context) {
	inst := v.instance()
	if inst == nil {
		return
	}
	for i := 0; i < 250; i++ {
		info, err := inst.Monitor.QueryMigrate(ctx)
		if err != nil || (info.Status != "active" && info.Status != "cancelling" && info.Status != "setup" && info.Status != "device") {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// resumeAfterFailedMigration makes sure the guest runs here again.
func (v *vm) resumeAfterFailedMigration() {
	inst := v.instance()
	if inst == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if st, err := inst.Monitor.Status(ctx); err == nil && st != "running" {
		if err := inst.Monitor.Execute(ctx, "cont", nil, nil); err != nil {
			v.a.log.Error("Failed to resume VM after a failed migration", "vm", v.name, "status", st, "err", err)
		}
	}
	v.setState(hostapi.StateRunning)
	if st, err := inst.Monitor.Status(ctx); err == nil && st != "running" {
		v.setState(hostapi.StatePaused)
	}
}

// finishMigration checks that the guest runs on the destination, then ends the local
// QEMU and forgets the VM. If the destination never ran the guest, it is removed
// there and the guest resumes here.
func (v *vm) finishMigration(ctx context.Context, o *operation, target *agentclient.Client, name string, destOwns *bool, ph *phases, sw *switchoverSignal) error {
	deadline := time.Now().Add(15 * time.Second)
	for {
		// The destination says when the guest runs there (then one request confirms
		// it); without its reply, ask every 50 ms (every 5 ms without the signal).
		if sw == nil {
			time.Sleep(5 * time.Millisecond)
		} else if sw.waitResumed(50 * time.Millisecond) {
			ph.mark("resumed_signal")
		}
		vmi, err := target.Get(ctx, name)
		if err == nil && vmi.State == hostapi.StateRunning {
			break
		}
		if err == nil && vmi.State == hostapi.StateStopped {
			return fmt.Errorf("The destination QEMU exited after the migration: %s", vmi.ExitReason)
		}
		if time.Now().After(deadline) {
			if err != nil {
				return fmt.Errorf("The destination did not confirm the VM runs: %w", err)
			}
			return fmt.Errorf("The destination VM is %s, not running, 15 s after the migration", vmi.State)
		}
	}
	*destOwns = true
	ph.mark("dest_running")
	o.update(func(op *hostapi.Operation) { op.Message = "destination running; removing the source" })
	v.dropMigrated(ctx, ph)
	ph.mark("source_gone")
	return nil
}

// migrationPoll is how often a running migration's progress is read; its state
// changes come as QEMU events at once.
const migrationPoll = 100 * time.Millisecond

// exitMigratedAway is the exit reason of a source QEMU after its guest moved.
const exitMigratedAway = "migrated away"

// dropMigrated ends the local QEMU of a VM that now runs on another host and forgets it.
// ph (may be nil) records the steps.
func (v *vm) dropMigrated(ctx context.Context, ph *phases) {
	name := v.name
	inst := v.instance()
	v.mu.Lock()
	v.expectExit = exitMigratedAway
	v.mu.Unlock()
	if inst != nil {
		_ = inst.Quit(ctx) // returns once QEMU exited (killed after 3 s)
		ph.mark("exited")
		v.waitGone(inst, 5*time.Second)
		ph.mark("cleaned")
	}
	a := v.a
	a.mu.Lock()
	if a.vms[name] == v {
		delete(a.vms, name)
	}
	a.mu.Unlock()
	v.detach()
	a.cg.remove(name)
	if err := removeAll(v.dir); err != nil {
		a.log.Warn("Failed to remove files of migrated VM", "vm", name, "err", err)
	}
}

// recoverMigration settles a migration that a previous agent left in flight (the record
// names its destination): if the destination runs the guest, the local QEMU goes;
// otherwise the migration is cancelled, the destination's copy removed and the guest
// runs here.
func (v *vm) recoverMigration() {
	v.mu.Lock()
	mt := v.rec.MigratingTo
	v.mu.Unlock()
	inst := v.instance()
	if mt == nil || inst == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	log := v.a.log.With("vm", v.name, "target", mt.URL)
	target, err := agentclient.NewWithCAPEM(mt.URL, mt.Token, mt.CACert)
	if err != nil {
		log.Error("Cannot settle an interrupted migration", "err", err)
		return
	}
	info, err := inst.Monitor.QueryMigrate(ctx)
	if err == nil && info.Status != "completed" && info.Status != "failed" && info.Status != "cancelled" && info.Status != "none" {
		_ = inst.Monitor.Execute(ctx, "migrate_cancel", nil, nil)
		v.waitMigrationEnd(ctx)
		info, err = inst.Monitor.QueryMigrate(ctx)
	}
	if err == nil && info.Status == "completed" {
		// The guest may already run there: wait a little for the destination to say so.
		for i := 0; i < 100; i++ {
			vmi, gerr := target.Get(ctx, v.name)
			if gerr == nil && vmi.State == hostapi.StateRunning {
				log.Info("Interrupted migration had completed; the destination owns the VM")
				v.dropMigrated(ctx, nil)
				return
			}
			if gerr != nil || vmi.State != hostapi.StateIncoming {
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	if err := target.Delete(ctx, v.name, true); err != nil && !agentclient.IsNotFound(err) {
		// Never resume here while a copy that might run is left there.
		log.Error("Cannot remove the destination's copy of an interrupted migration; the VM stays paused here", "err", err)
		v.setState(hostapi.StatePaused)
		return
	}
	v.resumeAfterFailedMigration()
	v.mu.Lock()
	v.rec.MigratingTo = nil
	_ = v.persistDurableLocked()
	v.mu.Unlock()
	log.Info("Interrupted migration rolled back; the VM runs here")
}

// phases records when each step of a migration happened, for its timing log line.
type phases struct {
	mu    sync.Mutex
	t0    time.Time
	cpu0  time.Duration
	parts []string
}

func newPhases() *phases {
	t0 := time.Now()
	return &phases{t0: t0, cpu0: processCPU(), parts: []string{"t0=" + t0.Format("15:04:05.000000")}}
}

// processCPU is the CPU time the agent process has used so far.
func processCPU() time.Duration {
	var ru unix.Rusage
	if unix.Getrusage(unix.RUSAGE_SELF, &ru) != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// mark records that step name happened now, and the agent's CPU time used until then.
// A nil p records nothing.
func (p *phases) mark(name string) {
	if p == nil {
		return
	}
	p.markAt(name, time.Now())
	p.note(fmt.Sprintf("(cpu %.1f)", float64((processCPU()-p.cpu0).Microseconds())/1000))
}

// markAt records that step name happened at t.
func (p *phases) markAt(name string, t time.Time) {
	p.note(fmt.Sprintf("%s=%.1f", name, float64(t.Sub(p.t0).Microseconds())/1000))
}

// note adds free text to the record.
func (p *phases) note(s string) {
	p.mu.Lock()
	p.parts = append(p.parts, s)
	p.mu.Unlock()
}

func (p *phases) String() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return strings.Join(p.parts, " ")
}
