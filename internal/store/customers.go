package store

import (
	"context"
	"fmt"
	"time"
)

// Customer is a tenant: it owns servers and its users act only on them.
type Customer struct {
	ID         string    `json:"id"`
	Name       string    `json:"name"`
	Email      string    `json:"email"`
	MaxServers int       `json:"max_servers"`
	CreatedAt  time.Time `json:"created_at"`
}

// CreateCustomer inserts c, assigning its ID and creation time.
func (s *Store) CreateCustomer(ctx context.Context, c *Customer) error {
	if c.ID == "" {
		c.ID = NewID("cus")
	}
	c.CreatedAt = time.Now().UTC()
	_, err := s.exec(ctx, `INSERT INTO customers (id, name, email, max_servers, created_at) VALUES (?, ?, ?, ?, ?)`,
		c.ID, c.Name, c.Email, c.MaxServers, ts(c.CreatedAt))
	if err != nil {
		return fmt.Errorf("Failed to create customer %q: %w", c.Name, err)
	}
	return nil
}

// UpdateCustomer saves the email and quota of c.
func (s *Store) UpdateCustomer(ctx context.Context, c Customer) error {
	err := affected(s.exec(ctx, `UPDATE customers SET email = ?, max_servers = ? WHERE id = ?`, c.Email, c.MaxServers, c.ID))
	if err != nil {
		return fmt.Errorf("Failed to update customer %q: %w", c.Name, err)
	}
	return nil
}

const customerCols = `id, name, email, max_servers, created_at`

func scanCustomer(sc interface{ Scan(...any) error }) (Customer, error) {
	var c Customer
	var at int64
	if err := sc.Scan(&c.ID, &c.Name, &c.Email, &c.MaxServers, &at); err != nil {
		return Customer{}, mapErr(err)
	}
	c.CreatedAt = fromTS(at)
	return c, nil
}

// GetCustomer returns the customer with the given ID or name.
func (s *Store) GetCustomer(ctx context.Context, idOrName string) (Customer, error) {
	c, err := scanCustomer(s.queryRow(ctx, `SELECT `+customerCols+` FROM customers WHERE id = ? OR name = ?`, idOrName, idOrName))
	if err != nil {
		return Customer{}, fmt.Errorf("Failed to load customer %q: %w", idOrName, err)
	}
	return c, nil
}

// ListCustomers returns a page of customers ordered by ID.
func (s *Store) ListCustomers(ctx context.Context, p Page) ([]Customer, error) {
	rows, err := s.query(ctx, `SELECT `+customerCols+` FROM customers WHERE id > ? ORDER BY id LIMIT ?`, p.After, p.limit())
	if err != nil {
		return nil, fmt.Errorf("Failed to list customers: %w", err)
	}
	defer rows.Close()
	var out []Customer
	for rows.Next() {
		c, err := scanCustomer(rows)
		if err != nil {
			return nil, fmt.Errorf("Failed to read customer: %w", err)
		}
		out = append(out, c)
	}
	return out, rows.Err()
}

// DeleteCustomer removes a customer that has no servers and no users left.
func (s *Store) DeleteCustomer(ctx context.Context, id string) error {
	if err := affected(s.exec(ctx, `DELETE FROM customers WHERE id = ?`, id)); err != nil {
		return fmt.Errorf("Failed to delete customer %q: %w", id, err)
	}
	return nil
}
