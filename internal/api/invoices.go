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
		periods, err := a.st.ListPeriods(r.Context(), c.ID, from, to)
		if err != nil {
			return err
		}
		var segs []billing.Segment
		traffic := map[string]int64{}
		for _, p := range periods {
			segs = append(segs, billing.Segment{ServerID: p.ServerID, ServerName: p.ServerName, Plan: p.Plan, PriceYen: p.PriceYen,
				TrafficBytes: p.TrafficBytes, From: p.StartedAt, To: p.EndedAt})
			if _, done := traffic[p.ServerID]; done {
				continue
			}
			rx, tx, err := a.st.TrafficTotal(r.Context(), p.ServerID, from, to)
			if err != nil {
				return err
			}
			traffic[p.ServerID] = rx + tx
		}
		inv, err := billing.Compute(c.ID, month, segs, traffic, a.cfg.Rates)
		if err != nil {
			return err
		}
		writeJSON(w, http.StatusOK, inv)
		return nil
	})
}
