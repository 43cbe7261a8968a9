package api

import (
	"net/http"

	"github.com/growserver/grow/internal/store"
)

// IPPoolRequest is the body of POST /v1/ip-pools.
type IPPoolRequest struct {
	Name    string   `json:"name"`
	CIDR    string   `json:"cidr"`
	First   string   `json:"first"`
	Last    string   `json:"last"`
	Gateway string   `json:"gateway,omitempty"`
	DNS     []string `json:"dns,omitempty"`
}

func (a *API) routeIPPools() {
	a.handle("GET /v1/ip-pools", true, func(w http.ResponseWriter, r *http.Request, u store.User) error {
		ps, err := a.st.ListIPPools(r.Context())
		if err != nil {
			return err
		}
		return paginate(w, r, ps, func(p store.IPPool) string { return p.Name })
	})
	a.handle("POST /v1/ip-pools", true, func(w http.ResponseWriter, r *http.Request, u store.User) error {
		var req IPPoolRequest
		if err := decode(r, &req); err != nil {
			return err
		}
		if req.Name == "" {
			return invalid("An IP pool needs a name")
		}
		p := store.IPPool{Name: req.Name, CIDR: req.CIDR, First: req.First, Last: req.Last, Gateway: req.Gateway, DNS: req.DNS}
		if err := p.Validate(); err != nil {
			return invalid("%v", err)
		}
		if err := a.st.CreateIPPool(r.Context(), &p); err != nil {
			return err
		}
		writeJSON(w, http.StatusCreated, p)
		return nil
	})
	a.handle("GET /v1/ip-pools/{id}", true, func(w http.ResponseWriter, r *http.Request, u store.User) error {
		p, err := a.st.GetIPPool(r.Context(), r.PathValue("id"))
		if err != nil {
			return err
		}
		writeJSON(w, http.StatusOK, p)
		return nil
	})
	a.handle("GET /v1/ip-pools/{id}/leases", true, func(w http.ResponseWriter, r *http.Request, u store.User) error {
		p, err := a.st.GetIPPool(r.Context(), r.PathValue("id"))
		if err != nil {
			return err
		}
		ls, err := a.st.ListLeases(r.Context(), p.ID)
		if err != nil {
			return err
		}
		return paginate(w, r, ls, func(l store.IPLease) string { return l.Address })
	})
	a.handle("DELETE /v1/ip-pools/{id}", true, func(w http.ResponseWriter, r *http.Request, u store.User) error {
		p, err := a.st.GetIPPool(r.Context(), r.PathValue("id"))
		if err != nil {
			return err
		}
		if err := a.st.DeleteIPPool(r.Context(), p.ID); err != nil {
			return err
		}
		w.WriteHeader(http.StatusNoContent)
		return nil
	})
}
