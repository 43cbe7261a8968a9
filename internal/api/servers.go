package api

import (
	"net/http"

	"github.com/growserver/grow/internal/jobs"
	"github.com/growserver/grow/internal/store"
)

// customerActions are what a customer user may do to its own servers.
var customerActions = map[string]bool{"start": true, "stop": true, "reboot": true}

func (a *API) routeServers() {
	a.handle("GET /v1/servers", false, func(w http.ResponseWriter, r *http.Request, u store.User) error {
		p, err := page(r)
		if err != nil {
			return err
		}
		f := store.ServerFilter{}
		if c := r.URL.Query().Get("customer"); c != "" {
			cust, err := a.st.GetCustomer(r.Context(), c)
			if err != nil {
				return err
			}
			f.CustomerID = cust.ID
		}
		if h := r.URL.Query().Get("host"); h != "" {
			if !isAdmin(u) {
				return &httpError{http.StatusForbidden, CodeForbidden, "Only an admin may filter by host"}
			}
			host, err := a.st.GetHost(r.Context(), h)
			if err != nil {
				return err
			}
			f.HostID = host.ID
		}
		if !isAdmin(u) {
			if f.CustomerID != "" && f.CustomerID != u.CustomerID {
				return notFound("Customer %q does not exist", r.URL.Query().Get("customer"))
			}
			f.CustomerID = u.CustomerID
		}
		svs, err := a.st.ListServers(r.Context(), f, p)
		if err != nil {
			return err
		}
		return listOf(w, svs, p, func(s store.Server) string { return s.ID })
	})
	a.handle("POST /v1/servers", true, func(w http.ResponseWriter, r *http.Request, u store.User) error {
		var req jobs.CreateServerRequest
		if err := decode(r, &req); err != nil {
			return err
		}
		key := r.Header.Get("Idempotency-Key")
		if len(key) > 200 {
			return invalid("Idempotency-Key is longer than 200 characters")
		}
		op, created, err := a.jobs.CreateServer(r.Context(), u, key, req)
		if err != nil {
			return err
		}
		if !created {
			w.Header().Set("Idempotent-Replayed", "true")
		}
		return accepted(w, op)
	})
	a.handle("GET /v1/servers/{id}", false, func(w http.ResponseWriter, r *http.Request, u store.User) error {
		sv, err := a.ownServer(r.Context(), u, r.PathValue("id"))
		if err != nil {
			return err
		}
		writeJSON(w, http.StatusOK, sv)
		return nil
	})
	a.handle("DELETE /v1/servers/{id}", true, func(w http.ResponseWriter, r *http.Request, u store.User) error {
		sv, err := a.ownServer(r.Context(), u, r.PathValue("id"))
		if err != nil {
			return err
		}
		op, err := a.jobs.ServerAction(r.Context(), u, sv.ID, jobs.KindDelete, jobs.ActionRequest{})
		if err != nil {
			return err
		}
		return accepted(w, op)
	})
	a.handle("POST /v1/servers/{id}/{action}", false, func(w http.ResponseWriter, r *http.Request, u store.User) error {
		action := r.PathValue("action")
		kind := map[string]string{"start": jobs.KindStart, "stop": jobs.KindStop, "reboot": jobs.KindReboot,
			"resize": jobs.KindResize, "migrate": jobs.KindMigrate}[action]
		if kind == "" {
			return notFound("No server action %q", action)
		}
		if !isAdmin(u) && !customerActions[action] {
			return &httpError{http.StatusForbidden, CodeForbidden, "Only an admin may " + action + " a server"}
		}
		sv, err := a.ownServer(r.Context(), u, r.PathValue("id"))
		if err != nil {
			return err
		}
		var req jobs.ActionRequest
		if r.ContentLength != 0 {
			if err := decode(r, &req); err != nil {
				return err
			}
		}
		if kind == jobs.KindResize && req.Plan == "" {
			return invalid("A resize needs a plan")
		}
		op, err := a.jobs.ServerAction(r.Context(), u, sv.ID, kind, req)
		if err != nil {
			return err
		}
		return accepted(w, op)
	})
	a.handle("GET /v1/servers/{id}/console", false, func(w http.ResponseWriter, r *http.Request, u store.User) error {
		sv, err := a.ownServer(r.Context(), u, r.PathValue("id"))
		if err != nil {
			return err
		}
		b, err := a.jobs.Console(r.Context(), sv)
		if err != nil {
			return err
		}
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		_, _ = w.Write(b)
		return nil
	})
}
