package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"text/tabwriter"
	"time"

	"github.com/coder/websocket"
	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/growserver/grow/internal/host/agentclient"
	"github.com/growserver/grow/internal/host/hostapi"
)

// agentFlags are the connection flags of the direct host-agent verbs.
type agentFlags struct{ url, token, caFile string }

func (f *agentFlags) add(cmd *cobra.Command) {
	cmd.Flags().StringVar(&f.url, "agent", "", "host agent URL (default $GROW_HOST_URL)")
	cmd.Flags().StringVar(&f.token, "token", "", "host agent token (default $GROW_TOKEN)")
	cmd.Flags().StringVar(&f.caFile, "ca-cert", "", "PEM CA that signed an https agent's certificate")
}

func (f *agentFlags) client() (*agentclient.Client, error) {
	u, tok := f.url, f.token
	if u == "" {
		u = os.Getenv("GROW_HOST_URL")
	}
	if tok == "" {
		tok = os.Getenv("GROW_TOKEN")
	}
	if u == "" {
		return nil, &ExitError{Code: exitUsage, Err: errors.New("No agent URL: give --agent or set $GROW_HOST_URL")}
	}
	if tok == "" {
		return nil, &ExitError{Code: exitAuth, Err: errors.New("No token: give --token or set $GROW_TOKEN")}
	}
	var ca []byte
	if f.caFile != "" {
		var err error
		if ca, err = os.ReadFile(f.caFile); err != nil {
			return nil, &ExitError{Code: exitUsage, Err: fmt.Errorf("Failed to read --ca-cert: %w", err)}
		}
	}
	c, err := agentclient.NewWithCAPEM(u, tok, string(ca))
	if err != nil {
		return nil, &ExitError{Code: exitUsage, Err: err}
	}
	return c, nil
}

// agentErr maps agent errors to the CLI's exit codes.
func agentErr(err error) error {
	switch {
	case err == nil:
		return nil
	case agentclient.IsNotFound(err):
		return &ExitError{Code: exitNotFound, Err: err}
	case agentclient.IsConflict(err):
		return &ExitError{Code: exitConflict, Err: err}
	case agentclient.IsUnauthorized(err):
		return &ExitError{Code: exitAuth, Err: err}
	}
	var ae *agentclient.APIError
	if errors.As(err, &ae) && ae.Code == hostapi.CodeInvalid {
		return &ExitError{Code: exitUsage, Err: err}
	}
	return err
}

func init() {
	vmCmd := &cobra.Command{Use: "vm", Short: "Inspect and drive the VMs of one host agent directly (debugging)"}
	hostCmd.AddCommand(vmCmd)

	var lf agentFlags
	var asJSON bool
	list := &cobra.Command{Use: "list", Short: "List the VMs of a host agent", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := lf.client()
			if err != nil {
				return err
			}
			vms, err := c.List(cmd.Context())
			if err != nil {
				return agentErr(err)
			}
			if asJSON {
				return printJSON(cmd.OutOrStdout(), vms)
			}
			tw := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "NAME\tSTATE\tVCPUS\tMEMORY\tPID\tEXIT REASON")
			for _, v := range vms {
				fmt.Fprintf(tw, "%s\t%s\t%d\t%d MiB\t%d\t%s\n", v.Spec.Name, v.State, v.Spec.VCPUs, v.Spec.MemoryMiB, v.PID, v.ExitReason)
			}
			return tw.Flush()
		}}
	lf.add(list)
	list.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	vmCmd.AddCommand(list)

	var sf agentFlags
	show := &cobra.Command{Use: "show VM", Short: "Show one VM as JSON", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := sf.client()
			if err != nil {
				return err
			}
			v, err := c.Get(cmd.Context(), args[0])
			if err != nil {
				return agentErr(err)
			}
			cnt, err := c.Counters(cmd.Context(), args[0])
			if err != nil {
				return agentErr(err)
			}
			return printJSON(cmd.OutOrStdout(), map[string]any{"vm": v, "counters": cnt})
		}}
	sf.add(show)
	vmCmd.AddCommand(show)

	// Lifecycle verbs map one to one onto agent calls.
	for _, verb := range []struct {
		name, short string
		call        func(ctx context.Context, c *agentclient.Client, vm string) error
	}{
		{"start", "Start a VM", func(ctx context.Context, c *agentclient.Client, vm string) error { return c.Start(ctx, vm) }},
		{"stop", "Shut a VM down (ACPI, forced after 30 s)", func(ctx context.Context, c *agentclient.Client, vm string) error {
			return c.Stop(ctx, vm, 30*time.Second)
		}},
		{"reboot", "Reset a VM", func(ctx context.Context, c *agentclient.Client, vm string) error { return c.Reboot(ctx, vm) }},
		{"kill", "Kill a VM's QEMU at once", func(ctx context.Context, c *agentclient.Client, vm string) error { return c.Kill(ctx, vm) }},
	} {
		var f agentFlags
		call := verb.call
		cmd := &cobra.Command{Use: verb.name + " VM", Short: verb.short, Args: cobra.ExactArgs(1),
			RunE: func(cmd *cobra.Command, args []string) error {
				c, err := f.client()
				if err != nil {
					return err
				}
				return agentErr(call(cmd.Context(), c, args[0]))
			}}
		f.add(cmd)
		vmCmd.AddCommand(cmd)
	}

	var cf agentFlags
	console := &cobra.Command{Use: "console VM", Short: "Attach to a VM's serial console (Ctrl-] to leave)", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := cf.client()
			if err != nil {
				return err
			}
			return runConsole(cmd.Context(), c, args[0], os.Stdin, cmd.OutOrStdout())
		}}
	cf.add(console)
	hostCmd.AddCommand(console)
}

func printJSON(w io.Writer, x any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(x)
}

// runConsole connects stdin/stdout to the VM's console websocket. On a terminal, the
// terminal is put in raw mode and Ctrl-] detaches; otherwise input is sent as it comes
// and the console ends at end of input.
func runConsole(ctx context.Context, c *agentclient.Client, name string, in *os.File, out io.Writer) error {
	if ctx == nil {
		ctx = context.Background()
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	hdr := http.Header{}
	hdr.Set("Authorization", "Bearer "+c.Token())
	ws, resp, err := websocket.Dial(ctx, c.ConsoleURL(name), &websocket.DialOptions{HTTPHeader: hdr, HTTPClient: c.HTTPClient()})
	if err != nil {
		if resp != nil {
			switch resp.StatusCode {
			case http.StatusNotFound:
				return &ExitError{Code: exitNotFound, Err: fmt.Errorf("VM %q not found", name)}
			case http.StatusConflict:
				return &ExitError{Code: exitConflict, Err: fmt.Errorf("VM %q is not running", name)}
			case http.StatusUnauthorized:
				return &ExitError{Code: exitAuth, Err: errors.New("The agent refused the token")}
			}
		}
		return fmt.Errorf("Failed to attach to the console of %q: %w", name, err)
	}
	defer ws.CloseNow()
	ws.SetReadLimit(1 << 20)
	raw := term.IsTerminal(int(in.Fd()))
	if raw {
		old, err := term.MakeRaw(int(in.Fd()))
		if err != nil {
			return fmt.Errorf("Failed to put the terminal in raw mode: %w", err)
		}
		defer term.Restore(int(in.Fd()), old)
		fmt.Fprintf(out, "Connected to %s (Ctrl-] to detach)\r\n", name)
	}
	go func() {
		defer cancel()
		b := make([]byte, 1024)
		for {
			n, err := in.Read(b)
			if n > 0 {
				p := b[:n]
				if raw {
					for i, ch := range p {
						if ch == 0x1d { // Ctrl-]
							if i > 0 {
								_ = ws.Write(ctx, websocket.MessageBinary, p[:i])
							}
							return
						}
					}
				}
				if werr := ws.Write(ctx, websocket.MessageBinary, p); werr != nil {
					return
				}
			}
			if err != nil {
				if !raw {
					// End of piped input: leave a moment for the answer, then detach.
					time.Sleep(2 * time.Second)
				}
				return
			}
		}
	}()
	for {
		_, b, err := ws.Read(ctx)
		if err != nil {
			if ctx.Err() != nil || websocket.CloseStatus(err) == websocket.StatusNormalClosure {
				return nil
			}
			return fmt.Errorf("Console of %q closed: %w", name, err)
		}
		if _, err := out.Write(b); err != nil {
			return err
		}
	}
}
