package api_test

import (
	"bytes"
	"context"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/growserver/grow/client"
	"github.com/growserver/grow/internal/api"
)

// fakeAgentConsole is a host agent's console websocket: the scrollback, then an echo.
func fakeAgentConsole(t *testing.T) *httptest.Server {
	t.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c, err := websocket.Accept(w, r, nil)
		if err != nil {
			return
		}
		defer c.CloseNow()
		ctx := r.Context()
		if err := c.Write(ctx, websocket.MessageBinary, []byte("scrollback\n")); err != nil {
			return
		}
		for {
			typ, b, err := c.Read(ctx)
			if err != nil {
				return
			}
			if err := c.Write(ctx, typ, b); err != nil {
				return
			}
		}
	}))
	t.Cleanup(srv.Close)
	return srv
}

// TestConsoleSubprotocolToken: a browser's token offered as the grow.bearer.<token>
// subprotocol opens the console of its own server and nothing else, and is never logged.
func TestConsoleSubprotocolToken(t *testing.T) {
	f := newFixture(t, "sqlite")
	agent := fakeAgentConsole(t)
	for _, h := range []string{"h1", "h2"} {
		if _, err := f.admin.UpdateHost(f.ctx, h, client.HostRequest{URL: agent.URL}); err != nil {
			t.Fatal(err)
		}
	}
	var logs bytes.Buffer
	logged := api.New(api.Config{Store: f.st, Jobs: f.jobs, Logger: slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))})
	srv := httptest.NewServer(logged)
	defer srv.Close()
	wsURL := "ws" + strings.TrimPrefix(srv.URL, "http")

	dial := func(path string, protocols ...string) (*websocket.Conn, *http.Response, error) {
		ctx, cancel := context.WithTimeout(f.ctx, 10*time.Second)
		defer cancel()
		return websocket.Dial(ctx, wsURL+path, &websocket.DialOptions{Subprotocols: protocols})
	}
	bearer := func(tok string) string { return api.BearerProtocolPrefix + tok }

	// Alice's own server: the console opens with grow.console answered.
	c, resp, err := dial("/v1/servers/"+f.web1.ID+"/console/ws", bearer(f.aliceTok), api.ConsoleProtocol)
	if err != nil {
		t.Fatalf("own console: %v (%v)", err, resp)
	}
	if got := c.Subprotocol(); got != api.ConsoleProtocol {
		t.Errorf("answered subprotocol %q, want %q", got, api.ConsoleProtocol)
	}
	ctx, cancel := context.WithTimeout(f.ctx, 10*time.Second)
	defer cancel()
	if _, b, err := c.Read(ctx); err != nil || string(b) != "scrollback\n" {
		t.Fatalf("scrollback: %q %v", b, err)
	}
	if err := c.Write(ctx, websocket.MessageBinary, []byte("ls\r")); err != nil {
		t.Fatal(err)
	}
	if _, b, err := c.Read(ctx); err != nil || string(b) != "ls\r" {
		t.Fatalf("echo: %q %v", b, err)
	}
	c.Close(websocket.StatusNormalClosure, "")
	// By name too, and the header token still works without any subprotocol.
	if c, _, err := dial("/v1/servers/web1/console/ws", api.ConsoleProtocol, bearer(f.aliceTok)); err != nil {
		t.Fatalf("own console by name: %v", err)
	} else {
		c.CloseNow()
	}
	if c, err := f.alice.AttachConsole(f.ctx, "web1"); err != nil {
		t.Fatalf("header token: %v", err)
	} else {
		c.CloseNow()
	}

	refused := []struct {
		name      string
		path      string
		protocols []string
		status    int
	}{
		{"another customer's server", "/v1/servers/" + f.bob1.ID + "/console/ws", []string{bearer(f.aliceTok), api.ConsoleProtocol}, http.StatusNotFound},
		{"another customer's server by name", "/v1/servers/bob1/console/ws", []string{bearer(f.aliceTok), api.ConsoleProtocol}, http.StatusNotFound},
		{"wrong token", "/v1/servers/" + f.web1.ID + "/console/ws", []string{bearer(strings.Repeat("0", 64)), api.ConsoleProtocol}, http.StatusUnauthorized},
		{"token without grow.console", "/v1/servers/" + f.web1.ID + "/console/ws", []string{bearer(f.aliceTok)}, http.StatusUnauthorized},
		{"no token", "/v1/servers/" + f.web1.ID + "/console/ws", []string{api.ConsoleProtocol}, http.StatusUnauthorized},
		{"admin token on another route", "/v1/servers/" + f.web1.ID, []string{bearer(f.adminTok), api.ConsoleProtocol}, http.StatusUnauthorized},
		{"token on whoami", "/v1/whoami", []string{bearer(f.aliceTok), api.ConsoleProtocol}, http.StatusUnauthorized},
		{"token on the text console", "/v1/servers/" + f.web1.ID + "/console", []string{bearer(f.aliceTok), api.ConsoleProtocol}, http.StatusUnauthorized},
		{"token on a longer path", "/v1/servers/" + f.web1.ID + "/console/ws/x", []string{bearer(f.adminTok), api.ConsoleProtocol}, http.StatusUnauthorized},
	}
	for _, tc := range refused {
		c, resp, err := dial(tc.path, tc.protocols...)
		if err == nil {
			c.CloseNow()
			t.Errorf("%s: the websocket opened", tc.name)
			continue
		}
		if resp == nil || resp.StatusCode != tc.status {
			t.Errorf("%s: got %v, want HTTP %d", tc.name, resp, tc.status)
		}
	}
	// Plain requests with the token in the header of the subprotocol are refused too
	// (not only websocket handshakes).
	for _, path := range []string{"/v1/servers", "/v1/whoami", "/v1/servers/" + f.web1.ID + "/console"} {
		req, _ := http.NewRequest(http.MethodGet, srv.URL+path, nil)
		req.Header.Set("Sec-WebSocket-Protocol", bearer(f.adminTok)+", "+api.ConsoleProtocol)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusUnauthorized {
			t.Errorf("GET %s with a subprotocol token: HTTP %d, want 401", path, resp.StatusCode)
		}
	}
	// A failure that is logged (the host agent went away) logs no token either.
	agent.Close()
	if c, resp, err := dial("/v1/servers/"+f.web1.ID+"/console/ws", bearer(f.aliceTok), api.ConsoleProtocol); err == nil {
		c.CloseNow()
		t.Error("the console opened without its host agent")
	} else if resp == nil || resp.StatusCode != http.StatusInternalServerError {
		t.Errorf("console without its host agent: %v, want HTTP 500", resp)
	}
	if !strings.Contains(logs.String(), "Request failed") {
		t.Fatalf("the failure was not logged:\n%s", logs.String())
	}
	for _, tok := range []string{f.aliceTok, f.adminTok, f.bobTok} {
		if strings.Contains(logs.String(), tok) {
			t.Fatalf("a token appears in the logs:\n%s", logs.String())
		}
	}
}
