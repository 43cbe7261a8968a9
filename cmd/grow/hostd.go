package main

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/growserver/grow/internal/authtoken"
	"github.com/growserver/grow/internal/host"
)

func init() {
	var dataDir, apiAddr, bridge, accel, cgParent, qemuBin, nbdTLSDir, tlsCert, tlsKey, migTLSDir string
	cmd := &cobra.Command{
		Use:   "hostd",
		Short: "Run the hypervisor host agent (QEMU VMs, taps, consoles, migration)",
		Long: `Runs the host agent: it keeps its VMs in --data, serves a token-protected HTTP API
on --api (token in DATA/admin.token) and reattaches to running VMs when restarted.
Stopping the agent never stops a VM.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if dataDir == "" || apiAddr == "" {
				return &ExitError{Code: exitUsage, Err: errors.New("--data and --api are required")}
			}
			if (tlsCert == "") != (tlsKey == "") {
				return &ExitError{Code: exitUsage, Err: errors.New("--tls-cert and --tls-key go together")}
			}
			var tlsCfg *tls.Config
			if tlsCert != "" {
				cert, err := tls.LoadX509KeyPair(tlsCert, tlsKey)
				if err != nil {
					return &ExitError{Code: exitUsage, Err: fmt.Errorf("Failed to load --tls-cert/--tls-key: %w", err)}
				}
				tlsCfg = &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
			}
			if err := os.MkdirAll(dataDir, 0o700); err != nil {
				return fmt.Errorf("Failed to create data directory %q: %w", dataDir, err)
			}
			token, err := authtoken.LoadOrCreate(filepath.Join(dataDir, "admin.token"))
			if err != nil {
				return fmt.Errorf("Failed to load the admin token: %w", err)
			}
			ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
			defer stop()
			log := slog.New(slog.NewTextHandler(os.Stderr, nil))
			agent, err := host.New(ctx, host.Config{DataDir: dataDir, Bridge: bridge, Accel: accel,
				CgroupParent: cgParent, QEMUBinary: qemuBin, NBDTLSDir: nbdTLSDir, MigrationTLSDir: migTLSDir, Logger: log})
			if err != nil {
				return err
			}
			defer agent.Close()
			l, err := net.Listen("tcp", apiAddr)
			if err != nil {
				return fmt.Errorf("Failed to listen on %q: %w", apiAddr, err)
			}
			srv := &http.Server{Handler: agent.Handler(token), ReadHeaderTimeout: 10 * time.Second, TLSConfig: tlsCfg}
			log.Info("Host agent API listening", "addr", l.Addr().String(), "https", tlsCfg != nil)
			fmt.Fprintf(cmd.OutOrStdout(), "listening on %s\n", l.Addr().String())
			errc := make(chan error, 1)
			go func() {
				if tlsCfg != nil {
					errc <- srv.ServeTLS(l, "", "")
					return
				}
				errc <- srv.Serve(l)
			}()
			select {
			case <-ctx.Done():
			case err := <-errc:
				return fmt.Errorf("API server failed: %w", err)
			}
			sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			_ = srv.Shutdown(sctx)
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&dataDir, "data", "", "data directory (VM records, sockets, logs, admin.token)")
	f.StringVar(&apiAddr, "api", "", "API listen address, e.g. 127.0.0.1:8444 (port 0 picks one)")
	f.StringVar(&bridge, "bridge", "", "default bridge for VM NICs (created if missing)")
	f.StringVar(&accel, "accel", "auto", "QEMU accelerator: auto (KVM if /dev/kvm works), kvm or tcg")
	f.StringVar(&cgParent, "cgroup-parent", "grow", "cgroup directory that holds one cgroup per VM")
	f.StringVar(&qemuBin, "qemu", "qemu-system-x86_64", "QEMU binary")
	f.StringVar(&tlsCert, "tls-cert", "", "PEM certificate: serve the API over https (register the host with its CA: grow host add --agent-ca-cert)")
	f.StringVar(&tlsKey, "tls-key", "", "PEM private key of --tls-cert")
	f.StringVar(&migTLSDir, "migration-tls-dir", "", "x509 credentials that encrypt live migrations in and out (ca-cert.pem, server-cert.pem, server-key.pem, client-cert.pem, client-key.pem); every host then needs them")
	f.StringVar(&nbdTLSDir, "nbd-tls-dir", "", "x509 client credentials for NBD over TLS to storage controllers (ca-cert.pem, client-cert.pem, client-key.pem)")
	rootCmd.AddCommand(cmd)
}
