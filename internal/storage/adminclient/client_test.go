package adminclient

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"testing"
)

func TestNewRejectsBadURLs(t *testing.T) {
	for _, u := range []string{"ftp://x", "127.0.0.1:7480", "http://", "://"} {
		if _, err := New(u, "t"); err == nil {
			t.Errorf("New(%q) succeeded", u)
		}
	}
	if c, err := New("", "t"); err != nil || c.base.String() != DefaultURL {
		t.Errorf("New(\"\") = %v, %v", c, err)
	}
}

func TestErrorsAreDecoded(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Authorization") != "Bearer tok" {
			w.WriteHeader(http.StatusUnauthorized)
			_, _ = w.Write([]byte(`{"code":"unauthorized","message":"missing or invalid bearer token"}`))
			return
		}
		switch r.URL.Path {
		case "/v1/volumes/missing":
			w.WriteHeader(http.StatusNotFound)
			_, _ = w.Write([]byte(`{"code":"not_found","message":"Volume \"missing\" not found"}`))
		case "/v1/volumes/weird":
			w.WriteHeader(http.StatusBadGateway)
			_, _ = w.Write([]byte(`<html>proxy error</html>`))
		case "/v1/volumes/a@b":
			_, _ = w.Write([]byte(`{"name":"a@b","kind":"snapshot","size":1024}`))
		default:
			w.WriteHeader(http.StatusTeapot)
		}
	}))
	defer srv.Close()
	ctx := context.Background()
	c, _ := New(srv.URL, "tok")
	_, err := c.GetVolume(ctx, "missing")
	if !IsNotFound(err) || StatusOf(err) != 404 || err.Error() != `Volume "missing" not found` {
		t.Errorf("not found: %v (status %d)", err, StatusOf(err))
	}
	_, err = c.GetVolume(ctx, "weird")
	if StatusOf(err) != http.StatusBadGateway || !bytes.Contains([]byte(err.Error()), []byte("proxy error")) {
		t.Errorf("non-JSON error: %v", err)
	}
	if _, err := c.GetVolume(ctx, "a b/c"); StatusOf(err) != http.StatusTeapot {
		t.Errorf("escaped name: %v", err)
	}
	if got := c.endpoint("/v1/volumes/"+url.PathEscape("a b/c"), nil); got != srv.URL+"/v1/volumes/a%20b%2Fc" {
		t.Errorf("endpoint escaping: %s", got)
	}
	v, err := c.GetVolume(ctx, "a@b")
	if err != nil || v.Kind != "snapshot" || v.Size != 1024 {
		t.Errorf("snapshot name with @: %+v %v", v, err)
	}
	bad, _ := New(srv.URL, "wrong")
	if _, err := bad.ListVolumes(ctx); !IsCode(err, CodeUnauthorized) {
		t.Errorf("wrong token: %v", err)
	}
}

func TestDetectFormat(t *testing.T) {
	if DetectFormat([]byte("QFI\xfb\x00\x00\x00\x03")) != FormatQcow2 || DetectFormat([]byte("QF")) != FormatRaw || DetectFormat(nil) != FormatRaw {
		t.Error("DetectFormat")
	}
}

// TestSparseReader reads a real sparse file with data, holes and a hole at the end.
func TestSparseReader(t *testing.T) {
	path := filepath.Join(t.TempDir(), "sparse.img")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	const size = 8 << 20
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	want := make([]byte, size)
	for _, off := range []int64{0, 1 << 20, 3<<20 + 4096, 5 << 20} {
		chunk := make([]byte, 300<<10)
		_, _ = rand.Read(chunk)
		if _, err := f.WriteAt(chunk, off); err != nil {
			t.Fatal(err)
		}
		copy(want[off:], chunk)
	}
	for _, bufSize := range []int{4095, 64 << 10, 1 << 20} {
		r := NewSparseReader(f, size)
		got, err := io.ReadAll(struct{ io.Reader }{&limitedReads{r: r, n: bufSize}})
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("buffer %d: content differs", bufSize)
		}
	}
	// A file shorter than announced is an error, not silent zeroes.
	r := NewSparseReader(f, size+1<<20)
	if _, err := io.ReadAll(r); !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Errorf("a file shorter than announced: %v, want io.ErrUnexpectedEOF", err)
	}
}

// limitedReads hands out reads of at most n bytes, like a small caller buffer.
type limitedReads struct {
	r io.Reader
	n int
}

func (l *limitedReads) Read(p []byte) (int, error) {
	if len(p) > l.n {
		p = p[:l.n]
	}
	return l.r.Read(p)
}
