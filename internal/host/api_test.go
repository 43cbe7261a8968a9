package host

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/growserver/grow/internal/host/agentclient"
	"github.com/growserver/grow/internal/host/hostapi"
)

// newTestAgent runs an agent with an HTTP API on a temporary directory; the calls used
// here never start QEMU.
func newTestAgent(t *testing.T) (*Agent, *agentclient.Client, string) {
	t.Helper()
	dir := t.TempDir()
	a, err := New(context.Background(), Config{DataDir: dir, Bridge: "br-test", Accel: "tcg",
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(a.Close)
	srv := httptest.NewServer(a.Handler("s3cret"))
	t.Cleanup(srv.Close)
	c, err := agentclient.New(srv.URL, "s3cret")
	if err != nil {
		t.Fatal(err)
	}
	return a, c, srv.URL
}

func spec(name string) hostapi.VMSpec {
	return hostapi.VMSpec{Name: name, VCPUs: 1, MemoryMiB: 128,
		Disks: []hostapi.Disk{{ID: "root", Socket: "/run/x.sock", Export: "v"}},
		NICs:  []hostapi.NIC{{MAC: "52:54:00:00:00:01"}}}
}

func TestAPIDefineListDelete(t *testing.T) {
	a, c, _ := newTestAgent(t)
	ctx := context.Background()
	vm, err := c.Define(ctx, spec("one"))
	if err != nil {
		t.Fatal(err)
	}
	if vm.State != hostapi.StateDefined || vm.Spec.NICs[0].Bridge != "br-test" || vm.Spec.CPUModel != hostapi.DefaultCPUModel {
		t.Fatalf("defined VM %+v", vm)
	}
	if _, err := c.Define(ctx, spec("one")); !agentclient.IsConflict(err) {
		t.Fatalf("second define: %v", err)
	}
	bad := spec("two")
	bad.VCPUs = 0
	if _, err := c.Define(ctx, bad); err == nil {
		t.Fatal("invalid spec accepted")
	}
	if vms, err := c.List(ctx); err != nil || len(vms) != 1 {
		t.Fatalf("list: %v %v", vms, err)
	}
	if _, err := c.Get(ctx, "nope"); !agentclient.IsNotFound(err) {
		t.Fatalf("get missing: %v", err)
	}
	for name, call := range map[string]func() error{
		"stop":     func() error { return c.Stop(ctx, "one", 0) },
		"reboot":   func() error { return c.Reboot(ctx, "one") },
		"kill":     func() error { return c.Kill(ctx, "one") },
		"resize":   func() error { return c.Resize(ctx, "one", hostapi.ResizeRequest{VCPUs: 2}) },
		"announce": func() error { return c.Announce(ctx, "one") },
	} {
		if err := call(); !agentclient.IsConflict(err) {
			t.Errorf("%s of a defined VM: %v", name, err)
		}
	}
	if _, err := c.Migrate(ctx, "one", hostapi.MigrateRequest{TargetURL: "http://127.0.0.1:1", TargetToken: "x", ListenHost: "127.0.0.1"}); !agentclient.IsConflict(err) {
		t.Errorf("migrating a stopped VM: %v", err)
	}
	if _, err := c.Migrate(ctx, "one", hostapi.MigrateRequest{TargetURL: "nope", ListenHost: "127.0.0.1"}); err == nil {
		t.Error("migration to a bad URL accepted")
	}
	// The record survives an agent restart.
	a.Close()
	a2, err := New(ctx, Config{DataDir: a.cfg.DataDir, Accel: "tcg", Logger: a.log})
	if err != nil {
		t.Fatal(err)
	}
	defer a2.Close()
	if vm, err := a2.Get("one"); err != nil || vm.State != hostapi.StateDefined {
		t.Fatalf("after restart: %+v %v", vm, err)
	}
	if err := c.Delete(ctx, "one", false); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(a.cfg.DataDir, "vms", "one")); !os.IsNotExist(err) {
		t.Fatalf("VM directory left: %v", err)
	}
	if err := c.Delete(ctx, "one", false); !agentclient.IsNotFound(err) {
		t.Fatalf("second delete: %v", err)
	}
}

func TestAPIAuthAndErrors(t *testing.T) {
	_, _, url := newTestAgent(t)
	bad, _ := agentclient.New(url, "wrong")
	if _, err := bad.List(context.Background()); !agentclient.IsUnauthorized(err) {
		t.Fatalf("wrong token: %v", err)
	}
	req, _ := http.NewRequest(http.MethodPost, url+"/v1/vms", nil)
	req.Header.Set("Authorization", "Bearer s3cret")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadRequest || resp.Header.Get("Content-Type") != "application/json" {
		t.Fatalf("empty body: %d %s", resp.StatusCode, body)
	}
	if _, err := agentclient.New("ftp://x", "t"); err == nil {
		t.Error("bad URL accepted")
	}
	if _, err := agentclient.New("http://x", ""); err == nil {
		t.Error("empty token accepted")
	}
}

// A disk that needs TLS gets this agent's credentials, whatever directory the spec
// carried (a VM migrating in brings its source host's); without --nbd-tls-dir the
// agent refuses it instead of starting a VM that cannot reach its disk.
func TestDefineTLSDiskUsesAgentCredentials(t *testing.T) {
	_, c, _ := newTestAgent(t)
	ctx := context.Background()
	s := spec("tls")
	s.Disks[0].TLS = true
	if _, err := c.Define(ctx, s); err == nil || !strings.Contains(err.Error(), "--nbd-tls-dir") {
		t.Fatalf("TLS disk on an agent without credentials: %v", err)
	}

	dir := t.TempDir()
	if _, err := New(ctx, Config{DataDir: t.TempDir(), Accel: "tcg", NBDTLSDir: dir}); err == nil {
		t.Fatal("an NBD TLS directory without ca-cert.pem was accepted")
	}
	if err := os.WriteFile(filepath.Join(dir, "ca-cert.pem"), []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	a, err := New(ctx, Config{DataDir: t.TempDir(), Bridge: "br-test", Accel: "tcg", NBDTLSDir: dir,
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	s.Disks[0].TLSCredsDir = "/var/lib/grow/other-host-tls"
	vm, err := a.Define(s)
	if err != nil {
		t.Fatal(err)
	}
	if d := vm.Spec.Disks[0]; !d.TLS || d.TLSCredsDir != dir {
		t.Fatalf("disk %+v, want TLS with credentials from %s", d, dir)
	}
	if s.Disks[0].TLSCredsDir != "/var/lib/grow/other-host-tls" {
		t.Fatal("Define changed the caller's spec")
	}
}

// A host with migration credentials accepts only TLS migrations, one without only plain
// ones, each with a reason naming the flag; a credentials directory must be complete.
func TestMigrationTLSMustMatch(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	for i, f := range migrationTLSFiles {
		if _, err := New(ctx, Config{DataDir: t.TempDir(), Accel: "tcg", MigrationTLSDir: dir, Logger: quiet}); err == nil || !strings.Contains(err.Error(), f) {
			t.Fatalf("a migration TLS directory with %d of its files: %v", i, err)
		}
		if err := os.WriteFile(filepath.Join(dir, f), []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	withTLS, err := New(ctx, Config{DataDir: t.TempDir(), Bridge: "br-test", Accel: "tcg", MigrationTLSDir: dir, Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	defer withTLS.Close()
	plain, _, _ := newTestAgent(t)
	req := hostapi.IncomingRequest{Spec: spec("in"), ListenHost: "127.0.0.1"}
	if _, err := withTLS.PrepareIncoming(ctx, req); !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), "only over TLS") {
		t.Fatalf("plain migration into a TLS host: %v", err)
	}
	req.TLS = true
	if _, err := plain.PrepareIncoming(ctx, req); !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), "--migration-tls-dir") {
		t.Fatalf("TLS migration into a host without credentials: %v", err)
	}
	for _, a := range []*Agent{withTLS, plain} {
		if vms := a.List(); len(vms) != 0 {
			t.Fatalf("a refused migration left %d VMs defined", len(vms))
		}
	}
}
