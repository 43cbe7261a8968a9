package api

import (
	_ "embed"
	"net/http"

	"github.com/growserver/grow/internal/store"
)

// OpenAPI is the OpenAPI 3 description of this API (docs/openapi.yaml is a copy; a test
// keeps them equal).
//
//go:embed openapi.yaml
var OpenAPI []byte

func (a *API) routeOpenAPI() {
	a.handle("GET /v1/openapi.yaml", false, func(w http.ResponseWriter, r *http.Request, u store.User) error {
		w.Header().Set("Content-Type", "application/yaml")
		_, _ = w.Write(OpenAPI)
		return nil
	})
}
