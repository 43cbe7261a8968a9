package store

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"time"
)

// ErrExhausted means an IP pool has no free address left.
var ErrExhausted = errors.New("no free address")

// IPPool is a range of IPv4 or IPv6 addresses handed to servers, with gateway and DNS.
type IPPool struct {
	ID        string    `json:"id"`
	Name      string    `json:"name"`
	Family    int       `json:"family"`
	CIDR      string    `json:"cidr"`
	First     string    `json:"first"`
	Last      string    `json:"last"`
	Gateway   string    `json:"gateway"`
	DNS       []string  `json:"dns"`
	CreatedAt time.Time `json:"created_at"`
}

// Validate checks that the pool's range lies inside its prefix, in one family.
func (p *IPPool) Validate() error {
	prefix, err := netip.ParsePrefix(p.CIDR)
	if err != nil {
		return fmt.Errorf("Invalid CIDR %q: %w", p.CIDR, err)
	}
	first, err := netip.ParseAddr(p.First)
	if err != nil {
		return fmt.Errorf("Invalid first address %q: %w", p.First, err)
	}
	last, err := netip.ParseAddr(p.Last)
	if err != nil {
		return fmt.Errorf("Invalid last address %q: %w", p.Last, err)
	}
	if !prefix.Contains(first) || !prefix.Contains(last) {
		return fmt.Errorf("Range %s-%s is not inside %s", p.First, p.Last, p.CIDR)
	}
	if last.Less(first) {
		return fmt.Errorf("Range %s-%s is empty", p.First, p.Last)
	}
	if p.Gateway != "" {
		gw, err := netip.ParseAddr(p.Gateway)
		if err != nil || !prefix.Contains(gw) {
			return fmt.Errorf("Gateway %q is not an address inside %s", p.Gateway, p.CIDR)
		}
	}
	for _, d := range p.DNS {
		if _, err := netip.ParseAddr(d); err != nil {
			return fmt.Errorf("Invalid DNS server %q: %w", d, err)
		}
	}
	if first.Is4() {
		p.Family = 4
	} else {
		p.Family = 6
	}
	return nil
}

// CreateIPPool validates and inserts p.
func (s *Store) CreateIPPool(ctx context.Context, p *IPPool) error {
	if err := p.Validate(); err != nil {
		return err
	}
	if p.ID == "" {
		p.ID = NewID("pool")
	}
	p.CreatedAt = time.Now().UTC()
	_, err := s.exec(ctx, `INSERT INTO ip_pools (id, name, family, cidr, first_addr, last_addr, gateway, dns, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)`,
		p.ID, p.Name, p.Family, p.CIDR, p.First, p.Last, p.Gateway, strings.Join(p.DNS, ","), ts(p.CreatedAt))
	if err != nil {
		return fmt.Errorf("Failed to create IP pool %q: %w", p.Name, err)
	}
	return nil
}

const poolCols = `id, name, family, cidr, first_addr, last_addr, gateway, dns, created_at`

func scanPool(sc interface{ Scan(...any) error }) (IPPool, error) {
	var p IPPool
	var dns string
	var at int64
	if err := sc.Scan(&p.ID, &p.Name, &p.Family, &p.CIDR, &p.First, &p.Last, &p.Gateway, &dns, &at); err != nil {
		return IPPool{}, mapErr(err)
	}
	if dns != "" {
		p.DNS = strings.Split(dns, ",")
	}
	p.CreatedAt = fromTS(at)
	return p, nil
}

// GetIPPool returns the pool with the given ID or name.
func (s *Store) GetIPPool(ctx context.Context, idOrName string) (IPPool, error) {
	p, err := scanPool(s.queryRow(ctx, `SELECT `+poolCols+` FROM ip_pools WHERE id = ? OR name = ?`, idOrName, idOrName))
	if err != nil {
		return IPPool{}, fmt.Errorf("Failed to load IP pool %q: %w", idOrName, err)
	}
	return p, nil
}

// ListIPPools returns every pool ordered by name.
func (s *Store) ListIPPools(ctx context.Context) ([]IPPool, error) {
	rows, err := s.query(ctx, `SELECT `+poolCols+` FROM ip_pools ORDER BY name`)
	if err != nil {
		return nil, fmt.Errorf("Failed to list IP pools: %w", err)
	}
	defer rows.Close()
	var out []IPPool
	for rows.Next() {
		p, err := scanPool(rows)
		if err != nil {
			return nil, fmt.Errorf("Failed to read IP pool: %w", err)
		}
		out = append(out, p)
	}
	return out, rows.Err()
}

// DeleteIPPool removes a pool with no lease.
func (s *Store) DeleteIPPool(ctx context.Context, id string) error {
	if err := affected(s.exec(ctx, `DELETE FROM ip_pools WHERE id = ?`, id)); err != nil {
		return fmt.Errorf("Failed to delete IP pool %q: %w", id, err)
	}
	return nil
}

// IPLease is one address of a pool given to a server.
type IPLease struct {
	PoolID    string    `json:"pool_id"`
	Address   string    `json:"address"`
	ServerID  string    `json:"server_id"`
	CreatedAt time.Time `json:"created_at"`
}

// LeaseIP gives serverID the lowest free address of the first pool of the family
// that has one. Concurrent control planes are kept apart by the lease's primary key.
func (s *Store) LeaseIP(ctx context.Context, family int, serverID string) (IPLease, IPPool, error) {
	pools, err := s.ListIPPools(ctx)
	if err != nil {
		return IPLease{}, IPPool{}, err
	}
	for _, p := range pools {
		if p.Family != family {
			continue
		}
		for attempt := 0; attempt < 5; attempt++ {
			addr, err := s.freeAddress(ctx, p)
			if errors.Is(err, ErrExhausted) {
				break
			}
			if err != nil {
				return IPLease{}, IPPool{}, err
			}
			l := IPLease{PoolID: p.ID, Address: addr, ServerID: serverID, CreatedAt: time.Now().UTC()}
			_, err = s.exec(ctx, `INSERT INTO ip_leases (pool_id, address, server_id, created_at) VALUES (?, ?, ?, ?)`,
				l.PoolID, l.Address, l.ServerID, ts(l.CreatedAt))
			if errors.Is(err, ErrConflict) {
				continue // another control plane took it; look again
			}
			if err != nil {
				return IPLease{}, IPPool{}, fmt.Errorf("Failed to lease %s: %w", addr, err)
			}
			return l, p, nil
		}
	}
	return IPLease{}, IPPool{}, fmt.Errorf("Failed to lease an IPv%d address: %w", family, ErrExhausted)
}

func (s *Store) freeAddress(ctx context.Context, p IPPool) (string, error) {
	rows, err := s.query(ctx, `SELECT address FROM ip_leases WHERE pool_id = ?`, p.ID)
	if err != nil {
		return "", fmt.Errorf("Failed to read leases of pool %q: %w", p.Name, err)
	}
	used := map[string]bool{}
	for rows.Next() {
		var a string
		if err := rows.Scan(&a); err != nil {
			rows.Close()
			return "", fmt.Errorf("Failed to read lease: %w", err)
		}
		used[a] = true
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return "", err
	}
	first, err := netip.ParseAddr(p.First)
	if err != nil {
		return "", fmt.Errorf("Pool %q has a bad first address: %w", p.Name, err)
	}
	last, err := netip.ParseAddr(p.Last)
	if err != nil {
		return "", fmt.Errorf("Pool %q has a bad last address: %w", p.Name, err)
	}
	// Never more candidates than leases plus one need checking.
	for a, n := first, 0; n <= len(used)+1 && a.IsValid() && !last.Less(a); a, n = a.Next(), n+1 {
		if p.Gateway != "" && a.String() == p.Gateway {
			continue
		}
		if !used[a.String()] {
			return a.String(), nil
		}
	}
	return "", ErrExhausted
}

// ReleaseIPs frees every address leased to serverID.
func (s *Store) ReleaseIPs(ctx context.Context, serverID string) error {
	if _, err := s.exec(ctx, `DELETE FROM ip_leases WHERE server_id = ?`, serverID); err != nil {
		return fmt.Errorf("Failed to release addresses of server %q: %w", serverID, err)
	}
	return nil
}

// ReleaseIP frees one lease.
func (s *Store) ReleaseIP(ctx context.Context, poolID, address string) error {
	if _, err := s.exec(ctx, `DELETE FROM ip_leases WHERE pool_id = ? AND address = ?`, poolID, address); err != nil {
		return fmt.Errorf("Failed to release address %s: %w", address, err)
	}
	return nil
}

// ListLeases returns the leases of a pool (or of every pool when poolID is empty).
func (s *Store) ListLeases(ctx context.Context, poolID string) ([]IPLease, error) {
	rows, err := s.query(ctx, `SELECT pool_id, address, server_id, created_at FROM ip_leases WHERE ? = '' OR pool_id = ? ORDER BY pool_id, address`, poolID, poolID)
	if err != nil {
		return nil, fmt.Errorf("Failed to list leases: %w", err)
	}
	defer rows.Close()
	var out []IPLease
	for rows.Next() {
		var l IPLease
		var at int64
		if err := rows.Scan(&l.PoolID, &l.Address, &l.ServerID, &at); err != nil {
			return nil, fmt.Errorf("Failed to read lease: %w", err)
		}
		l.CreatedAt = fromTS(at)
		out = append(out, l)
	}
	return out, rows.Err()
}
