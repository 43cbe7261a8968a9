package store_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/growserver/grow/internal/authtoken"
	"github.com/growserver/grow/internal/store"
	"github.com/growserver/grow/internal/store/storetest"
)

// forEachBackend runs fn on a fresh SQLite store and a fresh PostgreSQL store.
func forEachBackend(t *testing.T, fn func(t *testing.T, s *store.Store)) {
	for _, b := range storetest.Backends {
		t.Run(b, func(t *testing.T) {
			if b == "postgres" && testing.Short() {
				t.Skip("PostgreSQL needs initdb; skipped with -short")
			}
			fn(t, storetest.Open(t, b))
		})
	}
}

func TestStore(t *testing.T) {
	forEachBackend(t, func(t *testing.T, s *store.Store) {
		ctx := context.Background()
		// The suite shares one database to keep PostgreSQL start-ups few.
		t.Run("plans", func(t *testing.T) { testPlans(ctx, t, s) })
		t.Run("customers and users", func(t *testing.T) { testUsers(ctx, t, s) })
		t.Run("ip leases", func(t *testing.T) { testLeases(ctx, t, s) })
		t.Run("servers and operations", func(t *testing.T) { testServers(ctx, t, s) })
		t.Run("traffic", func(t *testing.T) { testTraffic(ctx, t, s) })
		t.Run("billing periods", func(t *testing.T) { testPeriods(ctx, t, s) })
	})
}

func testPlans(ctx context.Context, t *testing.T, s *store.Store) {
	p := store.Plan{Name: "E", VCPUs: 1, MemoryBytes: 256 << 20, DiskBytes: 10 << 30, TrafficBytes: 100e9, PriceYen: 30000}
	if err := s.EnsurePlan(ctx, p); err != nil {
		t.Fatal(err)
	}
	// Seeding again must not overwrite an operator's edit.
	p.PriceYen = 35000
	if err := s.PutPlan(ctx, p); err != nil {
		t.Fatal(err)
	}
	p.PriceYen = 1
	if err := s.EnsurePlan(ctx, p); err != nil {
		t.Fatal(err)
	}
	got, err := s.GetPlan(ctx, "E")
	if err != nil {
		t.Fatal(err)
	}
	if got.PriceYen != 35000 || got.MemoryBytes != 256<<20 {
		t.Fatalf("plan E = %+v, want price 35000 and 256 MiB", got)
	}
	if err := s.PutPlan(ctx, store.Plan{Name: "bad", VCPUs: 0, MemoryBytes: 1, DiskBytes: 1}); !errors.Is(err, store.ErrConflict) {
		t.Fatalf("plan with 0 vCPUs: err = %v, want ErrConflict", err)
	}
	if _, err := s.GetPlan(ctx, "Z"); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("missing plan: err = %v, want ErrNotFound", err)
	}
}

func testUsers(ctx context.Context, t *testing.T, s *store.Store) {
	c := &store.Customer{Name: "acme", Email: "ops@acme.example", MaxServers: 3}
	if err := s.CreateCustomer(ctx, c); err != nil {
		t.Fatal(err)
	}
	if err := s.CreateCustomer(ctx, &store.Customer{Name: "acme"}); !errors.Is(err, store.ErrConflict) {
		t.Fatalf("duplicate customer: err = %v, want ErrConflict", err)
	}
	tok, _ := authtoken.New()
	u := &store.User{Name: "alice", Role: store.RoleCustomer, CustomerID: c.ID}
	if err := s.CreateUser(ctx, u, authtoken.Hash(tok)); err != nil {
		t.Fatal(err)
	}
	got, err := s.UserByTokenHash(ctx, authtoken.Hash(tok))
	if err != nil || got.ID != u.ID || got.CustomerID != c.ID {
		t.Fatalf("UserByTokenHash = %+v, %v; want alice of acme", got, err)
	}
	if _, err := s.UserByTokenHash(ctx, authtoken.Hash("wrong")); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("unknown token: err = %v, want ErrNotFound", err)
	}
	// An admin cannot belong to a customer, and a customer user must.
	if err := s.CreateUser(ctx, &store.User{Name: "x", Role: store.RoleAdmin, CustomerID: c.ID}, "h1"); !errors.Is(err, store.ErrConflict) {
		t.Fatalf("admin with customer: err = %v, want ErrConflict", err)
	}
	if err := s.CreateUser(ctx, &store.User{Name: "y", Role: store.RoleCustomer}, "h2"); !errors.Is(err, store.ErrConflict) {
		t.Fatalf("customer user without customer: err = %v, want ErrConflict", err)
	}
	// A customer with users cannot be deleted.
	if err := s.DeleteCustomer(ctx, c.ID); !errors.Is(err, store.ErrConflict) {
		t.Fatalf("delete referenced customer: err = %v, want ErrConflict", err)
	}
	// Pagination walks every row once.
	for i := 0; i < 5; i++ {
		if err := s.CreateCustomer(ctx, &store.Customer{Name: fmt.Sprintf("c%d", i)}); err != nil {
			t.Fatal(err)
		}
	}
	seen := map[string]bool{}
	page := store.Page{Limit: 2}
	for {
		cs, err := s.ListCustomers(ctx, page)
		if err != nil {
			t.Fatal(err)
		}
		for _, c := range cs {
			if seen[c.ID] {
				t.Fatalf("customer %s listed twice", c.Name)
			}
			seen[c.ID] = true
		}
		if len(cs) < page.Limit {
			break
		}
		page.After = cs[len(cs)-1].ID
	}
	if len(seen) != 6 {
		t.Fatalf("pagination saw %d customers, want 6", len(seen))
	}
}

func testLeases(ctx context.Context, t *testing.T, s *store.Store) {
	if err := s.CreateIPPool(ctx, &store.IPPool{Name: "bad", CIDR: "10.0.0.0/24", First: "10.0.1.1", Last: "10.0.1.9"}); err == nil {
		t.Fatal("a range outside its CIDR was accepted")
	}
	p4 := &store.IPPool{Name: "v4", CIDR: "192.0.2.0/29", First: "192.0.2.1", Last: "192.0.2.6", Gateway: "192.0.2.1", DNS: []string{"192.0.2.53"}}
	if err := s.CreateIPPool(ctx, p4); err != nil {
		t.Fatal(err)
	}
	p6 := &store.IPPool{Name: "v6", CIDR: "2001:db8::/64", First: "2001:db8::10", Last: "2001:db8::ffff"}
	if err := s.CreateIPPool(ctx, p6); err != nil {
		t.Fatal(err)
	}
	if p4.Family != 4 || p6.Family != 6 {
		t.Fatalf("families = %d, %d; want 4, 6", p4.Family, p6.Family)
	}
	// Concurrent leases never hand out one address twice; the gateway is never leased.
	var mu sync.Mutex
	got := map[string]string{}
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for i := 0; i < 8; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			l, _, err := s.LeaseIP(ctx, 4, fmt.Sprintf("srv-%d", i))
			if err != nil {
				errs <- err
				return
			}
			mu.Lock()
			defer mu.Unlock()
			if other, dup := got[l.Address]; dup {
				t.Errorf("address %s leased to %s and srv-%d", l.Address, other, i)
			}
			got[l.Address] = l.ServerID
		}(i)
	}
	wg.Wait()
	close(errs)
	exhausted := 0
	for err := range errs {
		if !errors.Is(err, store.ErrExhausted) {
			t.Fatalf("lease: %v", err)
		}
		exhausted++
	}
	// .2-.6 are five addresses (.1 is the gateway).
	if len(got) != 5 || exhausted != 3 {
		t.Fatalf("leased %d addresses with %d exhausted, want 5 and 3: %v", len(got), exhausted, got)
	}
	if _, ok := got["192.0.2.1"]; ok {
		t.Fatal("the gateway was leased")
	}
	victim := "192.0.2.4"
	if err := s.ReleaseIPs(ctx, got[victim]); err != nil {
		t.Fatal(err)
	}
	l, _, err := s.LeaseIP(ctx, 4, "srv-new")
	if err != nil || l.Address != victim {
		t.Fatalf("after release got %q, %v; want the freed %s", l.Address, err, victim)
	}
	l6, _, err := s.LeaseIP(ctx, 6, "srv-new")
	if err != nil || l6.Address != "2001:db8::10" {
		t.Fatalf("IPv6 lease = %q, %v", l6.Address, err)
	}
}

func testServers(ctx context.Context, t *testing.T, s *store.Store) {
	c := &store.Customer{Name: "srvco", MaxServers: 5}
	if err := s.CreateCustomer(ctx, c); err != nil {
		t.Fatal(err)
	}
	h := &store.Host{Name: "h1", URL: "http://127.0.0.1:1", Token: "t", CPUs: 8, MemoryBytes: 16 << 30}
	if err := s.CreateHost(ctx, h); err != nil {
		t.Fatal(err)
	}
	im := &store.Image{Name: "tiny", State: store.ImageReady}
	if err := s.CreateImage(ctx, im); err != nil {
		t.Fatal(err)
	}
	sv := &store.Server{Name: "web1", CustomerID: c.ID, Plan: "E", ImageID: im.ID, VCPUs: 1, MemoryBytes: 256 << 20, DiskBytes: 10 << 30,
		SSHKeys: []string{"ssh-ed25519 AAAA a@b", "ssh-ed25519 BBBB c@d"}}
	err := s.InTx(ctx, func(tx *store.Store) error {
		if err := tx.CreateServer(ctx, sv); err != nil {
			return err
		}
		return tx.CreateOperation(ctx, &store.Operation{Kind: "server.create", ServerID: sv.ID, CustomerID: c.ID, IdempotencyKey: "k1"})
	})
	if err != nil {
		t.Fatal(err)
	}
	// A second create with the same key is refused and the transaction leaves nothing.
	err = s.InTx(ctx, func(tx *store.Store) error {
		if err := tx.CreateServer(ctx, &store.Server{Name: "web1-dup", CustomerID: c.ID, Plan: "E", ImageID: im.ID, VCPUs: 1, MemoryBytes: 1, DiskBytes: 1}); err != nil {
			return err
		}
		return tx.CreateOperation(ctx, &store.Operation{Kind: "server.create", IdempotencyKey: "k1"})
	})
	if !errors.Is(err, store.ErrConflict) {
		t.Fatalf("duplicate idempotency key: err = %v, want ErrConflict", err)
	}
	if _, err := s.GetServer(ctx, "web1-dup"); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("rolled-back server exists: %v", err)
	}
	op, err := s.OperationByKey(ctx, "k1")
	if err != nil || op.ServerID != sv.ID || op.State != store.OpPending {
		t.Fatalf("OperationByKey = %+v, %v", op, err)
	}
	sv.HostID, sv.State, sv.IPv4 = h.ID, store.ServerRunning, "192.0.2.9"
	if err := s.UpdateServer(ctx, sv); err != nil {
		t.Fatal(err)
	}
	got, err := s.GetServer(ctx, "web1")
	if err != nil {
		t.Fatal(err)
	}
	if got.HostID != h.ID || got.State != store.ServerRunning || len(got.SSHKeys) != 2 || got.IPv4 != "192.0.2.9" {
		t.Fatalf("server = %+v", got)
	}
	if err := s.DeleteHost(ctx, h.ID); !errors.Is(err, store.ErrConflict) {
		t.Fatalf("deleting a host with servers: err = %v, want ErrConflict", err)
	}
	if n, err := s.CountServers(ctx, c.ID); err != nil || n != 1 {
		t.Fatalf("CountServers = %d, %v", n, err)
	}
	if err := s.RequestCancel(ctx, op.ID); err != nil {
		t.Fatal(err)
	}
	op.State = store.OpSucceeded
	op.Progress = 100
	if err := s.UpdateOperation(ctx, &op); err != nil {
		t.Fatal(err)
	}
	if err := s.RequestCancel(ctx, op.ID); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("cancel of a finished operation: err = %v, want ErrNotFound", err)
	}
	un, err := s.ListOperations(ctx, store.OperationFilter{Unfinished: true}, store.Page{})
	if err != nil || len(un) != 0 {
		t.Fatalf("unfinished operations = %v, %v", un, err)
	}
}

func testTraffic(ctx context.Context, t *testing.T, s *store.Store) {
	base := time.Date(2026, 11, 1, 0, 0, 0, 0, time.UTC)
	for i := 0; i < 10; i++ {
		if err := s.AddTraffic(ctx, store.TrafficSample{ServerID: "srv-x", At: base.Add(time.Duration(i) * 24 * time.Hour), RxBytes: 100, TxBytes: 1000}); err != nil {
			t.Fatal(err)
		}
	}
	rx, tx, err := s.TrafficTotal(ctx, "srv-x", base.Add(24*time.Hour), base.Add(5*24*time.Hour))
	if err != nil || rx != 400 || tx != 4000 {
		t.Fatalf("traffic total = %d, %d, %v; want 400, 4000", rx, tx, err)
	}
	if err := s.AddTraffic(ctx, store.TrafficSample{ServerID: "srv-x", At: base, RxBytes: -1}); err == nil {
		t.Fatal("negative traffic accepted")
	}
	// Counter readings become deltas against the stored baseline; a reset counts from zero.
	for i, c := range []struct{ rx, tx uint64 }{{10, 20}, {15, 20}, {15, 20}, {4, 5}} {
		if _, err := s.RecordCounters(ctx, "srv-c", base.Add(time.Duration(i)*time.Minute), c.rx, c.tx); err != nil {
			t.Fatal(err)
		}
	}
	rx, tx, err = s.TrafficTotal(ctx, "srv-c", base, base.Add(time.Hour))
	if err != nil || rx != 19 || tx != 25 {
		t.Fatalf("counter readings total = %d, %d, %v; want 19, 25", rx, tx, err)
	}
	if _, err := s.RecordCounters(ctx, "srv-c", base, 1<<63, 0); err == nil {
		t.Fatal("counter beyond int64 accepted")
	}
}

// TestReopen checks that migrations are idempotent and data survives a reopen (SQLite file).
func TestReopen(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	s, err := store.Open(ctx, "", dir)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.CreateCustomer(ctx, &store.Customer{Name: "kept"}); err != nil {
		t.Fatal(err)
	}
	s.Close()
	s, err = store.Open(ctx, "", dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if _, err := s.GetCustomer(ctx, "kept"); err != nil {
		t.Fatalf("customer lost across reopen: %v", err)
	}
}

func testPeriods(ctx context.Context, t *testing.T, s *store.Store) {
	nov := func(d int) time.Time { return time.Date(2026, 11, d, 0, 0, 0, 0, time.UTC) }
	sv := store.Server{ID: "srv-p", Name: "p", CustomerID: "cus-p"}
	if err := s.StartPeriod(ctx, sv, store.Plan{Name: "E", PriceYen: 30000}, nov(1).AddDate(0, -1, 0)); err != nil {
		t.Fatal(err)
	}
	if err := s.StartPeriod(ctx, sv, store.Plan{Name: "C", PriceYen: 60000}, nov(10)); err != nil {
		t.Fatal(err)
	}
	if err := s.EndPeriod(ctx, sv.ID, nov(20)); err != nil {
		t.Fatal(err)
	}
	ps, err := s.ListPeriods(ctx, "cus-p", nov(1), nov(1).AddDate(0, 1, 0))
	if err != nil || len(ps) != 2 || ps[0].Plan != "E" || !ps[0].EndedAt.Equal(nov(10)) || ps[1].Plan != "C" || !ps[1].EndedAt.Equal(nov(20)) {
		t.Fatalf("periods = %+v, %v", ps, err)
	}
	if ps, _ := s.ListPeriods(ctx, "cus-p", nov(1).AddDate(0, 1, 0), nov(1).AddDate(0, 2, 0)); len(ps) != 0 {
		t.Fatalf("closed periods show up in the next month: %+v", ps)
	}
}
