package main

import (
	"context"
	"fmt"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/growserver/grow/client"
)

func newUserCmd() *cobra.Command {
	o := &cpOpts{}
	cmd := cpNoun("user", "API users: admins, and customer users limited to their own servers", o)
	var role, customer string
	create := &cobra.Command{
		Use:   "create NAME --role admin|customer [--customer C]",
		Short: "Add a user and print its API token (shown only once)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return o.do(func(ctx context.Context, c *client.Client) error {
				u, err := c.CreateUser(ctx, client.UserRequest{Name: args[0], Role: role, Customer: customer})
				if err != nil {
					return cpErr(err)
				}
				return o.emit(cmd.OutOrStdout(), u, func(tw *tabwriter.Writer) {
					fmt.Fprintf(tw, "User %s (%s) created. Token (shown only now):\n%s\n", u.Name, u.Role, u.Token)
				})
			})
		},
	}
	create.Flags().StringVar(&role, "role", "customer", "admin or customer")
	create.Flags().StringVar(&customer, "customer", "", "the customer a customer user acts for")
	var filter string
	list := &cobra.Command{
		Use:   "list [--customer C]",
		Short: "List users",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			return o.do(func(ctx context.Context, c *client.Client) error {
				us, err := c.ListUsers(ctx, filter)
				if err != nil {
					return cpErr(err)
				}
				return o.emit(cmd.OutOrStdout(), us, func(tw *tabwriter.Writer) {
					fmt.Fprintln(tw, "NAME\tID\tROLE\tCUSTOMER\tCREATED")
					for _, u := range us {
						fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", u.Name, u.ID, u.Role, dash(u.CustomerID), ago(u.CreatedAt))
					}
				})
			})
		},
	}
	list.Flags().StringVar(&filter, "customer", "", "only this customer's users")
	token := &cobra.Command{
		Use:   "token NAME",
		Short: "Give a user a new API token (the old one stops working)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return o.do(func(ctx context.Context, c *client.Client) error {
				u, err := c.RotateToken(ctx, args[0])
				if err != nil {
					return cpErr(err)
				}
				return o.emit(cmd.OutOrStdout(), u, func(tw *tabwriter.Writer) { fmt.Fprintln(tw, u.Token) })
			})
		},
	}
	del := &cobra.Command{
		Use:   "delete NAME",
		Short: "Delete a user; its token stops working",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return o.do(func(ctx context.Context, c *client.Client) error {
				return cpErr(c.DeleteUser(ctx, args[0]))
			})
		},
	}
	whoami := &cobra.Command{
		Use:   "whoami",
		Short: "Show the user the token belongs to",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			return o.do(func(ctx context.Context, c *client.Client) error {
				u, err := c.Whoami(ctx)
				if err != nil {
					return cpErr(err)
				}
				return o.emit(cmd.OutOrStdout(), u, func(tw *tabwriter.Writer) {
					fmt.Fprintf(tw, "%s (%s) %s\n", u.Name, u.Role, u.CustomerID)
				})
			})
		},
	}
	cmd.AddCommand(create, list, token, del, whoami)
	return cmd
}

func init() { rootCmd.AddCommand(newUserCmd()) }
