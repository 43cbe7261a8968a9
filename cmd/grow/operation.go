package main

import (
	"context"
	"fmt"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/growserver/grow/client"
)

func newOperationCmd() *cobra.Command {
	o := &cpOpts{}
	cmd := cpNoun("operation", "Long-running operations: progress, errors, cancel", o)
	cmd.Aliases = []string{"op"}
	var unfinished bool
	list := &cobra.Command{
		Use:   "list [--unfinished]",
		Short: "List operations",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			return o.do(func(ctx context.Context, c *client.Client) error {
				ops, err := c.ListOperations(ctx, unfinished)
				if err != nil {
					return cpErr(err)
				}
				return o.emit(cmd.OutOrStdout(), ops, func(tw *tabwriter.Writer) {
					fmt.Fprintln(tw, "ID\tKIND\tSTATE\tPROGRESS\tSTEP\tSERVER\tCREATED\tERROR")
					for _, op := range ops {
						fmt.Fprintf(tw, "%s\t%s\t%s\t%d%%\t%s\t%s\t%s\t%s\n", op.ID, op.Kind, op.State, op.Progress, dash(op.Step), dash(op.ServerID), ago(op.CreatedAt), op.Error)
					}
				})
			})
		},
	}
	list.Flags().BoolVar(&unfinished, "unfinished", false, "only pending and running operations")
	show := &cobra.Command{
		Use:   "show ID",
		Short: "Show an operation",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return o.do(func(ctx context.Context, c *client.Client) error {
				op, err := c.GetOperation(ctx, args[0])
				if err != nil {
					return cpErr(err)
				}
				return o.emit(cmd.OutOrStdout(), op, func(tw *tabwriter.Writer) {
					for _, kv := range [][2]string{{"ID", op.ID}, {"Kind", op.Kind}, {"State", op.State}, {"Progress", fmt.Sprintf("%d%%", op.Progress)},
						{"Step", dash(op.Step)}, {"Server", dash(op.ServerID)}, {"Message", dash(op.Message)}, {"Error", dash(op.Error)},
						{"Created", ago(op.CreatedAt)}, {"Updated", ago(op.UpdatedAt)}} {
						fmt.Fprintf(tw, "%s:\t%s\n", kv[0], kv[1])
					}
				})
			})
		},
	}
	wait := &cobra.Command{
		Use:   "wait ID",
		Short: "Follow an operation until it ends",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return o.do(func(ctx context.Context, c *client.Client) error {
				op, err := c.GetOperation(ctx, args[0])
				if err != nil {
					return cpErr(err)
				}
				return o.follow(ctx, c, cmd, op)
			})
		},
	}
	cancelCmd := &cobra.Command{
		Use:   "cancel ID",
		Short: "Cancel a running operation; its finished steps are undone",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return o.do(func(ctx context.Context, c *client.Client) error {
				op, err := c.CancelOperation(ctx, args[0])
				if err != nil {
					return cpErr(err)
				}
				return o.follow(ctx, c, cmd, op)
			})
		},
	}
	cmd.AddCommand(list, show, wait, cancelCmd)
	return cmd
}

func init() { rootCmd.AddCommand(newOperationCmd()) }
