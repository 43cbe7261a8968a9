package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"text/tabwriter"

	"github.com/schollz/progressbar/v3"
	"github.com/spf13/cobra"

	"github.com/growserver/grow/client"
	"github.com/growserver/grow/internal/storage/adminclient"
)

func newCPImageCmd() *cobra.Command {
	o := &cpOpts{}
	cmd := cpNoun("image", "Gold-master images that servers are cloned from", o)
	var opts client.ImportOptions
	imp := &cobra.Command{
		Use:   "import NAME FILE [--kernel PATH --initrd PATH --cmdline ARGS]",
		Short: "Stream a raw or qcow2 image into a storage controller as a gold master",
		Long: `Stream a raw or qcow2 image into a storage controller as a read-only gold master.
Images without a boot loader (such as the tiny test guest) boot directly with
--kernel and --initrd: absolute paths that must exist on every host.`,
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			f, err := os.Open(args[1])
			if err != nil {
				return &ExitError{Code: exitUsage, Err: fmt.Errorf("Failed to open image %q: %w", args[1], err)}
			}
			defer f.Close()
			st, err := f.Stat()
			if err != nil || st.Size() == 0 {
				return &ExitError{Code: exitUsage, Err: fmt.Errorf("Image %q is empty or unreadable", args[1])}
			}
			if opts.Format == "" {
				head := make([]byte, 512)
				n, _ := io.ReadFull(f, head)
				opts.Format = adminclient.DetectFormat(head[:n])
				if _, err := f.Seek(0, io.SeekStart); err != nil {
					return fmt.Errorf("Failed to rewind %q: %w", args[1], err)
				}
			}
			for _, p := range []*string{&opts.Kernel, &opts.Initrd} {
				if *p != "" {
					abs, err := filepath.Abs(*p)
					if err != nil {
						return &ExitError{Code: exitUsage, Err: err}
					}
					*p = abs
				}
			}
			return o.do(func(ctx context.Context, c *client.Client) error {
				var r io.Reader = f
				if o.output == "table" {
					bar := progressbar.NewOptions64(st.Size(), progressbar.OptionSetWriter(cmd.ErrOrStderr()), progressbar.OptionShowBytes(true),
						progressbar.OptionSetDescription("import "+args[0]), progressbar.OptionClearOnFinish())
					pr := progressbar.NewReader(f, bar)
					r = &pr
				}
				im, err := c.ImportImage(ctx, args[0], r, st.Size(), opts)
				if err != nil {
					return cpErr(err)
				}
				return o.emit(cmd.OutOrStdout(), im, func(tw *tabwriter.Writer) {
					fmt.Fprintf(tw, "Image %s imported (%s, %s)\n", im.Name, size(im.SizeBytes), opts.Format)
				})
			})
		},
	}
	f := imp.Flags()
	f.StringVar(&opts.Format, "format", "", "raw or qcow2 (default: detected)")
	f.StringVar(&opts.Storage, "storage", "", "storage controller (default: the first active one)")
	f.StringVar(&opts.Kernel, "kernel", "", "kernel to boot directly (path on the hosts)")
	f.StringVar(&opts.Initrd, "initrd", "", "initrd for --kernel (path on the hosts)")
	f.StringVar(&opts.Cmdline, "cmdline", "", "kernel command line for --kernel")
	list := &cobra.Command{
		Use:   "list",
		Short: "List images",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			return o.do(func(ctx context.Context, c *client.Client) error {
				ims, err := c.ListImages(ctx)
				if err != nil {
					return cpErr(err)
				}
				return o.emit(cmd.OutOrStdout(), ims, func(tw *tabwriter.Writer) {
					fmt.Fprintln(tw, "NAME\tSTATE\tSIZE\tBOOT\tCREATED")
					for _, im := range ims {
						boot := "disk"
						if im.Kernel != "" {
							boot = "kernel " + im.Kernel
						}
						fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", im.Name, im.State, size(im.SizeBytes), boot, ago(im.CreatedAt))
					}
				})
			})
		},
	}
	del := &cobra.Command{
		Use:   "delete NAME",
		Short: "Delete an image no server was cloned from",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return o.do(func(ctx context.Context, c *client.Client) error {
				return cpErr(c.DeleteImage(ctx, args[0]))
			})
		},
	}
	cmd.AddCommand(imp, list, del, newImageBuildCmd(o))
	return cmd
}

func init() { rootCmd.AddCommand(newCPImageCmd()) }
