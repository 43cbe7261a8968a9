package api

import (
	"net/http"

	"github.com/growserver/grow/internal/store"
)

func (a *API) routeOperations() {
	a.handle("GET /v1/operations", false, func(w http.ResponseWriter, r *http.Request, u store.User) error {
		p, err := page(r)
		if err != nil {
			return err
		}
		f := store.OperationFilter{Unfinished: r.URL.Query().Get("unfinished") == "true"}
		if s := r.URL.Query().Get("server"); s != "" {
			sv, err := a.ownServer(r.Context(), u, s)
			if err != nil {
				return err
			}
			f.ServerID = sv.ID
		}
		if !isAdmin(u) {
			f.CustomerID = u.CustomerID
		}
		ops, err := a.st.ListOperations(r.Context(), f, p)
		if err != nil {
			return err
		}
		return listOf(w, ops, p, func(o store.Operation) string { return o.ID })
	})
	a.handle("GET /v1/operations/{id}", false, func(w http.ResponseWriter, r *http.Request, u store.User) error {
		op, err := a.ownOperation(r, u)
		if err != nil {
			return err
		}
		writeJSON(w, http.StatusOK, op)
		return nil
	})
	a.handle("POST /v1/operations/{id}/cancel", false, func(w http.ResponseWriter, r *http.Request, u store.User) error {
		op, err := a.ownOperation(r, u)
		if err != nil {
			return err
		}
		if err := a.jobs.Cancel(r.Context(), op.ID); err != nil {
			return err
		}
		op, err = a.st.GetOperation(r.Context(), op.ID)
		if err != nil {
			return err
		}
		return accepted(w, op)
	})
}

func (a *API) ownOperation(r *http.Request, u store.User) (store.Operation, error) {
	op, err := a.st.GetOperation(r.Context(), r.PathValue("id"))
	if err != nil {
		return store.Operation{}, err
	}
	if !isAdmin(u) && op.CustomerID != u.CustomerID {
		return store.Operation{}, notFound("Operation %q does not exist", r.PathValue("id"))
	}
	return op, nil
}
