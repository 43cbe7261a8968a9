package api

import (
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"strings"

	"github.com/growserver/grow/internal/authtoken"
	"github.com/growserver/grow/internal/storage/witness"
	"github.com/growserver/grow/internal/store"
)

// WitnessPrefix is where the control plane serves the mirror witness API of
// internal/storage/witness (give storaged --witness http://CONTROL-PLANE/witness).
const WitnessPrefix = "/witness"

// witnessHandler serves the witness protocol from the store, so every control plane on
// one database is the same witness. It takes only the witness token (Config.WitnessToken),
// a storage controllers' credential that opens nothing else of the API.
func (a *API) witnessHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/health", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, map[string]bool{"ok": true})
	})
	mux.HandleFunc("GET /v1/records", func(w http.ResponseWriter, r *http.Request) {
		recs, err := a.st.WitnessRecords(r.Context())
		if err != nil {
			a.fail(w, r, err)
			return
		}
		out := make(map[string]witness.Record, len(recs))
		for k, v := range recs {
			out[k] = witness.Record{Epoch: v.Epoch, Holder: v.Holder}
		}
		writeJSON(w, http.StatusOK, out)
	})
	mux.HandleFunc("GET /v1/records/{key}", func(w http.ResponseWriter, r *http.Request) {
		rec, err := a.st.WitnessRecord(r.Context(), r.PathValue("key"))
		if err != nil {
			a.fail(w, r, err)
			return
		}
		writeJSON(w, http.StatusOK, witness.Record{Epoch: rec.Epoch, Holder: rec.Holder})
	})
	mux.HandleFunc("POST /v1/grant", func(w http.ResponseWriter, r *http.Request) {
		var req witness.GrantRequest
		dec := json.NewDecoder(io.LimitReader(r.Body, 64<<10))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&req); err != nil {
			writeError(w, http.StatusBadRequest, CodeInvalid, "Invalid JSON body: "+err.Error())
			return
		}
		granted, rec, err := a.st.WitnessGrant(r.Context(), req.Key, req.Holder, req.Epoch)
		if errors.Is(err, store.ErrBadGrant) {
			writeError(w, http.StatusBadRequest, CodeInvalid, err.Error())
			return
		}
		if err != nil {
			a.fail(w, r, err)
			return
		}
		if granted {
			a.log.Info("Witness granted", "key", req.Key, "holder", req.Holder, "epoch", req.Epoch)
		}
		writeJSON(w, http.StatusOK, witness.GrantAnswer{Granted: granted, Record: witness.Record{Epoch: rec.Epoch, Holder: rec.Holder}})
	})
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusNotFound, CodeNotFound, "No witness endpoint "+r.Method+" "+r.URL.Path)
	})
	return authtoken.Require(a.cfg.WitnessToken, http.StripPrefix(WitnessPrefix, mux))
}

// isWitnessPath tells whether a request is for the witness API.
func isWitnessPath(p string) bool {
	return p == WitnessPrefix || strings.HasPrefix(p, WitnessPrefix+"/")
}
