// Package web is the browser console of `grow serve`: a few static files (vanilla
// JavaScript as an ES module, no framework, no build step) embedded in the binary and
// served under /ui/ with strict security headers.
//
// It never authenticates anyone and never sees a token: the browser keeps the user's
// token in sessionStorage and sends it to the API, which checks it on every /v1 call.
// Nothing here may route a request to the API's endpoints around the API's own checks.
package web

import (
	"bytes"
	"crypto/sha256"
	"embed"
	"encoding/hex"
	"net/http"
	"path"
	"strings"
	"time"
)

// Prefix is where the console is served.
const Prefix = "/ui/"

// CSP is the Content-Security-Policy of every console file: scripts, styles and API
// calls from this origin only, no inline script or style, no framing, no forms posted.
const CSP = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; " +
	"img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"

//go:embed static
var static embed.FS

// file is one embedded console file with its headers.
type file struct {
	body        []byte
	contentType string
	etag        string
	// noStore keeps the page itself out of every cache, so a new binary's console
	// (and its script) is picked up at once.
	noStore bool
}

// files maps a path under Prefix ("" is the page) to its file.
var files = loadFiles()

func loadFiles() map[string]file {
	types := map[string]string{
		".html": "text/html; charset=utf-8",
		".js":   "text/javascript; charset=utf-8",
		".css":  "text/css; charset=utf-8",
	}
	out := map[string]file{}
	for _, name := range []string{"index.html", "app.js", "app.css"} {
		b, err := static.ReadFile("static/" + name)
		if err != nil {
			panic("web: missing embedded file " + name) // a build without the files is broken
		}
		sum := sha256.Sum256(b)
		f := file{body: b, contentType: types[path.Ext(name)], etag: `"` + hex.EncodeToString(sum[:8]) + `"`, noStore: name == "index.html"}
		out[name] = f
		if name == "index.html" {
			out[""] = f
		}
	}
	return out
}

// setSecurityHeaders sets the headers every console answer carries, errors included.
func setSecurityHeaders(h http.Header) {
	h.Set("Content-Security-Policy", CSP)
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("Referrer-Policy", "no-referrer")
	h.Set("X-Frame-Options", "DENY")
	h.Set("Cross-Origin-Opener-Policy", "same-origin")
}

// Handler serves the console's files under Prefix (GET and HEAD only).
func Handler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		setSecurityHeaders(w.Header())
		name, ok := strings.CutPrefix(r.URL.Path, Prefix)
		f, found := files[name]
		if !ok || !found {
			http.Error(w, "Not found", http.StatusNotFound)
			return
		}
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			w.Header().Set("Allow", "GET, HEAD")
			http.Error(w, "Method not allowed", http.StatusMethodNotAllowed)
			return
		}
		w.Header().Set("Content-Type", f.contentType)
		w.Header().Set("ETag", f.etag)
		if f.noStore {
			w.Header().Set("Cache-Control", "no-store")
		} else {
			w.Header().Set("Cache-Control", "no-cache")
		}
		http.ServeContent(w, r, name, time.Time{}, bytes.NewReader(f.body))
	})
}

// Mount puts the console in front of api: Prefix (and its bare form) is the console,
// a browser's GET of exactly "/" is redirected to it, and everything else, every /v1
// path included, goes to api untouched.
func Mount(api http.Handler) http.Handler {
	ui := Handler()
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch {
		case strings.HasPrefix(r.URL.Path, Prefix):
			ui.ServeHTTP(w, r)
		case r.URL.Path == strings.TrimSuffix(Prefix, "/") && (r.Method == http.MethodGet || r.Method == http.MethodHead):
			http.Redirect(w, r, Prefix, http.StatusFound)
		case r.URL.Path == "/" && (r.Method == http.MethodGet || r.Method == http.MethodHead) && wantsHTML(r):
			http.Redirect(w, r, Prefix, http.StatusFound)
		default:
			api.ServeHTTP(w, r)
		}
	})
}

// wantsHTML reports whether the request comes from a browser navigating (its Accept
// names text/html); API clients ask for JSON or anything.
func wantsHTML(r *http.Request) bool {
	for _, v := range r.Header.Values("Accept") {
		if strings.Contains(strings.ToLower(v), "text/html") {
			return true
		}
	}
	return false
}
