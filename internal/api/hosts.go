package api

import (
	"crypto/x509"
	"net/http"
	"net/url"

	"github.com/growserver/grow/internal/host/hostapi"
	"github.com/growserver/grow/internal/jobs"
	"github.com/growserver/grow/internal/store"
)

// HostRequest is the body of POST /v1/hosts and PATCH /v1/hosts/{id}.
type HostRequest struct {
	Name        string `json:"name,omitempty"`
	URL         string `json:"url,omitempty"`
	Token       string `json:"token,omitempty"`
	CPUs        int    `json:"cpus,omitempty"`
	MemoryBytes int64  `json:"memory_bytes,omitempty"`
	CPUModel    string `json:"cpu_model,omitempty"`
	State       string `json:"state,omitempty"`
	// CACert is the PEM CA that signed an https agent's certificate.
	CACert string `json:"ca_cert,omitempty"`
}

func validState(s string) bool {
	return s == store.StateActive || s == store.StateMaintenance || s == store.StateOffline
}

func validURL(s string) bool {
	u, err := url.Parse(s)
	return err == nil && (u.Scheme == "http" || u.Scheme == "https") && u.Host != ""
}

func (a *API) routeHosts() {
	a.handle("GET /v1/hosts", true, func(w http.ResponseWriter, r *http.Request, u store.User) error {
		hs, err := a.st.ListHosts(r.Context())
		if err != nil {
			return err
		}
		views := make([]HostView, len(hs))
		for i, h := range hs {
			views[i] = a.hostView(h)
		}
		return paginate(w, r, views, func(h HostView) string { return h.Name })
	})
	a.handle("POST /v1/hosts", true, func(w http.ResponseWriter, r *http.Request, u store.User) error {
		var req HostRequest
		if err := decode(r, &req); err != nil {
			return err
		}
		if !hostapi.ValidName(req.Name) {
			return invalid("Invalid host name %q", req.Name)
		}
		if !validURL(req.URL) || req.Token == "" {
			return invalid("A host needs the http(s) URL of its agent and the agent's token")
		}
		if req.CPUs < 1 || req.MemoryBytes < 64<<20 {
			return invalid("A host needs its CPU count and memory (at least 64 MiB)")
		}
		if req.State == "" {
			req.State = store.StateActive
		}
		if !validState(req.State) {
			return invalid("Unknown host state %q", req.State)
		}
		if req.CACert != "" && !x509.NewCertPool().AppendCertsFromPEM([]byte(req.CACert)) {
			return invalid("ca_cert holds no PEM certificate")
		}
		h := store.Host{Name: req.Name, URL: req.URL, Token: req.Token, CPUs: req.CPUs, MemoryBytes: req.MemoryBytes, CPUModel: req.CPUModel, State: req.State, CACert: req.CACert}
		if err := a.st.CreateHost(r.Context(), &h); err != nil {
			return err
		}
		writeJSON(w, http.StatusCreated, h)
		return nil
	})
	a.handle("GET /v1/hosts/{id}", true, func(w http.ResponseWriter, r *http.Request, u store.User) error {
		h, err := a.st.GetHost(r.Context(), r.PathValue("id"))
		if err != nil {
			return err
		}
		writeJSON(w, http.StatusOK, a.hostView(h))
		return nil
	})
	a.handle("POST /v1/hosts/{id}/evacuate", true, func(w http.ResponseWriter, r *http.Request, u store.User) error {
		h, err := a.st.GetHost(r.Context(), r.PathValue("id"))
		if err != nil {
			return err
		}
		op, err := a.jobs.EvacuateHost(r.Context(), u, h.ID)
		if err != nil {
			return err
		}
		return accepted(w, op)
	})
	a.handle("PATCH /v1/hosts/{id}", true, func(w http.ResponseWriter, r *http.Request, u store.User) error {
		var req HostRequest
		if err := decode(r, &req); err != nil {
			return err
		}
		h, err := a.st.GetHost(r.Context(), r.PathValue("id"))
		if err != nil {
			return err
		}
		if req.Name != "" && req.Name != h.Name {
			return invalid("A host cannot be renamed")
		}
		if req.State != "" {
			if !validState(req.State) {
				return invalid("Unknown host state %q", req.State)
			}
			h.State = req.State
		}
		if req.URL != "" {
			if !validURL(req.URL) {
				return invalid("Invalid agent URL %q", req.URL)
			}
			h.URL = req.URL
		}
		if req.Token != "" {
			h.Token = req.Token
		}
		if req.CPUs < 0 || req.MemoryBytes < 0 {
			return invalid("Capacity must not be negative")
		}
		if req.CPUs > 0 {
			h.CPUs = req.CPUs
		}
		if req.MemoryBytes > 0 {
			h.MemoryBytes = req.MemoryBytes
		}
		if req.CPUModel != "" {
			h.CPUModel = req.CPUModel
		}
		if err := a.st.UpdateHost(r.Context(), h); err != nil {
			return err
		}
		writeJSON(w, http.StatusOK, h)
		return nil
	})
	a.handle("DELETE /v1/hosts/{id}", true, func(w http.ResponseWriter, r *http.Request, u store.User) error {
		h, err := a.st.GetHost(r.Context(), r.PathValue("id"))
		if err != nil {
			return err
		}
		if err := a.st.DeleteHost(r.Context(), h.ID); err != nil {
			return err
		}
		w.WriteHeader(http.StatusNoContent)
		return nil
	})
}

// HostView is a host as the API shows it: its record and its agent's latest health probe.
type HostView struct {
	store.Host
	Health jobs.Health `json:"health"`
}

func (a *API) hostView(h store.Host) HostView { return HostView{Host: h, Health: a.jobs.Health(h.ID)} }
