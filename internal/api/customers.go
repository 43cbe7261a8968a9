package api

import (
	"net/http"
	"time"

	"github.com/growserver/grow/internal/store"
)

var timeNow = func() time.Time { return time.Now().UTC() }

// CustomerRequest is the body of POST /v1/customers and PATCH /v1/customers/{id}.
type CustomerRequest struct {
	Name       string  `json:"name,omitempty"`
	Email      *string `json:"email,omitempty"`
	MaxServers *int    `json:"max_servers,omitempty"`
}

func (a *API) routeCustomers() {
	a.handle("GET /v1/customers", true, func(w http.ResponseWriter, r *http.Request, u store.User) error {
		p, err := page(r)
		if err != nil {
			return err
		}
		cs, err := a.st.ListCustomers(r.Context(), p)
		if err != nil {
			return err
		}
		return listOf(w, cs, p, func(c store.Customer) string { return c.ID })
	})
	a.handle("POST /v1/customers", true, func(w http.ResponseWriter, r *http.Request, u store.User) error {
		var req CustomerRequest
		if err := decode(r, &req); err != nil {
			return err
		}
		c := store.Customer{Name: trim(req.Name), MaxServers: 10}
		if c.Name == "" || len(c.Name) > 100 {
			return invalid("A customer needs a name of 1-100 characters")
		}
		if err := applyCustomer(&c, req); err != nil {
			return err
		}
		if err := a.st.CreateCustomer(r.Context(), &c); err != nil {
			return err
		}
		writeJSON(w, http.StatusCreated, c)
		return nil
	})
	a.handle("GET /v1/customers/{id}", false, func(w http.ResponseWriter, r *http.Request, u store.User) error {
		c, err := a.st.GetCustomer(r.Context(), r.PathValue("id"))
		if err != nil {
			return err
		}
		if !isAdmin(u) && c.ID != u.CustomerID {
			return notFound("Customer %q does not exist", r.PathValue("id"))
		}
		writeJSON(w, http.StatusOK, c)
		return nil
	})
	a.handle("PATCH /v1/customers/{id}", true, func(w http.ResponseWriter, r *http.Request, u store.User) error {
		var req CustomerRequest
		if err := decode(r, &req); err != nil {
			return err
		}
		c, err := a.st.GetCustomer(r.Context(), r.PathValue("id"))
		if err != nil {
			return err
		}
		if req.Name != "" && req.Name != c.Name {
			return invalid("A customer cannot be renamed")
		}
		if err := applyCustomer(&c, req); err != nil {
			return err
		}
		if err := a.st.UpdateCustomer(r.Context(), c); err != nil {
			return err
		}
		writeJSON(w, http.StatusOK, c)
		return nil
	})
	a.handle("DELETE /v1/customers/{id}", true, func(w http.ResponseWriter, r *http.Request, u store.User) error {
		c, err := a.st.GetCustomer(r.Context(), r.PathValue("id"))
		if err != nil {
			return err
		}
		if err := a.st.DeleteCustomer(r.Context(), c.ID); err != nil {
			return err
		}
		w.WriteHeader(http.StatusNoContent)
		return nil
	})
}

// applyCustomer sets the fields a create or update request gives.
func applyCustomer(c *store.Customer, req CustomerRequest) error {
	if req.Email != nil {
		c.Email = *req.Email
	}
	if req.MaxServers != nil {
		if *req.MaxServers < 0 {
			return invalid("max_servers must not be negative")
		}
		c.MaxServers = *req.MaxServers
	}
	return nil
}
