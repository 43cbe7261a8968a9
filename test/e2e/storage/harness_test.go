package storage

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/growserver/grow/internal/storage/adminclient"
	"github.com/growserver/grow/test/testbed"
)

// needTools skips under -short and fails if an interop tool is missing.
func needTools(t *testing.T, tools ...string) {
	t.Helper()
	if testing.Short() {
		t.Skip("end-to-end test: needs the grow binary and real NBD clients")
	}
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s is not installed (run scripts/install-deps.sh): %v", tool, err)
		}
	}
}

// ctl is one `grow storaged` process under test, with its data directory.
type ctl struct {
	t      *testing.T
	bin    string
	dir    string
	extra  []string
	cmd    *exec.Cmd
	done   chan struct{}
	waitMu sync.Mutex
	exit   error
	logf   *os.File
	// reported is set once a race or panic in the log has failed the test.
	reported bool

	NBDAddr string
	Socket  string
	API     string
	Token   string
	// CACert is the CA the CLI and client trust when the admin API is HTTPS.
	CACert string
}

var readyRE = regexp.MustCompile(`Storage controller ready.* nbd=(\S*) nbd_socket=(\S*) api=(\S+) api_tls=(\S+)`)

// startCtl starts grow storaged on a fresh data directory with extra flags.
func startCtl(t *testing.T, extra ...string) *ctl {
	t.Helper()
	c := &ctl{t: t, bin: testbed.GrowBinary(t), dir: t.TempDir(), extra: extra}
	c.start()
	t.Cleanup(c.kill)
	return c
}

// start launches the daemon on c.dir and waits until it says it is ready.
func (c *ctl) start() {
	c.t.Helper()
	args := append([]string{"storaged", "--data", c.dir, "--nbd", "127.0.0.1:0", "--api", "127.0.0.1:0",
		"--nbd-socket", filepath.Join(c.dir, "nbd.sock"), "--cache", "64MiB", "--pool-size", "4GiB"}, c.extra...)
	cmd := exec.Command(c.bin, args...)
	logPath := filepath.Join(c.dir, "storaged.log")
	lf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		c.t.Fatalf("Failed to open log: %v", err)
	}
	c.logf = lf
	pr, pw := io.Pipe()
	cmd.Stdout = lf
	cmd.Stderr = io.MultiWriter(lf, pw)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		c.t.Fatalf("Failed to start grow storaged: %v", err)
	}
	c.cmd = cmd
	c.done = make(chan struct{})
	go func() {
		err := cmd.Wait()
		c.waitMu.Lock()
		c.exit = err
		c.waitMu.Unlock()
		pw.Close()
		close(c.done)
	}()
	ready := make(chan []string, 1)
	go func() {
		sc := bufio.NewScanner(pr)
		sent := false
		for sc.Scan() {
			if m := readyRE.FindStringSubmatch(sc.Text()); m != nil && !sent {
				ready <- m
				sent = true
			}
		}
		_, _ = io.Copy(io.Discard, pr)
	}()
	select {
	case m := <-ready:
		c.NBDAddr, c.Socket, c.API = m[1], m[2], "http://"+m[3]
		if m[4] == "true" {
			c.API = "https://" + m[3]
		}
	case <-c.done:
		c.t.Fatalf("grow storaged exited before it was ready: %v\n%s", c.exit, c.log())
	case <-time.After(60 * time.Second):
		c.kill()
		c.t.Fatalf("grow storaged did not become ready in 60 s\n%s", c.log())
	}
	tok, err := os.ReadFile(filepath.Join(c.dir, "admin.token"))
	if err != nil {
		c.t.Fatalf("No admin token: %v", err)
	}
	c.Token = strings.TrimSpace(string(tok))
}

// log returns the daemon's log so far.
func (c *ctl) log() string {
	b, _ := os.ReadFile(filepath.Join(c.dir, "storaged.log"))
	if len(b) > 8000 {
		b = b[len(b)-8000:]
	}
	return string(b)
}

// kill sends SIGKILL and waits; it is the cleanup and the crash of the crash test.
func (c *ctl) kill() {
	if c.cmd == nil {
		return
	}
	_ = c.cmd.Process.Kill()
	<-c.done
	c.cmd = nil
	if c.logf != nil {
		c.logf.Close()
	}
	c.checkLog()
}

// checkLog fails the test if the daemon reported a data race (a -race build of grow)
// or a panic.
func (c *ctl) checkLog() {
	if c.reported {
		return
	}
	b, _ := os.ReadFile(filepath.Join(c.dir, "storaged.log"))
	for _, bad := range []string{"WARNING: DATA RACE", "panic:"} {
		if i := bytes.Index(b, []byte(bad)); i >= 0 {
			end := min(len(b), i+4000)
			c.reported = true
			c.t.Errorf("grow storaged logged %q:\n%s", bad, b[i:end])
			return
		}
	}
}

// stop sends SIGTERM and waits for a clean exit.
func (c *ctl) stop() {
	c.t.Helper()
	if c.cmd == nil {
		return
	}
	_ = c.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-c.done:
	case <-time.After(60 * time.Second):
		c.kill()
		c.t.Fatalf("grow storaged did not stop within 60 s of SIGTERM\n%s", c.log())
	}
	c.waitMu.Lock()
	err := c.exit
	c.waitMu.Unlock()
	c.cmd = nil
	c.logf.Close()
	c.checkLog()
	if err != nil {
		c.t.Fatalf("grow storaged exited with %v after SIGTERM\n%s", err, c.log())
	}
}

// restart starts the daemon again on the same data directory.
func (c *ctl) restart() {
	c.t.Helper()
	c.start()
}

// client is an admin API client with the controller's token.
func (c *ctl) client() *adminclient.Client {
	cl, err := adminclient.New(c.API, c.Token)
	if err != nil {
		c.t.Fatal(err)
	}
	if c.CACert != "" {
		if cl, err = cl.WithCACert(c.CACert); err != nil {
			c.t.Fatal(err)
		}
	}
	return cl
}

// uri is the NBD URI of a volume over the unix socket.
func (c *ctl) uri(name string) string {
	return fmt.Sprintf("nbd+unix:///%s?socket=%s", name, c.Socket)
}

// tcpURI is the NBD URI of a volume over TCP.
func (c *ctl) tcpURI(name string) string {
	return fmt.Sprintf("nbd://%s/%s", c.NBDAddr, name)
}

// qemuJSON is QEMU's json: filename for a volume over the unix socket (qemu-io, qemu-img).
func (c *ctl) qemuJSON(name string) string {
	return fmt.Sprintf(`json:{"driver":"raw","file":{"driver":"nbd","server":{"type":"unix","path":%q},"export":%q}}`, c.Socket, name)
}

// cliResult is what a `grow storage` run printed and how it exited.
type cliResult struct {
	Stdout, Stderr string
	Code           int
}

// cli runs `grow storage --controller API --token TOKEN args...`.
func (c *ctl) cli(args ...string) cliResult {
	c.t.Helper()
	return c.cliWithToken(c.Token, args...)
}

func (c *ctl) cliWithToken(token string, args ...string) cliResult {
	c.t.Helper()
	full := append([]string{"storage", "--controller", c.API, "--token-file", filepath.Join(c.dir, "no-such-token")}, args...)
	if token != "" {
		full = append([]string{"storage", "--controller", c.API, "--token", token}, args...)
	}
	if c.CACert != "" {
		full = append([]string{full[0], "--ca-cert", c.CACert}, full[1:]...)
	}
	return run(c.t, c.bin, full...)
}

// run runs a program with a 5-minute limit and returns its output and exit code.
func run(t *testing.T, bin string, args ...string) cliResult {
	t.Helper()
	return runEnv(t, nil, bin, args...)
}

// runEnv is run with extra environment variables.
func runEnv(t *testing.T, env []string, bin string, args ...string) cliResult {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Env = append(append(os.Environ(), "GROW_TOKEN="), env...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	code := 0
	if err != nil {
		var ee *exec.ExitError
		if !errors.As(err, &ee) {
			t.Fatalf("Failed to run %s %v: %v", bin, args, err)
		}
		code = ee.ExitCode()
	}
	return cliResult{Stdout: out.String(), Stderr: errb.String(), Code: code}
}

// mustRun runs a program and fails the test unless it exits 0.
func mustRun(t *testing.T, bin string, args ...string) string {
	t.Helper()
	r := run(t, bin, args...)
	if r.Code != 0 {
		t.Fatalf("%s %s: exit %d\nstdout: %s\nstderr: %s", bin, strings.Join(args, " "), r.Code, r.Stdout, r.Stderr)
	}
	return r.Stdout
}

// mustCLI runs `grow storage ...` and fails unless it exits 0.
func (c *ctl) mustCLI(args ...string) string {
	c.t.Helper()
	r := c.cli(args...)
	if r.Code != 0 {
		c.t.Fatalf("grow storage %s: exit %d\nstdout: %s\nstderr: %s\ncontroller log:\n%s", strings.Join(args, " "), r.Code, r.Stdout, r.Stderr, c.log())
	}
	return r.Stdout
}

// randomFile writes size random bytes to a new file in dir and returns its path.
func randomFile(t *testing.T, dir, name string, size int64, seed uint64) string {
	t.Helper()
	p := filepath.Join(dir, name)
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 1<<20)
	x := seed | 1
	for done := int64(0); done < size; {
		for i := 0; i+8 <= len(buf); i += 8 {
			x ^= x << 13
			x ^= x >> 7
			x ^= x << 17
			for k := 0; k < 8; k++ {
				buf[i+k] = byte(x >> (8 * k))
			}
		}
		n := min(int64(len(buf)), size-done)
		if _, err := f.Write(buf[:n]); err != nil {
			t.Fatal(err)
		}
		done += n
	}
	return p
}

// sameFiles fails unless two files have identical content.
func sameFiles(t *testing.T, a, b string) {
	t.Helper()
	fa, err := os.Open(a)
	if err != nil {
		t.Fatal(err)
	}
	defer fa.Close()
	fb, err := os.Open(b)
	if err != nil {
		t.Fatal(err)
	}
	defer fb.Close()
	ba, bb := make([]byte, 1<<20), make([]byte, 1<<20)
	for off := int64(0); ; {
		na, ea := io.ReadFull(fa, ba)
		nb, eb := io.ReadFull(fb, bb)
		if na != nb || !bytes.Equal(ba[:na], bb[:nb]) {
			t.Fatalf("%s and %s differ in the MiB at offset %d (read %d and %d bytes)", a, b, off, na, nb)
		}
		if ea != nil || eb != nil {
			return
		}
		off += int64(na)
	}
}

// allocatedBytes is the space a file really takes on disk.
func allocatedBytes(t *testing.T, path string) int64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512
}

// waitFor polls cond every 100 ms until it is true or the timeout passes.
func waitFor(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("Timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// httpGet does a GET with an optional bearer token and returns the status and body.
func httpGet(t *testing.T, url, token string) (int, string) {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}
