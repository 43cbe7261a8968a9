package store

import (
	"context"
	"database/sql"
	"fmt"
	"time"
)

// Roles a user can have.
const (
	RoleAdmin    = "admin"
	RoleCustomer = "customer"
)

// User is someone holding an API token; a customer user acts only for its customer.
type User struct {
	ID         string    `json:"id"`
	Name       string    `json:"name"`
	Role       string    `json:"role"`
	CustomerID string    `json:"customer_id,omitempty"`
	CreatedAt  time.Time `json:"created_at"`
}

// CreateUser inserts u with the hash of its API token (never the token itself).
func (s *Store) CreateUser(ctx context.Context, u *User, tokenHash string) error {
	if u.ID == "" {
		u.ID = NewID("usr")
	}
	u.CreatedAt = time.Now().UTC()
	_, err := s.exec(ctx, `INSERT INTO users (id, name, role, customer_id, token_hash, created_at) VALUES (?, ?, ?, ?, ?, ?)`,
		u.ID, u.Name, u.Role, nullStr(u.CustomerID), tokenHash, ts(u.CreatedAt))
	if err != nil {
		return fmt.Errorf("Failed to create user %q: %w", u.Name, err)
	}
	return nil
}

// SetUserToken replaces the token hash of a user (token rotation).
func (s *Store) SetUserToken(ctx context.Context, id, tokenHash string) error {
	if err := affected(s.exec(ctx, `UPDATE users SET token_hash = ? WHERE id = ?`, tokenHash, id)); err != nil {
		return fmt.Errorf("Failed to set token of user %q: %w", id, err)
	}
	return nil
}

const userCols = `id, name, role, customer_id, created_at`

func scanUser(sc interface{ Scan(...any) error }) (User, error) {
	var u User
	var cust sql.NullString
	var at int64
	if err := sc.Scan(&u.ID, &u.Name, &u.Role, &cust, &at); err != nil {
		return User{}, mapErr(err)
	}
	u.CustomerID = cust.String
	u.CreatedAt = fromTS(at)
	return u, nil
}

// UserByTokenHash returns the user whose token hashes to tokenHash.
func (s *Store) UserByTokenHash(ctx context.Context, tokenHash string) (User, error) {
	u, err := scanUser(s.queryRow(ctx, `SELECT `+userCols+` FROM users WHERE token_hash = ?`, tokenHash))
	if err != nil {
		return User{}, fmt.Errorf("Failed to look up token: %w", err)
	}
	return u, nil
}

// GetUser returns the user with the given ID or name.
func (s *Store) GetUser(ctx context.Context, idOrName string) (User, error) {
	u, err := scanUser(s.queryRow(ctx, `SELECT `+userCols+` FROM users WHERE id = ? OR name = ?`, idOrName, idOrName))
	if err != nil {
		return User{}, fmt.Errorf("Failed to load user %q: %w", idOrName, err)
	}
	return u, nil
}

// ListUsers returns a page of users, all of them or only those of customerID.
func (s *Store) ListUsers(ctx context.Context, customerID string, p Page) ([]User, error) {
	rows, err := s.query(ctx, `SELECT `+userCols+` FROM users WHERE id > ? AND (? = '' OR customer_id = ?) ORDER BY id LIMIT ?`,
		p.After, customerID, customerID, p.limit())
	if err != nil {
		return nil, fmt.Errorf("Failed to list users: %w", err)
	}
	defer rows.Close()
	var out []User
	for rows.Next() {
		u, err := scanUser(rows)
		if err != nil {
			return nil, fmt.Errorf("Failed to read user: %w", err)
		}
		out = append(out, u)
	}
	return out, rows.Err()
}

// DeleteUser removes a user; its token stops working at once.
func (s *Store) DeleteUser(ctx context.Context, id string) error {
	if err := affected(s.exec(ctx, `DELETE FROM users WHERE id = ?`, id)); err != nil {
		return fmt.Errorf("Failed to delete user %q: %w", id, err)
	}
	return nil
}
