package api

import (
	"context"
	"net/http"
	"strings"

	"github.com/coder/websocket"

	"github.com/growserver/grow/internal/authtoken"
	"github.com/growserver/grow/internal/store"
)

// ConsoleProtocol is the websocket subprotocol of the serial console; the API answers
// it to a client that offers it.
const ConsoleProtocol = "grow.console"

// BearerProtocolPrefix starts the subprotocol that carries a browser's token on the
// console websocket ("grow.bearer.<token>" next to ConsoleProtocol), because browsers
// cannot set an Authorization header on a websocket. No other route accepts it.
const BearerProtocolPrefix = "grow.bearer."

// requestToken returns the caller's bearer token: the Authorization header, or, on the
// console websocket only, a BearerProtocolPrefix subprotocol offered next to ConsoleProtocol.
func requestToken(r *http.Request) string {
	if tok := authtoken.FromRequest(r); tok != "" {
		return tok
	}
	if r.Method != http.MethodGet || !isConsoleWSPath(r.URL.Path) {
		return ""
	}
	return protocolToken(r.Header)
}

// isConsoleWSPath reports whether p is /v1/servers/{id}/console/ws.
func isConsoleWSPath(p string) bool {
	id, ok := strings.CutPrefix(p, "/v1/servers/")
	if !ok {
		return false
	}
	id, ok = strings.CutSuffix(id, "/console/ws")
	return ok && id != "" && !strings.Contains(id, "/")
}

// protocolToken returns the token of a grow.bearer.<token> subprotocol offered together
// with ConsoleProtocol ("" if either is missing).
func protocolToken(h http.Header) string {
	tok, console := "", false
	for _, v := range h.Values("Sec-WebSocket-Protocol") {
		for _, p := range strings.Split(v, ",") {
			p = strings.TrimSpace(p)
			if p == ConsoleProtocol {
				console = true
			} else if t, ok := strings.CutPrefix(p, BearerProtocolPrefix); ok && t != "" {
				tok = t
			}
		}
	}
	if !console {
		return ""
	}
	return tok
}

// routeConsole serves GET /v1/servers/{id}/console/ws: the server's serial console as a
// websocket (binary messages both ways; the scrollback comes first), bridged to the
// host agent's console after the caller's role and tenant are checked. A client that
// offers ConsoleProtocol gets it back (never the bearer subprotocol).
func (a *API) routeConsole() {
	a.handle("GET /v1/servers/{id}/console/ws", false, func(w http.ResponseWriter, r *http.Request, u store.User) error {
		sv, err := a.ownServer(r.Context(), u, r.PathValue("id"))
		if err != nil {
			return err
		}
		url, token, hc, err := a.jobs.ConsoleEndpoint(r.Context(), sv)
		if err != nil {
			return err
		}
		hdr := http.Header{}
		hdr.Set("Authorization", "Bearer "+token)
		up, resp, err := websocket.Dial(r.Context(), url, &websocket.DialOptions{HTTPHeader: hdr, HTTPClient: hc})
		if err != nil {
			if resp != nil && resp.StatusCode == http.StatusConflict {
				return &httpError{http.StatusConflict, CodeConflict, "Server " + sv.Name + " is not running"}
			}
			return err
		}
		defer up.CloseNow()
		down, err := websocket.Accept(w, r, &websocket.AcceptOptions{Subprotocols: []string{ConsoleProtocol}})
		if err != nil {
			return nil // Accept answered the client already
		}
		defer down.CloseNow()
		up.SetReadLimit(1 << 20)
		down.SetReadLimit(1 << 20)
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		pipe := func(from, to *websocket.Conn) {
			defer cancel()
			for {
				typ, b, err := from.Read(ctx)
				if err != nil {
					return
				}
				if err := to.Write(ctx, typ, b); err != nil {
					return
				}
			}
		}
		go pipe(up, down)
		go pipe(down, up)
		<-ctx.Done()
		_ = down.Close(websocket.StatusNormalClosure, "")
		return nil
	})
}
