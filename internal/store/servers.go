package store

import (
	"context"
	"database/sql"
	"fmt"
	"strings"
	"time"
)

// Server states.
const (
	ServerCreating  = "creating"
	ServerRunning   = "running"
	ServerStopped   = "stopped"
	ServerMigrating = "migrating"
	ServerResizing  = "resizing"
	ServerDeleting  = "deleting"
	ServerError     = "error"
)

// Server is a customer's virtual server; its size is copied from the plan at creation
// or resize, so editing a plan never silently changes running servers.
type Server struct {
	ID          string    `json:"id"`
	Name        string    `json:"name"`
	CustomerID  string    `json:"customer_id"`
	Plan        string    `json:"plan"`
	ImageID     string    `json:"image_id"`
	VCPUs       int       `json:"vcpus"`
	MemoryBytes int64     `json:"memory_bytes"`
	DiskBytes   int64     `json:"disk_bytes"`
	HostID      string    `json:"host_id,omitempty"`
	StorageID   string    `json:"storage_id,omitempty"`
	Volume      string    `json:"volume,omitempty"`
	Group       string    `json:"group,omitempty"`
	IPv4        string    `json:"ipv4,omitempty"`
	IPv6        string    `json:"ipv6,omitempty"`
	State       string    `json:"state"`
	SSHKeys     []string  `json:"ssh_keys,omitempty"`
	UserData    string    `json:"user_data,omitempty"`
	CreatedAt   time.Time `json:"created_at"`
	UpdatedAt   time.Time `json:"updated_at"`
}

// CreateServer inserts sv.
func (s *Store) CreateServer(ctx context.Context, sv *Server) error {
	if sv.ID == "" {
		sv.ID = NewID("srv")
	}
	if sv.State == "" {
		sv.State = ServerCreating
	}
	sv.CreatedAt = time.Now().UTC()
	sv.UpdatedAt = sv.CreatedAt
	_, err := s.exec(ctx, `INSERT INTO servers (id, name, customer_id, plan, image_id, vcpus, memory_bytes, disk_bytes, host_id, storage_id,
		volume, group_name, ipv4, ipv6, state, ssh_keys, user_data, created_at, updated_at)
		VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`,
		sv.ID, sv.Name, sv.CustomerID, sv.Plan, sv.ImageID, sv.VCPUs, sv.MemoryBytes, sv.DiskBytes, nullStr(sv.HostID), nullStr(sv.StorageID),
		sv.Volume, sv.Group, sv.IPv4, sv.IPv6, sv.State, strings.Join(sv.SSHKeys, "\n"), sv.UserData, ts(sv.CreatedAt), ts(sv.UpdatedAt))
	if err != nil {
		return fmt.Errorf("Failed to create server %q: %w", sv.Name, err)
	}
	return nil
}

// UpdateServer saves every mutable field of sv.
func (s *Store) UpdateServer(ctx context.Context, sv *Server) error {
	sv.UpdatedAt = time.Now().UTC()
	err := affected(s.exec(ctx, `UPDATE servers SET plan = ?, vcpus = ?, memory_bytes = ?, disk_bytes = ?, host_id = ?, storage_id = ?,
		volume = ?, ipv4 = ?, ipv6 = ?, state = ?, updated_at = ? WHERE id = ?`,
		sv.Plan, sv.VCPUs, sv.MemoryBytes, sv.DiskBytes, nullStr(sv.HostID), nullStr(sv.StorageID),
		sv.Volume, sv.IPv4, sv.IPv6, sv.State, ts(sv.UpdatedAt), sv.ID))
	if err != nil {
		return fmt.Errorf("Failed to update server %q: %w", sv.Name, err)
	}
	return nil
}

// SetServerState changes only the state of a server.
func (s *Store) SetServerState(ctx context.Context, id, state string) error {
	err := affected(s.exec(ctx, `UPDATE servers SET state = ?, updated_at = ? WHERE id = ?`, state, ts(time.Now()), id))
	if err != nil {
		return fmt.Errorf("Failed to set state of server %q: %w", id, err)
	}
	return nil
}

const serverCols = `id, name, customer_id, plan, image_id, vcpus, memory_bytes, disk_bytes, host_id, storage_id,
	volume, group_name, ipv4, ipv6, state, ssh_keys, user_data, created_at, updated_at`

func scanServer(sc interface{ Scan(...any) error }) (Server, error) {
	var sv Server
	var host, stor sql.NullString
	var keys string
	var created, updated int64
	if err := sc.Scan(&sv.ID, &sv.Name, &sv.CustomerID, &sv.Plan, &sv.ImageID, &sv.VCPUs, &sv.MemoryBytes, &sv.DiskBytes, &host, &stor,
		&sv.Volume, &sv.Group, &sv.IPv4, &sv.IPv6, &sv.State, &keys, &sv.UserData, &created, &updated); err != nil {
		return Server{}, mapErr(err)
	}
	sv.HostID, sv.StorageID = host.String, stor.String
	if keys != "" {
		sv.SSHKeys = strings.Split(keys, "\n")
	}
	sv.CreatedAt, sv.UpdatedAt = fromTS(created), fromTS(updated)
	return sv, nil
}

// GetServer returns the server with the given ID or name.
func (s *Store) GetServer(ctx context.Context, idOrName string) (Server, error) {
	sv, err := scanServer(s.queryRow(ctx, `SELECT `+serverCols+` FROM servers WHERE id = ? OR name = ?`, idOrName, idOrName))
	if err != nil {
		return Server{}, fmt.Errorf("Failed to load server %q: %w", idOrName, err)
	}
	return sv, nil
}

// ServerFilter narrows ListServers; empty fields match everything.
type ServerFilter struct {
	CustomerID string
	HostID     string
}

// ListServers returns a page of servers ordered by ID.
func (s *Store) ListServers(ctx context.Context, f ServerFilter, p Page) ([]Server, error) {
	rows, err := s.query(ctx, `SELECT `+serverCols+` FROM servers WHERE id > ? AND (? = '' OR customer_id = ?) AND (? = '' OR host_id = ?) ORDER BY id LIMIT ?`,
		p.After, f.CustomerID, f.CustomerID, f.HostID, f.HostID, p.limit())
	if err != nil {
		return nil, fmt.Errorf("Failed to list servers: %w", err)
	}
	defer rows.Close()
	var out []Server
	for rows.Next() {
		sv, err := scanServer(rows)
		if err != nil {
			return nil, fmt.Errorf("Failed to read server: %w", err)
		}
		out = append(out, sv)
	}
	return out, rows.Err()
}

// AllServers returns every server (for building a placement snapshot).
func (s *Store) AllServers(ctx context.Context) ([]Server, error) {
	var out []Server
	p := Page{Limit: MaxLimit}
	for {
		page, err := s.ListServers(ctx, ServerFilter{}, p)
		if err != nil {
			return nil, err
		}
		out = append(out, page...)
		if len(page) < p.Limit {
			return out, nil
		}
		p.After = page[len(page)-1].ID
	}
}

// CountServers returns how many servers a customer has.
func (s *Store) CountServers(ctx context.Context, customerID string) (int, error) {
	var n int
	if err := s.queryRow(ctx, `SELECT COUNT(*) FROM servers WHERE customer_id = ?`, customerID).Scan(&n); err != nil {
		return 0, fmt.Errorf("Failed to count servers of customer %q: %w", customerID, err)
	}
	return n, nil
}

// DeleteServer removes a server row.
func (s *Store) DeleteServer(ctx context.Context, id string) error {
	if err := affected(s.exec(ctx, `DELETE FROM servers WHERE id = ?`, id)); err != nil {
		return fmt.Errorf("Failed to delete server %q: %w", id, err)
	}
	return nil
}
