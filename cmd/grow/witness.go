package main

import (
	"context"
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
	"github.com/growserver/grow/internal/storage/witness"
)

// newWitnessCmd is `grow storage witness`: the tie-breaker of a mirrored controller pair.
func newWitnessCmd() *cobra.Command {
	var dataDir, apiAddr string
	cmd := &cobra.Command{
		Use:   "witness --data DIR --api IP:PORT",
		Short: "Run the witness (tie-breaker) of a mirrored pair of storage controllers",
		Long: `Run the witness of a mirrored pair of storage controllers. It keeps, per volume,
the highest epoch it granted and to which controller, in DIR/grants.json (replaced
crash-safely before any answer), and grants each epoch only once. Its bearer token
is DIR/admin.token (created on first start); give it to both controllers with
--witness-token-file. Run it on a third machine that both controllers can reach.`,
		Args: storageArgs(0),
		RunE: func(cmd *cobra.Command, args []string) error {
			if dataDir == "" || apiAddr == "" {
				return usageErr(errors.New("--data and --api are required"))
			}
			log := slog.New(slog.NewTextHandler(os.Stderr, nil))
			tok, err := authtoken.LoadOrCreate(filepath.Join(dataDir, "admin.token"))
			if err != nil {
				return err
			}
			st, err := witness.Open(dataDir)
			if err != nil {
				return err
			}
			l, err := net.Listen("tcp", apiAddr)
			if err != nil {
				return fmt.Errorf("Failed to listen for the witness API on %q: %w", apiAddr, err)
			}
			srv := &http.Server{Handler: witness.Handler(st, tok), ReadHeaderTimeout: 10 * time.Second}
			ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
			defer stop()
			go func() {
				<-ctx.Done()
				sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				defer cancel()
				_ = srv.Shutdown(sctx)
			}()
			log.Info("Witness ready", "api", l.Addr().String(), "data", dataDir)
			if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
				return fmt.Errorf("Witness API failed: %w", err)
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&dataDir, "data", "", "state directory (admin.token, grants.json)")
	cmd.Flags().StringVar(&apiAddr, "api", "", "listen address IP:PORT of the witness API")
	return cmd
}
