package api

import (
	"net/http"

	"github.com/growserver/grow/internal/billing"
	"github.com/growserver/grow/internal/store"
)

func (a *API) routeInvoices() {
	// GET /v1/customers/{id}/invoices/{month}: the invoice of a calendar month (YYYY-MM, UTC).
	a.handle("GET /v1/customers/{id}/invoices/{month}", false, func(w http.ResponseWriter, r *http.Request, u store.User) error {
		c, err := a.st.GetCustomer(r.Context(), r.PathValue("id"))
		if err != nil {
			return err
		}
		if !isAdmin(u) && c.ID != u.CustomerID {
			return notFound("Customer %q does not exist", r.PathValue("id"))
		}
		month := r.PathValue("month")
		from, to, err := billing.MonthBounds(month)
		if err != nil {
			return invalid("%v", err)
		}
		var segs []billing.Segment
		traffic := map[string]int64{}
		p := store.Page{Limit: store.MaxLimit}
		for {
			svs, err := a.st.ListServers(r.Context(), store.ServerFilter{CustomerID: c.ID}, p)
			if err != nil {
				return err
			}
			for _, sv := range svs {
				plan, err := a.st.GetPlan(r.Context(), sv.Plan)
				if err != nil {
					return err
				}
				segs = append(segs, billing.Segment{ServerID: sv.ID, ServerName: sv.Name, Plan: plan.Name, PriceYen: plan.PriceYen,
					TrafficBytes: plan.TrafficBytes, From: sv.CreatedAt})
				rx, tx, err := a.st.TrafficTotal(r.Context(), sv.ID, from, to)
				if err != nil {
					return err
				}
				traffic[sv.ID] = rx + tx
			}
			if len(svs) < p.Limit {
				break
			}
			p.After = svs[len(svs)-1].ID
		}
		inv, err := billing.Compute(c.ID, month, segs, traffic, a.cfg.Rates)
		if err != nil {
			return err
		}
		writeJSON(w, http.StatusOK, inv)
		return nil
	})
}
