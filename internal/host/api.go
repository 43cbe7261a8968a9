package host

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"

	"github.com/coder/websocket"

	"github.com/growserver/grow/internal/authtoken"
	"github.com/growserver/grow/internal/host/hostapi"
)

// Handler returns the agent's HTTP API, every route behind the bearer token.
//
//	GET    /v1/host                       accelerator, cgroup mode
//	GET    /v1/vms                        list
//	POST   /v1/vms                        define (body: VMSpec)
//	GET    /v1/vms/{name}                 status
//	DELETE /v1/vms/{name}[?force=1]       delete
//	POST   /v1/vms/{name}/start|stop|reboot|kill|resize|migrate|announce
//	GET    /v1/vms/{name}/counters        traffic counters
//	GET    /v1/vms/{name}/console         websocket: serial console (scrollback first)
//	GET    /v1/vms/{name}/console/log     console scrollback as text
//	POST   /v1/incoming                   prepare an incoming migration (agent to agent)
//	GET    /v1/operations/{id}            operation progress
//	DELETE /v1/operations/{id}            cancel an operation
func (a *Agent) Handler(token string) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/host", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, map[string]string{"accel": a.accel, "cgroups": a.cg.mode})
	})
	mux.HandleFunc("GET /v1/vms", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, a.List())
	})
	mux.HandleFunc("POST /v1/vms", func(w http.ResponseWriter, r *http.Request) {
		var spec hostapi.VMSpec
		if !readJSON(w, r, &spec) {
			return
		}
		vm, err := a.Define(spec)
		reply(w, http.StatusCreated, vm, err)
	})
	mux.HandleFunc("GET /v1/vms/{name}", func(w http.ResponseWriter, r *http.Request) {
		vm, err := a.Get(r.PathValue("name"))
		reply(w, http.StatusOK, vm, err)
	})
	mux.HandleFunc("DELETE /v1/vms/{name}", func(w http.ResponseWriter, r *http.Request) {
		force := r.URL.Query().Get("force") == "1" || r.URL.Query().Get("force") == "true"
		reply(w, http.StatusOK, nil, a.Delete(r.Context(), r.PathValue("name"), force))
	})
	mux.HandleFunc("POST /v1/vms/{name}/{action}", func(w http.ResponseWriter, r *http.Request) {
		name, ctx := r.PathValue("name"), r.Context()
		switch r.PathValue("action") {
		case "start":
			reply(w, http.StatusOK, nil, a.Start(ctx, name))
		case "stop":
			var req hostapi.StopRequest
			if r.ContentLength != 0 && !readJSON(w, r, &req) {
				return
			}
			if req.TimeoutSeconds < 0 || req.TimeoutSeconds > 3600 {
				writeErr(w, fmt.Errorf("%w: timeout_seconds must be 0-3600", ErrInvalid))
				return
			}
			if req.TimeoutSeconds == 0 {
				req.TimeoutSeconds = 30
			}
			reply(w, http.StatusOK, nil, a.Stop(ctx, name, time.Duration(req.TimeoutSeconds)*time.Second))
		case "reboot":
			reply(w, http.StatusOK, nil, a.Reboot(ctx, name))
		case "kill":
			reply(w, http.StatusOK, nil, a.Kill(ctx, name))
		case "resize":
			var req hostapi.ResizeRequest
			if !readJSON(w, r, &req) {
				return
			}
			reply(w, http.StatusOK, nil, a.Resize(ctx, name, req))
		case "announce":
			reply(w, http.StatusOK, nil, a.Announce(name))
		case "shape":
			var req hostapi.ShapeRequest
			if !readJSON(w, r, &req) {
				return
			}
			reply(w, http.StatusOK, nil, a.Shape(name, req))
		case "migrate":
			var req hostapi.MigrateRequest
			if !readJSON(w, r, &req) {
				return
			}
			op, err := a.Migrate(ctx, name, req)
			reply(w, http.StatusAccepted, op, err)
		default:
			writeErr(w, fmt.Errorf("Unknown action %q: %w", r.PathValue("action"), ErrNotFound))
		}
	})
	mux.HandleFunc("GET /v1/vms/{name}/counters", func(w http.ResponseWriter, r *http.Request) {
		c, err := a.Counters(r.PathValue("name"))
		reply(w, http.StatusOK, c, err)
	})
	mux.HandleFunc("GET /v1/vms/{name}/console/log", func(w http.ResponseWriter, r *http.Request) {
		b, err := a.ConsoleLog(r.PathValue("name"))
		if err != nil {
			writeErr(w, err)
			return
		}
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		_, _ = w.Write(b)
	})
	mux.HandleFunc("GET /v1/vms/{name}/console", a.serveConsole)
	mux.HandleFunc("POST /v1/incoming", func(w http.ResponseWriter, r *http.Request) {
		var req hostapi.IncomingRequest
		if !readJSON(w, r, &req) {
			return
		}
		rep, err := a.PrepareIncoming(r.Context(), req)
		reply(w, http.StatusOK, rep, err)
	})
	mux.HandleFunc("GET /v1/operations/{id}", func(w http.ResponseWriter, r *http.Request) {
		op, err := a.Operation(r.PathValue("id"))
		reply(w, http.StatusOK, op, err)
	})
	mux.HandleFunc("DELETE /v1/operations/{id}", func(w http.ResponseWriter, r *http.Request) {
		reply(w, http.StatusOK, nil, a.CancelOperation(r.PathValue("id")))
	})
	return authtoken.Require(token, mux)
}

// serveConsole bridges a websocket to the VM's serial port: binary messages both ways,
// the scrollback first.
func (a *Agent) serveConsole(w http.ResponseWriter, r *http.Request) {
	v, err := a.get(r.PathValue("name"))
	if err != nil {
		writeErr(w, err)
		return
	}
	c := v.console
	if c == nil || v.instance() == nil {
		writeErr(w, fmt.Errorf("VM %q is not running: %w", v.name, ErrConflict))
		return
	}
	ws, err := websocket.Accept(w, r, nil)
	if err != nil {
		return
	}
	defer ws.CloseNow()
	ctx, cancel := context.WithCancel(r.Context())
	defer cancel()
	back, ch := c.subscribe()
	defer c.unsubscribe(ch)
	go func() {
		defer cancel()
		for {
			typ, b, err := ws.Read(ctx)
			if err != nil {
				return
			}
			if typ == websocket.MessageBinary || typ == websocket.MessageText {
				if _, err := c.Write(b); err != nil {
					return
				}
			}
		}
	}()
	if len(back) > 0 {
		if err := ws.Write(ctx, websocket.MessageBinary, back); err != nil {
			return
		}
	}
	inst := v.instance()
	var exited <-chan struct{}
	if inst != nil {
		exited = inst.Exited()
	}
	for {
		select {
		case b := <-ch:
			if err := ws.Write(ctx, websocket.MessageBinary, b); err != nil {
				return
			}
		case <-exited:
			_ = ws.Close(websocket.StatusNormalClosure, "VM stopped")
			return
		case <-ctx.Done():
			_ = ws.Close(websocket.StatusNormalClosure, "")
			return
		}
	}
}

func readJSON(w http.ResponseWriter, r *http.Request, x any) bool {
	dec := json.NewDecoder(io.LimitReader(r.Body, 4<<20))
	dec.DisallowUnknownFields()
	if err := dec.Decode(x); err != nil {
		writeErr(w, fmt.Errorf("%w: bad JSON body: %v", ErrInvalid, err))
		return false
	}
	return true
}

func reply(w http.ResponseWriter, status int, body any, err error) {
	if err != nil {
		writeErr(w, err)
		return
	}
	if body == nil {
		body = map[string]string{"status": "ok"}
	}
	writeJSON(w, status, body)
}

func writeJSON(w http.ResponseWriter, status int, body any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(body)
}

func writeErr(w http.ResponseWriter, err error) {
	code, status := hostapi.CodeInternal, http.StatusInternalServerError
	switch {
	case errors.Is(err, ErrNotFound):
		code, status = hostapi.CodeNotFound, http.StatusNotFound
	case errors.Is(err, ErrConflict):
		code, status = hostapi.CodeConflict, http.StatusConflict
	case errors.Is(err, ErrInvalid):
		code, status = hostapi.CodeInvalid, http.StatusBadRequest
	}
	msg := err.Error()
	for _, s := range []string{": " + ErrNotFound.Error(), ": " + ErrConflict.Error(), ErrInvalid.Error() + ": "} {
		msg = strings.Replace(msg, s, "", 1)
	}
	writeJSON(w, status, hostapi.Error{Code: code, Message: msg})
}
