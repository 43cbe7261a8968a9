package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/growserver/grow/internal/api"
	"github.com/growserver/grow/internal/authtoken"
	"github.com/growserver/grow/internal/billing"
	"github.com/growserver/grow/internal/jobs"
	"github.com/growserver/grow/internal/jobs/jobstest"
	"github.com/growserver/grow/internal/scheduler"
	"github.com/growserver/grow/internal/store"
	"github.com/growserver/grow/internal/store/storetest"
	"github.com/growserver/grow/test/testbed"
)

// TestControlPlaneCLI runs the grow binary against an API backed by in-memory daemons
// and checks what scripts rely on: exit codes, JSON output, and finding the local
// server's admin token.
func TestControlPlaneCLI(t *testing.T) {
	bin := testbed.GrowBinary(t)
	ctx := context.Background()
	st := storetest.Open(t, "sqlite")
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	m := jobs.New(jobs.Config{Store: st, Connector: jobstest.NewCluster(), Policy: scheduler.DefaultPolicy, ReadyTimeout: 10 * time.Second, Logger: quiet})
	t.Cleanup(m.Close)
	for _, p := range billing.DefaultPlans() {
		if err := st.EnsurePlan(ctx, p); err != nil {
			t.Fatal(err)
		}
	}
	data := t.TempDir()
	tok, err := authtoken.LoadOrCreate(filepath.Join(data, "admin.token"))
	if err != nil {
		t.Fatal(err)
	}
	if err := st.CreateUser(ctx, &store.User{Name: "admin", Role: store.RoleAdmin}, authtoken.Hash(tok)); err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(api.New(api.Config{Store: st, Jobs: m, Logger: quiet}))
	t.Cleanup(srv.Close)

	run := func(env []string, args ...string) (string, int) {
		t.Helper()
		cmd := exec.Command(bin, args...)
		cmd.Env = append([]string{"PATH=" + os.Getenv("PATH"), "HOME=" + t.TempDir(), "GROW_URL=" + srv.URL}, env...)
		var out bytes.Buffer
		cmd.Stdout = &out
		cmd.Stderr = io.Discard
		err := cmd.Run()
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return out.String(), ee.ExitCode()
		}
		if err != nil {
			t.Fatal(err)
		}
		return out.String(), 0
	}
	// The admin on the serve host needs no token: it is read from DATA/admin.token.
	local := []string{"GROW_DATA=" + data}
	admin := []string{"GROW_TOKEN=" + tok}
	expect := func(env []string, code int, args ...string) string {
		t.Helper()
		out, got := run(env, args...)
		if got != code {
			t.Fatalf("grow %s: exit %d, want %d\n%s", strings.Join(args, " "), got, code, out)
		}
		return out
	}
	expect(local, 0, "controller", "add", "s0", "--storage-url", "http://127.0.0.1:1", "--storage-token", "x")
	expect(local, 0, "host", "add", "h0", "--agent-url", "http://127.0.0.1:1", "--agent-token", "x", "--cpus", "4", "--memory", "4GiB")
	expect(local, 0, "ippool", "create", "v4", "--cidr", "192.0.2.0/24", "--first", "192.0.2.10", "--last", "192.0.2.20", "--gateway", "192.0.2.1")
	img := filepath.Join(t.TempDir(), "disk.raw")
	if err := os.WriteFile(img, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	expect(local, 0, "image", "import", "tiny", img)
	expect(admin, 0, "customer", "create", "acme")
	if out := expect(admin, 0, "plan", "list"); !strings.Contains(out, "¥30,000") || !strings.Contains(out, "100 GB") {
		t.Fatalf("plan list:\n%s", out)
	}

	// Exit codes.
	expect([]string{"GROW_DATA=" + t.TempDir()}, exitAuth, "server", "list")
	expect([]string{"GROW_TOKEN=wrong"}, exitAuth, "server", "list")
	expect(admin, exitNotFound, "server", "show", "nope")
	expect(admin, exitConflict, "customer", "create", "acme")
	expect(admin, exitUsage, "server", "create", "web1", "--customer", "acme")
	expect(admin, exitUsage, "plan", "set", "E", "--memory", "lots")
	expect(admin, exitUsage, "server", "list", "--output", "yaml")
	expect(admin, exitUsage, "server", "create", "Bad_Name", "--customer", "acme", "--plan", "E", "--image", "tiny")

	// Create without waiting, then follow the operation; a retried key makes no second server.
	opID := strings.TrimSpace(expect(admin, 0, "server", "create", "web1", "--customer", "acme", "--plan", "E", "--image", "tiny", "--no-wait", "--idempotency-key", "k1"))
	if !strings.HasPrefix(opID, "op-") {
		t.Fatalf("create --no-wait printed %q, want an operation ID", opID)
	}
	if again := strings.TrimSpace(expect(admin, 0, "server", "create", "web1", "--customer", "acme", "--plan", "E", "--image", "tiny", "--no-wait", "--idempotency-key", "k1")); again != opID {
		t.Fatalf("retried create gave %q, want %q", again, opID)
	}
	if out := expect(admin, 0, "operation", "wait", opID); !strings.Contains(out, "succeeded") {
		t.Fatalf("operation wait: %s", out)
	}
	var svs []store.Server
	if err := json.Unmarshal([]byte(expect(admin, 0, "server", "list", "-o", "json")), &svs); err != nil || len(svs) != 1 || svs[0].State != "running" {
		t.Fatalf("server list -o json = %+v, %v", svs, err)
	}
	expect(admin, exitNotFound, "server", "resize", "web1", "--plan", "nope")
	expect(admin, 0, "plan", "set", "small", "--vcpus", "1", "--memory", "256MiB", "--disk", "1GiB", "--price", "1000")
	expect(admin, exitConflict, "server", "resize", "web1", "--plan", "small")

	// A customer user may stop its server but not resize it.
	var u api.UserWithToken
	if err := json.Unmarshal([]byte(expect(admin, 0, "user", "create", "alice", "--role", "customer", "--customer", "acme", "-o", "json")), &u); err != nil {
		t.Fatal(err)
	}
	alice := []string{"GROW_TOKEN=" + u.Token}
	expect(alice, 0, "server", "stop", "web1")
	expect(alice, exitAuth, "server", "resize", "web1", "--plan", "D")
	expect(alice, exitAuth, "customer", "list")
	// Evacuating web1's host moves it to the other host and leaves the first in maintenance.
	expect(admin, 0, "host", "add", "h1", "--agent-url", "http://127.0.0.1:1", "--agent-token", "x", "--cpus", "4", "--memory", "4GiB")
	expect(alice, 0, "server", "start", "web1")
	expect(admin, 0, "host", "evacuate", "h0")
	if err := json.Unmarshal([]byte(expect(admin, 0, "server", "list", "--host", "h1", "-o", "json")), &svs); err != nil || len(svs) != 1 {
		t.Fatalf("after evacuating h0, h1 carries %+v (%v)", svs, err)
	}
	if out := expect(admin, 0, "host", "list"); !strings.Contains(out, "maintenance") {
		t.Fatalf("host list after evacuate:\n%s", out)
	}
	expect(admin, 0, "server", "delete", "web1")
	expect(admin, exitNotFound, "server", "show", "web1")
	if out := expect(admin, 0, "completion", "bash"); !strings.Contains(out, "grow") {
		t.Fatal("no bash completion")
	}
}
