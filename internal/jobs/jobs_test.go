package jobs_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/growserver/grow/internal/billing"
	"github.com/growserver/grow/internal/host/hostapi"
	. "github.com/growserver/grow/internal/jobs"
	"github.com/growserver/grow/internal/jobs/jobstest"
	"github.com/growserver/grow/internal/scheduler"
	"github.com/growserver/grow/internal/store"
	"github.com/growserver/grow/internal/store/storetest"
)

type env struct {
	t     *testing.T
	ctx   context.Context
	st    *store.Store
	c     *jobstest.Cluster
	m     *Manager
	admin store.User
	cust  store.Customer
	hosts []store.Host
}

func newEnv(t *testing.T, backend string) *env {
	t.Helper()
	ctx := context.Background()
	e := &env{t: t, ctx: ctx, st: storetest.Open(t, backend), c: jobstest.NewCluster()}
	for _, p := range billing.DefaultPlans() {
		if err := e.st.EnsurePlan(ctx, p); err != nil {
			t.Fatal(err)
		}
	}
	if err := e.st.CreateStorage(ctx, &store.StorageController{Name: "stor1", URL: "http://127.0.0.1:1", Token: "x"}); err != nil {
		t.Fatal(err)
	}
	for _, n := range []string{"h1", "h2"} {
		h := store.Host{Name: n, URL: "http://127.0.0.1:1", Token: "x", CPUs: 4, MemoryBytes: 4 << 30}
		if err := e.st.CreateHost(ctx, &h); err != nil {
			t.Fatal(err)
		}
		e.hosts = append(e.hosts, h)
	}
	if err := e.st.CreateIPPool(ctx, &store.IPPool{Name: "v4", CIDR: "192.0.2.0/28", First: "192.0.2.2", Last: "192.0.2.6", Gateway: "192.0.2.1", DNS: []string{"192.0.2.1"}}); err != nil {
		t.Fatal(err)
	}
	e.cust = store.Customer{Name: "acme", MaxServers: 4}
	if err := e.st.CreateCustomer(ctx, &e.cust); err != nil {
		t.Fatal(err)
	}
	e.admin = store.User{Name: "root", Role: store.RoleAdmin}
	if err := e.st.CreateUser(ctx, &e.admin, "hash-admin"); err != nil {
		t.Fatal(err)
	}
	e.m = e.manager()
	if _, err := e.m.ImportImage(ctx, ImportImageRequest{Name: "tiny", Format: "raw", Kernel: "/boot/vmlinux"}, bytes.NewReader(make([]byte, 64<<20)), nil); err != nil {
		t.Fatal(err)
	}
	return e
}

func (e *env) manager() *Manager { return e.managerWith(5 * time.Second) }

func (e *env) managerWith(ready time.Duration) *Manager {
	// The same instance name across "restarts", as grow serve keeps it in its data directory.
	m := New(Config{Store: e.st, Connector: e.c, Policy: scheduler.DefaultPolicy, ReadyTimeout: ready, Instance: "cp-test",
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	e.t.Cleanup(m.Close)
	return m
}

func (e *env) create(name, key string) store.Operation {
	e.t.Helper()
	op, _, err := e.m.CreateServer(e.ctx, e.admin, key, CreateServerRequest{Name: name, Customer: "acme", Plan: "E", Image: "tiny",
		SSHKeys: []string{"ssh-ed25519 AAAAC3Nza test@example"}, UserData: "#cloud-config\npackages: [htop]\n"})
	if err != nil {
		e.t.Fatalf("create %s: %v", name, err)
	}
	return op
}

func (e *env) wait(op store.Operation) store.Operation {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(e.ctx, 20*time.Second)
	defer cancel()
	op, err := e.m.Wait(ctx, op.ID)
	if err != nil {
		e.t.Fatalf("wait %s: %v", op.ID, err)
	}
	return op
}

// nothingLeft checks that no server, lease, volume or VM remains.
func (e *env) nothingLeft() {
	e.t.Helper()
	svs, _ := e.st.AllServers(e.ctx)
	leases, _ := e.st.ListLeases(e.ctx, "")
	if len(svs) != 0 || len(leases) != 0 || e.c.VolumeCount() != 0 || e.c.VMCount() != 0 {
		e.t.Fatalf("left behind: %d servers, %d leases, %d volumes, %d VMs", len(svs), len(leases), e.c.VolumeCount(), e.c.VMCount())
	}
}

func TestJobs(t *testing.T) {
	for _, b := range storetest.Backends {
		t.Run(b, func(t *testing.T) {
			if b == "postgres" && testing.Short() {
				t.Skip("PostgreSQL skipped with -short")
			}
			t.Run("create, resize, migrate, delete", func(t *testing.T) { testLifecycle(t, newEnv(t, b)) })
			t.Run("failure at each step leaves nothing", func(t *testing.T) { testFailures(t, newEnv(t, b)) })
			t.Run("admission", func(t *testing.T) { testAdmission(t, newEnv(t, b)) })
			t.Run("restart mid-create", func(t *testing.T) { testRestart(t, newEnv(t, b)) })
			t.Run("two control planes", func(t *testing.T) { testTwoControlPlanes(t, newEnv(t, b)) })
			t.Run("traffic metering", func(t *testing.T) { testTraffic(t, newEnv(t, b)) })
			t.Run("traffic limit", func(t *testing.T) { testTrafficLimit(t, newEnv(t, b)) })
			t.Run("health probes steer placement", func(t *testing.T) { testHealth(t, newEnv(t, b)) })
			t.Run("evacuate a host", func(t *testing.T) { testEvacuate(t, newEnv(t, b)) })
		})
	}
}

func testLifecycle(t *testing.T, e *env) {
	op := e.wait(e.create("web1", "k1"))
	if op.State != store.OpSucceeded || !strings.Contains(op.Message, "hostname=web1 ip=192.0.2.2") {
		t.Fatalf("create: %+v", op)
	}
	// The same idempotency key gives the same operation and no second server.
	again, created, err := e.m.CreateServer(e.ctx, e.admin, "k1", CreateServerRequest{Name: "web1-retry", Customer: "acme", Plan: "E", Image: "tiny"})
	if err != nil || created || again.ID != op.ID {
		t.Fatalf("retried create: %+v created=%v err=%v", again, created, err)
	}
	sv, err := e.st.GetServer(e.ctx, "web1")
	if err != nil || sv.State != store.ServerRunning || sv.IPv4 != "192.0.2.2" || sv.DiskBytes != 10<<30 {
		t.Fatalf("server = %+v, %v", sv, err)
	}
	vm := e.c.VMs[sv.HostID][sv.ID]
	if vm == nil || vm.State != "running" || !strings.Contains(vm.Spec.Seed.UserData, "htop") || !strings.Contains(vm.Spec.Seed.UserData, "ssh-ed25519 AAAAC3Nza") ||
		!strings.Contains(vm.Spec.Seed.NetworkConfig, "192.0.2.2/28") || vm.Spec.Boot == nil || vm.Spec.Boot.Kernel != "/boot/vmlinux" {
		t.Fatalf("VM spec = %+v", vm)
	}
	if e.c.Volumes[sv.Volume] != 10<<30 {
		t.Fatalf("volume size %d, want the plan's 10 GiB", e.c.Volumes[sv.Volume])
	}
	// A downgrade that would shrink the disk is refused and changes nothing.
	if err := e.st.PutPlan(e.ctx, store.Plan{Name: "tinydisk", VCPUs: 1, MemoryBytes: 256 << 20, DiskBytes: 5 << 30, PriceYen: 1}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.m.ServerAction(e.ctx, e.admin, sv.ID, KindResize, ActionRequest{Plan: "tinydisk"}); !errors.Is(err, ErrConflict) {
		t.Fatalf("shrinking resize: err = %v, want ErrConflict", err)
	}
	// Resize to D grows the disk online; memory hotplug refused -> announced for a reboot.
	rop, err := e.m.ServerAction(e.ctx, e.admin, sv.ID, KindResize, ActionRequest{Plan: "D"})
	if err != nil {
		t.Fatal(err)
	}
	rop = e.wait(rop)
	sv, _ = e.st.GetServer(e.ctx, "web1")
	if rop.State != store.OpSucceeded || sv.Plan != "D" || sv.DiskBytes != 20<<30 || e.c.Volumes[sv.Volume] != 20<<30 ||
		e.c.VMs[sv.HostID][sv.ID].Disk != 20<<30 || !strings.Contains(rop.Message, "next stop and start") {
		t.Fatalf("resize: op %+v server %+v", rop, sv)
	}
	// A host that cannot grow the disk online still completes the resize, announcing the restart.
	e.c.Fail = map[string]error{"resize": errors.New("Cannot grow NBD nodes")}
	rop, err = e.m.ServerAction(e.ctx, e.admin, sv.ID, KindResize, ActionRequest{Plan: "C"})
	if err != nil {
		t.Fatal(err)
	}
	rop = e.wait(rop)
	e.c.Fail = map[string]error{}
	sv, _ = e.st.GetServer(e.ctx, "web1")
	if rop.State != store.OpSucceeded || sv.Plan != "C" || sv.DiskBytes != 40<<30 || e.c.Volumes[sv.Volume] != 40<<30 || !strings.Contains(rop.Message, "disk at the next stop and start") {
		t.Fatalf("resize without online growth: op %+v server %+v", rop, sv)
	}
	// Migrate to the other host.
	other := e.hosts[0]
	if other.ID == sv.HostID {
		other = e.hosts[1]
	}
	mop, err := e.m.ServerAction(e.ctx, e.admin, sv.ID, KindMigrate, ActionRequest{To: other.Name})
	if err != nil {
		t.Fatal(err)
	}
	if mop = e.wait(mop); mop.State != store.OpSucceeded {
		t.Fatalf("migrate: %+v", mop)
	}
	sv, _ = e.st.GetServer(e.ctx, "web1")
	if sv.HostID != other.ID || e.c.VMs[other.ID][sv.ID] == nil {
		t.Fatalf("after migrate server on %s, want %s", sv.HostID, other.ID)
	}
	if _, err := e.m.ServerAction(e.ctx, e.admin, sv.ID, KindMigrate, ActionRequest{To: other.Name}); !errors.Is(err, ErrConflict) {
		t.Fatalf("migrate onto its own host: err = %v", err)
	}
	// A migration that fails leaves the server where it runs; one whose answer is lost
	// after the VM moved follows the VM.
	back := e.hosts[0]
	if back.ID == sv.HostID {
		back = e.hosts[1]
	}
	e.c.Fail = map[string]error{"migrate": errors.New("destination refused")}
	mop, err = e.m.ServerAction(e.ctx, e.admin, sv.ID, KindMigrate, ActionRequest{To: back.Name})
	if err != nil {
		t.Fatal(err)
	}
	if mop = e.wait(mop); mop.State != store.OpFailed {
		t.Fatalf("failed migrate: %+v", mop)
	}
	if sv, _ = e.st.GetServer(e.ctx, "web1"); sv.HostID != other.ID || sv.State != store.ServerRunning {
		t.Fatalf("after a failed migrate the server is on %s (%s), want %s", sv.HostID, sv.State, other.ID)
	}
	e.c.Fail = map[string]error{}
	e.c.Lost = map[string]error{"migrate": errors.New("connection reset by peer")}
	mop, err = e.m.ServerAction(e.ctx, e.admin, sv.ID, KindMigrate, ActionRequest{To: back.Name})
	if err != nil {
		t.Fatal(err)
	}
	mop = e.wait(mop)
	e.c.Lost = nil
	if sv, _ = e.st.GetServer(e.ctx, "web1"); mop.State != store.OpSucceeded || sv.HostID != back.ID {
		t.Fatalf("a migration whose answer was lost: op %+v, server on %s, want %s", mop, sv.HostID, back.ID)
	}
	// Stop, start, then delete frees VM, volume and address.
	for _, k := range []string{KindStop, KindStart, KindReboot} {
		o, err := e.m.ServerAction(e.ctx, e.admin, sv.ID, k, ActionRequest{})
		if err != nil {
			t.Fatalf("%s: %v", k, err)
		}
		if o = e.wait(o); o.State != store.OpSucceeded {
			t.Fatalf("%s: %+v", k, o)
		}
	}
	// The stop and start applied the plan's memory, which could not change online.
	if vm := e.c.VMs[sv.HostID][sv.ID]; vm.Spec.MemoryMiB != int(sv.MemoryBytes>>20) || vm.State != "running" {
		t.Fatalf("after stop and start the VM has %d MiB (%s), want %d MiB", vm.Spec.MemoryMiB, vm.State, sv.MemoryBytes>>20)
	}
	dop, err := e.m.ServerAction(e.ctx, e.admin, sv.ID, KindDelete, ActionRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if dop = e.wait(dop); dop.State != store.OpSucceeded {
		t.Fatalf("delete: %+v", dop)
	}
	e.nothingLeft()
	// Billing remembers the deleted server's plans: E, then D, then C, all closed.
	now := time.Now().UTC()
	periods, err := e.st.ListPeriods(e.ctx, e.cust.ID, now.Add(-time.Hour), now.Add(time.Hour))
	if err != nil || len(periods) != 3 || periods[0].Plan != "E" || periods[1].Plan != "D" || periods[2].Plan != "C" {
		t.Fatalf("billing periods = %+v, %v", periods, err)
	}
	for _, p := range periods {
		if p.EndedAt.IsZero() {
			t.Fatalf("period %+v still open after delete", p)
		}
	}
}

func testFailures(t *testing.T, e *env) {
	for _, step := range []string{"clone", "define", "start"} {
		e.c.Fail = map[string]error{step: errors.New("injected " + step + " failure")}
		op := e.wait(e.create("fail-"+step, ""))
		if op.State != store.OpFailed || !strings.Contains(op.Error, "injected") {
			t.Fatalf("%s failure: op %+v", step, op)
		}
		e.nothingLeft()
	}
	// A guest that never reports ready times out and is undone.
	e.c.Fail = map[string]error{}
	e.c.ReadyAfter = time.Hour
	e.m.Close()
	e.m = e.managerWith(500 * time.Millisecond)
	if op := e.wait(e.create("never-ready", "")); op.State != store.OpFailed || !strings.Contains(op.Error, "did not report ready") {
		t.Fatalf("ready timeout: %+v", op)
	}
	e.nothingLeft()
	// Cancel while waiting for the guest undoes everything.
	e.m.Close()
	e.m = e.managerWith(time.Minute)
	op := e.create("cancelled", "")
	time.Sleep(300 * time.Millisecond)
	if err := e.m.Cancel(e.ctx, op.ID); err != nil {
		t.Fatal(err)
	}
	if op = e.wait(op); op.State != store.OpCancelled {
		t.Fatalf("cancel: %+v", op)
	}
	e.nothingLeft()
	if err := e.m.Cancel(e.ctx, op.ID); !errors.Is(err, ErrConflict) {
		t.Fatalf("cancel of a finished op: err = %v", err)
	}
}

func testAdmission(t *testing.T, e *env) {
	bad := []CreateServerRequest{
		{Name: "Bad_Name", Customer: "acme", Plan: "E", Image: "tiny"},
		{Name: "ok", Customer: "nobody", Plan: "E", Image: "tiny"},
		{Name: "ok", Customer: "acme", Plan: "Z", Image: "tiny"},
		{Name: "ok", Customer: "acme", Plan: "E", Image: "nope"},
		{Name: "ok", Customer: "acme", Plan: "E", Image: "tiny", SSHKeys: []string{"not a key"}},
		{Name: "ok", Customer: "acme", Plan: "E", Image: "tiny", UserData: "#!/bin/sh\necho hi"},
		// Plan S needs 8 GiB; hosts have 4 GiB.
		{Name: "ok", Customer: "acme", Plan: "S", Image: "tiny"},
	}
	for _, req := range bad {
		if _, _, err := e.m.CreateServer(e.ctx, e.admin, "", req); err == nil {
			t.Fatalf("accepted %+v", req)
		}
	}
	e.nothingLeft()
	// A customer user may not create for another customer.
	other := store.Customer{Name: "other"}
	if err := e.st.CreateCustomer(e.ctx, &other); err != nil {
		t.Fatal(err)
	}
	mallory := store.User{ID: "usr-mallory", Role: store.RoleCustomer, CustomerID: other.ID}
	if _, _, err := e.m.CreateServer(e.ctx, mallory, "", CreateServerRequest{Name: "x", Customer: "acme", Plan: "E", Image: "tiny"}); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("cross-tenant create: err = %v", err)
	}
	// Quota of 4, then the fifth is refused.
	for _, n := range []string{"a1", "a2", "a3", "a4"} {
		if op := e.wait(e.create(n, "")); op.State != store.OpSucceeded {
			t.Fatalf("%s: %+v", n, op)
		}
	}
	if _, _, err := e.m.CreateServer(e.ctx, e.admin, "", CreateServerRequest{Name: "a5", Customer: "acme", Plan: "E", Image: "tiny"}); !errors.Is(err, ErrQuota) {
		t.Fatalf("fifth server: err = %v, want ErrQuota", err)
	}
	// The pool has five addresses: a second customer gets the last, then none is left.
	if op, _, err := e.m.CreateServer(e.ctx, e.admin, "", CreateServerRequest{Name: "b1", Customer: "other", Plan: "E", Image: "tiny"}); err != nil {
		t.Fatal(err)
	} else if op = e.wait(op); op.State != store.OpSucceeded {
		t.Fatalf("b1: %+v", op)
	}
	if _, _, err := e.m.CreateServer(e.ctx, e.admin, "", CreateServerRequest{Name: "b2", Customer: "other", Plan: "E", Image: "tiny"}); !errors.Is(err, ErrNoAddress) {
		t.Fatalf("no address left: err = %v", err)
	}
	// Anti-affinity: two group members land on different hosts, a third has nowhere to go.
	svs, _ := e.st.AllServers(e.ctx)
	for _, sv := range svs {
		o, err := e.m.ServerAction(e.ctx, e.admin, sv.ID, KindDelete, ActionRequest{})
		if err != nil {
			t.Fatal(err)
		}
		e.wait(o)
	}
	e.nothingLeft()
	var hostsUsed []string
	for _, n := range []string{"db1", "db2"} {
		op, _, err := e.m.CreateServer(e.ctx, e.admin, "", CreateServerRequest{Name: n, Customer: "acme", Plan: "E", Image: "tiny", Group: "db"})
		if err != nil {
			t.Fatal(err)
		}
		e.wait(op)
		sv, _ := e.st.GetServer(e.ctx, n)
		hostsUsed = append(hostsUsed, sv.HostID)
	}
	if hostsUsed[0] == hostsUsed[1] {
		t.Fatalf("group members share host %s", hostsUsed[0])
	}
	if _, _, err := e.m.CreateServer(e.ctx, e.admin, "", CreateServerRequest{Name: "db3", Customer: "acme", Plan: "E", Image: "tiny", Group: "db"}); !errors.Is(err, ErrNoCapacity) {
		t.Fatalf("third group member on two hosts: err = %v", err)
	}
}

// testRestart stops the manager mid-create (as a crash would leave the rows) and checks
// that a new manager either finishes the server or removes every trace of it.
func testRestart(t *testing.T, e *env) {
	// Case 1: the VM is running when the control plane dies: recovery follows it to ready.
	e.c.ReadyAfter = 700 * time.Millisecond
	op := e.create("survivor", "")
	deadline := time.Now().Add(5 * time.Second)
	for e.c.VMCount() == 0 || e.vmState("survivor") != "running" {
		if time.Now().After(deadline) {
			t.Fatal("VM never started")
		}
		time.Sleep(20 * time.Millisecond)
	}
	e.m.Close()
	if o, _ := e.st.GetOperation(e.ctx, op.ID); o.Done() {
		t.Fatalf("operation finished before the simulated crash: %+v", o)
	}
	e.m = e.manager()
	if err := e.m.Recover(e.ctx); err != nil {
		t.Fatal(err)
	}
	if op = e.wait(op); op.State != store.OpSucceeded {
		t.Fatalf("recovered create: %+v", op)
	}
	// Case 2: the control plane dies before the VM runs: recovery undoes everything.
	e.c.Fail = map[string]error{"start": errors.New("host unreachable")}
	e.c.ReadyAfter = 0
	op2, _, err := e.m.CreateServer(e.ctx, e.admin, "", CreateServerRequest{Name: "ghost", Customer: "acme", Plan: "E", Image: "tiny"})
	if err != nil {
		t.Fatal(err)
	}
	// Simulate a crash right after admission: close before the runner finishes by
	// marking the op unfinished again as a kill -9 would have left it.
	e.wait(op2)
	ghost := store.Server{ID: "srv-ghost", Name: "ghost", CustomerID: e.cust.ID, Plan: "E", VCPUs: 1, MemoryBytes: 256 << 20, DiskBytes: 10 << 30,
		State: store.ServerCreating, HostID: e.hosts[0].ID, StorageID: "", Volume: "srv-ghost"}
	im, _ := e.st.GetImage(e.ctx, "tiny")
	ghost.ImageID, ghost.StorageID = im.ID, im.StorageID
	if err := e.st.CreateServer(e.ctx, &ghost); err != nil {
		t.Fatal(err)
	}
	if _, _, err := e.st.LeaseIP(e.ctx, 4, ghost.ID); err != nil {
		t.Fatal(err)
	}
	stor, _ := e.c.Storage(store.StorageController{})
	if err := stor.CloneVolume(e.ctx, im.Volume, ghost.Volume); err != nil {
		t.Fatal(err)
	}
	crashed := store.Operation{Kind: KindCreate, ServerID: ghost.ID, CustomerID: e.cust.ID, State: store.OpRunning, Step: "define"}
	if err := e.st.CreateOperation(e.ctx, &crashed); err != nil {
		t.Fatal(err)
	}
	e.c.Fail = map[string]error{}
	e.m.Close()
	e.m = e.manager()
	if err := e.m.Recover(e.ctx); err != nil {
		t.Fatal(err)
	}
	if c := e.wait(crashed); c.State != store.OpFailed || !strings.Contains(c.Error, "undone") {
		t.Fatalf("recovered crashed create: %+v", c)
	}
	if _, err := e.st.GetServer(e.ctx, "ghost"); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("ghost server still recorded: %v", err)
	}
	if _, ok := e.c.Volumes["srv-ghost"]; ok {
		t.Fatal("ghost volume left behind")
	}
	leases, _ := e.st.ListLeases(e.ctx, "")
	if len(leases) != 1 { // survivor's
		t.Fatalf("leases after recovery: %+v", leases)
	}
}

func (e *env) vmState(name string) string {
	sv, err := e.st.GetServer(e.ctx, name)
	if err != nil {
		return ""
	}
	e.c.Mu.Lock()
	defer e.c.Mu.Unlock()
	if v := e.c.VMs[sv.HostID][sv.ID]; v != nil {
		return v.State
	}
	return ""
}

// testTwoControlPlanes runs a second control plane on the same database: it must leave
// the first one's operations alone while that one renews its lease, and take them over
// once it died.
func testTwoControlPlanes(t *testing.T, e *env) {
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	mk := func(name string) *Manager {
		m := New(Config{Store: e.st, Connector: e.c, Policy: scheduler.DefaultPolicy, ReadyTimeout: 20 * time.Second,
			Instance: name, Lease: 900 * time.Millisecond, Logger: quiet})
		t.Cleanup(m.Close)
		if err := m.Recover(e.ctx); err != nil {
			t.Fatal(err)
		}
		return m
	}
	a, b := mk("cp-a"), mk("cp-b")
	e.c.ReadyAfter = 2500 * time.Millisecond
	op, _, err := a.CreateServer(e.ctx, e.admin, "", CreateServerRequest{Name: "shared", Customer: "acme", Plan: "E", Image: "tiny"})
	if err != nil {
		t.Fatal(err)
	}
	// While a lives, b never claims its operation.
	time.Sleep(1800 * time.Millisecond)
	if got, _ := e.st.GetOperation(e.ctx, op.ID); got.Owner != "cp-a" {
		t.Fatalf("operation taken from a live control plane: owner %q", got.Owner)
	}
	// a dies mid-create (its VM is running, the guest not ready yet): b takes over and finishes.
	a.Close()
	got, err := b.Wait(context.Background(), op.ID)
	if err != nil || got.State != store.OpSucceeded || got.Owner != "cp-b" {
		t.Fatalf("after a died: %+v, %v", got, err)
	}
	if sv, err := e.st.GetServer(e.ctx, "shared"); err != nil || sv.State != store.ServerRunning {
		t.Fatalf("server after takeover: %+v, %v", sv, err)
	}
}

// testTraffic checks that cumulative counters become per-interval samples counted from
// the VM's definition, and that a restarted collector (a restarted control plane)
// continues from the baseline kept in the store, billing what moved while it was down.
func testTraffic(t *testing.T, e *env) {
	op := e.wait(e.create("metered", ""))
	if op.State != store.OpSucceeded {
		t.Fatalf("create: %+v", op)
	}
	sv, _ := e.st.GetServer(e.ctx, "metered")
	set := func(rx, tx uint64) {
		e.c.Mu.Lock()
		e.c.Traffic[sv.ID] = hostapi.Counters{RxBytes: rx, TxBytes: tx}
		e.c.Mu.Unlock()
	}
	collect := func() func() {
		ctx, cancel := context.WithCancel(e.ctx)
		done := make(chan struct{})
		go func() { e.m.CollectTraffic(ctx, 50*time.Millisecond); close(done) }()
		return func() { cancel(); <-done }
	}
	from, to := time.Now().Add(-time.Hour), time.Now().Add(time.Hour)
	expect := func(wantRx, wantTx int64) {
		t.Helper()
		for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(50 * time.Millisecond) {
			rx, tx, err := e.st.TrafficTotal(e.ctx, sv.ID, from, to)
			if err != nil {
				t.Fatal(err)
			}
			if rx == wantRx && tx == wantTx {
				return
			}
			if rx > wantRx || tx > wantTx || time.Now().After(deadline) {
				t.Fatalf("metered %d received and %d sent, want %d and %d", rx, tx, wantRx, wantTx)
			}
		}
	}
	set(100, 200)
	stop := collect()
	time.Sleep(200 * time.Millisecond)
	set(1100, 5200)
	expect(1100, 5200)
	stop()
	set(2100, 6200) // while the collector is down
	stop = collect()
	defer stop()
	expect(2100, 6200)
	set(50, 60) // the VM was defined afresh: its counters start again
	expect(2150, 6260)
}

// testTrafficLimit checks that a server whose traffic this month exceeds its plan's
// allowance is slowed to the over-allowance rate (also when its VM is defined afresh),
// and that the limit is lifted once the allowance covers it again (a larger plan).
func testTrafficLimit(t *testing.T, e *env) {
	m := New(Config{Store: e.st, Connector: e.c, Policy: scheduler.DefaultPolicy, ReadyTimeout: 5 * time.Second, Instance: "cp-test",
		OverAllowanceBps: 10e6, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	t.Cleanup(m.Close)
	e.m = m
	op := e.wait(e.create("chatty", ""))
	if op.State != store.OpSucceeded {
		t.Fatalf("create: %+v", op)
	}
	sv, _ := e.st.GetServer(e.ctx, "chatty")
	plan, err := e.st.GetPlan(e.ctx, sv.Plan)
	if err != nil {
		t.Fatal(err)
	}
	rates := func() (uint64, uint64) {
		e.c.Mu.Lock()
		defer e.c.Mu.Unlock()
		n := e.c.VMs[sv.HostID][sv.ID].Spec.NICs[0]
		return n.InRate, n.OutRate
	}
	setTraffic := func(rx uint64) {
		e.c.Mu.Lock()
		e.c.Traffic[sv.ID] = hostapi.Counters{RxBytes: rx, TxBytes: 1}
		e.c.Mu.Unlock()
	}
	now := time.Now().UTC()
	setTraffic(uint64(plan.TrafficBytes) - 10)
	m.SampleTraffic(e.ctx, now)
	if in, out := rates(); in != 0 || out != 0 {
		t.Fatalf("within the allowance the VM is shaped to %d/%d", in, out)
	}
	setTraffic(uint64(plan.TrafficBytes) + 10)
	m.SampleTraffic(e.ctx, now.Add(time.Second))
	if in, out := rates(); in != 10e6 || out != 10e6 {
		t.Fatalf("over the allowance the VM is shaped to %d/%d, want 10 Mbit/s both ways", in, out)
	}
	// Stopped and started, it is defined afresh: still slowed.
	for _, k := range []string{KindStop, KindStart} {
		o, err := m.ServerAction(e.ctx, e.admin, sv.ID, k, ActionRequest{})
		if err != nil {
			t.Fatal(err)
		}
		if o = e.wait(o); o.State != store.OpSucceeded {
			t.Fatalf("%s: %+v", k, o)
		}
	}
	if in, _ := rates(); in != 10e6 {
		t.Fatalf("after a restart the VM is shaped to %d, want 10 Mbit/s", in)
	}
	// A larger allowance lifts the limit at the next reading.
	plan.TrafficBytes *= 100
	if err := e.st.PutPlan(e.ctx, plan); err != nil {
		t.Fatal(err)
	}
	m.SampleTraffic(e.ctx, now.Add(2*time.Second))
	if in, out := rates(); in != 0 || out != 0 {
		t.Fatalf("with a larger allowance the VM is still shaped to %d/%d", in, out)
	}
}

// testHealth checks that a host whose agent stops answering is reported down with the
// reason and gets no new servers, and that it comes back once it answers again.
func testHealth(t *testing.T, e *env) {
	h1, h2 := e.hosts[0], e.hosts[1]
	h3 := store.Host{Name: "h3", URL: "http://127.0.0.1:1", Token: "x", CPUs: 4, MemoryBytes: 4 << 30}
	if err := e.st.CreateHost(e.ctx, &h3); err != nil { // N+1 needs two answering hosts
		t.Fatal(err)
	}
	if h := e.m.Health(h1.ID); !h.Reachable || !h.Checked.IsZero() {
		t.Fatalf("health before any probe: %+v, want reachable and unchecked", h)
	}
	e.c.SetDown(h1.ID, true)
	e.m.ProbeAll(e.ctx)
	down := e.m.Health(h1.ID)
	if down.Reachable || down.Detail == "" || down.Checked.IsZero() || down.Since.IsZero() {
		t.Fatalf("health of a silent host: %+v", down)
	}
	if h := e.m.Health(h2.ID); !h.Reachable || h.Detail != "fake agent" {
		t.Fatalf("health of the other host: %+v", h)
	}
	var stor store.StorageController
	if cs, err := e.st.ListStorage(e.ctx); err != nil || len(cs) != 1 {
		t.Fatalf("storage controllers: %v, %v", cs, err)
	} else {
		stor = cs[0]
	}
	if h := e.m.Health(stor.ID); !h.Reachable || h.Detail != "pool ok" {
		t.Fatalf("health of the storage controller: %+v", h)
	}
	for _, name := range []string{"p1", "p2", "p3"} {
		if op := e.wait(e.create(name, "")); op.State != store.OpSucceeded {
			t.Fatalf("create %s: %+v", name, op)
		}
		if sv, _ := e.st.GetServer(e.ctx, name); sv.HostID == h1.ID {
			t.Fatalf("%s placed on %s while h1 does not answer", name, sv.HostID)
		}
	}
	e.c.SetDown(h1.ID, false)
	e.m.ProbeAll(e.ctx)
	if up := e.m.Health(h1.ID); !up.Reachable || !up.Since.After(down.Since) {
		t.Fatalf("health after the agent answers again: %+v (was %+v)", up, down)
	}
}

// testEvacuate checks the host.evacuate operation: the host goes into maintenance, every
// running server leaves it through its own migration, and a server that is not running
// is named in the failure and stays.
func testEvacuate(t *testing.T, e *env) {
	h3 := store.Host{Name: "h3", URL: "http://127.0.0.1:1", Token: "x", CPUs: 4, MemoryBytes: 4 << 30}
	if err := e.st.CreateHost(e.ctx, &h3); err != nil { // N+1 while one host is evacuated
		t.Fatal(err)
	}
	for _, n := range []string{"e1", "e2", "e3"} {
		if op := e.wait(e.create(n, "")); op.State != store.OpSucceeded {
			t.Fatalf("create %s: %+v", n, op)
		}
	}
	onHost := func(id string) []store.Server {
		all, err := e.st.AllServers(e.ctx)
		if err != nil {
			t.Fatal(err)
		}
		var out []store.Server
		for _, sv := range all {
			if sv.HostID == id {
				out = append(out, sv)
			}
		}
		return out
	}
	first, _ := e.st.GetServer(e.ctx, "e1")
	src := first.HostID
	if n := len(onHost(src)); n == 0 {
		t.Fatal("no server on the host to evacuate")
	}
	op, err := e.m.EvacuateHost(e.ctx, e.admin, src)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.m.EvacuateHost(e.ctx, e.admin, src); !errors.Is(err, ErrConflict) {
		t.Fatalf("second evacuation of one host: %v, want a conflict", err)
	}
	if op = e.wait(op); op.State != store.OpSucceeded || op.Message == "" {
		t.Fatalf("evacuation: %+v", op)
	}
	if left := onHost(src); len(left) != 0 {
		t.Fatalf("servers left on the evacuated host: %+v", left)
	}
	if h, _ := e.st.GetHost(e.ctx, src); h.State != store.StateMaintenance {
		t.Fatalf("evacuated host is %s, want maintenance", h.State)
	}
	// Bring it back, put a stopped server somewhere and evacuate that host.
	h, _ := e.st.GetHost(e.ctx, src)
	h.State = store.StateActive
	if err := e.st.UpdateHost(e.ctx, h); err != nil {
		t.Fatal(err)
	}
	second, _ := e.st.GetServer(e.ctx, "e2")
	stop, err := e.m.ServerAction(e.ctx, e.admin, second.ID, KindStop, ActionRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if stop = e.wait(stop); stop.State != store.OpSucceeded {
		t.Fatalf("stop: %+v", stop)
	}
	running := 0
	for _, sv := range onHost(second.HostID) {
		if sv.State == store.ServerRunning {
			running++
		}
	}
	op, err = e.m.EvacuateHost(e.ctx, e.admin, second.HostID)
	if err != nil {
		t.Fatal(err)
	}
	if op = e.wait(op); op.State != store.OpFailed || !strings.Contains(op.Error, "e2") || !strings.Contains(op.Error, "not running") {
		t.Fatalf("evacuation with a stopped server: %+v", op)
	}
	if left := onHost(second.HostID); len(left) != 1 || left[0].Name != "e2" {
		t.Fatalf("after evacuating %d running servers, left: %+v", running, left)
	}
}
