// Package witness is the tie-breaker of a mirrored pair of storage controllers: a
// tiny HTTP service that holds, per key (a volume name, or "home:CONTROLLER"), the
// highest epoch it ever granted and to whom, and grants a higher epoch only once
// (compare-and-set). Two controllers that cannot see each other ask it before either
// writes alone; whoever it answers first wins, the other learns it lost.
//
// It must never answer a grant before the grant is durable (the state file is
// replaced by write, fsync, rename and directory fsync), never grant an epoch that is
// not higher than every epoch granted before for that key, and never serve without
// the bearer token. It knows nothing about volumes or data; it can be embedded in
// another daemon through Handler.
package witness

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"sync"

	"github.com/growserver/grow/internal/authtoken"
)

// Record is the witness's knowledge about one key.
type Record struct {
	// Epoch is the highest epoch granted for the key.
	Epoch uint64 `json:"epoch"`
	// Holder is who was granted Epoch.
	Holder string `json:"holder"`
}

// GrantRequest is the body of POST /v1/grant.
type GrantRequest struct {
	Key    string `json:"key"`
	Holder string `json:"holder"`
	Epoch  uint64 `json:"epoch"`
}

// GrantAnswer says whether the grant was given and what the witness now holds for the key.
type GrantAnswer struct {
	Granted bool   `json:"granted"`
	Record  Record `json:"record"`
}

// Store is the witness's durable state: one Record per key, in one JSON file.
type Store struct {
	path string
	mu   sync.Mutex
	recs map[string]Record
}

// stateFile is the name of the witness's state file in its data directory.
const stateFile = "grants.json"

// Open loads (or starts empty) the store in dir.
func Open(dir string) (*Store, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("Failed to create witness directory %q: %w", dir, err)
	}
	s := &Store{path: filepath.Join(dir, stateFile), recs: map[string]Record{}}
	b, err := os.ReadFile(s.path)
	switch {
	case errors.Is(err, os.ErrNotExist):
	case err != nil:
		return nil, fmt.Errorf("Failed to read witness state %q: %w", s.path, err)
	default:
		if err := json.Unmarshal(b, &s.recs); err != nil {
			return nil, fmt.Errorf("Failed to parse witness state %q (refusing to start with a damaged state: restore it from backup): %w", s.path, err)
		}
	}
	return s, nil
}

// Get returns the record of key (zero if none).
func (s *Store) Get(key string) Record {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.recs[key]
}

// All returns every record by key.
func (s *Store) All() map[string]Record {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make(map[string]Record, len(s.recs))
	for k, v := range s.recs {
		out[k] = v
	}
	return out
}

// Grant gives epoch of key to holder if it is higher than every epoch granted for key
// before, and makes it durable before returning. Asking again for the epoch one
// already holds is answered granted (a retry after a lost answer).
func (s *Store) Grant(key, holder string, epoch uint64) (GrantAnswer, error) {
	if key == "" || holder == "" || epoch == 0 || len(key) > 1024 || len(holder) > 256 {
		return GrantAnswer{}, fmt.Errorf("%w: a grant needs a key, a holder and a positive epoch", errInvalid)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	cur := s.recs[key]
	if epoch == cur.Epoch && holder == cur.Holder {
		return GrantAnswer{Granted: true, Record: cur}, nil
	}
	if epoch <= cur.Epoch {
		return GrantAnswer{Granted: false, Record: cur}, nil
	}
	next := Record{Epoch: epoch, Holder: holder}
	s.recs[key] = next
	if err := s.persistLocked(); err != nil {
		s.recs[key] = cur
		return GrantAnswer{}, err
	}
	return GrantAnswer{Granted: true, Record: next}, nil
}

func (s *Store) persistLocked() error {
	b, err := json.MarshalIndent(s.recs, "", " ")
	if err != nil {
		return fmt.Errorf("Failed to encode witness state: %w", err)
	}
	return WriteFileSync(s.path, b)
}

// WriteFileSync replaces path with data crash-safely: a temporary file is written and
// fsynced, renamed over path, and the directory is fsynced.
func WriteFileSync(path string, data []byte) error {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-")
	if err != nil {
		return fmt.Errorf("Failed to write %q: %w", path, err)
	}
	tmp := f.Name()
	_, err = f.Write(data)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		_ = os.Remove(tmp)
		return fmt.Errorf("Failed to write %q: %w", path, err)
	}
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("Failed to sync directory %q: %w", dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("Failed to sync directory %q: %w", dir, err)
	}
	return nil
}

var errInvalid = errors.New("invalid request")

// Handler is the witness HTTP API behind the bearer token:
//
//	GET  /v1/health         {"ok": true}
//	GET  /v1/records        every key's record
//	GET  /v1/records/{key}  one key's record
//	POST /v1/grant          GrantRequest -> GrantAnswer (200 whether granted or not)
func Handler(s *Store, token string) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/health", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, map[string]bool{"ok": true})
	})
	mux.HandleFunc("GET /v1/records", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, s.All())
	})
	mux.HandleFunc("GET /v1/records/{key}", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, s.Get(r.PathValue("key")))
	})
	mux.HandleFunc("POST /v1/grant", func(w http.ResponseWriter, r *http.Request) {
		var req GrantRequest
		dec := json.NewDecoder(io.LimitReader(r.Body, 64<<10))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&req); err != nil {
			writeJSON(w, http.StatusBadRequest, apiError{Code: "invalid", Message: "invalid JSON body: " + err.Error()})
			return
		}
		ans, err := s.Grant(req.Key, req.Holder, req.Epoch)
		if errors.Is(err, errInvalid) {
			writeJSON(w, http.StatusBadRequest, apiError{Code: "invalid", Message: err.Error()})
			return
		}
		if err != nil {
			writeJSON(w, http.StatusInternalServerError, apiError{Code: "internal", Message: err.Error()})
			return
		}
		writeJSON(w, http.StatusOK, ans)
	})
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusNotFound, apiError{Code: "not_found", Message: fmt.Sprintf("No such endpoint: %s %s", r.Method, r.URL.Path)})
	})
	return authtoken.Require(token, mux)
}

type apiError struct {
	Code    string `json:"code"`
	Message string `json:"message"`
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}
