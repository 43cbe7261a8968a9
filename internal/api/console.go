package api

import (
	"context"
	"net/http"

	"github.com/coder/websocket"

	"github.com/growserver/grow/internal/store"
)

// routeConsole serves GET /v1/servers/{id}/console/ws: the server's serial console as a
// websocket (binary messages both ways; the scrollback comes first), bridged to the
// host agent's console after the caller's role and tenant are checked.
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
		down, err := websocket.Accept(w, r, nil)
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
