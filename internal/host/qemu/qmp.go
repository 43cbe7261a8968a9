package qemu

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"
)

// Event is an asynchronous QMP event.
type Event struct {
	Event     string         `json:"event"`
	Data      map[string]any `json:"data"`
	Timestamp struct {
		Seconds      int64 `json:"seconds"`
		Microseconds int64 `json:"microseconds"`
	} `json:"timestamp"`
}

// QMPError is an error reply from QEMU.
type QMPError struct {
	Class string `json:"class"`
	Desc  string `json:"desc"`
}

func (e *QMPError) Error() string { return e.Class + ": " + e.Desc }

// ErrClosed is returned for commands on a monitor whose connection has ended.
var ErrClosed = errors.New("QMP connection closed")

type qmpReply struct {
	Return json.RawMessage `json:"return"`
	Error  *QMPError       `json:"error"`
	ID     *uint64         `json:"id"`
	Event  string          `json:"event"`
}

// Monitor is a small typed QMP client over a unix socket: commands may be issued from
// many goroutines; events go to the callback given to DialQMP.
type Monitor struct {
	conn    net.Conn
	wmu     sync.Mutex
	mu      sync.Mutex
	nextID  uint64
	pending map[uint64]chan qmpReply
	done    chan struct{}
	onEvent func(Event)
}

// DialQMP connects to a QMP socket, retrying until ctx ends, and negotiates capabilities.
func DialQMP(ctx context.Context, path string, onEvent func(Event)) (*Monitor, error) {
	var conn net.Conn
	var err error
	for {
		var d net.Dialer
		conn, err = d.DialContext(ctx, "unix", path)
		if err == nil {
			break
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("Failed to connect to QMP socket %q: %w", path, err)
		case <-time.After(5 * time.Millisecond):
		}
	}
	if onEvent == nil {
		onEvent = func(Event) {}
	}
	m := &Monitor{conn: conn, pending: map[uint64]chan qmpReply{}, done: make(chan struct{}), onEvent: onEvent}
	r := bufio.NewReaderSize(conn, 64<<10)
	if dl, ok := ctx.Deadline(); ok {
		_ = conn.SetReadDeadline(dl)
	}
	greeting, err := r.ReadBytes('\n')
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("Failed to read QMP greeting on %q: %w", path, err)
	}
	var g struct {
		QMP json.RawMessage `json:"QMP"`
	}
	if json.Unmarshal(greeting, &g) != nil || g.QMP == nil {
		conn.Close()
		return nil, fmt.Errorf("Unexpected QMP greeting on %q: %.200s", path, greeting)
	}
	_ = conn.SetReadDeadline(time.Time{})
	go m.readLoop(r)
	if err := m.Execute(ctx, "qmp_capabilities", nil, nil); err != nil {
		m.Close()
		return nil, fmt.Errorf("Failed to negotiate QMP capabilities on %q: %w", path, err)
	}
	return m, nil
}

func (m *Monitor) readLoop(r *bufio.Reader) {
	defer func() {
		m.mu.Lock()
		close(m.done)
		for id, ch := range m.pending {
			close(ch)
			delete(m.pending, id)
		}
		m.mu.Unlock()
	}()
	for {
		line, err := r.ReadBytes('\n')
		if err != nil {
			return
		}
		var rep qmpReply
		if json.Unmarshal(line, &rep) != nil {
			continue
		}
		if rep.Event != "" {
			var ev Event
			if json.Unmarshal(line, &ev) == nil {
				m.onEvent(ev)
			}
			continue
		}
		if rep.ID == nil {
			continue
		}
		m.mu.Lock()
		ch := m.pending[*rep.ID]
		delete(m.pending, *rep.ID)
		m.mu.Unlock()
		if ch != nil {
			ch <- rep
		}
	}
}

// Done is closed when the QMP connection ends (QEMU exited or closed the socket).
func (m *Monitor) Done() <-chan struct{} { return m.done }

// Close ends the connection; QEMU keeps running.
func (m *Monitor) Close() error { return m.conn.Close() }

// Execute runs one QMP command; args may be nil, out (if not nil) receives "return".
func (m *Monitor) Execute(ctx context.Context, cmd string, args any, out any) error {
	m.mu.Lock()
	select {
	case <-m.done:
		m.mu.Unlock()
		return fmt.Errorf("Failed to run QMP %s: %w", cmd, ErrClosed)
	default:
	}
	m.nextID++
	id := m.nextID
	ch := make(chan qmpReply, 1)
	m.pending[id] = ch
	m.mu.Unlock()

	req := map[string]any{"execute": cmd, "id": id}
	if args != nil {
		req["arguments"] = args
	}
	b, err := json.Marshal(req)
	if err != nil {
		return fmt.Errorf("Failed to encode QMP %s: %w", cmd, err)
	}
	m.wmu.Lock()
	_, err = m.conn.Write(append(b, '\n'))
	m.wmu.Unlock()
	if err != nil {
		m.mu.Lock()
		delete(m.pending, id)
		m.mu.Unlock()
		return fmt.Errorf("Failed to send QMP %s: %w", cmd, err)
	}
	select {
	case rep, ok := <-ch:
		if !ok {
			return fmt.Errorf("Failed to run QMP %s: %w", cmd, ErrClosed)
		}
		if rep.Error != nil {
			return fmt.Errorf("QMP %s failed: %w", cmd, rep.Error)
		}
		if out != nil && len(rep.Return) > 0 {
			if err := json.Unmarshal(rep.Return, out); err != nil {
				return fmt.Errorf("Failed to decode QMP %s reply: %w", cmd, err)
			}
		}
		return nil
	case <-ctx.Done():
		m.mu.Lock()
		delete(m.pending, id)
		m.mu.Unlock()
		return fmt.Errorf("QMP %s: %w", cmd, ctx.Err())
	}
}

// Status returns the run state QEMU reports ("running", "paused", "inmigrate", "postmigrate", ...).
func (m *Monitor) Status(ctx context.Context) (string, error) {
	var st struct {
		Status string `json:"status"`
	}
	if err := m.Execute(ctx, "query-status", nil, &st); err != nil {
		return "", err
	}
	return st.Status, nil
}

// MigrationInfo is the subset of query-migrate the agent uses.
type MigrationInfo struct {
	Status    string `json:"status"`
	TotalTime int64  `json:"total-time"`
	Downtime  int64  `json:"downtime"`
	SetupTime int64  `json:"setup-time"`
	ErrorDesc string `json:"error-desc"`
	RAM       *struct {
		Transferred int64 `json:"transferred"`
		Remaining   int64 `json:"remaining"`
		Total       int64 `json:"total"`
		DirtySync   int64 `json:"dirty-sync-count"`
	} `json:"ram"`
}

// QueryMigrate returns the state of the current or last migration.
func (m *Monitor) QueryMigrate(ctx context.Context) (MigrationInfo, error) {
	var mi MigrationInfo
	err := m.Execute(ctx, "query-migrate", nil, &mi)
	return mi, err
}
