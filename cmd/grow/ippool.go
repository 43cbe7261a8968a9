package main

import (
	"context"
	"fmt"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/growserver/grow/client"
)

func newIPPoolCmd() *cobra.Command {
	o := &cpOpts{}
	cmd := cpNoun("ippool", "IPv4 and IPv6 address pools for servers", o)
	var req client.IPPoolRequest
	var dns string
	create := &cobra.Command{
		Use:   "create NAME --cidr PREFIX --first ADDR --last ADDR [--gateway ADDR] [--dns A,B]",
		Short: "Add an address pool",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			req.Name = args[0]
			if dns != "" {
				req.DNS = strings.Split(dns, ",")
			}
			return o.do(func(ctx context.Context, c *client.Client) error {
				p, err := c.CreateIPPool(ctx, req)
				if err != nil {
					return cpErr(err)
				}
				return o.emit(cmd.OutOrStdout(), p, func(tw *tabwriter.Writer) { fmt.Fprintf(tw, "Pool %s: %s-%s in %s\n", p.Name, p.First, p.Last, p.CIDR) })
			})
		},
	}
	f := create.Flags()
	f.StringVar(&req.CIDR, "cidr", "", "the network, for example 203.0.113.0/24")
	f.StringVar(&req.First, "first", "", "first address given out")
	f.StringVar(&req.Last, "last", "", "last address given out")
	f.StringVar(&req.Gateway, "gateway", "", "default gateway (never given out)")
	f.StringVar(&dns, "dns", "", "comma-separated DNS servers")
	list := &cobra.Command{
		Use:   "list",
		Short: "List address pools",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			return o.do(func(ctx context.Context, c *client.Client) error {
				ps, err := c.ListIPPools(ctx)
				if err != nil {
					return cpErr(err)
				}
				return o.emit(cmd.OutOrStdout(), ps, func(tw *tabwriter.Writer) {
					fmt.Fprintln(tw, "NAME\tFAMILY\tCIDR\tRANGE\tGATEWAY\tDNS")
					for _, p := range ps {
						fmt.Fprintf(tw, "%s\tIPv%d\t%s\t%s-%s\t%s\t%s\n", p.Name, p.Family, p.CIDR, p.First, p.Last, dash(p.Gateway), dash(strings.Join(p.DNS, ",")))
					}
				})
			})
		},
	}
	leases := &cobra.Command{
		Use:   "leases NAME",
		Short: "List the addresses a pool has given out",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return o.do(func(ctx context.Context, c *client.Client) error {
				ls, err := c.ListLeases(ctx, args[0])
				if err != nil {
					return cpErr(err)
				}
				return o.emit(cmd.OutOrStdout(), ls, func(tw *tabwriter.Writer) {
					fmt.Fprintln(tw, "ADDRESS\tSERVER\tSINCE")
					for _, l := range ls {
						fmt.Fprintf(tw, "%s\t%s\t%s\n", l.Address, l.ServerID, ago(l.CreatedAt))
					}
				})
			})
		},
	}
	del := &cobra.Command{
		Use:   "delete NAME",
		Short: "Delete a pool with no leases",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return o.do(func(ctx context.Context, c *client.Client) error {
				return cpErr(c.DeleteIPPool(ctx, args[0]))
			})
		},
	}
	cmd.AddCommand(create, list, leases, del)
	return cmd
}

func init() { rootCmd.AddCommand(newIPPoolCmd()) }
