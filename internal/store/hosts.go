package store

import (
	"context"
	"fmt"
	"time"
)

// Host and storage controller states.
const (
	StateActive      = "active"
	StateMaintenance = "maintenance"
	StateOffline     = "offline"
)

// Host is a registered `grow hostd` agent with its capacity.
type Host struct {
	ID          string    `json:"id"`
	Name        string    `json:"name"`
	URL         string    `json:"url"`
	Token       string    `json:"-"`
	CPUs        int       `json:"cpus"`
	MemoryBytes int64     `json:"memory_bytes"`
	CPUModel    string    `json:"cpu_model"`
	State       string    `json:"state"`
	CreatedAt   time.Time `json:"created_at"`
	// CACert is the PEM CA the control plane (and the other agents, during a migration)
	// trusts for the agent's https API.
	CACert string `json:"ca_cert,omitempty"`
}

// CreateHost registers a host agent.
func (s *Store) CreateHost(ctx context.Context, h *Host) error {
	if h.ID == "" {
		h.ID = NewID("host")
	}
	if h.State == "" {
		h.State = StateActive
	}
	h.CreatedAt = time.Now().UTC()
	_, err := s.exec(ctx, `INSERT INTO hosts (id, name, url, token, cpus, memory_bytes, cpu_model, state, created_at, ca_cert) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`,
		h.ID, h.Name, h.URL, h.Token, h.CPUs, h.MemoryBytes, h.CPUModel, h.State, ts(h.CreatedAt), h.CACert)
	if err != nil {
		return fmt.Errorf("Failed to register host %q: %w", h.Name, err)
	}
	return nil
}

// UpdateHost saves the address, token, CA, capacity and state of h.
func (s *Store) UpdateHost(ctx context.Context, h Host) error {
	err := affected(s.exec(ctx, `UPDATE hosts SET url = ?, token = ?, cpus = ?, memory_bytes = ?, cpu_model = ?, state = ?, ca_cert = ? WHERE id = ?`,
		h.URL, h.Token, h.CPUs, h.MemoryBytes, h.CPUModel, h.State, h.CACert, h.ID))
	if err != nil {
		return fmt.Errorf("Failed to update host %q: %w", h.Name, err)
	}
	return nil
}

const hostCols = `id, name, url, token, cpus, memory_bytes, cpu_model, state, created_at, ca_cert`

func scanHost(sc interface{ Scan(...any) error }) (Host, error) {
	var h Host
	var at int64
	if err := sc.Scan(&h.ID, &h.Name, &h.URL, &h.Token, &h.CPUs, &h.MemoryBytes, &h.CPUModel, &h.State, &at, &h.CACert); err != nil {
		return Host{}, mapErr(err)
	}
	h.CreatedAt = fromTS(at)
	return h, nil
}

// GetHost returns the host with the given ID or name.
func (s *Store) GetHost(ctx context.Context, idOrName string) (Host, error) {
	h, err := scanHost(s.queryRow(ctx, `SELECT `+hostCols+` FROM hosts WHERE id = ? OR name = ?`, idOrName, idOrName))
	if err != nil {
		return Host{}, fmt.Errorf("Failed to load host %q: %w", idOrName, err)
	}
	return h, nil
}

// ListHosts returns every host ordered by name.
func (s *Store) ListHosts(ctx context.Context) ([]Host, error) {
	rows, err := s.query(ctx, `SELECT `+hostCols+` FROM hosts ORDER BY name`)
	if err != nil {
		return nil, fmt.Errorf("Failed to list hosts: %w", err)
	}
	defer rows.Close()
	var out []Host
	for rows.Next() {
		h, err := scanHost(rows)
		if err != nil {
			return nil, fmt.Errorf("Failed to read host: %w", err)
		}
		out = append(out, h)
	}
	return out, rows.Err()
}

// DeleteHost removes a host that carries no server.
func (s *Store) DeleteHost(ctx context.Context, id string) error {
	if err := affected(s.exec(ctx, `DELETE FROM hosts WHERE id = ?`, id)); err != nil {
		return fmt.Errorf("Failed to delete host %q: %w", id, err)
	}
	return nil
}

// StorageController is a registered `grow storaged`.
type StorageController struct {
	ID        string    `json:"id"`
	Name      string    `json:"name"`
	URL       string    `json:"url"`
	Token     string    `json:"-"`
	State     string    `json:"state"`
	CreatedAt time.Time `json:"created_at"`
	// CACert is the PEM CA the control plane trusts for the controller's https API.
	CACert string `json:"ca_cert,omitempty"`
	// PartnerURL and PartnerToken reach the controller's mirror partner, which answers
	// for the pair while the controller itself does not (its maintenance, a dead machine).
	PartnerURL   string `json:"partner_url,omitempty"`
	PartnerToken string `json:"-"`
}

// CreateStorage registers a storage controller.
func (s *Store) CreateStorage(ctx context.Context, c *StorageController) error {
	if c.ID == "" {
		c.ID = NewID("stor")
	}
	if c.State == "" {
		c.State = StateActive
	}
	c.CreatedAt = time.Now().UTC()
	_, err := s.exec(ctx, `INSERT INTO storage_controllers (id, name, url, token, state, created_at, ca_cert, partner_url, partner_token) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)`,
		c.ID, c.Name, c.URL, c.Token, c.State, ts(c.CreatedAt), c.CACert, c.PartnerURL, c.PartnerToken)
	if err != nil {
		return fmt.Errorf("Failed to register storage controller %q: %w", c.Name, err)
	}
	return nil
}

// UpdateStorage saves the address, token, CA, partner and state of c.
func (s *Store) UpdateStorage(ctx context.Context, c StorageController) error {
	err := affected(s.exec(ctx, `UPDATE storage_controllers SET url = ?, token = ?, state = ?, ca_cert = ?, partner_url = ?, partner_token = ? WHERE id = ?`,
		c.URL, c.Token, c.State, c.CACert, c.PartnerURL, c.PartnerToken, c.ID))
	if err != nil {
		return fmt.Errorf("Failed to update storage controller %q: %w", c.Name, err)
	}
	return nil
}

const storageCols = `id, name, url, token, state, created_at, ca_cert, partner_url, partner_token`

func scanStorage(sc interface{ Scan(...any) error }) (StorageController, error) {
	var c StorageController
	var at int64
	if err := sc.Scan(&c.ID, &c.Name, &c.URL, &c.Token, &c.State, &at, &c.CACert, &c.PartnerURL, &c.PartnerToken); err != nil {
		return StorageController{}, mapErr(err)
	}
	c.CreatedAt = fromTS(at)
	return c, nil
}

// GetStorage returns the storage controller with the given ID or name.
func (s *Store) GetStorage(ctx context.Context, idOrName string) (StorageController, error) {
	c, err := scanStorage(s.queryRow(ctx, `SELECT `+storageCols+` FROM storage_controllers WHERE id = ? OR name = ?`, idOrName, idOrName))
	if err != nil {
		return StorageController{}, fmt.Errorf("Failed to load storage controller %q: %w", idOrName, err)
	}
	return c, nil
}

// ListStorage returns every storage controller ordered by name.
func (s *Store) ListStorage(ctx context.Context) ([]StorageController, error) {
	rows, err := s.query(ctx, `SELECT `+storageCols+` FROM storage_controllers ORDER BY name`)
	if err != nil {
		return nil, fmt.Errorf("Failed to list storage controllers: %w", err)
	}
	defer rows.Close()
	var out []StorageController
	for rows.Next() {
		c, err := scanStorage(rows)
		if err != nil {
			return nil, fmt.Errorf("Failed to read storage controller: %w", err)
		}
		out = append(out, c)
	}
	return out, rows.Err()
}
