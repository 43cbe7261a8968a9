package testbed

import (
	"bufio"
	"encoding/json"
	"fmt"
	"net"
	"sync"
	"time"
)

// QMP is a minimal QMP client for tests: one command at a time, events skipped.
type QMP struct {
	mu   sync.Mutex
	conn net.Conn
	rd   *bufio.Reader
}

// DialQMP connects to a QMP unix socket, retrying until timeout, and negotiates capabilities.
func DialQMP(path string, timeout time.Duration) (*QMP, error) {
	deadline := time.Now().Add(timeout)
	var conn net.Conn
	var err error
	for {
		conn, err = net.DialTimeout("unix", path, time.Second)
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("Failed to connect to QMP socket %s: %w", path, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	q := &QMP{conn: conn, rd: bufio.NewReader(conn)}
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := q.rd.ReadBytes('\n'); err != nil { // greeting
		conn.Close()
		return nil, fmt.Errorf("Failed to read the QMP greeting: %w", err)
	}
	_ = conn.SetDeadline(time.Time{})
	if _, err := q.Execute("qmp_capabilities", nil); err != nil {
		conn.Close()
		return nil, err
	}
	return q, nil
}

// Execute runs one QMP command and returns its "return" value.
func (q *QMP) Execute(cmd string, args any) (json.RawMessage, error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	req := map[string]any{"execute": cmd}
	if args != nil {
		req["arguments"] = args
	}
	b, err := json.Marshal(req)
	if err != nil {
		return nil, fmt.Errorf("Failed to encode QMP %s: %w", cmd, err)
	}
	_ = q.conn.SetDeadline(time.Now().Add(60 * time.Second))
	defer func() { _ = q.conn.SetDeadline(time.Time{}) }()
	if _, err := q.conn.Write(append(b, '\n')); err != nil {
		return nil, fmt.Errorf("Failed to send QMP %s: %w", cmd, err)
	}
	for {
		line, err := q.rd.ReadBytes('\n')
		if err != nil {
			return nil, fmt.Errorf("Failed to read the QMP reply to %s: %w", cmd, err)
		}
		var resp struct {
			Return json.RawMessage `json:"return"`
			Error  *struct {
				Class string `json:"class"`
				Desc  string `json:"desc"`
			} `json:"error"`
			Event string `json:"event"`
		}
		if err := json.Unmarshal(line, &resp); err != nil {
			return nil, fmt.Errorf("Bad QMP reply to %s: %w", cmd, err)
		}
		if resp.Event != "" {
			continue
		}
		if resp.Error != nil {
			return nil, fmt.Errorf("QMP %s failed: %s: %s", cmd, resp.Error.Class, resp.Error.Desc)
		}
		return resp.Return, nil
	}
}

// Close closes the connection.
func (q *QMP) Close() error { return q.conn.Close() }
