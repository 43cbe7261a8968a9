package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/schollz/progressbar/v3"
	"github.com/spf13/cobra"

	"github.com/growserver/grow/client"
	"github.com/growserver/grow/internal/units"
)

// defaultServeDataDir is where `grow serve` keeps its state unless --data says otherwise.
const defaultServeDataDir = "/var/lib/grow"

// cpOpts are the connection and output flags shared by every control-plane noun.
type cpOpts struct {
	url, token, data, output string
}

// cpNoun makes a control-plane noun with the shared persistent flags.
func cpNoun(use, short string, o *cpOpts) *cobra.Command {
	cmd := &cobra.Command{Use: use, Short: short}
	o.addFlags(cmd)
	return cmd
}

func (o *cpOpts) addFlags(cmd *cobra.Command) {
	pf := cmd.PersistentFlags()
	pf.StringVar(&o.url, "url", "", "control-plane API URL (default $GROW_URL, else "+client.DefaultURL+")")
	pf.StringVar(&o.token, "token", "", "API token (default $GROW_TOKEN, else DATA/admin.token of the local server)")
	pf.StringVar(&o.data, "data", "", "data directory of the local grow serve, for its admin.token (default $GROW_DATA, else "+defaultServeDataDir+")")
	pf.StringVarP(&o.output, "output", "o", "table", "output format: table or json")
	_ = cmd.RegisterFlagCompletionFunc("output", func(*cobra.Command, []string, string) ([]string, cobra.ShellCompDirective) {
		return []string{"table", "json"}, cobra.ShellCompDirectiveNoFileComp
	})
}

// client resolves the API address and token and returns a client.
func (o *cpOpts) client() (*client.Client, error) {
	if o.output != "table" && o.output != "json" {
		return nil, &ExitError{Code: exitUsage, Err: fmt.Errorf("Unknown --output %q: want table or json", o.output)}
	}
	u := firstNonEmpty(o.url, os.Getenv("GROW_URL"), client.DefaultURL)
	tok := firstNonEmpty(o.token, os.Getenv("GROW_TOKEN"))
	if tok == "" {
		dir := firstNonEmpty(o.data, os.Getenv("GROW_DATA"), defaultServeDataDir)
		b, err := os.ReadFile(filepath.Join(dir, "admin.token"))
		if err != nil {
			return nil, &ExitError{Code: exitAuth, Err: fmt.Errorf("No token: give --token, set $GROW_TOKEN, or run on the grow serve host (reading %s: %v)", filepath.Join(dir, "admin.token"), err)}
		}
		tok = strings.TrimSpace(string(b))
	}
	c, err := client.New(u, tok)
	if err != nil {
		return nil, &ExitError{Code: exitUsage, Err: err}
	}
	return c, nil
}

func firstNonEmpty(s ...string) string {
	for _, v := range s {
		if v != "" {
			return v
		}
	}
	return ""
}

// cpErr maps API errors to the CLI's exit codes.
func cpErr(err error) error {
	if err == nil {
		return nil
	}
	var ee *ExitError
	if errors.As(err, &ee) {
		return err
	}
	switch client.StatusOf(err) {
	case http.StatusBadRequest:
		return &ExitError{Code: exitUsage, Err: err}
	case http.StatusUnauthorized, http.StatusForbidden:
		return &ExitError{Code: exitAuth, Err: err}
	case http.StatusNotFound:
		return &ExitError{Code: exitNotFound, Err: err}
	case http.StatusConflict:
		return &ExitError{Code: exitConflict, Err: err}
	}
	return err
}

// cpCtx is a context cancelled by Ctrl-C.
func cpCtx() (context.Context, context.CancelFunc) {
	return signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
}

// emit prints v as JSON or, for tables, calls table.
func (o *cpOpts) emit(w io.Writer, v any, table func(tw *tabwriter.Writer)) error {
	if o.output == "json" {
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		return enc.Encode(v)
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	table(tw)
	return tw.Flush()
}

func size(n int64) string {
	if n == 0 {
		return "-"
	}
	return units.FormatSize(n)
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func yen(n int64) string {
	s := fmt.Sprint(n)
	var b strings.Builder
	for i, c := range s {
		if i > 0 && (len(s)-i)%3 == 0 {
			b.WriteByte(',')
		}
		b.WriteRune(c)
	}
	return "¥" + b.String()
}

func ago(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return t.Local().Format("2006-01-02 15:04:05")
}

func randomKey() string {
	b := make([]byte, 16)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// follow waits for an operation with a progress bar (or silently with JSON output) and
// turns a failed operation into an error.
func (o *cpOpts) follow(ctx context.Context, c *client.Client, cmd *cobra.Command, op client.Operation) error {
	var bar *progressbar.ProgressBar
	if o.output == "table" {
		bar = progressbar.NewOptions(100, progressbar.OptionSetWriter(cmd.ErrOrStderr()), progressbar.OptionSetWidth(30),
			progressbar.OptionShowDescriptionAtLineEnd(), progressbar.OptionSetDescription(op.Kind), progressbar.OptionClearOnFinish())
	}
	final, err := c.WaitOperation(ctx, op.ID, 250*time.Millisecond, func(op client.Operation) {
		if bar != nil {
			bar.Describe(fmt.Sprintf("%s: %s", op.Kind, dash(op.Step)))
			_ = bar.Set(op.Progress)
		}
	})
	if bar != nil {
		_ = bar.Finish()
		fmt.Fprintln(cmd.ErrOrStderr())
	}
	if err != nil {
		if errors.Is(err, context.Canceled) {
			return fmt.Errorf("Stopped following operation %s; it continues (grow operation show %s)", op.ID, op.ID)
		}
		return cpErr(err)
	}
	if o.output == "json" {
		return o.emit(cmd.OutOrStdout(), final, nil)
	}
	switch final.State {
	case "succeeded":
		msg := final.Message
		if msg != "" {
			msg = ": " + msg
		}
		fmt.Fprintf(cmd.OutOrStdout(), "%s %s succeeded%s\n", final.Kind, final.ID, msg)
		return nil
	case "cancelled":
		return &ExitError{Code: exitConflict, Err: fmt.Errorf("Operation %s was cancelled: %s", final.ID, final.Error)}
	}
	return &ExitError{Code: exitError, Err: fmt.Errorf("Operation %s failed: %s", final.ID, final.Error)}
}

// startOp prints an operation started with --no-wait, or follows it.
func (o *cpOpts) startOp(ctx context.Context, c *client.Client, cmd *cobra.Command, op client.Operation, noWait bool) error {
	if noWait {
		if o.output == "json" {
			return o.emit(cmd.OutOrStdout(), op, nil)
		}
		fmt.Fprintf(cmd.OutOrStdout(), "%s\n", op.ID)
		return nil
	}
	return o.follow(ctx, c, cmd, op)
}

// completeServers offers server names for shell completion.
func (o *cpOpts) completeServers(cmd *cobra.Command, args []string, _ string) ([]string, cobra.ShellCompDirective) {
	if len(args) > 0 {
		return nil, cobra.ShellCompDirectiveNoFileComp
	}
	c, err := o.client()
	if err != nil {
		return nil, cobra.ShellCompDirectiveNoFileComp
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	svs, err := c.ListServers(ctx, client.ServerFilter{})
	if err != nil {
		return nil, cobra.ShellCompDirectiveNoFileComp
	}
	var names []string
	for _, s := range svs {
		names = append(names, s.Name)
	}
	return names, cobra.ShellCompDirectiveNoFileComp
}

// do runs fn with a client and a Ctrl-C-cancelled context, mapping API errors to exit codes.
func (o *cpOpts) do(fn func(ctx context.Context, c *client.Client) error) error {
	c, err := o.client()
	if err != nil {
		return err
	}
	ctx, cancel := cpCtx()
	defer cancel()
	return cpErr(fn(ctx, c))
}

// healthText is a daemon's latest health probe in a table cell.
func healthText(h client.Health) string {
	switch {
	case h.Checked.IsZero():
		return "unknown"
	case h.Reachable:
		return "ok (" + h.Detail + ")"
	}
	return "DOWN since " + h.Since.Local().Format("15:04:05") + ": " + h.Detail
}
