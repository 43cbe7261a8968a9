package store

import (
	"context"
	"fmt"
	"strings"
	"time"
)

// migrations are applied in order, each once; never edit one that has shipped, append a new one.
// The DDL sticks to types both SQLite and PostgreSQL accept: TEXT, BIGINT, INTEGER.
var migrations = []string{
	// 1: the initial schema.
	`
CREATE TABLE plans (
	name          TEXT PRIMARY KEY,
	vcpus         INTEGER NOT NULL CHECK (vcpus > 0),
	memory_bytes  BIGINT NOT NULL CHECK (memory_bytes > 0),
	disk_bytes    BIGINT NOT NULL CHECK (disk_bytes > 0),
	traffic_bytes BIGINT NOT NULL CHECK (traffic_bytes >= 0),
	price_yen     BIGINT NOT NULL CHECK (price_yen >= 0),
	updated_at    BIGINT NOT NULL
);
CREATE TABLE customers (
	id          TEXT PRIMARY KEY,
	name        TEXT NOT NULL UNIQUE,
	email       TEXT NOT NULL DEFAULT '',
	max_servers INTEGER NOT NULL DEFAULT 10,
	created_at  BIGINT NOT NULL
);
CREATE TABLE users (
	id          TEXT PRIMARY KEY,
	name        TEXT NOT NULL UNIQUE,
	role        TEXT NOT NULL CHECK (role IN ('admin', 'customer')),
	customer_id TEXT REFERENCES customers(id),
	token_hash  TEXT NOT NULL UNIQUE,
	created_at  BIGINT NOT NULL,
	CHECK ((role = 'admin' AND customer_id IS NULL) OR (role = 'customer' AND customer_id IS NOT NULL))
);
CREATE TABLE hosts (
	id           TEXT PRIMARY KEY,
	name         TEXT NOT NULL UNIQUE,
	url          TEXT NOT NULL,
	token        TEXT NOT NULL,
	cpus         INTEGER NOT NULL CHECK (cpus > 0),
	memory_bytes BIGINT NOT NULL CHECK (memory_bytes > 0),
	cpu_model    TEXT NOT NULL DEFAULT '',
	state        TEXT NOT NULL CHECK (state IN ('active', 'maintenance', 'offline')),
	created_at   BIGINT NOT NULL
);
CREATE TABLE storage_controllers (
	id         TEXT PRIMARY KEY,
	name       TEXT NOT NULL UNIQUE,
	url        TEXT NOT NULL,
	token      TEXT NOT NULL,
	state      TEXT NOT NULL CHECK (state IN ('active', 'maintenance', 'offline')),
	created_at BIGINT NOT NULL
);
CREATE TABLE ip_pools (
	id         TEXT PRIMARY KEY,
	name       TEXT NOT NULL UNIQUE,
	family     INTEGER NOT NULL CHECK (family IN (4, 6)),
	cidr       TEXT NOT NULL,
	first_addr TEXT NOT NULL,
	last_addr  TEXT NOT NULL,
	gateway    TEXT NOT NULL DEFAULT '',
	dns        TEXT NOT NULL DEFAULT '',
	created_at BIGINT NOT NULL
);
CREATE TABLE images (
	id         TEXT PRIMARY KEY,
	name       TEXT NOT NULL UNIQUE,
	storage_id TEXT REFERENCES storage_controllers(id),
	volume     TEXT NOT NULL DEFAULT '',
	size_bytes BIGINT NOT NULL DEFAULT 0,
	kernel     TEXT NOT NULL DEFAULT '',
	initrd     TEXT NOT NULL DEFAULT '',
	cmdline    TEXT NOT NULL DEFAULT '',
	state      TEXT NOT NULL CHECK (state IN ('importing', 'ready', 'error')),
	created_at BIGINT NOT NULL
);
CREATE TABLE servers (
	id           TEXT PRIMARY KEY,
	name         TEXT NOT NULL UNIQUE,
	customer_id  TEXT NOT NULL REFERENCES customers(id),
	plan         TEXT NOT NULL REFERENCES plans(name),
	image_id     TEXT NOT NULL REFERENCES images(id),
	vcpus        INTEGER NOT NULL,
	memory_bytes BIGINT NOT NULL,
	disk_bytes   BIGINT NOT NULL,
	host_id      TEXT REFERENCES hosts(id),
	storage_id   TEXT REFERENCES storage_controllers(id),
	volume       TEXT NOT NULL DEFAULT '',
	group_name   TEXT NOT NULL DEFAULT '',
	ipv4         TEXT NOT NULL DEFAULT '',
	ipv6         TEXT NOT NULL DEFAULT '',
	state        TEXT NOT NULL,
	ssh_keys     TEXT NOT NULL DEFAULT '',
	user_data    TEXT NOT NULL DEFAULT '',
	created_at   BIGINT NOT NULL,
	updated_at   BIGINT NOT NULL
);
CREATE INDEX servers_customer ON servers (customer_id);
CREATE INDEX servers_host ON servers (host_id);
CREATE TABLE ip_leases (
	pool_id    TEXT NOT NULL REFERENCES ip_pools(id),
	address    TEXT NOT NULL,
	server_id  TEXT NOT NULL,
	created_at BIGINT NOT NULL,
	PRIMARY KEY (pool_id, address)
);
CREATE INDEX ip_leases_server ON ip_leases (server_id);
CREATE TABLE operations (
	id               TEXT PRIMARY KEY,
	kind             TEXT NOT NULL,
	state            TEXT NOT NULL CHECK (state IN ('pending', 'running', 'succeeded', 'failed', 'cancelled')),
	server_id        TEXT NOT NULL DEFAULT '',
	customer_id      TEXT NOT NULL DEFAULT '',
	user_id          TEXT NOT NULL DEFAULT '',
	step             TEXT NOT NULL DEFAULT '',
	progress         INTEGER NOT NULL DEFAULT 0,
	message          TEXT NOT NULL DEFAULT '',
	error            TEXT NOT NULL DEFAULT '',
	idempotency_key  TEXT UNIQUE,
	request          TEXT NOT NULL DEFAULT '',
	cancel_requested INTEGER NOT NULL DEFAULT 0,
	created_at       BIGINT NOT NULL,
	updated_at       BIGINT NOT NULL
);
CREATE INDEX operations_state ON operations (state);
CREATE TABLE traffic_samples (
	server_id TEXT NOT NULL,
	at        BIGINT NOT NULL,
	rx_bytes  BIGINT NOT NULL,
	tx_bytes  BIGINT NOT NULL,
	PRIMARY KEY (server_id, at)
);
`,
	// 2: billing periods, so deleted and resized servers are invoiced for the time they ran on each plan.
	`
CREATE TABLE plan_periods (
	server_id     TEXT NOT NULL,
	server_name   TEXT NOT NULL,
	customer_id   TEXT NOT NULL,
	plan          TEXT NOT NULL,
	price_yen     BIGINT NOT NULL,
	traffic_bytes BIGINT NOT NULL,
	started_at    BIGINT NOT NULL,
	ended_at      BIGINT NOT NULL DEFAULT 0,
	PRIMARY KEY (server_id, started_at)
);
CREATE INDEX plan_periods_customer ON plan_periods (customer_id, started_at);
`,
	// 3: operation leases, so several control planes on one database never run one operation twice.
	`
ALTER TABLE operations ADD COLUMN owner TEXT NOT NULL DEFAULT '';
ALTER TABLE operations ADD COLUMN heartbeat BIGINT NOT NULL DEFAULT 0
`,
	// 4: the last traffic counter reading per server, so traffic while the control plane is down is still billed.
	`
CREATE TABLE traffic_counters (
	server_id TEXT PRIMARY KEY,
	rx_total  BIGINT NOT NULL,
	tx_total  BIGINT NOT NULL,
	at        BIGINT NOT NULL
)
`,
	// 5: the mirror witness: per key, the highest epoch granted to a storage controller.
	`
CREATE TABLE witness_grants (
	key    TEXT PRIMARY KEY,
	epoch  BIGINT NOT NULL,
	holder TEXT NOT NULL
)
`,
	// 6: the CA that signed a storage controller's certificate (an https admin API).
	`
ALTER TABLE storage_controllers ADD COLUMN ca_cert TEXT NOT NULL DEFAULT ''
`,
	// 7, 8: the mirror partner of a storage controller, reached when the controller is not.
	`
ALTER TABLE storage_controllers ADD COLUMN partner_url TEXT NOT NULL DEFAULT ''
`,
	`
ALTER TABLE storage_controllers ADD COLUMN partner_token TEXT NOT NULL DEFAULT ''
`,
	// 9: the CA that signed a host agent's certificate (an https agent API).
	`
ALTER TABLE hosts ADD COLUMN ca_cert TEXT NOT NULL DEFAULT ''
`,
}

// SchemaVersion is the version a fully migrated database has.
var SchemaVersion = len(migrations)

func (s *Store) migrate(ctx context.Context) error {
	if _, err := s.exec(ctx, `CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at BIGINT NOT NULL)`); err != nil {
		return fmt.Errorf("Failed to create the migrations table: %w", err)
	}
	for i, m := range migrations {
		version := i + 1
		err := s.InTx(ctx, func(tx *Store) error {
			if s.dialect == Postgres {
				// Several control planes may start at once: serialise migrations.
				if _, err := tx.exec(ctx, `SELECT pg_advisory_xact_lock(7470)`); err != nil {
					return fmt.Errorf("Failed to take the migration lock: %w", err)
				}
			}
			var n int
			if err := tx.queryRow(ctx, `SELECT COUNT(*) FROM schema_migrations WHERE version = ?`, version).Scan(&n); err != nil {
				return fmt.Errorf("Failed to read schema version: %w", err)
			}
			if n > 0 {
				return nil
			}
			for _, stmt := range strings.Split(m, ";") {
				if strings.TrimSpace(stmt) == "" {
					continue
				}
				if _, err := tx.exec(ctx, stmt); err != nil {
					return fmt.Errorf("Failed to apply migration %d: %w", version, err)
				}
			}
			_, err := tx.exec(ctx, `INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)`, version, time.Now().UnixNano())
			return err
		})
		if err != nil {
			return err
		}
	}
	var max int
	if err := s.queryRow(ctx, `SELECT COALESCE(MAX(version), 0) FROM schema_migrations`).Scan(&max); err != nil {
		return fmt.Errorf("Failed to read schema version: %w", err)
	}
	if max > SchemaVersion {
		return fmt.Errorf("The database schema is version %d, newer than this grow (%d): upgrade grow", max, SchemaVersion)
	}
	return nil
}
