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
	"github.com/growserver/grow/internal/storage/nbd"
	"github.com/growserver/grow/internal/units"
)

// defaultStorageDataDir is where `grow storaged` keeps its state unless --data says otherwise.
const defaultStorageDataDir = "/var/lib/grow/storage"

func newStoragedCmd() *cobra.Command {
	var (
		cfg       controller.Config
		poolSize  string
		cacheSize string
		bufMem    string
		logLevel  string
		rate      string
	)
	cmd := &cobra.Command{
		Use:   "storaged",
		Short: "Run a storage controller: a RAID 1+0 pool of thin, cloneable volumes served over NBD",
		Long: `Run a storage controller. It keeps its state in --data (admin.token, pool.json,
meta/), stripes data over mirrored pairs of the --disk paths (none: DATA/disk0.img),
keeps a shared read cache of --cache bytes, serves every volume over NBD on --nbd and
on the unix socket --nbd-socket (default DATA/nbd.sock; "none" disables it), and
offers its admin API on --api, guarded by the token in DATA/admin.token.

With --peer it is one of a mirrored pair: every volume, image and snapshot exists on
both controllers, every write is on both before it is acknowledged, and each volume
has a primary (serving NBD) on its home controller. --name names this controller,
--peer-token-file holds the partner's admin token, --mirror-listen is where the
partner's mirror link connects, --witness (with --witness-token-file) is the
tie-breaker, and --service-address is this controller's moving address for hosts
(added to --service-dev while it serves its home's volumes; both controllers must be
on the same L2 segment). Without a witness a controller that loses its partner
freezes rather than guess.`,
		Args: storageArgs(0),
		RunE: func(cmd *cobra.Command, args []string) error {
			var err error
			if cfg.PoolSize, err = units.ParseSize(poolSize); err != nil || cfg.PoolSize <= 0 {
				return &ExitError{Code: exitUsage, Err: fmt.Errorf("Invalid --pool-size %q: want a positive size such as 100GiB", poolSize)}
			}
			if cfg.CacheSize, err = units.ParseSize(cacheSize); err != nil {
				return &ExitError{Code: exitUsage, Err: fmt.Errorf("Invalid --cache %q: %w", cacheSize, err)}
			}
			if cfg.Mirror.ResyncRate, err = units.ParseSize(rate); err != nil || cfg.Mirror.ResyncRate < 0 {
				return &ExitError{Code: exitUsage, Err: fmt.Errorf("Invalid --resync-rate %q: want a size per second such as 200MiB (0: unlimited)", rate)}
			}
			if cfg.NBDBufferMemory, err = units.ParseSize(bufMem); err != nil || cfg.NBDBufferMemory < nbd.MaxPayload {
				return &ExitError{Code: exitUsage, Err: fmt.Errorf("Invalid --nbd-buffer-memory %q: want a size of at least 32MiB, such as 1GiB", bufMem)}
			}
			if cfg.NBDMaxConns < 1 {
				return &ExitError{Code: exitUsage, Err: fmt.Errorf("Invalid --nbd-max-connections %d: want at least 1", cfg.NBDMaxConns)}
			}
			if cfg.Mirror.Peer == "" && (cfg.Mirror.Name != "" || cfg.Mirror.Listen != "" || cfg.Mirror.Witness != "" || cfg.Mirror.ServiceAddress != "") {
				return &ExitError{Code: exitUsage, Err: fmt.Errorf("--name, --mirror-listen, --witness and --service-address need --peer")}
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
	f.IntVar(&cfg.NBDMaxConns, "nbd-max-connections", 4096, "most NBD connections served at once; further ones are closed at once, with a warning")
	f.StringVar(&bufMem, "nbd-buffer-memory", "1GiB", "most memory all NBD connections together may hold for request data; a client waits beyond it")
	f.StringVar(&cfg.APIAddr, "api", controller.DefaultAPIAddr, "admin API listen address")
	f.StringArrayVar(&cfg.Disks, "disk", nil, "pool disk, file or block device (repeat; 2N disks make N mirrored pairs; none: DATA/disk0.img)")
	f.StringVar(&poolSize, "pool-size", "100GiB", "size of each sparse file disk created because its path does not exist")
	f.StringVar(&cacheSize, "cache", "1GiB", "shared RAM read cache size (0 disables it)")
	f.StringVar(&cfg.TLSCert, "tls-cert", "", "PEM certificate for NBD STARTTLS and HTTPS on the admin API")
	f.StringVar(&cfg.TLSKey, "tls-key", "", "PEM private key of --tls-cert")
	f.StringVar(&cfg.TLSClientCA, "tls-client-ca", "", "PEM CA bundle; NBD clients must then present a certificate it signed")
	f.BoolVar(&cfg.RequireTLS, "tls-required", false, "refuse NBD clients that do not upgrade to TLS")
	f.StringVar(&cfg.TLSName, "tls-name", "", "name hosts verify the NBD certificate against (default: its first DNS name; give both controllers of a pair the same)")
	f.StringVar(&logLevel, "log-level", "info", "log level: debug, info, warn or error")
	f.StringVar(&cfg.Mirror.Name, "name", "", "this controller's name in a mirrored pair")
	f.StringVar(&cfg.Mirror.Peer, "peer", "", "admin API URL of the mirror partner (enables mirroring)")
	f.StringVar(&cfg.Mirror.PeerTokenFile, "peer-token-file", "", "file holding the partner's admin token")
	f.StringVar(&cfg.Mirror.Listen, "mirror-listen", "", "IP:PORT of this controller's mirror link server")
	f.StringVar(&cfg.Mirror.Witness, "witness", "", "URL of the witness (grow storage witness) that settles who may write alone")
	f.StringVar(&cfg.Mirror.WitnessTokenFile, "witness-token-file", "", "file holding the witness's token")
	f.StringVar(&cfg.Mirror.ServiceAddress, "service-address", "", "this controller's moving service address for hosts, IP/PREFIX (needs --service-dev and --nbd on a wildcard address)")
	f.StringVar(&cfg.Mirror.ServiceDev, "service-dev", "", "network device that carries the service addresses")
	f.StringVar(&rate, "resync-rate", "0", "resync rate limit per second, e.g. 200MiB (0: unlimited)")
	f.DurationVar(&cfg.Mirror.PeerTimeout, "peer-timeout", 0, "declare the partner lost after this long without an answer (default 1s; fencing follows 0.5s later, a takeover by the partner 1.5s later)")
	return cmd
}

func init() { rootCmd.AddCommand(newStoragedCmd()) }
