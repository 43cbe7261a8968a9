package main

import (
	"context"
	"fmt"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/growserver/grow/client"
	"github.com/growserver/grow/internal/units"
)

func newPlanCmd() *cobra.Command {
	o := &cpOpts{}
	cmd := cpNoun("plan", "Server plans (S–E): size and monthly price", o)
	list := &cobra.Command{
		Use:   "list",
		Short: "List plans",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			return o.do(func(ctx context.Context, c *client.Client) error {
				ps, err := c.ListPlans(ctx)
				if err != nil {
					return cpErr(err)
				}
				return o.emit(cmd.OutOrStdout(), ps, func(tw *tabwriter.Writer) {
					fmt.Fprintln(tw, "PLAN\tVCPUS\tMEMORY\tDISK\tTRAFFIC/MONTH\tPRICE/MONTH")
					for _, p := range ps {
						fmt.Fprintf(tw, "%s\t%d\t%s\t%s\t%s\t%s\n", p.Name, p.VCPUs, size(p.MemoryBytes), size(p.DiskBytes), decimal(p.TrafficBytes), yen(p.PriceYen))
					}
				})
			})
		},
	}
	var vcpus int
	var mem, disk, traffic string
	var price int64
	set := &cobra.Command{
		Use:   "set NAME [--vcpus N] [--memory SIZE] [--disk SIZE] [--traffic SIZE] [--price YEN]",
		Short: "Create a plan or change some of its values (servers keep the size they were created with until resized)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			req := client.PlanRequest{VCPUs: vcpus, PriceYen: price}
			for _, s := range []struct {
				flag, val string
				dst       *int64
			}{{"memory", mem, &req.MemoryBytes}, {"disk", disk, &req.DiskBytes}, {"traffic", traffic, &req.TrafficBytes}} {
				if s.val == "" {
					continue
				}
				n, err := units.ParseSize(s.val)
				if err != nil || n <= 0 {
					return &ExitError{Code: exitUsage, Err: fmt.Errorf("Invalid --%s %q: want a size such as 2GiB or 500GB", s.flag, s.val)}
				}
				*s.dst = n
			}
			if vcpus < 0 || price < 0 {
				return &ExitError{Code: exitUsage, Err: fmt.Errorf("--vcpus and --price must not be negative")}
			}
			return o.do(func(ctx context.Context, c *client.Client) error {
				p, err := c.SetPlan(ctx, args[0], req)
				if err != nil {
					return cpErr(err)
				}
				return o.emit(cmd.OutOrStdout(), p, func(tw *tabwriter.Writer) {
					fmt.Fprintf(tw, "Plan %s: %d vCPUs, %s memory, %s disk, %s traffic, %s a month\n", p.Name, p.VCPUs, size(p.MemoryBytes), size(p.DiskBytes), decimal(p.TrafficBytes), yen(p.PriceYen))
				})
			})
		},
	}
	f := set.Flags()
	f.IntVar(&vcpus, "vcpus", 0, "virtual CPUs")
	f.StringVar(&mem, "memory", "", "memory, for example 2GiB")
	f.StringVar(&disk, "disk", "", "disk, for example 80GiB")
	f.StringVar(&traffic, "traffic", "", "monthly traffic included, for example 500GB")
	f.Int64Var(&price, "price", 0, "monthly price in yen")
	cmd.AddCommand(list, set)
	return cmd
}

func init() { rootCmd.AddCommand(newPlanCmd()) }

// decimal formats traffic in decimal units, as it is sold (1 TB = 10^12 bytes).
func decimal(n int64) string {
	switch {
	case n == 0:
		return "-"
	case n%1e12 == 0:
		return fmt.Sprintf("%d TB", n/1e12)
	case n%1e9 == 0:
		return fmt.Sprintf("%d GB", n/1e9)
	}
	return fmt.Sprintf("%d B", n)
}
