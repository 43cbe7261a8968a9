// Package authtoken creates, stores and checks the bearer tokens that guard every
// daemon's HTTP API. Tokens are never logged; comparisons are constant-time.
package authtoken

import (
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
)

// New returns a fresh random token (256 bits, hex).
func New() (string, error) {
	b := make([]byte, 32)
	if _, err := rand.Read(b); err != nil {
		return "", fmt.Errorf("Failed to generate token: %w", err)
	}
	return hex.EncodeToString(b), nil
}

// LoadOrCreate reads the token in path, creating it (mode 0600) if it does not exist.
func LoadOrCreate(path string) (string, error) {
	if b, err := os.ReadFile(path); err == nil {
		tok := strings.TrimSpace(string(b))
		if tok == "" {
			return "", fmt.Errorf("Token file %q is empty", path)
		}
		return tok, nil
	} else if !errors.Is(err, os.ErrNotExist) {
		return "", fmt.Errorf("Failed to read token file %q: %w", path, err)
	}
	tok, err := New()
	if err != nil {
		return "", err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return "", fmt.Errorf("Failed to create directory for %q: %w", path, err)
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(tok+"\n"), 0o600); err != nil {
		return "", fmt.Errorf("Failed to write token file %q: %w", path, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return "", fmt.Errorf("Failed to install token file %q: %w", path, err)
	}
	return tok, nil
}

// Hash returns the stored form of a token (SHA-256, hex); tokens are high-entropy,
// so a plain hash is sufficient and lets lookups be indexed.
func Hash(token string) string {
	s := sha256.Sum256([]byte(token))
	return hex.EncodeToString(s[:])
}

// Equal compares two tokens in constant time.
func Equal(a, b string) bool {
	ha, hb := sha256.Sum256([]byte(a)), sha256.Sum256([]byte(b))
	return subtle.ConstantTimeCompare(ha[:], hb[:]) == 1
}

// FromRequest extracts the bearer token of an HTTP request ("" if none).
func FromRequest(r *http.Request) string {
	h := r.Header.Get("Authorization")
	if tok, ok := strings.CutPrefix(h, "Bearer "); ok {
		return strings.TrimSpace(tok)
	}
	return ""
}

// Require wraps next so that only requests bearing token get through; others get 401 JSON.
func Require(token string, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !Equal(FromRequest(r), token) {
			w.Header().Set("Content-Type", "application/json")
			w.Header().Set("WWW-Authenticate", `Bearer realm="grow"`)
			w.WriteHeader(http.StatusUnauthorized)
			_, _ = w.Write([]byte(`{"code":"unauthorized","message":"missing or invalid bearer token"}` + "\n"))
			return
		}
		next.ServeHTTP(w, r)
	})
}
