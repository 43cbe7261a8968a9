package api

import (
	"net/http"

	"github.com/growserver/grow/internal/store"
)

// PlanRequest is the body of PUT /v1/plans/{name}; fields left zero keep their value.
type PlanRequest struct {
	VCPUs        int   `json:"vcpus,omitempty"`
	MemoryBytes  int64 `json:"memory_bytes,omitempty"`
	DiskBytes    int64 `json:"disk_bytes,omitempty"`
	TrafficBytes int64 `json:"traffic_bytes,omitempty"`
	PriceYen     int64 `json:"price_yen,omitempty"`
}

func (a *API) routePlans() {
	a.handle("GET /v1/plans", false, func(w http.ResponseWriter, r *http.Request, u store.User) error {
		plans, err := a.st.ListPlans(r.Context())
		if err != nil {
			return err
		}
		return paginate(w, r, plans, func(p store.Plan) string { return p.Name })
	})
	a.handle("GET /v1/plans/{name}", false, func(w http.ResponseWriter, r *http.Request, u store.User) error {
		p, err := a.st.GetPlan(r.Context(), r.PathValue("name"))
		if err != nil {
			return err
		}
		writeJSON(w, http.StatusOK, p)
		return nil
	})
	a.handle("PUT /v1/plans/{name}", true, func(w http.ResponseWriter, r *http.Request, u store.User) error {
		var req PlanRequest
		if err := decode(r, &req); err != nil {
			return err
		}
		name := r.PathValue("name")
		if len(name) == 0 || len(name) > 32 {
			return invalid("Invalid plan name %q", name)
		}
		if req.VCPUs < 0 || req.MemoryBytes < 0 || req.DiskBytes < 0 || req.TrafficBytes < 0 || req.PriceYen < 0 {
			return invalid("Plan values must not be negative")
		}
		p, err := a.st.GetPlan(r.Context(), name)
		if err != nil {
			p = store.Plan{Name: name}
		}
		if req.VCPUs > 0 {
			p.VCPUs = req.VCPUs
		}
		if req.MemoryBytes > 0 {
			p.MemoryBytes = req.MemoryBytes
		}
		if req.DiskBytes > 0 {
			p.DiskBytes = req.DiskBytes
		}
		if req.TrafficBytes > 0 {
			p.TrafficBytes = req.TrafficBytes
		}
		if req.PriceYen > 0 {
			p.PriceYen = req.PriceYen
		}
		if p.VCPUs == 0 || p.MemoryBytes < 16<<20 || p.DiskBytes == 0 {
			return invalid("A new plan needs vcpus, memory (at least 16 MiB) and disk")
		}
		p.UpdatedAt = timeNow()
		if err := a.st.PutPlan(r.Context(), p); err != nil {
			return err
		}
		writeJSON(w, http.StatusOK, p)
		return nil
	})
	a.handle("DELETE /v1/plans/{name}", true, func(w http.ResponseWriter, r *http.Request, u store.User) error {
		if err := a.st.DeletePlan(r.Context(), r.PathValue("name")); err != nil {
			return err
		}
		w.WriteHeader(http.StatusNoContent)
		return nil
	})
}
