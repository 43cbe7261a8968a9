package web_test

import (
	"bytes"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/growserver/grow/internal/api"
	"github.com/growserver/grow/internal/store/storetest"
	"github.com/growserver/grow/internal/web"
)

// get sends one request through the console mounted in front of the real API.
func get(t *testing.T, h http.Handler, method, path string, hdr map[string]string) *http.Response {
	t.Helper()
	req := httptest.NewRequest(method, path, nil)
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, req)
	return rec.Result()
}

// mounted is the console in front of a real API on an empty store.
func mounted(t *testing.T) http.Handler {
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	return web.Mount(api.New(api.Config{Store: storetest.Open(t, "sqlite"), Logger: quiet}))
}

func TestFilesAndHeaders(t *testing.T) {
	h := mounted(t)
	for path, ctype := range map[string]string{
		"/ui/":           "text/html; charset=utf-8",
		"/ui/index.html": "text/html; charset=utf-8",
		"/ui/app.js":     "text/javascript; charset=utf-8",
		"/ui/app.css":    "text/css; charset=utf-8",
	} {
		resp := get(t, h, http.MethodGet, path, nil)
		body, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("GET %s: HTTP %d", path, resp.StatusCode)
		}
		want := map[string]string{
			"Content-Type":            ctype,
			"Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
			"X-Content-Type-Options":  "nosniff",
			"Referrer-Policy":         "no-referrer",
		}
		if strings.HasSuffix(path, ".html") || strings.HasSuffix(path, "/") {
			want["Cache-Control"] = "no-store"
		}
		for k, v := range want {
			if got := resp.Header.Get(k); got != v {
				t.Errorf("GET %s: %s = %q, want %q", path, k, got, v)
			}
		}
		if len(body) == 0 {
			t.Errorf("GET %s: empty body", path)
		}
		// HEAD answers the same headers without a body.
		hr := get(t, h, http.MethodHead, path, nil)
		if hr.StatusCode != http.StatusOK || hr.Header.Get("Content-Type") != ctype {
			t.Errorf("HEAD %s: HTTP %d %q", path, hr.StatusCode, hr.Header.Get("Content-Type"))
		}
		// A cached copy is revalidated by its ETag.
		if et := resp.Header.Get("ETag"); et == "" {
			t.Errorf("GET %s: no ETag", path)
		} else if r2 := get(t, h, http.MethodGet, path, map[string]string{"If-None-Match": et}); r2.StatusCode != http.StatusNotModified {
			t.Errorf("GET %s with its ETag: HTTP %d, want 304", path, r2.StatusCode)
		}
	}
	// Unknown files and other methods: errors, with the same strict headers.
	for _, tc := range []struct{ method, path string }{
		{http.MethodGet, "/ui/nope.js"}, {http.MethodGet, "/ui/static/app.js"}, {http.MethodGet, "/ui/../v1/whoami"},
		{http.MethodPost, "/ui/app.js"}, {http.MethodDelete, "/ui/"},
	} {
		resp := get(t, h, tc.method, tc.path, nil)
		if resp.StatusCode != http.StatusNotFound && resp.StatusCode != http.StatusMethodNotAllowed {
			t.Errorf("%s %s: HTTP %d", tc.method, tc.path, resp.StatusCode)
		}
		if resp.Header.Get("Content-Security-Policy") != web.CSP || resp.Header.Get("X-Content-Type-Options") != "nosniff" {
			t.Errorf("%s %s: missing strict headers", tc.method, tc.path)
		}
	}
}

// TestNoInlineCode: the CSP forbids inline script and style, so the page must have none
// (it would silently break), and data must never reach innerHTML.
func TestNoInlineCode(t *testing.T) {
	page, _ := os.ReadFile("static/index.html")
	for _, re := range []string{`<script(?:\s[^>]*)?>\s*[^<\s]`, `<style`, `\sstyle=`, `\son[a-z]+=`, `javascript:`, `https?://`} {
		if m := regexp.MustCompile(`(?i)` + re).Find(page); m != nil {
			t.Errorf("index.html has %q (matched %s)", m, re)
		}
	}
	if !bytes.Contains(page, []byte(`<script type="module" src="app.js"></script>`)) {
		t.Error("index.html does not load app.js as a module")
	}
	js, _ := os.ReadFile("static/app.js")
	for _, bad := range []string{"innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function", "localStorage", ".style."} {
		if bytes.Contains(js, []byte(bad)) {
			t.Errorf("app.js uses %s", bad)
		}
	}
}

func TestRootRedirectsBrowsersOnly(t *testing.T) {
	h := mounted(t)
	browser := map[string]string{"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}
	resp := get(t, h, http.MethodGet, "/", browser)
	if resp.StatusCode != http.StatusFound || resp.Header.Get("Location") != "/ui/" {
		t.Fatalf("browser GET /: HTTP %d to %q, want 302 to /ui/", resp.StatusCode, resp.Header.Get("Location"))
	}
	if resp := get(t, h, http.MethodGet, "/ui", nil); resp.StatusCode != http.StatusFound || resp.Header.Get("Location") != "/ui/" {
		t.Errorf("GET /ui: HTTP %d to %q", resp.StatusCode, resp.Header.Get("Location"))
	}
	// Not a browser, not exactly "/", or not a GET: the API answers (401 without a token).
	for _, tc := range []struct {
		method, path string
		hdr          map[string]string
	}{
		{http.MethodGet, "/", nil},
		{http.MethodGet, "/", map[string]string{"Accept": "application/json"}},
		{http.MethodGet, "/", map[string]string{"Accept": "*/*"}},
		{http.MethodPost, "/", browser},
		{http.MethodGet, "/index.html", browser},
		{http.MethodGet, "/v1/servers", browser},
	} {
		resp := get(t, h, tc.method, tc.path, tc.hdr)
		if resp.StatusCode != http.StatusUnauthorized || !strings.HasPrefix(resp.Header.Get("Content-Type"), "application/json") {
			t.Errorf("%s %s %v: HTTP %d %s, want the API's 401", tc.method, tc.path, tc.hdr, resp.StatusCode, resp.Header.Get("Content-Type"))
		}
	}
}

// TestEveryAPIPathStillNeedsAToken: mounting the console never opens an API route.
func TestEveryAPIPathStillNeedsAToken(t *testing.T) {
	h := mounted(t)
	routes := api.New(api.Config{}).Routes()
	if len(routes) < 20 {
		t.Fatalf("only %d routes", len(routes))
	}
	params := regexp.MustCompile(`\{[a-z]+\}`)
	for pattern := range routes {
		method, path, _ := strings.Cut(pattern, " ")
		path = params.ReplaceAllString(path, "x")
		for _, hdr := range []map[string]string{nil, {"Accept": "text/html"}, {"Sec-WebSocket-Protocol": "grow.bearer.abc, grow.console"}} {
			resp := get(t, h, method, path, hdr)
			if resp.StatusCode != http.StatusUnauthorized {
				t.Errorf("%s %s %v without a token: HTTP %d, want 401", method, path, hdr, resp.StatusCode)
			}
			if resp.Header.Get("Content-Security-Policy") != "" {
				t.Errorf("%s %s: answered by the console, not the API", method, path)
			}
		}
	}
}

// node runs node with args (and env) in this package's directory, skipping without node.
func node(t *testing.T, env []string, args ...string) {
	t.Helper()
	bin, err := exec.LookPath("node")
	if err != nil {
		t.Skip("node is not installed")
	}
	cmd := exec.Command(bin, args...)
	cmd.Env = append(os.Environ(), env...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("node %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	t.Logf("node %s:\n%s", strings.Join(args, " "), out)
}

// moduleCopy copies app.js to a .mjs file, so that any node treats it as an ES module.
func moduleCopy(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("static", "app.js"))
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(t.TempDir(), "app.mjs")
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestJavaScriptSyntax(t *testing.T) {
	node(t, nil, "--check", moduleCopy(t))
}

func TestJavaScriptFunctions(t *testing.T) {
	node(t, []string{"GROW_APP_JS=" + moduleCopy(t)}, filepath.Join("testdata", "app_test.mjs"))
}

func TestJavaScriptDOM(t *testing.T) {
	node(t, []string{"GROW_APP_JS=" + moduleCopy(t)}, filepath.Join("testdata", "dom_test.mjs"))
}
