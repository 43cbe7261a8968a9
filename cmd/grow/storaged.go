package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/growserver/grow/internal/storage/controller"
	"github.com/growserver/grow/internal/units"
)

// defaultStorageDataDir is where `grow storaged` keeps its state unless --data says otherwise.
const defaultStorageDataDir = "/var/lib/grow/storage"

func newStoragedCmd() *cobra.Command {
	var (
		cfg       controller.Config
		poolSize  string
		cacheSize string
		logLevel  string
	)
	cmd := &cobra.Command{
		Use:   "storaged",
		Short: "Run a storage controller: a RAID 1+0 pool of thin, cloneable volumes served over NBD",
		Long: `Run a storage controller. It keeps its state in --data (admin.token, pool.json,
meta/), stripes data over mirrored pairs of the --disk paths (none: DATA/disk0.img),
keeps a shared read cache of --cache bytes, serves every volume over NBD on --nbd and
on the unix socket --nbd-socket (default DATA/nbd.sock; "none" disables it), and
offers its admin API on --api, guarded by the token in DATA/admin.token.`,
		Args: storageArgs(0),
		RunE: func(cmd *cobra.Command, args []string) error {
			var err error
			if cfg.PoolSize, err = units.ParseSize(poolSize); err != nil || cfg.PoolSize <= 0 {
				return &ExitError{Code: exitUsage, Err: fmt.Errorf("Invalid --pool-size %q: want a positive size such as 100GiB", poolSize)}
			}
			if cfg.CacheSize, err = units.ParseSize(cacheSize); err != nil {
				return &ExitError{Code: exitUsage, Err: fmt.Errorf("Invalid --cache %q: %w", cacheSize, err)}
			}
			var level slog.Level
			if err := level.UnmarshalText([]byte(logLevel)); err != nil {
				return &ExitError{Code: exitUsage, Err: fmt.Errorf("Invalid --log-level %q: want debug, info, warn or error", logLevel)}
			}
			cfg.Logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
			c, err := controller.Open(cfg)
			if err != nil {
				return err
			}
			ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
			defer stop()
			return c.Serve(ctx)
		},
	}
	cmd.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return usageErr(err) })
	f := cmd.Flags()
	f.StringVar(&cfg.DataDir, "data", defaultStorageDataDir, "state directory (token, pool state, volume metadata)")
	f.StringVar(&cfg.NBDAddr, "nbd", controller.DefaultNBDAddr, `NBD TCP listen address ("" disables TCP)`)
	f.StringVar(&cfg.NBDAdvertise, "nbd-advertise", "", "host:port that hypervisor hosts use to reach NBD, if not the --nbd address (e.g. with --nbd 0.0.0.0:10809)")
	f.StringVar(&cfg.NBDSocket, "nbd-socket", "", `NBD unix socket (default DATA/nbd.sock, "none" disables it)`)
	f.StringVar(&cfg.APIAddr, "api", controller.DefaultAPIAddr, "admin API listen address")
	f.StringArrayVar(&cfg.Disks, "disk", nil, "pool disk, file or block device (repeat; 2N disks make N mirrored pairs; none: DATA/disk0.img)")
	f.StringVar(&poolSize, "pool-size", "100GiB", "size of each sparse file disk created because its path does not exist")
	f.StringVar(&cacheSize, "cache", "1GiB", "shared RAM read cache size (0 disables it)")
	f.StringVar(&cfg.TLSCert, "tls-cert", "", "PEM certificate for NBD STARTTLS and HTTPS on the admin API")
	f.StringVar(&cfg.TLSKey, "tls-key", "", "PEM private key of --tls-cert")
	f.StringVar(&cfg.TLSClientCA, "tls-client-ca", "", "PEM CA bundle; NBD clients must then present a certificate it signed")
	f.BoolVar(&cfg.RequireTLS, "tls-required", false, "refuse NBD clients that do not upgrade to TLS")
	f.StringVar(&logLevel, "log-level", "info", "log level: debug, info, warn or error")
	return cmd
}

func init() { rootCmd.AddCommand(newStoragedCmd()) }
