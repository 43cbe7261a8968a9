package jobs

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/growserver/grow/internal/host/hostapi"
	"github.com/growserver/grow/internal/revert"
	"github.com/growserver/grow/internal/scheduler"
	"github.com/growserver/grow/internal/store"
)

// CreateServerRequest is what `grow server create` asks for.
type CreateServerRequest struct {
	Name     string   `json:"name"`
	Customer string   `json:"customer"`
	Plan     string   `json:"plan"`
	Image    string   `json:"image"`
	SSHKeys  []string `json:"ssh_keys,omitempty"`
	UserData string   `json:"user_data,omitempty"`
	Group    string   `json:"group,omitempty"`
}

// ReadyPrefix starts the console line a guest prints when cloud-init is done.
const ReadyPrefix = "GROW-READY "

// CreateServer admits, places and records a new server and starts provisioning it in
// the background. With an idempotency key already used by actor, it returns the
// operation of that first request and created=false.
func (m *Manager) CreateServer(ctx context.Context, actor store.User, key string, req CreateServerRequest) (store.Operation, bool, error) {
	if key != "" {
		if op, err := m.st.OperationByKey(ctx, actor.ID+":"+key); err == nil {
			return op, false, nil
		} else if !errors.Is(err, store.ErrNotFound) {
			return store.Operation{}, false, err
		}
	}
	if !hostapi.ValidName(req.Name) {
		return store.Operation{}, false, fmt.Errorf("Invalid server name %q: use 1-63 lower-case letters, digits and dashes: %w", req.Name, ErrInvalid)
	}
	if req.Group != "" && !hostapi.ValidName(req.Group) {
		return store.Operation{}, false, fmt.Errorf("Invalid group %q: %w", req.Group, ErrInvalid)
	}
	for _, k := range req.SSHKeys {
		if !strings.HasPrefix(k, "ssh-") && !strings.HasPrefix(k, "ecdsa-") && !strings.HasPrefix(k, "sk-") {
			return store.Operation{}, false, fmt.Errorf("SSH key %.20q... is not an OpenSSH public key: %w", k, ErrInvalid)
		}
	}
	if req.UserData != "" && !strings.HasPrefix(req.UserData, "#cloud-config") {
		return store.Operation{}, false, fmt.Errorf("User data must be a #cloud-config document: %w", ErrInvalid)
	}
	if req.UserData != "" {
		var probe map[string]any
		if err := yaml.Unmarshal([]byte(req.UserData), &probe); err != nil {
			return store.Operation{}, false, fmt.Errorf("User data is not valid YAML: %v: %w", err, ErrInvalid)
		}
	}
	m.placeMu.Lock()
	defer m.placeMu.Unlock()
	var op store.Operation
	err := m.st.InTx(ctx, func(tx *store.Store) error {
		if err := tx.LockPlacement(ctx); err != nil {
			return err
		}
		cust, err := tx.GetCustomer(ctx, req.Customer)
		if err != nil {
			return err
		}
		if actor.Role == store.RoleCustomer && actor.CustomerID != cust.ID {
			return fmt.Errorf("Customer %q: %w", req.Customer, store.ErrNotFound)
		}
		plan, err := tx.GetPlan(ctx, req.Plan)
		if err != nil {
			return err
		}
		im, err := tx.GetImage(ctx, req.Image)
		if err != nil {
			return err
		}
		if im.State != store.ImageReady || im.StorageID == "" {
			return fmt.Errorf("Image %q is %s: %w", im.Name, im.State, ErrConflict)
		}
		n, err := tx.CountServers(ctx, cust.ID)
		if err != nil {
			return err
		}
		if cust.MaxServers > 0 && n >= cust.MaxServers {
			return fmt.Errorf("Customer %q already has %d of %d servers: %w", cust.Name, n, cust.MaxServers, ErrQuota)
		}
		sv := store.Server{ID: store.NewID("srv"), Name: req.Name, CustomerID: cust.ID, Plan: plan.Name, ImageID: im.ID,
			VCPUs: plan.VCPUs, MemoryBytes: plan.MemoryBytes, DiskBytes: max(plan.DiskBytes, im.SizeBytes),
			StorageID: im.StorageID, Group: req.Group, SSHKeys: req.SSHKeys, UserData: req.UserData, State: store.ServerCreating}
		sv.Volume = sv.ID
		snap, err := m.Snapshot(ctx, tx)
		if err != nil {
			return err
		}
		i, err := scheduler.Place(snap, requestOf(sv), m.cfg.Policy)
		if err != nil {
			return fmt.Errorf("Cannot place server %q (%d vCPUs, %d MiB): %w", sv.Name, sv.VCPUs, sv.MemoryBytes>>20, err)
		}
		sv.HostID = snap.Hosts[i].ID
		lease, _, err := tx.LeaseIP(ctx, 4, sv.ID)
		if err != nil {
			return err
		}
		sv.IPv4 = lease.Address
		if l6, _, err := tx.LeaseIP(ctx, 6, sv.ID); err == nil {
			sv.IPv6 = l6.Address
		} else if !errors.Is(err, store.ErrExhausted) {
			return err
		}
		if err := tx.CreateServer(ctx, &sv); err != nil {
			return err
		}
		op = store.Operation{Kind: KindCreate, ServerID: sv.ID, CustomerID: cust.ID, UserID: actor.ID, Step: "admitted", Progress: 5, Owner: m.cfg.Instance}
		if key != "" {
			op.IdempotencyKey = actor.ID + ":" + key
		}
		return tx.CreateOperation(ctx, &op)
	})
	if err != nil {
		if key != "" && errors.Is(err, store.ErrConflict) {
			// A concurrent request with the same key won the race.
			if prev, perr := m.st.OperationByKey(ctx, actor.ID+":"+key); perr == nil {
				return prev, false, nil
			}
		}
		return store.Operation{}, false, err
	}
	m.launch(op, m.runCreate)
	return op, true, nil
}

// runCreate does the side effects of a create; every finished step is undone on failure.
func (m *Manager) runCreate(r *opRun) error {
	ctx := r.ctx
	sv, err := m.st.GetServer(ctx, r.op.ServerID)
	if err != nil {
		return err
	}
	rev := revert.New()
	defer func() {
		if !m.isClosing() {
			rev.Fail()
		}
	}()
	rev.Add(func() { m.forgetServer(sv) })
	im, err := m.st.GetImage(ctx, sv.ImageID)
	if err != nil {
		return err
	}
	_, stor, err := m.storageOf(ctx, sv.StorageID)
	if err != nil {
		return err
	}
	h, agent, err := m.hostOf(ctx, sv.HostID)
	if err != nil {
		return err
	}
	r.progress("clone", 15)
	if err := stor.CloneVolume(ctx, im.Volume, sv.Volume); err != nil {
		return err
	}
	rev.Add(func() {
		c, cancel := cleanup()
		defer cancel()
		if err := stor.DeleteVolume(c, sv.Volume); err != nil {
			m.log.Error("Undo: failed to delete volume", "volume", sv.Volume, "err", err)
		}
	})
	if sv.DiskBytes > im.SizeBytes {
		r.progress("grow disk", 25)
		if err := stor.ResizeVolume(ctx, sv.Volume, sv.DiskBytes); err != nil {
			return err
		}
	}
	r.progress("define", 35)
	spec, err := m.vmSpec(ctx, sv, im, stor)
	if err != nil {
		return err
	}
	if err := agent.Define(ctx, spec); err != nil {
		return err
	}
	rev.Add(func() {
		c, cancel := cleanup()
		defer cancel()
		if err := agent.Delete(c, sv.ID); err != nil {
			m.log.Error("Undo: failed to delete VM", "vm", sv.ID, "host", h.Name, "err", err)
		}
	})
	r.progress("start", 50)
	if err := agent.Start(ctx, sv.ID); err != nil {
		return err
	}
	if err := m.finishCreate(r, agent, sv); err != nil {
		return err
	}
	rev.Success()
	return nil
}

// finishCreate waits for the guest's ready report, records the server running and opens
// its billing period.
func (m *Manager) finishCreate(r *opRun, agent Host, sv store.Server) error {
	if err := m.waitReady(r, agent, sv); err != nil {
		return err
	}
	sv.State = store.ServerRunning
	if err := m.st.UpdateServer(context.Background(), &sv); err != nil {
		return err
	}
	m.startBilling(sv)
	return nil
}

// startBilling opens the server's billing period on its current plan.
func (m *Manager) startBilling(sv store.Server) {
	ctx := context.Background()
	plan, err := m.st.GetPlan(ctx, sv.Plan)
	if err == nil {
		err = m.st.StartPeriod(ctx, sv, plan, time.Now().UTC())
	}
	if err != nil {
		m.log.Error("Failed to start billing period", "server", sv.Name, "err", err)
	}
}

// forgetServer releases a failed server's addresses and deletes its row.
func (m *Manager) forgetServer(sv store.Server) {
	c, cancel := cleanup()
	defer cancel()
	if err := m.st.ReleaseIPs(c, sv.ID); err != nil {
		m.log.Error("Undo: failed to release addresses", "server", sv.Name, "err", err)
	}
	if err := m.st.DeleteServer(c, sv.ID); err != nil && !errors.Is(err, store.ErrNotFound) {
		m.log.Error("Undo: failed to delete server row", "server", sv.Name, "err", err)
	}
}

// waitReady follows the guest's console until it reports ready with its hostname.
func (m *Manager) waitReady(r *opRun, agent Host, sv store.Server) error {
	r.progress("wait for guest", 70)
	deadline := time.Now().Add(m.cfg.ReadyTimeout)
	for {
		vm, err := agent.Get(r.ctx, sv.ID)
		if err != nil {
			return err
		}
		if vm.State == hostapi.StateStopped {
			return fmt.Errorf("The VM of %q stopped before the guest was ready: %s", sv.Name, vm.ExitReason)
		}
		log, err := agent.ConsoleLog(r.ctx, sv.ID)
		if err != nil {
			return err
		}
		if line := readyLine(log, sv.Name); line != "" {
			r.op.Message = line
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("The guest of %q did not report ready within %s", sv.Name, m.cfg.ReadyTimeout)
		}
		select {
		case <-r.ctx.Done():
			return r.ctx.Err()
		case <-time.After(250 * time.Millisecond):
		}
	}
}

// readyLine returns the last ready report naming hostname in a console log.
func readyLine(log []byte, hostname string) string {
	found := ""
	sc := bufio.NewScanner(bytes.NewReader(log))
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := strings.TrimSpace(strings.TrimRight(sc.Text(), "\r"))
		if i := strings.Index(line, ReadyPrefix); i >= 0 {
			line = line[i:]
			if strings.Contains(line+" ", " hostname="+hostname+" ") {
				found = line
			}
		}
	}
	return found
}

// macOf derives a stable, locally administered MAC address from a server ID.
func macOf(id string) string {
	h := sha256.Sum256([]byte(id))
	return fmt.Sprintf("02:%02x:%02x:%02x:%02x:%02x", h[0], h[1], h[2], h[3], h[4])
}

// vmSpec builds what the host agent runs for sv.
func (m *Manager) vmSpec(ctx context.Context, sv store.Server, im store.Image, stor Storage) (hostapi.VMSpec, error) {
	disk, err := stor.Endpoint(ctx, sv.Volume)
	if err != nil {
		return hostapi.VMSpec{}, err
	}
	disk.ID, disk.Export = "root", sv.Volume
	nic := hostapi.NIC{MAC: macOf(sv.ID)}
	if rate, err := m.trafficRate(ctx, sv, time.Now().UTC()); err == nil && rate > 0 {
		nic.InRate, nic.OutRate = rate, rate
	}
	if sv.IPv4 != "" {
		nic.IPv4 = []string{sv.IPv4}
	}
	if sv.IPv6 != "" {
		nic.IPv6 = []string{sv.IPv6}
	}
	seed, err := m.seed(ctx, sv, nic.MAC)
	if err != nil {
		return hostapi.VMSpec{}, err
	}
	spec := hostapi.VMSpec{Name: sv.ID, VCPUs: sv.VCPUs, MemoryMiB: int(sv.MemoryBytes >> 20),
		Disks: []hostapi.Disk{disk}, NICs: []hostapi.NIC{nic}, Seed: seed}
	// Room to grow online up to the largest plan (QEMU reserves hotplug slots, not memory).
	if plans, err := m.st.ListPlans(ctx); err == nil {
		for _, p := range plans {
			spec.MaxMemMiB = max(spec.MaxMemMiB, int(p.MemoryBytes>>20))
			spec.MaxVCPUs = max(spec.MaxVCPUs, p.VCPUs)
		}
		spec.MaxMemMiB = max(spec.MaxMemMiB, spec.MemoryMiB)
		spec.MaxVCPUs = max(spec.MaxVCPUs, spec.VCPUs)
	}
	if im.Kernel != "" {
		spec.Boot = &hostapi.DirectBoot{Kernel: im.Kernel, Initrd: im.Initrd, Append: im.Cmdline}
	}
	if err := spec.Validate(); err != nil {
		return hostapi.VMSpec{}, fmt.Errorf("Invalid VM for server %q: %w", sv.Name, err)
	}
	return spec, nil
}

// seed renders the cloud-init NoCloud documents: hostname, static network, SSH keys,
// the customer's user-data merged in, and a final command that prints the ready line.
func (m *Manager) seed(ctx context.Context, sv store.Server, mac string) (*hostapi.Seed, error) {
	meta := fmt.Sprintf("instance-id: %s\nlocal-hostname: %s\n", sv.ID, sv.Name)
	eth := map[string]any{"match": map[string]any{"macaddress": mac}, "set-name": "eth0"}
	var addrs []string
	var dns []string
	for fam, addr := range map[int]string{4: sv.IPv4, 6: sv.IPv6} {
		if addr == "" {
			continue
		}
		pool, err := m.poolOf(ctx, sv.ID, addr)
		if err != nil {
			return nil, err
		}
		prefix, err := netip.ParsePrefix(pool.CIDR)
		if err != nil {
			return nil, fmt.Errorf("Pool %q has a bad CIDR: %w", pool.Name, err)
		}
		addrs = append(addrs, fmt.Sprintf("%s/%d", addr, prefix.Bits()))
		if pool.Gateway != "" {
			eth[map[int]string{4: "gateway4", 6: "gateway6"}[fam]] = pool.Gateway
		}
		dns = append(dns, pool.DNS...)
	}
	if len(addrs) > 0 {
		// Stable order: IPv4 first.
		if len(addrs) == 2 && strings.Contains(addrs[0], ":") {
			addrs[0], addrs[1] = addrs[1], addrs[0]
		}
		eth["addresses"] = addrs
	}
	if len(dns) > 0 {
		eth["nameservers"] = map[string]any{"addresses": dns}
	}
	netcfg, err := yaml.Marshal(map[string]any{"version": 2, "ethernets": map[string]any{"eth0": eth}})
	if err != nil {
		return nil, fmt.Errorf("Failed to render network config: %w", err)
	}
	user := map[string]any{}
	if sv.UserData != "" {
		if err := yaml.Unmarshal([]byte(sv.UserData), &user); err != nil {
			return nil, fmt.Errorf("User data of %q is not valid YAML: %w", sv.Name, err)
		}
		if user == nil {
			user = map[string]any{}
		}
	}
	user["hostname"] = sv.Name
	user["manage_etc_hosts"] = true
	if len(sv.SSHKeys) > 0 {
		keys, _ := user["ssh_authorized_keys"].([]any)
		for _, k := range sv.SSHKeys {
			keys = append(keys, k)
		}
		user["ssh_authorized_keys"] = keys
	}
	runcmd, _ := user["runcmd"].([]any)
	runcmd = append(runcmd, []any{"sh", "-c", `echo "` + ReadyPrefix + `hostname=$(hostname) ip=$(hostname -I 2>/dev/null | tr ' ' ',' | sed 's/,$//') keys=$(cat /root/.ssh/authorized_keys /home/*/.ssh/authorized_keys 2>/dev/null | grep -c '^ssh-')" > /dev/ttyS0`})
	user["runcmd"] = runcmd
	ud, err := yaml.Marshal(user)
	if err != nil {
		return nil, fmt.Errorf("Failed to render user data: %w", err)
	}
	return &hostapi.Seed{MetaData: meta, UserData: "#cloud-config\n" + string(ud), NetworkConfig: string(netcfg)}, nil
}

func (m *Manager) poolOf(ctx context.Context, serverID, addr string) (store.IPPool, error) {
	leases, err := m.st.ListLeases(ctx, "")
	if err != nil {
		return store.IPPool{}, err
	}
	for _, l := range leases {
		if l.ServerID == serverID && l.Address == addr {
			return m.st.GetIPPool(ctx, l.PoolID)
		}
	}
	return store.IPPool{}, fmt.Errorf("Address %s of server %s has no lease: %w", addr, serverID, store.ErrNotFound)
}
