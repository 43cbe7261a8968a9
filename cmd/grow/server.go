package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"

	"github.com/coder/websocket"
	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/growserver/grow/client"
)

func newServerCmd() *cobra.Command {
	o := &cpOpts{}
	cmd := cpNoun("server", "Customers' virtual servers: create, list, power, resize, migrate, delete", o)
	cmd.AddCommand(newServerCreateCmd(o), newServerListCmd(o), newServerShowCmd(o), newServerConsoleCmd(o),
		newServerResizeCmd(o), newServerMigrateCmd(o), newServerDeleteCmd(o))
	for _, a := range []struct{ verb, short string }{
		{"start", "Start a stopped server"}, {"stop", "Power a server off (ACPI, forced after a timeout)"}, {"reboot", "Reset a running server"},
	} {
		cmd.AddCommand(newServerActionCmd(o, a.verb, a.short))
	}
	return cmd
}

func init() { rootCmd.AddCommand(newServerCmd()) }

func newServerCreateCmd(o *cpOpts) *cobra.Command {
	var (
		req            client.CreateServer
		keyFiles       []string
		userData       string
		noWait         bool
		idempotencyKey string
	)
	cmd := &cobra.Command{
		Use:   "create NAME --customer C --plan P --image IMG",
		Short: "Provision a server: placement, O(1) clone of the image, cloud-init, start, wait until the guest is ready",
		Long: `Provision a server. The command returns an operation at once and follows it with a
progress bar unless --no-wait. The request carries an idempotency key (random unless
--idempotency-key), so a retried create never makes two servers.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			req.Name = args[0]
			if req.Customer == "" || req.Plan == "" || req.Image == "" {
				return &ExitError{Code: exitUsage, Err: fmt.Errorf("--customer, --plan and --image are required")}
			}
			for _, f := range keyFiles {
				b, err := os.ReadFile(f)
				if err != nil {
					return &ExitError{Code: exitUsage, Err: fmt.Errorf("Failed to read SSH key %q: %w", f, err)}
				}
				for _, l := range strings.Split(string(b), "\n") {
					if l = strings.TrimSpace(l); l != "" && !strings.HasPrefix(l, "#") {
						req.SSHKeys = append(req.SSHKeys, l)
					}
				}
			}
			if userData != "" {
				b, err := os.ReadFile(userData)
				if err != nil {
					return &ExitError{Code: exitUsage, Err: fmt.Errorf("Failed to read user data %q: %w", userData, err)}
				}
				req.UserData = string(b)
			}
			return o.do(func(ctx context.Context, c *client.Client) error {
				if idempotencyKey == "" {
					idempotencyKey = randomKey()
				}
				op, err := c.CreateServer(ctx, req, idempotencyKey)
				if err != nil {
					return cpErr(err)
				}
				if err := o.startOp(ctx, c, cmd, op, noWait); err != nil || noWait || o.output == "json" {
					return err
				}
				sv, err := c.GetServer(ctx, req.Name)
				if err != nil {
					return cpErr(err)
				}
				fmt.Fprintf(cmd.OutOrStdout(), "Server %s runs on %s with address %s\n", sv.Name, hostNames(ctx, c)(sv.HostID), dash(strings.Trim(sv.IPv4+" "+sv.IPv6, " ")))
				return nil
			})
		},
	}
	f := cmd.Flags()
	f.StringVar(&req.Customer, "customer", "", "customer the server belongs to (name or ID)")
	f.StringVar(&req.Plan, "plan", "", "plan: S, A, B, C, D or E (see grow plan list)")
	f.StringVar(&req.Image, "image", "", "gold-master image (see grow image list)")
	f.StringArrayVar(&keyFiles, "ssh-key", nil, "file of SSH public keys to authorise (repeatable)")
	f.StringVar(&userData, "user-data", "", "#cloud-config file merged into the server's cloud-init")
	f.StringVar(&req.Group, "group", "", "anti-affinity group: servers of one group never share a host")
	f.BoolVar(&noWait, "no-wait", false, "print the operation ID and return at once")
	f.StringVar(&idempotencyKey, "idempotency-key", "", "key that makes a retried create safe (default: random)")
	return cmd
}

func newServerListCmd(o *cpOpts) *cobra.Command {
	var f client.ServerFilter
	cmd := &cobra.Command{
		Use:   "list",
		Short: "List servers",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			return o.do(func(ctx context.Context, c *client.Client) error {
				svs, err := c.ListServers(ctx, f)
				if err != nil {
					return cpErr(err)
				}
				host := func(id string) string { return id }
				if o.output == "table" {
					host = hostNames(ctx, c)
				}
				return o.emit(cmd.OutOrStdout(), svs, func(tw *tabwriter.Writer) {
					fmt.Fprintln(tw, "NAME\tSTATE\tPLAN\tIPV4\tIPV6\tHOST\tCUSTOMER")
					for _, s := range svs {
						fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", s.Name, s.State, s.Plan, dash(s.IPv4), dash(s.IPv6), dash(host(s.HostID)), s.CustomerID)
					}
				})
			})
		},
	}
	cmd.Flags().StringVar(&f.Customer, "customer", "", "only this customer's servers")
	cmd.Flags().StringVar(&f.Host, "host", "", "only servers on this host")
	return cmd
}

func newServerShowCmd(o *cpOpts) *cobra.Command {
	return &cobra.Command{
		Use:               "show NAME",
		Short:             "Show a server",
		Args:              cobra.ExactArgs(1),
		ValidArgsFunction: o.completeServers,
		RunE: func(cmd *cobra.Command, args []string) error {
			return o.do(func(ctx context.Context, c *client.Client) error {
				s, err := c.GetServer(ctx, args[0])
				if err != nil {
					return cpErr(err)
				}
				return o.emit(cmd.OutOrStdout(), s, func(tw *tabwriter.Writer) {
					for _, kv := range [][2]string{{"Name", s.Name}, {"ID", s.ID}, {"State", s.State}, {"Customer", s.CustomerID},
						{"Plan", s.Plan}, {"vCPUs", fmt.Sprint(s.VCPUs)}, {"Memory", size(s.MemoryBytes)}, {"Disk", size(s.DiskBytes)},
						{"IPv4", dash(s.IPv4)}, {"IPv6", dash(s.IPv6)}, {"Host", dash(hostNames(ctx, c)(s.HostID))}, {"Volume", dash(s.Volume)},
						{"Group", dash(s.Group)}, {"SSH keys", fmt.Sprint(len(s.SSHKeys))}, {"Created", ago(s.CreatedAt)}} {
						fmt.Fprintf(tw, "%s:\t%s\n", kv[0], kv[1])
					}
				})
			})
		},
	}
}

func newServerActionCmd(o *cpOpts, verb, short string) *cobra.Command {
	var noWait bool
	cmd := &cobra.Command{
		Use:               verb + " NAME",
		Short:             short,
		Args:              cobra.ExactArgs(1),
		ValidArgsFunction: o.completeServers,
		RunE: func(cmd *cobra.Command, args []string) error {
			return o.do(func(ctx context.Context, c *client.Client) error {
				op, err := c.ServerAction(ctx, args[0], verb, client.ActionRequest{})
				if err != nil {
					return cpErr(err)
				}
				return o.startOp(ctx, c, cmd, op, noWait)
			})
		},
	}
	cmd.Flags().BoolVar(&noWait, "no-wait", false, "print the operation ID and return at once")
	return cmd
}

func newServerResizeCmd(o *cpOpts) *cobra.Command {
	var (
		plan   string
		noWait bool
	)
	cmd := &cobra.Command{
		Use:   "resize NAME --plan P",
		Short: "Change a server's plan: the disk grows online; a plan with a smaller disk is refused",
		Long: `Change a server's plan. The disk grows online (the guest sees the new size at once).
Memory and vCPUs change online where the guest supports it; otherwise the operation's
message says they apply at the next stop and start.`,
		Args:              cobra.ExactArgs(1),
		ValidArgsFunction: o.completeServers,
		RunE: func(cmd *cobra.Command, args []string) error {
			if plan == "" {
				return &ExitError{Code: exitUsage, Err: fmt.Errorf("--plan is required")}
			}
			return o.do(func(ctx context.Context, c *client.Client) error {
				op, err := c.ServerAction(ctx, args[0], "resize", client.ActionRequest{Plan: plan})
				if err != nil {
					return cpErr(err)
				}
				return o.startOp(ctx, c, cmd, op, noWait)
			})
		},
	}
	cmd.Flags().StringVar(&plan, "plan", "", "the new plan")
	cmd.Flags().BoolVar(&noWait, "no-wait", false, "print the operation ID and return at once")
	return cmd
}

func newServerMigrateCmd(o *cpOpts) *cobra.Command {
	var (
		to     string
		noWait bool
	)
	cmd := &cobra.Command{
		Use:               "migrate NAME [--to HOST]",
		Short:             "Move a running server live to another host (placement chooses one without --to)",
		Args:              cobra.ExactArgs(1),
		ValidArgsFunction: o.completeServers,
		RunE: func(cmd *cobra.Command, args []string) error {
			return o.do(func(ctx context.Context, c *client.Client) error {
				op, err := c.ServerAction(ctx, args[0], "migrate", client.ActionRequest{To: to})
				if err != nil {
					return cpErr(err)
				}
				return o.startOp(ctx, c, cmd, op, noWait)
			})
		},
	}
	cmd.Flags().StringVar(&to, "to", "", "target host")
	cmd.Flags().BoolVar(&noWait, "no-wait", false, "print the operation ID and return at once")
	return cmd
}

func newServerDeleteCmd(o *cpOpts) *cobra.Command {
	var noWait bool
	cmd := &cobra.Command{
		Use:               "delete NAME",
		Short:             "Delete a server: frees its QEMU, its volume and its addresses",
		Args:              cobra.ExactArgs(1),
		ValidArgsFunction: o.completeServers,
		RunE: func(cmd *cobra.Command, args []string) error {
			return o.do(func(ctx context.Context, c *client.Client) error {
				op, err := c.DeleteServer(ctx, args[0])
				if err != nil {
					return cpErr(err)
				}
				return o.startOp(ctx, c, cmd, op, noWait)
			})
		},
	}
	cmd.Flags().BoolVar(&noWait, "no-wait", false, "print the operation ID and return at once")
	return cmd
}

func newServerConsoleCmd(o *cpOpts) *cobra.Command {
	var logOnly bool
	cmd := &cobra.Command{
		Use:               "console NAME",
		Short:             "Attach to a server's serial console (Ctrl-] to leave); with --log or without a terminal, print its recent output",
		Args:              cobra.ExactArgs(1),
		ValidArgsFunction: o.completeServers,
		RunE: func(cmd *cobra.Command, args []string) error {
			return o.do(func(ctx context.Context, c *client.Client) error {
				if logOnly || !term.IsTerminal(int(os.Stdin.Fd())) {
					b, err := c.Console(ctx, args[0])
					if err != nil {
						return cpErr(err)
					}
					_, err = cmd.OutOrStdout().Write(b)
					return err
				}
				ws, err := c.AttachConsole(ctx, args[0])
				if err != nil {
					return cpErr(err)
				}
				defer ws.CloseNow()
				return attachTerminal(ctx, ws, args[0], cmd.OutOrStdout())
			})
		},
	}
	cmd.Flags().BoolVar(&logOnly, "log", false, "print the recent console output and return")
	return cmd
}

// attachTerminal joins the terminal (in raw mode) and a console websocket until Ctrl-]
// or the console closes.
func attachTerminal(ctx context.Context, ws *websocket.Conn, name string, out io.Writer) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	fd := int(os.Stdin.Fd())
	old, err := term.MakeRaw(fd)
	if err != nil {
		return fmt.Errorf("Failed to put the terminal in raw mode: %w", err)
	}
	defer term.Restore(fd, old)
	fmt.Fprintf(out, "Connected to the console of %s (Ctrl-] to leave)\r\n", name)
	go func() {
		defer cancel()
		b := make([]byte, 1024)
		for {
			n, err := os.Stdin.Read(b)
			if n > 0 {
				p := b[:n]
				if i := bytes.IndexByte(p, 0x1d); i >= 0 {
					if i > 0 {
						_ = ws.Write(ctx, websocket.MessageBinary, p[:i])
					}
					return
				}
				if ws.Write(ctx, websocket.MessageBinary, p) != nil {
					return
				}
			}
			if err != nil {
				return
			}
		}
	}()
	for {
		_, b, err := ws.Read(ctx)
		if err != nil {
			if ctx.Err() != nil || websocket.CloseStatus(err) == websocket.StatusNormalClosure {
				fmt.Fprint(out, "\r\n")
				return nil
			}
			return fmt.Errorf("Console of %q closed: %w", name, err)
		}
		if _, err := out.Write(b); err != nil {
			return err
		}
	}
}

// hostNames maps host IDs to names when the caller may list hosts (admins); otherwise
// IDs are shown as they are.
func hostNames(ctx context.Context, c *client.Client) func(string) string {
	names := map[string]string{}
	if hs, err := c.ListHosts(ctx); err == nil {
		for _, h := range hs {
			names[h.ID] = h.Name
		}
	}
	return func(id string) string {
		if n, ok := names[id]; ok {
			return n
		}
		return id
	}
}
