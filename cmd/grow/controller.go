package main

import (
	"context"
	"fmt"
	"os"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/growserver/grow/client"
)

func newControllerCmd() *cobra.Command {
	o := &cpOpts{}
	cmd := cpNoun("controller", "Storage controllers registered with the control plane", o)
	var req client.StorageReq
	var caFile string
	add := &cobra.Command{
		Use:   "add NAME --storage-url URL --storage-token TOKEN",
		Short: "Register a storage controller (grow storaged)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			req.Name = args[0]
			if caFile != "" {
				pem, err := os.ReadFile(caFile)
				if err != nil {
					return usageErr(fmt.Errorf("Failed to read --storage-ca-cert: %w", err))
				}
				req.CACert = string(pem)
			}
			return o.do(func(ctx context.Context, c *client.Client) error {
				s, err := c.AddStorage(ctx, req)
				if err != nil {
					return cpErr(err)
				}
				return o.emit(cmd.OutOrStdout(), s, func(tw *tabwriter.Writer) { fmt.Fprintf(tw, "Storage controller %s registered (%s)\n", s.Name, s.ID) })
			})
		},
	}
	add.Flags().StringVar(&req.URL, "storage-url", "", "URL of the controller's admin API, for example http://10.0.0.9:7480")
	add.Flags().StringVar(&req.Token, "storage-token", "", "the controller's token (its DATA/admin.token)")
	add.Flags().StringVar(&caFile, "storage-ca-cert", "", "PEM CA that signed an https controller's certificate")
	add.Flags().StringVar(&req.PartnerURL, "partner-url", "", "admin API URL of the controller's mirror partner, used while the controller does not answer")
	add.Flags().StringVar(&req.PartnerToken, "partner-token", "", "the mirror partner's token (its DATA/admin.token)")
	list := &cobra.Command{
		Use:   "list",
		Short: "List storage controllers",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			return o.do(func(ctx context.Context, c *client.Client) error {
				ss, err := c.ListStorage(ctx)
				if err != nil {
					return cpErr(err)
				}
				return o.emit(cmd.OutOrStdout(), ss, func(tw *tabwriter.Writer) {
					fmt.Fprintln(tw, "NAME\tSTATE\tHEALTH\tURL\tPARTNER\tID")
					for _, s := range ss {
						fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", s.Name, s.State, healthText(s.Health), s.URL, orNone(s.PartnerURL), s.ID)
					}
				})
			})
		},
	}
	cmd.AddCommand(add, list)
	return cmd
}

func init() { rootCmd.AddCommand(newControllerCmd()) }
