package api

import (
	"net/http"

	"github.com/growserver/grow/internal/authtoken"
	"github.com/growserver/grow/internal/store"
)

// UserRequest is the body of POST /v1/users.
type UserRequest struct {
	Name     string `json:"name"`
	Role     string `json:"role"`
	Customer string `json:"customer,omitempty"`
}

// UserWithToken is the answer to creating a user or rotating its token: the only time
// the token is shown.
type UserWithToken struct {
	store.User
	Token string `json:"token"`
}

func (a *API) routeUsers() {
	a.handle("GET /v1/whoami", false, func(w http.ResponseWriter, r *http.Request, u store.User) error {
		writeJSON(w, http.StatusOK, u)
		return nil
	})
	a.handle("GET /v1/users", true, func(w http.ResponseWriter, r *http.Request, u store.User) error {
		p, err := page(r)
		if err != nil {
			return err
		}
		cust := r.URL.Query().Get("customer")
		if cust != "" {
			c, err := a.st.GetCustomer(r.Context(), cust)
			if err != nil {
				return err
			}
			cust = c.ID
		}
		us, err := a.st.ListUsers(r.Context(), cust, p)
		if err != nil {
			return err
		}
		return listOf(w, us, p, func(u store.User) string { return u.ID })
	})
	a.handle("POST /v1/users", true, func(w http.ResponseWriter, r *http.Request, u store.User) error {
		var req UserRequest
		if err := decode(r, &req); err != nil {
			return err
		}
		nu := store.User{Name: trim(req.Name), Role: req.Role}
		if nu.Name == "" || len(nu.Name) > 100 {
			return invalid("A user needs a name of 1-100 characters")
		}
		switch req.Role {
		case store.RoleAdmin:
			if req.Customer != "" {
				return invalid("An admin belongs to no customer")
			}
		case store.RoleCustomer:
			c, err := a.st.GetCustomer(r.Context(), req.Customer)
			if err != nil {
				return err
			}
			nu.CustomerID = c.ID
		default:
			return invalid("Unknown role %q (want admin or customer)", req.Role)
		}
		tok, err := authtoken.New()
		if err != nil {
			return err
		}
		if err := a.st.CreateUser(r.Context(), &nu, authtoken.Hash(tok)); err != nil {
			return err
		}
		writeJSON(w, http.StatusCreated, UserWithToken{User: nu, Token: tok})
		return nil
	})
	a.handle("GET /v1/users/{id}", true, func(w http.ResponseWriter, r *http.Request, u store.User) error {
		got, err := a.st.GetUser(r.Context(), r.PathValue("id"))
		if err != nil {
			return err
		}
		writeJSON(w, http.StatusOK, got)
		return nil
	})
	a.handle("POST /v1/users/{id}/token", true, func(w http.ResponseWriter, r *http.Request, u store.User) error {
		got, err := a.st.GetUser(r.Context(), r.PathValue("id"))
		if err != nil {
			return err
		}
		tok, err := authtoken.New()
		if err != nil {
			return err
		}
		if err := a.st.SetUserToken(r.Context(), got.ID, authtoken.Hash(tok)); err != nil {
			return err
		}
		writeJSON(w, http.StatusOK, UserWithToken{User: got, Token: tok})
		return nil
	})
	a.handle("DELETE /v1/users/{id}", true, func(w http.ResponseWriter, r *http.Request, u store.User) error {
		got, err := a.st.GetUser(r.Context(), r.PathValue("id"))
		if err != nil {
			return err
		}
		if got.ID == u.ID {
			return &httpError{http.StatusConflict, CodeConflict, "You cannot delete yourself"}
		}
		if err := a.st.DeleteUser(r.Context(), got.ID); err != nil {
			return err
		}
		w.WriteHeader(http.StatusNoContent)
		return nil
	})
}
