package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"github.com/vishvananda/netlink"

	"github.com/growserver/grow/internal/api"
	"github.com/growserver/grow/internal/authtoken"
	"github.com/growserver/grow/internal/billing"
	"github.com/growserver/grow/internal/host"
	"github.com/growserver/grow/internal/jobs"
	"github.com/growserver/grow/internal/network"
	"github.com/growserver/grow/internal/scheduler"
	"github.com/growserver/grow/internal/storage/controller"
	"github.com/growserver/grow/internal/store"
	"github.com/growserver/grow/internal/units"
	"github.com/growserver/grow/internal/web"
)

// serveConfig is what `grow serve` is started with.
type serveConfig struct {
	data, apiAddr, database             string
	local                               bool
	bridge, bridgeCIDR                  string
	poolSize, cacheSize                 string
	hostMemory                          string
	guestDir                            string
	cpuOvercommit                       float64
	nPlusOne                            bool
	readyTimeout, trafficInt, healthInt time.Duration
	overAllowanceRate                   string
	logLevel                            string
}

func newServeCmd() *cobra.Command {
	var cfg serveConfig
	cmd := &cobra.Command{
		Use:   "serve",
		Short: "Run the control plane: API, store, placement, operations (all-in-one by default)",
		Long: `Run the control plane. With no flags it is an all-in-one installation: state in
/var/lib/grow (SQLite grow.db, admin.token), the API on 127.0.0.1:7470, a local storage
controller (DATA/storage, NBD on a unix socket) and a local host agent (DATA/host, VM NICs
on the bridge --bridge with the address pool --bridge-cidr), both registered as "local",
and the tiny test guest from $GROW_GUEST_DIR imported as the image "tiny".
With --local=false it only runs the control plane; register agents with
'grow host add' and 'grow controller add'. --database postgres://... keeps the state in
PostgreSQL instead of SQLite.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error { return runServe(cmd, cfg) },
	}
	f := cmd.Flags()
	f.StringVar(&cfg.data, "data", defaultServeDataDir, "state directory (grow.db, admin.token, local daemons)")
	f.StringVar(&cfg.apiAddr, "api", "127.0.0.1:7470", "API listen address")
	f.StringVar(&cfg.database, "database", "", "postgres://... to use PostgreSQL (default: SQLite in DATA/grow.db)")
	f.BoolVar(&cfg.local, "local", true, "run and register a local storage controller and host agent")
	f.StringVar(&cfg.bridge, "bridge", "grow0", "bridge of the local host agent's VM NICs")
	f.StringVar(&cfg.bridgeCIDR, "bridge-cidr", "10.74.0.1/24", `address of the local bridge; its network becomes the IP pool "local" ("" skips both)`)
	f.StringVar(&cfg.poolSize, "pool-size", "100GiB", "size of the local storage controller's sparse disk file")
	f.StringVar(&cfg.cacheSize, "cache", "256MiB", "local storage controller's RAM read cache")
	f.StringVar(&cfg.hostMemory, "host-memory", "", "memory servers may use on the local host (default: 90 % of MemTotal)")
	f.StringVar(&cfg.guestDir, "guest-dir", os.Getenv("GROW_GUEST_DIR"), `directory of the tiny test guest to import as image "tiny" ("" skips)`)
	f.Float64Var(&cfg.cpuOvercommit, "cpu-overcommit", scheduler.DefaultPolicy.CPUOvercommit, "vCPUs per host CPU thread")
	f.BoolVar(&cfg.nPlusOne, "n-plus-one", true, "keep enough free memory to evacuate any one host")
	f.DurationVar(&cfg.readyTimeout, "ready-timeout", 5*time.Minute, "how long a new guest has to report ready")
	f.DurationVar(&cfg.trafficInt, "traffic-interval", time.Minute, "how often servers' traffic counters are sampled for billing")
	f.StringVar(&cfg.overAllowanceRate, "over-allowance-rate", "10Mbit", "rate a server is slowed to once its traffic this month exceeds its plan's allowance (0: never slow; the overage is billed either way)")
	f.DurationVar(&cfg.healthInt, "health-interval", 5*time.Second, "how often host agents and storage controllers are probed (a host that does not answer gets no new servers)")
	f.StringVar(&cfg.logLevel, "log-level", "info", "log level: debug, info, warn or error")
	return cmd
}

func init() { rootCmd.AddCommand(newServeCmd()) }

func runServe(cmd *cobra.Command, cfg serveConfig) error {
	var level slog.Level
	if err := level.UnmarshalText([]byte(cfg.logLevel)); err != nil {
		return &ExitError{Code: exitUsage, Err: fmt.Errorf("Invalid --log-level %q", cfg.logLevel)}
	}
	if cfg.cpuOvercommit < 1 {
		return &ExitError{Code: exitUsage, Err: fmt.Errorf("--cpu-overcommit must be at least 1")}
	}
	overRate, err := units.ParseRate(cfg.overAllowanceRate)
	if err != nil {
		return &ExitError{Code: exitUsage, Err: fmt.Errorf("Invalid --over-allowance-rate: %w", err)}
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if err := os.MkdirAll(cfg.data, 0o700); err != nil {
		return fmt.Errorf("Failed to create data directory %q: %w", cfg.data, err)
	}
	st, err := store.Open(ctx, cfg.database, cfg.data)
	if err != nil {
		return err
	}
	defer st.Close()
	for _, p := range billing.DefaultPlans() {
		if err := st.EnsurePlan(ctx, p); err != nil {
			return err
		}
	}
	token, err := authtoken.LoadOrCreate(filepath.Join(cfg.data, "admin.token"))
	if err != nil {
		return err
	}
	if err := ensureAdmin(ctx, st, token); err != nil {
		return err
	}
	instance, err := instanceID(cfg.data)
	if err != nil {
		return err
	}
	m := jobs.New(jobs.Config{Store: st, Connector: jobs.Clients{}, ReadyTimeout: cfg.readyTimeout, Logger: log, Instance: instance,
		OverAllowanceBps: overRate,
		Policy:           scheduler.Policy{CPUOvercommit: cfg.cpuOvercommit, NPlusOne: cfg.nPlusOne}})
	defer m.Close()

	if cfg.local {
		closeLocal, err := startLocal(ctx, cfg, st, m, log)
		if err != nil {
			return err
		}
		defer closeLocal()
	}
	if err := m.Recover(ctx); err != nil {
		return err
	}
	go m.CollectTraffic(ctx, cfg.trafficInt)
	go m.WatchHealth(ctx, cfg.healthInt)

	l, err := net.Listen("tcp", cfg.apiAddr)
	if err != nil {
		return fmt.Errorf("Failed to listen for the API on %q: %w", cfg.apiAddr, err)
	}
	url := "http://" + l.Addr().String()
	if err := os.WriteFile(filepath.Join(cfg.data, "api.url"), []byte(url+"\n"), 0o644); err != nil {
		return fmt.Errorf("Failed to write %s: %w", filepath.Join(cfg.data, "api.url"), err)
	}
	// The control plane is the mirrored storage controllers' witness (tie-breaker), behind
	// a token of its own: `grow storaged --witness URL/witness --witness-token-file DATA/witness.token`.
	witnessToken, err := authtoken.LoadOrCreate(filepath.Join(cfg.data, "witness.token"))
	if err != nil {
		return err
	}
	// The web console (static files under /ui/) sits in front of the API; every other
	// path, each /v1 endpoint included, is the API with its own token check.
	apiHandler := api.New(api.Config{Store: st, Jobs: m, Logger: log, WitnessToken: witnessToken})
	srv := &http.Server{Handler: web.Mount(apiHandler), ReadHeaderTimeout: 10 * time.Second}
	log.Info("Control plane API listening", "url", url, "console", url+web.Prefix, "database", st.Dialect(), "data", cfg.data)
	fmt.Fprintf(cmd.OutOrStdout(), "grow serve: API on %s, web console on %s%s, admin token in %s\n", url, url, web.Prefix, filepath.Join(cfg.data, "admin.token"))
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(l) }()
	select {
	case <-ctx.Done():
	case err := <-errc:
		return fmt.Errorf("API server failed: %w", err)
	}
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_ = srv.Shutdown(sctx)
	return nil
}

// instanceID names this control plane in operation leases, kept in DATA/instance.id so
// that a restarted grow serve takes its own unfinished operations back at once.
func instanceID(data string) (string, error) {
	p := filepath.Join(data, "instance.id")
	if b, err := os.ReadFile(p); err == nil && len(strings.TrimSpace(string(b))) > 0 {
		return strings.TrimSpace(string(b)), nil
	}
	id := store.NewID("cp")
	if err := os.WriteFile(p, []byte(id+"\n"), 0o600); err != nil {
		return "", fmt.Errorf("Failed to write %s: %w", p, err)
	}
	return id, nil
}

// ensureAdmin makes the admin.token file's token the "admin" user's.
func ensureAdmin(ctx context.Context, st *store.Store, token string) error {
	u, err := st.GetUser(ctx, "admin")
	if errors.Is(err, store.ErrNotFound) {
		return st.CreateUser(ctx, &store.User{Name: "admin", Role: store.RoleAdmin}, authtoken.Hash(token))
	}
	if err != nil {
		return err
	}
	return st.SetUserToken(ctx, u.ID, authtoken.Hash(token))
}

// startLocal runs a storage controller and a host agent in this process and registers
// them as "local"; the returned function stops them (running VMs keep running).
func startLocal(ctx context.Context, cfg serveConfig, st *store.Store, m *jobs.Manager, log *slog.Logger) (func(), error) {
	poolSize, err := units.ParseSize(cfg.poolSize)
	if err != nil || poolSize <= 0 {
		return nil, &ExitError{Code: exitUsage, Err: fmt.Errorf("Invalid --pool-size %q", cfg.poolSize)}
	}
	cacheSize, err := units.ParseSize(cfg.cacheSize)
	if err != nil {
		return nil, &ExitError{Code: exitUsage, Err: fmt.Errorf("Invalid --cache %q", cfg.cacheSize)}
	}
	var closers []func()
	closeAll := func() {
		for i := len(closers) - 1; i >= 0; i-- {
			closers[i]()
		}
	}
	ok := false
	defer func() {
		if !ok {
			closeAll()
		}
	}()

	sc, err := controller.Open(controller.Config{DataDir: filepath.Join(cfg.data, "storage"), APIAddr: "127.0.0.1:0",
		PoolSize: poolSize, CacheSize: cacheSize, Logger: log.With("component", "storaged")})
	if err != nil {
		return nil, fmt.Errorf("Failed to start the local storage controller: %w", err)
	}
	sctx, scancel := context.WithCancel(context.Background())
	sdone := make(chan struct{})
	go func() {
		defer close(sdone)
		if err := sc.Serve(sctx); err != nil {
			log.Error("Local storage controller stopped", "err", err)
		}
	}()
	closers = append(closers, func() { scancel(); <-sdone })

	bridgeOK := false
	if cfg.bridgeCIDR != "" {
		if err := ensureBridgeAddress(cfg.bridge, cfg.bridgeCIDR); err != nil {
			log.Warn("Local bridge not configured; servers will get no address from the local pool", "bridge", cfg.bridge, "err", err)
		} else {
			bridgeOK = true
		}
	}
	hostDir := filepath.Join(cfg.data, "host")
	if err := os.MkdirAll(hostDir, 0o700); err != nil {
		return nil, fmt.Errorf("Failed to create %q: %w", hostDir, err)
	}
	htoken, err := authtoken.LoadOrCreate(filepath.Join(hostDir, "admin.token"))
	if err != nil {
		return nil, err
	}
	agent, err := host.New(ctx, host.Config{DataDir: hostDir, Bridge: cfg.bridge, Logger: log.With("component", "hostd")})
	if err != nil {
		return nil, fmt.Errorf("Failed to start the local host agent: %w", err)
	}
	hl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		agent.Close()
		return nil, fmt.Errorf("Failed to listen for the local host agent: %w", err)
	}
	hsrv := &http.Server{Handler: agent.Handler(htoken), ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = hsrv.Serve(hl) }()
	closers = append(closers, func() {
		c, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = hsrv.Shutdown(c)
		agent.Close()
	})

	if err := registerStorage(ctx, st, "http://"+sc.APIAddr(), sc.Token()); err != nil {
		return nil, err
	}
	mem, err := localMemory(cfg.hostMemory)
	if err != nil {
		return nil, err
	}
	if err := registerHost(ctx, st, "http://"+hl.Addr().String(), htoken, runtime.NumCPU(), mem); err != nil {
		return nil, err
	}
	if bridgeOK {
		if err := ensureLocalPool(ctx, st, cfg.bridgeCIDR); err != nil {
			return nil, err
		}
	}
	if cfg.guestDir != "" {
		if err := importTinyGuest(ctx, st, m, cfg.guestDir, cfg.data, log); err != nil {
			return nil, err
		}
	}
	ok = true
	return closeAll, nil
}

func registerStorage(ctx context.Context, st *store.Store, url, token string) error {
	c, err := st.GetStorage(ctx, "local")
	if errors.Is(err, store.ErrNotFound) {
		return st.CreateStorage(ctx, &store.StorageController{Name: "local", URL: url, Token: token})
	}
	if err != nil {
		return err
	}
	c.URL, c.Token, c.State = url, token, store.StateActive
	return st.UpdateStorage(ctx, c)
}

func registerHost(ctx context.Context, st *store.Store, url, token string, cpus int, mem int64) error {
	h, err := st.GetHost(ctx, "local")
	if errors.Is(err, store.ErrNotFound) {
		return st.CreateHost(ctx, &store.Host{Name: "local", URL: url, Token: token, CPUs: cpus, MemoryBytes: mem, CPUModel: cpuModel()})
	}
	if err != nil {
		return err
	}
	h.URL, h.Token, h.CPUs, h.MemoryBytes = url, token, cpus, mem
	if h.State == store.StateOffline {
		h.State = store.StateActive
	}
	return st.UpdateHost(ctx, h)
}

// localMemory is --host-memory, or 90 % of this machine's MemTotal.
func localMemory(flag string) (int64, error) {
	if flag != "" {
		n, err := units.ParseSize(flag)
		if err != nil || n <= 0 {
			return 0, &ExitError{Code: exitUsage, Err: fmt.Errorf("Invalid --host-memory %q", flag)}
		}
		return n, nil
	}
	f, err := os.Open("/proc/meminfo")
	if err != nil {
		return 0, fmt.Errorf("Failed to read /proc/meminfo (give --host-memory): %w", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) >= 2 && fields[0] == "MemTotal:" {
			kb, err := strconv.ParseInt(fields[1], 10, 64)
			if err != nil {
				break
			}
			return kb * 1024 * 9 / 10, nil
		}
	}
	return 0, errors.New("No MemTotal in /proc/meminfo (give --host-memory)")
}

func cpuModel() string {
	b, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return ""
	}
	for _, l := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(l, ":"); ok && strings.TrimSpace(k) == "model name" {
			return strings.TrimSpace(v)
		}
	}
	return ""
}

// ensureBridgeAddress creates the local bridge and gives it the gateway address.
func ensureBridgeAddress(bridge, cidr string) error {
	prefix, err := netip.ParsePrefix(cidr)
	if err != nil {
		return fmt.Errorf("Invalid --bridge-cidr %q: %w", cidr, err)
	}
	if err := network.EnsureBridge(bridge); err != nil {
		return err
	}
	link, err := netlink.LinkByName(bridge)
	if err != nil {
		return fmt.Errorf("Failed to find bridge %q: %w", bridge, err)
	}
	addr, err := netlink.ParseAddr(prefix.String())
	if err != nil {
		return fmt.Errorf("Invalid --bridge-cidr %q: %w", cidr, err)
	}
	if err := netlink.AddrReplace(link, addr); err != nil {
		return fmt.Errorf("Failed to give bridge %q the address %s: %w", bridge, cidr, err)
	}
	return nil
}

// ensureLocalPool creates the IP pool "local" over the bridge's network if it is missing.
func ensureLocalPool(ctx context.Context, st *store.Store, cidr string) error {
	if _, err := st.GetIPPool(ctx, "local"); err == nil {
		return nil
	}
	prefix, err := netip.ParsePrefix(cidr)
	if err != nil {
		return err
	}
	gw := prefix.Addr()
	first := prefix.Masked().Addr().Next().Next()
	last := first
	if prefix.Addr().Is4() {
		b := prefix.Masked().Addr().As4()
		size := uint32(1) << (32 - prefix.Bits())
		n := uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3])
		n += size - 2
		last = netip.AddrFrom4([4]byte{byte(n >> 24), byte(n >> 16), byte(n >> 8), byte(n)})
	} else {
		for i := 0; i < 1000; i++ {
			last = last.Next()
		}
	}
	p := store.IPPool{Name: "local", CIDR: prefix.Masked().String(), First: first.String(), Last: last.String(), Gateway: gw.String(), DNS: []string{gw.String()}}
	return st.CreateIPPool(ctx, &p)
}

// importTinyGuest imports the test guest as the image "tiny" unless it exists.
func importTinyGuest(ctx context.Context, st *store.Store, m *jobs.Manager, dir, data string, log *slog.Logger) error {
	if _, err := st.GetImage(ctx, "tiny"); err == nil {
		return nil
	}
	if _, err := os.Stat(filepath.Join(dir, "disk.raw")); err != nil {
		log.Warn("No test guest to import (run make guest)", "dir", dir)
		return nil
	}
	dst := filepath.Join(data, "images", "tiny")
	if err := os.MkdirAll(dst, 0o755); err != nil {
		return fmt.Errorf("Failed to create %q: %w", dst, err)
	}
	for _, name := range []string{"vmlinux", "initrd.img"} {
		if err := copyFile(filepath.Join(dir, name), filepath.Join(dst, name)); err != nil {
			return err
		}
	}
	f, err := os.Open(filepath.Join(dir, "disk.raw"))
	if err != nil {
		return fmt.Errorf("Failed to open the test guest's disk: %w", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	im, err := m.ImportImage(ctx, jobs.ImportImageRequest{Name: "tiny", Format: "raw", Size: fi.Size(),
		Kernel: filepath.Join(dst, "vmlinux"), Initrd: filepath.Join(dst, "initrd.img"), Cmdline: "console=ttyS0"}, f, nil)
	if err != nil {
		return fmt.Errorf("Failed to import the test guest: %w", err)
	}
	log.Info("Imported the test guest", "image", im.Name, "size", im.SizeBytes)
	return nil
}

func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return fmt.Errorf("Failed to open %q: %w", src, err)
	}
	defer in.Close()
	tmp := dst + ".tmp"
	out, err := os.OpenFile(tmp, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o644)
	if err != nil {
		return fmt.Errorf("Failed to create %q: %w", tmp, err)
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return fmt.Errorf("Failed to copy %q: %w", src, err)
	}
	if err := out.Close(); err != nil {
		return fmt.Errorf("Failed to write %q: %w", tmp, err)
	}
	return os.Rename(tmp, dst)
}
