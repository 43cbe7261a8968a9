// Package api is the control plane's REST/JSON API: thin handlers, one file per
// resource, that check the caller's role and tenant and delegate to internal/store
// (reads and simple writes) and internal/jobs (anything long-running, which answers
// 202 with an operation).
//
// Every endpoint requires a bearer token. Admins may do everything; a customer user
// sees only its own customer's servers and operations (others' are "not_found", never
// "forbidden", so their existence does not leak) and may only start, stop, reboot and
// read its servers. Handlers must never reach a host agent or storage controller
// except through internal/jobs, and must never log or return a stored token.
package api

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"sort"
	"strconv"
	"strings"

	"github.com/growserver/grow/internal/authtoken"
	"github.com/growserver/grow/internal/billing"
	"github.com/growserver/grow/internal/jobs"
	"github.com/growserver/grow/internal/scheduler"
	"github.com/growserver/grow/internal/store"
)

// Error codes every error answer carries; they are stable, scripts may rely on them.
const (
	CodeInvalid       = "invalid"
	CodeUnauthorized  = "unauthorized"
	CodeForbidden     = "forbidden"
	CodeNotFound      = "not_found"
	CodeConflict      = "conflict"
	CodeQuotaExceeded = "quota_exceeded"
	CodeNoCapacity    = "no_capacity"
	CodeNoAddress     = "no_address"
	CodeInternal      = "internal"
)

// Error is the JSON body of every error answer.
type Error struct {
	Code    string `json:"code"`
	Message string `json:"message"`
}

// List is the JSON body of every list answer; Next is the cursor for the following
// page ("" on the last page): pass it back as ?after=.
type List[T any] struct {
	Items []T    `json:"items"`
	Next  string `json:"next"`
}

// Config configures the API.
type Config struct {
	Store  *store.Store
	Jobs   *jobs.Manager
	Rates  billing.Rates
	Logger *slog.Logger
	// WitnessToken opens the mirror witness under WitnessPrefix ("" = no witness).
	WitnessToken string
}

// API serves the control-plane endpoints.
type API struct {
	st   *store.Store
	jobs *jobs.Manager
	cfg  Config
	log  *slog.Logger
	mux  *http.ServeMux
	// routes lists every registered pattern with whether it is admin-only.
	routes map[string]bool
	// witness serves WitnessPrefix with its own token (nil = no witness).
	witness http.Handler
}

type ctxKey struct{}

// handler is an endpoint body; it returns an error mapped to a JSON error answer.
type handler func(w http.ResponseWriter, r *http.Request, u store.User) error

// New builds the API and its routes.
func New(cfg Config) *API {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.Rates.OverageYenPerGB == 0 {
		cfg.Rates = billing.DefaultRates
	}
	a := &API{st: cfg.Store, jobs: cfg.Jobs, cfg: cfg, log: cfg.Logger, mux: http.NewServeMux(), routes: map[string]bool{}}
	a.routePlans()
	a.routeCustomers()
	a.routeUsers()
	a.routeHosts()
	a.routeStorage()
	a.routeIPPools()
	a.routeImages()
	a.routeServers()
	a.routeOperations()
	a.routeInvoices()
	a.routeConsole()
	a.routeOpenAPI()
	if cfg.WitnessToken != "" {
		a.witness = a.witnessHandler()
	}
	a.mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusNotFound, CodeNotFound, fmt.Sprintf("No endpoint %s %s", r.Method, r.URL.Path))
	})
	return a
}

// ServeHTTP authenticates the caller, then routes.
func (a *API) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if a.witness != nil && isWitnessPath(r.URL.Path) {
		a.witness.ServeHTTP(w, r)
		return
	}
	tok := requestToken(r)
	if tok == "" {
		w.Header().Set("WWW-Authenticate", `Bearer realm="grow"`)
		writeError(w, http.StatusUnauthorized, CodeUnauthorized, "Missing bearer token")
		return
	}
	u, err := a.st.UserByTokenHash(r.Context(), authtoken.Hash(tok))
	if err != nil {
		if !errors.Is(err, store.ErrNotFound) {
			a.log.Error("Token lookup failed", "err", err)
			writeError(w, http.StatusInternalServerError, CodeInternal, "Failed to check the token")
			return
		}
		w.Header().Set("WWW-Authenticate", `Bearer realm="grow"`)
		writeError(w, http.StatusUnauthorized, CodeUnauthorized, "Invalid bearer token")
		return
	}
	a.mux.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), ctxKey{}, u)))
}

// handle registers pattern; adminOnly endpoints answer 403 to customer users.
func (a *API) handle(pattern string, adminOnly bool, h handler) {
	a.routes[pattern] = adminOnly
	a.mux.HandleFunc(pattern, func(w http.ResponseWriter, r *http.Request) {
		u, _ := r.Context().Value(ctxKey{}).(store.User)
		if u.ID == "" {
			writeError(w, http.StatusUnauthorized, CodeUnauthorized, "Not authenticated")
			return
		}
		if adminOnly && u.Role != store.RoleAdmin {
			writeError(w, http.StatusForbidden, CodeForbidden, "Only an admin may do this")
			return
		}
		if err := h(w, r, u); err != nil {
			a.fail(w, r, err)
		}
	})
}

// Routes returns every endpoint pattern and whether only admins may call it.
func (a *API) Routes() map[string]bool {
	out := make(map[string]bool, len(a.routes))
	for k, v := range a.routes {
		out[k] = v
	}
	return out
}

// httpError is an error with its own status and code.
type httpError struct {
	status int
	code   string
	msg    string
}

func (e *httpError) Error() string { return e.msg }

func invalid(format string, args ...any) error {
	return &httpError{http.StatusBadRequest, CodeInvalid, fmt.Sprintf(format, args...)}
}

func notFound(format string, args ...any) error {
	return &httpError{http.StatusNotFound, CodeNotFound, fmt.Sprintf(format, args...)}
}

// fail maps an error to its JSON answer.
func (a *API) fail(w http.ResponseWriter, r *http.Request, err error) {
	var he *httpError
	switch {
	case errors.As(err, &he):
		writeError(w, he.status, he.code, he.msg)
	case errors.Is(err, store.ErrNotFound):
		writeError(w, http.StatusNotFound, CodeNotFound, err.Error())
	case errors.Is(err, jobs.ErrInvalid):
		writeError(w, http.StatusBadRequest, CodeInvalid, err.Error())
	case errors.Is(err, jobs.ErrQuota):
		writeError(w, http.StatusConflict, CodeQuotaExceeded, err.Error())
	case errors.Is(err, scheduler.ErrNoCapacity):
		writeError(w, http.StatusConflict, CodeNoCapacity, err.Error())
	case errors.Is(err, store.ErrExhausted):
		writeError(w, http.StatusConflict, CodeNoAddress, err.Error())
	case errors.Is(err, jobs.ErrConflict), errors.Is(err, store.ErrConflict):
		writeError(w, http.StatusConflict, CodeConflict, err.Error())
	default:
		a.log.Error("Request failed", "method", r.Method, "path", r.URL.Path, "err", err)
		writeError(w, http.StatusInternalServerError, CodeInternal, err.Error())
	}
}

func writeError(w http.ResponseWriter, status int, code, msg string) {
	writeJSON(w, status, Error{Code: code, Message: msg})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v) // the client went away; nothing to do
}

// accepted answers 202 with the operation that carries out the request.
func accepted(w http.ResponseWriter, op store.Operation) error {
	w.Header().Set("Location", "/v1/operations/"+op.ID)
	writeJSON(w, http.StatusAccepted, op)
	return nil
}

// decode reads a JSON body strictly (unknown fields are an error).
func decode(r *http.Request, v any) error {
	dec := json.NewDecoder(http.MaxBytesReader(nil, r.Body, 1<<20))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return invalid("Invalid JSON body: %v", err)
	}
	return nil
}

// page reads ?after= and ?limit=.
func page(r *http.Request) (store.Page, error) {
	p := store.Page{After: r.URL.Query().Get("after")}
	if l := r.URL.Query().Get("limit"); l != "" {
		n, err := strconv.Atoi(l)
		if err != nil || n < 1 || n > store.MaxLimit {
			return p, invalid("Invalid limit %q: want 1-%d", l, store.MaxLimit)
		}
		p.Limit = n
	} else {
		p.Limit = store.DefaultLimit
	}
	return p, nil
}

// listOf answers a page fetched from the store; a full page means there may be more.
func listOf[T any](w http.ResponseWriter, items []T, p store.Page, key func(T) string) error {
	l := List[T]{Items: items}
	if l.Items == nil {
		l.Items = []T{}
	}
	if len(items) == p.Limit && len(items) > 0 {
		l.Next = key(items[len(items)-1])
	}
	writeJSON(w, http.StatusOK, l)
	return nil
}

// paginate answers a page of a small list held in memory, ordered by key.
func paginate[T any](w http.ResponseWriter, r *http.Request, items []T, key func(T) string) error {
	p, err := page(r)
	if err != nil {
		return err
	}
	sort.SliceStable(items, func(i, j int) bool { return key(items[i]) < key(items[j]) })
	out := []T{}
	for _, it := range items {
		if key(it) > p.After && len(out) < p.Limit {
			out = append(out, it)
		}
	}
	return listOf(w, out, p, key)
}

// ownServer loads a server the caller may see: any for an admin, its customer's for a customer.
func (a *API) ownServer(ctx context.Context, u store.User, idOrName string) (store.Server, error) {
	sv, err := a.st.GetServer(ctx, idOrName)
	if err != nil {
		return store.Server{}, err
	}
	if u.Role != store.RoleAdmin && sv.CustomerID != u.CustomerID {
		return store.Server{}, notFound("Server %q does not exist", idOrName)
	}
	return sv, nil
}

func isAdmin(u store.User) bool { return u.Role == store.RoleAdmin }

func trim(s string) string { return strings.TrimSpace(s) }
