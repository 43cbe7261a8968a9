package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/growserver/grow/client"
	"github.com/growserver/grow/internal/units"
)

// The control plane's verbs of `grow host`: register hosts and put them in maintenance.
func init() {
	o := &cpOpts{}
	var req client.HostRequest
	var mem, caFile string
	add := &cobra.Command{
		Use:   "add NAME --url URL --token TOKEN --cpus N --memory SIZE",
		Short: "Register a host agent with the control plane",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			req.Name = args[0]
			n, err := units.ParseSize(mem)
			if err != nil || n <= 0 {
				return &ExitError{Code: exitUsage, Err: fmt.Errorf("Invalid --memory %q: want a size such as 64GiB", mem)}
			}
			req.MemoryBytes = n
			if caFile != "" {
				pem, err := os.ReadFile(caFile)
				if err != nil {
					return usageErr(fmt.Errorf("Failed to read --agent-ca-cert: %w", err))
				}
				req.CACert = string(pem)
			}
			return o.do(func(ctx context.Context, c *client.Client) error {
				h, err := c.AddHost(ctx, req)
				if err != nil {
					return cpErr(err)
				}
				return o.emit(cmd.OutOrStdout(), h, func(tw *tabwriter.Writer) { fmt.Fprintf(tw, "Host %s registered (%s)\n", h.Name, h.ID) })
			})
		},
	}
	o.addFlags(add)
	f := add.Flags()
	f.StringVar(&req.URL, "agent-url", "", "URL of the host agent's API, for example http://10.0.0.5:7471")
	f.StringVar(&req.Token, "agent-token", "", "the host agent's token (its DATA/admin.token)")
	f.IntVar(&req.CPUs, "cpus", 0, "CPU threads servers may use")
	f.StringVar(&mem, "memory", "", "memory servers may use, for example 64GiB")
	f.StringVar(&req.CPUModel, "cpu-model", "", "CPU model, for information")
	f.StringVar(&caFile, "agent-ca-cert", "", "PEM CA that signed an https agent's certificate")

	lo := &cpOpts{}
	list := &cobra.Command{
		Use:   "list",
		Short: "List the hosts registered with the control plane",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := lo.client()
			if err != nil {
				return err
			}
			ctx, cancel := cpCtx()
			defer cancel()
			hs, err := c.ListHosts(ctx)
			if err != nil {
				return cpErr(err)
			}
			svs, err := c.ListServers(ctx, client.ServerFilter{})
			if err != nil {
				return cpErr(err)
			}
			used := map[string][2]int64{}
			for _, s := range svs {
				u := used[s.HostID]
				u[0] += int64(s.VCPUs)
				u[1] += s.MemoryBytes
				used[s.HostID] = u
			}
			return lo.emit(cmd.OutOrStdout(), hs, func(tw *tabwriter.Writer) {
				fmt.Fprintln(tw, "NAME\tSTATE\tHEALTH\tCPUS\tVCPUS USED\tMEMORY\tMEMORY USED\tURL")
				for _, h := range hs {
					fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%d\t%s\t%s\t%s\n", h.Name, h.State, healthText(h.Health), h.CPUs, used[h.ID][0], size(h.MemoryBytes), size(used[h.ID][1]), h.URL)
				}
			})
		},
	}
	o2 := &cpOpts{}
	var off bool
	maint := &cobra.Command{
		Use:   "maintenance NAME [--off]",
		Short: "Put a host in maintenance (placement gives it nothing new) or, with --off, back in service",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			state := "maintenance"
			if off {
				state = "active"
			}
			c, err := o2.client()
			if err != nil {
				return err
			}
			ctx, cancel := cpCtx()
			defer cancel()
			h, err := c.UpdateHost(ctx, args[0], client.HostRequest{State: state})
			if err != nil {
				return cpErr(err)
			}
			return o2.emit(cmd.OutOrStdout(), h, func(tw *tabwriter.Writer) { fmt.Fprintf(tw, "Host %s is %s\n", h.Name, h.State) })
		},
	}
	maint.Flags().BoolVar(&off, "off", false, "end maintenance")
	o3 := &cpOpts{}
	remove := &cobra.Command{
		Use:   "remove NAME",
		Short: "Unregister a host that carries no server",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := o3.client()
			if err != nil {
				return err
			}
			ctx, cancel := cpCtx()
			defer cancel()
			return cpErr(c.DeleteHost(ctx, args[0]))
		},
	}
	o4 := &cpOpts{}
	var evacNoWait bool
	evacuate := &cobra.Command{
		Use:   "evacuate NAME [--no-wait]",
		Short: "Put a host in maintenance and live-migrate every server off it (placement picks the targets)",
		Long: `Puts the host in maintenance and starts a host.evacuate operation in grow serve that
live-migrates the host's running servers away one at a time; it goes on if this command
is interrupted (follow it with grow operation show ID) and after a restart of grow serve.
Exit status 4 if servers are left on the host (not running, or a migration failed).`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return o4.do(func(ctx context.Context, c *client.Client) error {
				op, err := c.EvacuateHost(ctx, args[0])
				if err != nil {
					return err
				}
				err = o4.startOp(ctx, c, cmd, op, evacNoWait)
				var ee *ExitError
				if errors.As(err, &ee) && ee.Code == exitError {
					ee.Code = exitConflict // servers are left on the host
				}
				return err
			})
		},
	}
	evacuate.Flags().BoolVar(&evacNoWait, "no-wait", false, "print the operation ID and return at once")
	o4.addFlags(evacuate)
	lo.addFlags(list)
	o2.addFlags(maint)
	o3.addFlags(remove)
	hostCmd.AddCommand(add, list, maint, remove, evacuate)
}
