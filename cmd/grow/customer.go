package main

import (
	"context"
	"fmt"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/growserver/grow/client"
)

func newCustomerCmd() *cobra.Command {
	o := &cpOpts{}
	cmd := cpNoun("customer", "Customers (tenants) and their invoices", o)
	var email string
	var maxServers int
	create := &cobra.Command{
		Use:   "create NAME [--email E] [--max-servers N]",
		Short: "Add a customer",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return o.do(func(ctx context.Context, c *client.Client) error {
				req := client.CustomerReq{Name: args[0], Email: &email}
				if cmd.Flags().Changed("max-servers") {
					req.MaxServers = &maxServers
				}
				cu, err := c.CreateCustomer(ctx, req)
				if err != nil {
					return cpErr(err)
				}
				return o.emit(cmd.OutOrStdout(), cu, func(tw *tabwriter.Writer) { fmt.Fprintf(tw, "Customer %s created (%s)\n", cu.Name, cu.ID) })
			})
		},
	}
	create.Flags().StringVar(&email, "email", "", "contact address")
	create.Flags().IntVar(&maxServers, "max-servers", 10, "quota of servers (0 = unlimited)")
	var setEmail string
	var setMax int
	set := &cobra.Command{
		Use:   "set NAME [--email E] [--max-servers N]",
		Short: "Change a customer's contact or quota",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return o.do(func(ctx context.Context, c *client.Client) error {
				req := client.CustomerReq{}
				if cmd.Flags().Changed("email") {
					req.Email = &setEmail
				}
				if cmd.Flags().Changed("max-servers") {
					req.MaxServers = &setMax
				}
				cu, err := c.UpdateCustomer(ctx, args[0], req)
				if err != nil {
					return cpErr(err)
				}
				return o.emit(cmd.OutOrStdout(), cu, func(tw *tabwriter.Writer) { fmt.Fprintf(tw, "Customer %s updated\n", cu.Name) })
			})
		},
	}
	set.Flags().StringVar(&setEmail, "email", "", "contact address")
	set.Flags().IntVar(&setMax, "max-servers", 0, "quota of servers (0 = unlimited)")
	list := &cobra.Command{
		Use:   "list",
		Short: "List customers",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			return o.do(func(ctx context.Context, c *client.Client) error {
				cs, err := c.ListCustomers(ctx)
				if err != nil {
					return cpErr(err)
				}
				return o.emit(cmd.OutOrStdout(), cs, func(tw *tabwriter.Writer) {
					fmt.Fprintln(tw, "NAME\tID\tEMAIL\tMAX SERVERS\tCREATED")
					for _, cu := range cs {
						fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%s\n", cu.Name, cu.ID, dash(cu.Email), cu.MaxServers, ago(cu.CreatedAt))
					}
				})
			})
		},
	}
	show := &cobra.Command{
		Use:   "show NAME",
		Short: "Show a customer",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return o.do(func(ctx context.Context, c *client.Client) error {
				cu, err := c.GetCustomer(ctx, args[0])
				if err != nil {
					return cpErr(err)
				}
				return o.emit(cmd.OutOrStdout(), cu, func(tw *tabwriter.Writer) {
					fmt.Fprintf(tw, "Name:\t%s\nID:\t%s\nEmail:\t%s\nMax servers:\t%d\nCreated:\t%s\n", cu.Name, cu.ID, dash(cu.Email), cu.MaxServers, ago(cu.CreatedAt))
				})
			})
		},
	}
	del := &cobra.Command{
		Use:   "delete NAME",
		Short: "Delete a customer that has no servers and no users",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return o.do(func(ctx context.Context, c *client.Client) error {
				return cpErr(c.DeleteCustomer(ctx, args[0]))
			})
		},
	}
	var month string
	invoice := &cobra.Command{
		Use:   "invoice NAME [--month YYYY-MM]",
		Short: "Show a customer's invoice for a month (default: this month so far)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if month == "" {
				month = time.Now().UTC().Format("2006-01")
			}
			return o.do(func(ctx context.Context, c *client.Client) error {
				inv, err := c.Invoice(ctx, args[0], month)
				if err != nil {
					return cpErr(err)
				}
				return o.emit(cmd.OutOrStdout(), inv, func(tw *tabwriter.Writer) {
					fmt.Fprintln(tw, "SERVER\tITEM\tAMOUNT")
					for _, l := range inv.Lines {
						fmt.Fprintf(tw, "%s\t%s\t%s\n", dash(l.ServerName), l.Description, yen(l.AmountYen))
					}
					fmt.Fprintf(tw, "\tTotal %s\t%s\n", inv.Month, yen(inv.TotalYen))
				})
			})
		},
	}
	invoice.Flags().StringVar(&month, "month", "", "calendar month, UTC")
	cmd.AddCommand(create, set, list, show, del, invoice)
	return cmd
}

func init() { rootCmd.AddCommand(newCustomerCmd()) }
