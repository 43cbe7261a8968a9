package api

import (
	"crypto/x509"
	"net/http"

	"github.com/growserver/grow/internal/host/hostapi"
	"github.com/growserver/grow/internal/jobs"
	"github.com/growserver/grow/internal/store"
)

// StorageRequest is the body of POST /v1/storage.
type StorageRequest struct {
	Name  string `json:"name"`
	URL   string `json:"url"`
	Token string `json:"token"`
	// CACert is the PEM CA that signed an https controller's certificate (and its partner's).
	CACert string `json:"ca_cert,omitempty"`
	// PartnerURL and PartnerToken reach the controller's mirror partner, which answers
	// for the pair while the controller does not.
	PartnerURL   string `json:"partner_url,omitempty"`
	PartnerToken string `json:"partner_token,omitempty"`
}

func (a *API) routeStorage() {
	a.handle("GET /v1/storage", true, func(w http.ResponseWriter, r *http.Request, u store.User) error {
		cs, err := a.st.ListStorage(r.Context())
		if err != nil {
			return err
		}
		views := make([]StorageView, len(cs))
		for i, c := range cs {
			views[i] = a.storageView(c)
		}
		return paginate(w, r, views, func(c StorageView) string { return c.Name })
	})
	a.handle("POST /v1/storage", true, func(w http.ResponseWriter, r *http.Request, u store.User) error {
		var req StorageRequest
		if err := decode(r, &req); err != nil {
			return err
		}
		if !hostapi.ValidName(req.Name) || !validURL(req.URL) || req.Token == "" {
			return invalid("A storage controller needs a name, the http(s) URL of its admin API and its token")
		}
		if req.CACert != "" && !x509.NewCertPool().AppendCertsFromPEM([]byte(req.CACert)) {
			return invalid("ca_cert holds no PEM certificate")
		}
		if (req.PartnerURL != "" || req.PartnerToken != "") && (!validURL(req.PartnerURL) || req.PartnerToken == "" || req.PartnerURL == req.URL) {
			return invalid("A mirror partner needs the http(s) URL of its own admin API (not the controller's) and its token")
		}
		c := store.StorageController{Name: req.Name, URL: req.URL, Token: req.Token, CACert: req.CACert, PartnerURL: req.PartnerURL, PartnerToken: req.PartnerToken}
		if err := a.st.CreateStorage(r.Context(), &c); err != nil {
			return err
		}
		writeJSON(w, http.StatusCreated, c)
		return nil
	})
	a.handle("GET /v1/storage/{id}", true, func(w http.ResponseWriter, r *http.Request, u store.User) error {
		c, err := a.st.GetStorage(r.Context(), r.PathValue("id"))
		if err != nil {
			return err
		}
		writeJSON(w, http.StatusOK, a.storageView(c))
		return nil
	})
}

// StorageView is a storage controller as the API shows it: its record and its latest health probe.
type StorageView struct {
	store.StorageController
	Health jobs.Health `json:"health"`
}

func (a *API) storageView(c store.StorageController) StorageView {
	return StorageView{StorageController: c, Health: a.jobs.Health(c.ID)}
}
