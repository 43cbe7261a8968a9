package main

import (
	"bytes"
	"encoding/json"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/growserver/grow/internal/storage/adminclient"
	"github.com/growserver/grow/test/testbed"
)

func freeLoopback(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// The mirror commands work end to end against a real pair of `grow storaged`
// processes and a `grow storage witness`: the pair forms, volumes show role and
// state, status and rate answer, drain and resume finish with exit 0, and resolve
// refuses a volume that is not split with the conflict exit code.
func TestStorageMirrorCLI(t *testing.T) {
	if testing.Short() {
		t.Skip("runs storage daemons")
	}
	bin := testbed.GrowBinary(t)
	start := func(name string, args ...string) {
		t.Helper()
		cmd := exec.Command(bin, args...)
		var log bytes.Buffer
		cmd.Stdout, cmd.Stderr = &log, &log
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			_ = cmd.Process.Kill()
			_ = cmd.Wait()
			if t.Failed() {
				t.Logf("%s log:\n%s", name, log.String())
			}
		})
	}
	wdir, adir, bdir := t.TempDir(), t.TempDir(), t.TempDir()
	for _, d := range []string{wdir, adir, bdir} {
		if err := os.WriteFile(filepath.Join(d, "admin.token"), []byte("tok-"+filepath.Base(d)+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	waddr, aapi, bapi := freeLoopback(t), freeLoopback(t), freeLoopback(t)
	start("witness", "storage", "witness", "--data", wdir, "--api", waddr)
	for _, c := range []struct{ name, dir, api, peerDir, peerAPI string }{{"a", adir, aapi, bdir, bapi}, {"b", bdir, bapi, adir, aapi}} {
		start(c.name, "storaged", "--data", c.dir, "--api", c.api, "--nbd", freeLoopback(t), "--nbd-socket", "none",
			"--pool-size", "256MiB", "--cache", "8MiB", "--name", c.name, "--peer", "http://"+c.peerAPI,
			"--peer-token-file", filepath.Join(c.peerDir, "admin.token"), "--mirror-listen", freeLoopback(t),
			"--witness", "http://"+waddr, "--witness-token-file", filepath.Join(wdir, "admin.token"), "--resync-rate", "100MiB")
	}
	try := func(args ...string) (string, int) {
		t.Helper()
		cmd := exec.Command(bin, append([]string{"storage", "--controller", "http://" + aapi, "--token-file", filepath.Join(adir, "admin.token")}, args...)...)
		out, err := cmd.CombinedOutput()
		code := 0
		if ee, ok := err.(*exec.ExitError); ok {
			code = ee.ExitCode()
		} else if err != nil {
			t.Fatal(err)
		}
		return string(out), code
	}
	run := func(want int, args ...string) string {
		t.Helper()
		out, code := try(args...)
		if code != want {
			t.Fatalf("grow storage %v: exit %d, want %d\n%s", args, code, want, out)
		}
		return out
	}
	// The daemons were just started: until their APIs listen, status fails; wait for the pair.
	deadline := time.Now().Add(20 * time.Second)
	for {
		out, code := try("mirror", "status", "-o", "json")
		if code == 0 && strings.Contains(out, `"partner_reachable": true`) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the pair did not form: exit %d\n%s", code, out)
		}
		time.Sleep(200 * time.Millisecond)
	}
	run(0, "volume", "create", "v1", "--size", "16MiB")
	run(0, "volume", "create", "v2", "--size", "16MiB")
	var vols []adminclient.Volume
	deadline = time.Now().Add(10 * time.Second)
	for {
		if err := json.Unmarshal([]byte(run(0, "volume", "list", "-o", "json")), &vols); err != nil {
			t.Fatal(err)
		}
		synced := 0
		for _, v := range vols {
			if v.Mirror != nil && v.Mirror.State == adminclient.MirrorSynced && v.NBDAddress != "" {
				synced++
			}
		}
		if synced == 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("volumes not synced: %+v", vols)
		}
		time.Sleep(200 * time.Millisecond)
	}
	if out := run(0, "volume", "list"); !strings.Contains(out, "ROLE") || !strings.Contains(out, "STATE") || !strings.Contains(out, "synced") {
		t.Fatalf("volume list lacks the mirror columns:\n%s", out)
	}
	if out := run(0, "mirror", "status"); !strings.Contains(out, "Partner:") || !strings.Contains(out, "synced 2") || !strings.Contains(out, "rate 100MiB/s") {
		t.Fatalf("mirror status:\n%s", out)
	}
	run(0, "mirror", "rate", "50MiB")
	if out := run(0, "mirror", "status", "-o", "json"); !strings.Contains(out, `"resync_rate": 52428800`) {
		t.Fatalf("rate not applied:\n%s", out)
	}
	run(2, "mirror", "rate", "fast")
	if out := run(0, "controller", "drain", "a"); !strings.Contains(out, "serves no volume") {
		t.Fatalf("drain:\n%s", out)
	}
	if out := run(0, "mirror", "status", "-o", "json"); !strings.Contains(out, `"serves": []`) {
		t.Fatalf("a still serves after drain:\n%s", out)
	}
	if out := run(0, "controller", "resume", "a"); !strings.Contains(out, "serves its home volumes again") {
		t.Fatalf("resume:\n%s", out)
	}
	run(4, "volume", "resolve", "v1", "--keep", "a")
	run(2, "volume", "resolve", "v1")
	run(0, "controller", "drain", "b")
	run(0, "controller", "resume", "b")
}
