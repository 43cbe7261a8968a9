package api_test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/growserver/grow/client"
	"github.com/growserver/grow/internal/api"
	"github.com/growserver/grow/internal/authtoken"
	"github.com/growserver/grow/internal/billing"
	"github.com/growserver/grow/internal/jobs"
	"github.com/growserver/grow/internal/jobs/jobstest"
	"github.com/growserver/grow/internal/scheduler"
	"github.com/growserver/grow/internal/storage/witness"
	"github.com/growserver/grow/internal/store"
	"github.com/growserver/grow/internal/store/storetest"
	"github.com/growserver/grow/test/testbed"
)

type fixture struct {
	t                 *testing.T
	ctx               context.Context
	st                *store.Store
	api               *api.API
	srv               *httptest.Server
	adminTok          string
	admin, alice, bob *client.Client
	aliceTok, bobTok  string
	web1, bob1        client.Server
	web1Op            client.Operation
	cluster           *jobstest.Cluster
	jobs              *jobs.Manager
}

func newFixture(t *testing.T, backend string) *fixture {
	t.Helper()
	ctx := context.Background()
	f := &fixture{t: t, ctx: ctx, st: storetest.Open(t, backend), cluster: jobstest.NewCluster()}
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	m := jobs.New(jobs.Config{Store: f.st, Connector: f.cluster, Policy: scheduler.DefaultPolicy, ReadyTimeout: 10 * time.Second, Logger: quiet})
	t.Cleanup(m.Close)
	for _, p := range billing.DefaultPlans() {
		if err := f.st.EnsurePlan(ctx, p); err != nil {
			t.Fatal(err)
		}
	}
	f.adminTok, _ = authtoken.New()
	if err := f.st.CreateUser(ctx, &store.User{Name: "admin", Role: store.RoleAdmin}, authtoken.Hash(f.adminTok)); err != nil {
		t.Fatal(err)
	}
	f.jobs = m
	f.api = api.New(api.Config{Store: f.st, Jobs: m, Logger: quiet, WitnessToken: fixtureWitnessToken})
	f.srv = httptest.NewServer(f.api)
	t.Cleanup(f.srv.Close)
	f.admin = f.client(f.adminTok)

	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	_, err := f.admin.AddStorage(ctx, client.StorageReq{Name: "stor1", URL: "http://127.0.0.1:1", Token: "x"})
	must(err)
	for _, n := range []string{"h1", "h2"} {
		_, err := f.admin.AddHost(ctx, client.HostRequest{Name: n, URL: "http://127.0.0.1:1", Token: "x", CPUs: 8, MemoryBytes: 8 << 30})
		must(err)
	}
	_, err = f.admin.CreateIPPool(ctx, client.IPPoolRequest{Name: "v4", CIDR: "198.51.100.0/24", First: "198.51.100.10", Last: "198.51.100.200", Gateway: "198.51.100.1"})
	must(err)
	_, err = f.admin.ImportImage(ctx, "tiny", bytes.NewReader(make([]byte, 1<<20)), 1<<20, client.ImportOptions{})
	must(err)
	for _, c := range []string{"acme", "other"} {
		_, err := f.admin.CreateCustomer(ctx, client.CustomerReq{Name: c})
		must(err)
	}
	a, err := f.admin.CreateUser(ctx, client.UserRequest{Name: "alice", Role: "customer", Customer: "acme"})
	must(err)
	b, err := f.admin.CreateUser(ctx, client.UserRequest{Name: "bob", Role: "customer", Customer: "other"})
	must(err)
	f.aliceTok, f.bobTok = a.Token, b.Token
	f.alice, f.bob = f.client(a.Token), f.client(b.Token)
	f.web1Op = f.createAndWait("web1", "acme")
	f.web1, err = f.admin.GetServer(ctx, "web1")
	must(err)
	f.createAndWait("bob1", "other")
	f.bob1, err = f.admin.GetServer(ctx, "bob1")
	must(err)
	return f
}

func (f *fixture) client(tok string) *client.Client {
	c, err := client.New(f.srv.URL, tok)
	if err != nil {
		f.t.Fatal(err)
	}
	return c
}

func (f *fixture) createAndWait(name, customer string) client.Operation {
	f.t.Helper()
	op, err := f.admin.CreateServer(f.ctx, client.CreateServer{Name: name, Customer: customer, Plan: "E", Image: "tiny"}, "")
	if err != nil {
		f.t.Fatalf("create %s: %v", name, err)
	}
	ctx, cancel := context.WithTimeout(f.ctx, 20*time.Second)
	defer cancel()
	op, err = f.admin.WaitOperation(ctx, op.ID, 50*time.Millisecond, nil)
	if err != nil || op.State != store.OpSucceeded {
		f.t.Fatalf("create %s: %+v %v", name, op, err)
	}
	return op
}

// raw sends one request with token and returns the status and error code.
func (f *fixture) raw(method, path, token, body string) (int, string) {
	f.t.Helper()
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	req, _ := http.NewRequest(method, f.srv.URL+path, rd)
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	if method == http.MethodPost && strings.HasPrefix(path, "/v1/images") {
		req.Header.Set("Content-Type", "application/octet-stream")
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		f.t.Fatal(err)
	}
	defer resp.Body.Close()
	var e api.Error
	b, _ := io.ReadAll(resp.Body)
	_ = jsonUnmarshal(b, &e)
	return resp.StatusCode, e.Code
}

type endpoint struct {
	pattern string // as registered
	method  string
	path    string
	body    string
	// tenant marks endpoints about acme's own data: another customer must get 404.
	tenant bool
}

func endpoints(f *fixture) []endpoint {
	srv, op := f.web1.ID, f.web1Op.ID
	return []endpoint{
		{"GET /v1/whoami", "GET", "/v1/whoami", "", false},
		{"GET /v1/plans", "GET", "/v1/plans", "", false},
		{"GET /v1/plans/{name}", "GET", "/v1/plans/E", "", false},
		{"PUT /v1/plans/{name}", "PUT", "/v1/plans/E", `{"price_yen":1}`, false},
		{"DELETE /v1/plans/{name}", "DELETE", "/v1/plans/S", "", false},
		{"GET /v1/customers", "GET", "/v1/customers", "", false},
		{"POST /v1/customers", "POST", "/v1/customers", `{"name":"evil"}`, false},
		{"GET /v1/customers/{id}", "GET", "/v1/customers/acme", "", true},
		{"PATCH /v1/customers/{id}", "PATCH", "/v1/customers/acme", `{"max_servers":1000}`, true},
		{"DELETE /v1/customers/{id}", "DELETE", "/v1/customers/acme", "", true},
		{"GET /v1/customers/{id}/invoices/{month}", "GET", "/v1/customers/acme/invoices/2026-11", "", true},
		{"GET /v1/users", "GET", "/v1/users", "", false},
		{"POST /v1/users", "POST", "/v1/users", `{"name":"evil","role":"admin"}`, false},
		{"GET /v1/users/{id}", "GET", "/v1/users/alice", "", true},
		{"POST /v1/users/{id}/token", "POST", "/v1/users/alice/token", "", true},
		{"DELETE /v1/users/{id}", "DELETE", "/v1/users/alice", "", true},
		{"GET /v1/hosts", "GET", "/v1/hosts", "", false},
		{"POST /v1/hosts", "POST", "/v1/hosts", `{"name":"evil","url":"http://127.0.0.1:9","token":"t","cpus":1,"memory_bytes":1073741824}`, false},
		{"GET /v1/hosts/{id}", "GET", "/v1/hosts/h1", "", false},
		{"PATCH /v1/hosts/{id}", "PATCH", "/v1/hosts/h1", `{"state":"maintenance"}`, false},
		{"POST /v1/hosts/{id}/evacuate", "POST", "/v1/hosts/h2/evacuate", "", false},
		{"DELETE /v1/hosts/{id}", "DELETE", "/v1/hosts/h2", "", false},
		{"GET /v1/storage", "GET", "/v1/storage", "", false},
		{"POST /v1/storage", "POST", "/v1/storage", `{"name":"evil","url":"http://127.0.0.1:9","token":"t"}`, false},
		{"GET /v1/storage/{id}", "GET", "/v1/storage/stor1", "", false},
		{"GET /v1/ip-pools", "GET", "/v1/ip-pools", "", false},
		{"POST /v1/ip-pools", "POST", "/v1/ip-pools", `{"name":"evil","cidr":"10.9.0.0/24","first":"10.9.0.2","last":"10.9.0.9"}`, false},
		{"GET /v1/ip-pools/{id}", "GET", "/v1/ip-pools/v4", "", false},
		{"GET /v1/ip-pools/{id}/leases", "GET", "/v1/ip-pools/v4/leases", "", false},
		{"DELETE /v1/ip-pools/{id}", "DELETE", "/v1/ip-pools/v4", "", false},
		{"GET /v1/images", "GET", "/v1/images", "", false},
		{"GET /v1/images/{id}", "GET", "/v1/images/tiny", "", false},
		{"POST /v1/images", "POST", "/v1/images?name=evil", "xxxx", false},
		{"DELETE /v1/images/{id}", "DELETE", "/v1/images/tiny", "", false},
		{"GET /v1/servers", "GET", "/v1/servers?customer=acme", "", true},
		{"POST /v1/servers", "POST", "/v1/servers", `{"name":"evil","customer":"acme","plan":"E","image":"tiny"}`, true},
		{"GET /v1/servers/{id}", "GET", "/v1/servers/" + srv, "", true},
		{"DELETE /v1/servers/{id}", "DELETE", "/v1/servers/" + srv, "", true},
		{"POST /v1/servers/{id}/{action}", "POST", "/v1/servers/" + srv + "/stop", "", true},
		{"POST /v1/servers/{id}/{action}", "POST", "/v1/servers/" + srv + "/reboot", "", true},
		{"POST /v1/servers/{id}/{action}", "POST", "/v1/servers/" + srv + "/start", "", true},
		{"POST /v1/servers/{id}/{action}", "POST", "/v1/servers/" + srv + "/resize", `{"plan":"D"}`, true},
		{"POST /v1/servers/{id}/{action}", "POST", "/v1/servers/" + srv + "/migrate", `{"to":"h2"}`, true},
		{"GET /v1/servers/{id}/console", "GET", "/v1/servers/" + srv + "/console", "", true},
		{"GET /v1/servers/{id}/console/ws", "GET", "/v1/servers/" + srv + "/console/ws", "", true},
		{"GET /v1/operations", "GET", "/v1/operations?server=" + srv, "", true},
		{"GET /v1/operations/{id}", "GET", "/v1/operations/" + op, "", true},
		{"POST /v1/operations/{id}/cancel", "POST", "/v1/operations/" + op + "/cancel", "", true},
		{"GET /v1/openapi.yaml", "GET", "/v1/openapi.yaml", "", false},
	}
}

// TestAuthorization tries every endpoint without a token, with a wrong token, as
// another customer and, for admin-only endpoints, as a customer: every attempt must be
// refused and change nothing.
func TestAuthorization(t *testing.T) {
	for _, backend := range storetest.Backends {
		t.Run(backend, func(t *testing.T) {
			if backend == "postgres" && testing.Short() {
				t.Skip("PostgreSQL skipped with -short")
			}
			f := newFixture(t, backend)
			eps := endpoints(f)
			covered := map[string]bool{}
			for _, e := range eps {
				covered[e.pattern] = true
			}
			routes := f.api.Routes()
			for pattern := range routes {
				if !covered[pattern] {
					t.Errorf("endpoint %s is missing from the authorization table", pattern)
				}
			}
			before := f.snapshot()
			for _, e := range eps {
				adminOnly, ok := routes[e.pattern]
				if !ok {
					t.Fatalf("table names unknown endpoint %s", e.pattern)
				}
				name := e.method + " " + e.path
				for _, tok := range []string{"", "not-a-token", f.adminTok + "x"} {
					if st, code := f.raw(e.method, e.path, tok, e.body); st != http.StatusUnauthorized || code != api.CodeUnauthorized {
						t.Errorf("%s with token %q: %d %s, want 401 unauthorized", name, tok, st, code)
					}
				}
				isAction := strings.HasSuffix(e.path, "/stop") || strings.HasSuffix(e.path, "/start") || strings.HasSuffix(e.path, "/reboot")
				if adminOnly || (e.pattern == "POST /v1/servers/{id}/{action}" && !isAction) {
					st, code := f.raw(e.method, e.path, f.aliceTok, e.body)
					if st != http.StatusForbidden || code != api.CodeForbidden {
						t.Errorf("%s as a customer: %d %s, want 403 forbidden", name, st, code)
					}
				}
				if e.tenant {
					st, _ := f.raw(e.method, e.path, f.bobTok, e.body)
					if st != http.StatusNotFound && st != http.StatusForbidden {
						t.Errorf("%s as another customer: %d, want 404 or 403", name, st)
					}
				}
			}
			if after := f.snapshot(); after != before {
				t.Fatalf("refused requests changed state:\nbefore %s\nafter  %s", before, after)
			}
			// The owner may do the customer actions on its own server.
			for _, a := range []string{"stop", "start", "reboot"} {
				op, err := f.alice.ServerAction(f.ctx, f.web1.ID, a, client.ActionRequest{})
				if err != nil {
					t.Fatalf("alice %s: %v", a, err)
				}
				if op, err = f.alice.WaitOperation(f.ctx, op.ID, 20*time.Millisecond, nil); err != nil || op.State != store.OpSucceeded {
					t.Fatalf("alice %s: %+v %v", a, op, err)
				}
			}
			// Lists are filtered to the caller's own customer.
			svs, err := f.bob.ListServers(f.ctx, client.ServerFilter{})
			if err != nil || len(svs) != 1 || svs[0].Name != "bob1" {
				t.Fatalf("bob sees %+v (%v), want only bob1", svs, err)
			}
			ops, err := f.bob.ListOperations(f.ctx, false)
			if err != nil {
				t.Fatal(err)
			}
			for _, o := range ops {
				if o.CustomerID != f.bob1.CustomerID {
					t.Fatalf("bob sees operation %+v of another customer", o)
				}
			}
			if _, err := f.bob.Console(f.ctx, "bob1"); err != nil {
				t.Fatalf("bob reading his own console: %v", err)
			}
		})
	}
}

// snapshot summarises everything an attacker could have changed.
func (f *fixture) snapshot() string {
	var b strings.Builder
	cs, _ := f.st.ListCustomers(f.ctx, store.Page{})
	for _, c := range cs {
		b.WriteString(c.Name + ":" + itoa(c.MaxServers) + " ")
	}
	us, _ := f.st.ListUsers(f.ctx, "", store.Page{})
	b.WriteString("users=" + itoa(len(us)) + " ")
	svs, _ := f.st.AllServers(f.ctx)
	for _, s := range svs {
		b.WriteString(s.Name + "/" + s.State + "/" + s.Plan + "/" + s.HostID + " ")
	}
	ps, _ := f.st.ListPlans(f.ctx)
	for _, p := range ps {
		b.WriteString(p.Name + "=" + itoa(int(p.PriceYen)) + " ")
	}
	hs, _ := f.st.ListHosts(f.ctx)
	for _, h := range hs {
		b.WriteString(h.Name + "/" + h.State + " ")
	}
	ims, _ := f.st.ListImages(f.ctx)
	pools, _ := f.st.ListIPPools(f.ctx)
	stor, _ := f.st.ListStorage(f.ctx)
	ops, _ := f.st.ListOperations(f.ctx, store.OperationFilter{}, store.Page{})
	b.WriteString("images=" + itoa(len(ims)) + " pools=" + itoa(len(pools)) + " storage=" + itoa(len(stor)) + " ops=" + itoa(len(ops)))
	return b.String()
}

func TestOpenAPIMatchesDocs(t *testing.T) {
	docs, err := os.ReadFile("../../docs/openapi.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(docs, api.OpenAPI) {
		t.Fatal("docs/openapi.yaml differs from internal/api/openapi.yaml: copy it over")
	}
	// Every route is documented.
	a := api.New(api.Config{})
	for pattern := range a.Routes() {
		method, path, _ := strings.Cut(pattern, " ")
		if !bytes.Contains(api.OpenAPI, []byte("\n  "+path+":")) {
			t.Errorf("path %s is not in the OpenAPI document", path)
		}
		if !bytes.Contains(api.OpenAPI, []byte(strings.ToLower(method)+":")) {
			t.Errorf("method %s is not in the OpenAPI document", method)
		}
	}
}

// TestHealthShown checks that hosts and storage controllers carry the latest health
// probe: reachable with what the daemon said, or down with the reason.
func TestHealthShown(t *testing.T) {
	f := newFixture(t, "sqlite")
	hs, err := f.admin.ListHosts(f.ctx)
	if err != nil || len(hs) != 2 {
		t.Fatalf("hosts: %v, %v", hs, err)
	}
	f.cluster.SetDown(hs[0].ID, true)
	f.jobs.ProbeAll(f.ctx)
	h, err := f.admin.GetHost(f.ctx, hs[0].Name)
	if err != nil || h.Health.Reachable || h.Health.Detail == "" || h.Health.Checked.IsZero() {
		t.Fatalf("silent host: %+v, %v", h, err)
	}
	hs, err = f.admin.ListHosts(f.ctx)
	if err != nil || hs[0].Health.Reachable || !hs[1].Health.Reachable || hs[1].Health.Detail != "fake agent" {
		t.Fatalf("host list health: %+v, %v", hs, err)
	}
	cs, err := f.admin.ListStorage(f.ctx)
	if err != nil || len(cs) != 1 || !cs[0].Health.Reachable || cs[0].Health.Detail != "pool ok" {
		t.Fatalf("storage health: %+v, %v", cs, err)
	}
	// Tokens of the daemons never leave the control plane.
	status, body := f.adminGET(t, "/v1/hosts")
	if status != 200 || strings.Contains(body, `"token"`) || !strings.Contains(body, `"reachable": false`) {
		t.Fatalf("GET /v1/hosts: %d %s", status, body)
	}
}

// fixtureWitnessToken is the storage controllers' credential for the witness in tests.
const fixtureWitnessToken = "witness-secret-for-tests"

// TestWitness checks the control plane as the mirror witness, through the storage
// controllers' own client, on both databases: grants are compare-and-set, a retry of
// one's own grant is granted, records survive a restart (a second API on the same
// store), and neither users' tokens nor a wrong one open it.
func TestWitness(t *testing.T) {
	for _, backend := range storetest.Backends {
		t.Run(backend, func(t *testing.T) {
			if backend == "postgres" && testing.Short() {
				t.Skip("PostgreSQL skipped with -short")
			}
			f := newFixture(t, backend)
			wc, err := witness.NewClient(f.srv.URL+api.WitnessPrefix, fixtureWitnessToken)
			if err != nil {
				t.Fatal(err)
			}
			if err := wc.Health(f.ctx); err != nil {
				t.Fatalf("witness health: %v", err)
			}
			grant := func(key, holder string, epoch uint64, want bool) witness.GrantAnswer {
				t.Helper()
				ans, err := wc.Grant(f.ctx, key, holder, epoch)
				if err != nil || ans.Granted != want {
					t.Fatalf("grant %s %s %d: %+v, %v; want granted=%v", key, holder, epoch, ans, err, want)
				}
				return ans
			}
			grant("vol-a", "A", 2, true)
			grant("vol-a", "A", 2, true) // a retry after a lost answer
			if ans := grant("vol-a", "B", 2, false); ans.Record != (witness.Record{Epoch: 2, Holder: "A"}) {
				t.Fatalf("refused grant reports %+v, want A's epoch 2", ans.Record)
			}
			grant("vol-a", "B", 1, false)
			grant("vol-a", "B", 3, true)
			grant("vol-b", "A", 1, true)
			// Racing grants of one epoch: exactly one wins.
			wins := make(chan bool, 8)
			for i := 0; i < 8; i++ {
				go func(i int) {
					ans, err := wc.Grant(f.ctx, "vol-race", fmt.Sprintf("c%d", i), 7)
					wins <- err == nil && ans.Granted
				}(i)
			}
			n := 0
			for i := 0; i < 8; i++ {
				if <-wins {
					n++
				}
			}
			if n != 1 {
				t.Fatalf("%d racing grants of one epoch won, want 1", n)
			}
			// A restarted control plane (a new API on the same database) remembers.
			quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
			srv2 := httptest.NewServer(api.New(api.Config{Store: f.st, Jobs: f.jobs, Logger: quiet, WitnessToken: fixtureWitnessToken}))
			defer srv2.Close()
			wc2, _ := witness.NewClient(srv2.URL+api.WitnessPrefix, fixtureWitnessToken)
			if rec, err := wc2.Get(f.ctx, "vol-a"); err != nil || rec != (witness.Record{Epoch: 3, Holder: "B"}) {
				t.Fatalf("record after restart: %+v, %v", rec, err)
			}
			if _, err := wc2.Grant(f.ctx, "vol-a", "A", 0); err == nil {
				t.Fatal("epoch 0 accepted")
			}
			for name, tok := range map[string]string{"admin": f.adminTok, "customer": f.aliceTok, "wrong": "nope", "none": ""} {
				bad, _ := witness.NewClient(f.srv.URL+api.WitnessPrefix, tok)
				if _, err := bad.Grant(f.ctx, "vol-a", "X", 99); err == nil {
					t.Errorf("witness grant with the %s token accepted", name)
				}
			}
			if rec, _ := wc.Get(f.ctx, "vol-a"); rec.Epoch != 3 {
				t.Fatalf("refused requests changed the record: %+v", rec)
			}
			// The witness token opens nothing else.
			if code, _ := f.raw("GET", "/v1/servers", fixtureWitnessToken, ""); code != http.StatusUnauthorized {
				t.Fatalf("GET /v1/servers with the witness token: %d, want 401", code)
			}
		})
	}
}

// TestStoragePartner checks the registration of a controller's mirror partner: a
// partner needs its own URL and token, and neither token ever leaves the control plane.
func TestStoragePartner(t *testing.T) {
	f := newFixture(t, "sqlite")
	for _, bad := range []client.StorageReq{
		{Name: "p1", URL: "http://10.0.0.1:7480", Token: "x", PartnerURL: "http://10.0.0.2:7480"},
		{Name: "p2", URL: "http://10.0.0.1:7480", Token: "x", PartnerURL: "ftp://10.0.0.2", PartnerToken: "y"},
		{Name: "p3", URL: "http://10.0.0.1:7480", Token: "x", PartnerURL: "http://10.0.0.1:7480", PartnerToken: "y"},
		{Name: "p4", URL: "http://10.0.0.1:7480", Token: "x", PartnerToken: "y"},
	} {
		if _, err := f.admin.AddStorage(f.ctx, bad); err == nil || !strings.Contains(err.Error(), "mirror partner") {
			t.Fatalf("%+v accepted: %v", bad, err)
		}
	}
	s, err := f.admin.AddStorage(f.ctx, client.StorageReq{Name: "pair1", URL: "http://10.0.0.1:7480", Token: "tok-a-secret",
		PartnerURL: "http://10.0.0.2:7480", PartnerToken: "tok-b-secret"})
	if err != nil || s.PartnerURL != "http://10.0.0.2:7480" {
		t.Fatalf("register with a partner: %+v %v", s, err)
	}
	stored, err := f.st.GetStorage(f.ctx, "pair1")
	if err != nil || stored.PartnerToken != "tok-b-secret" || stored.PartnerURL != "http://10.0.0.2:7480" {
		t.Fatalf("stored: %+v %v", stored, err)
	}
	if status, body := f.adminGET(t, "/v1/storage"); status != 200 || strings.Contains(body, "secret") || !strings.Contains(body, "10.0.0.2") {
		t.Fatalf("GET /v1/storage: %d %s", status, body)
	}
}

// TestHostCACert checks that a host's CA must be PEM and is kept for the https agent.
func TestHostCACert(t *testing.T) {
	f := newFixture(t, "sqlite")
	req := client.HostRequest{Name: "h9", URL: "https://10.0.0.9:8444", Token: "x", CPUs: 4, MemoryBytes: 4 << 30, CACert: "not a certificate"}
	if _, err := f.admin.AddHost(f.ctx, req); err == nil || !strings.Contains(err.Error(), "ca_cert") {
		t.Fatalf("a host with a CA that is no PEM certificate: %v", err)
	}
	pki, err := testbed.NewPKI(t.TempDir(), "10.0.0.9")
	if err != nil {
		t.Fatal(err)
	}
	pem, err := os.ReadFile(pki.CA)
	if err != nil {
		t.Fatal(err)
	}
	req.CACert = string(pem)
	if _, err := f.admin.AddHost(f.ctx, req); err != nil {
		t.Fatal(err)
	}
	if h, err := f.st.GetHost(f.ctx, "h9"); err != nil || h.CACert != string(pem) {
		t.Fatalf("stored host: %+v %v", h, err)
	}
}

// adminGET is a raw GET of path with the admin token: the status and the body as sent.
func (f *fixture) adminGET(t *testing.T, path string) (int, string) {
	t.Helper()
	req, _ := http.NewRequest("GET", f.srv.URL+path, nil)
	req.Header.Set("Authorization", "Bearer "+f.adminTok)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body)
}
