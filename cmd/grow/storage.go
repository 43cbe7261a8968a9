package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/schollz/progressbar/v3"
	"github.com/spf13/cobra"

	"github.com/growserver/grow/internal/storage/adminclient"
	"github.com/growserver/grow/internal/units"
)

// storageOpts are the flags every `grow storage` command shares.
type storageOpts struct {
	controller string
	token      string
	tokenFile  string
	caCert     string
	output     string
}

func newStorageCmd() *cobra.Command {
	o := &storageOpts{}
	cmd := &cobra.Command{
		Use:   "storage",
		Short: "Manage a storage controller: volumes, images, snapshots, checks and disks",
		Long: `Manage a storage controller through its admin API.

The token comes from --token, else $GROW_TOKEN, else (for a controller on this
machine) the controller's token file, DATA/admin.token.`,
		PersistentPreRunE: func(cmd *cobra.Command, args []string) error {
			if o.output != "table" && o.output != "json" {
				return usageErr(fmt.Errorf("Invalid --output %q: want table or json", o.output))
			}
			return nil
		},
	}
	cmd.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return usageErr(err) })
	pf := cmd.PersistentFlags()
	pf.StringVar(&o.controller, "controller", adminclient.DefaultURL, "admin API URL of the storage controller")
	pf.StringVar(&o.token, "token", "", "admin API bearer token (default $GROW_TOKEN)")
	pf.StringVar(&o.tokenFile, "token-file", filepath.Join(defaultStorageDataDir, "admin.token"), "token file read when no token is given and the controller is local")
	pf.StringVar(&o.caCert, "ca-cert", "", "PEM CA certificate to trust for an https controller URL")
	pf.StringVarP(&o.output, "output", "o", "table", "output format: table or json")

	vol := &cobra.Command{Use: "volume", Aliases: []string{"volumes", "vol"}, Short: "Volumes, clones and snapshots"}
	vol.AddCommand(
		newVolumeCreateCmd(o), newVolumeListCmd(o), newVolumeShowCmd(o), newVolumeDeleteCmd(o),
		newVolumeResizeCmd(o), newVolumeCloneCmd(o), newVolumeSnapshotCmd(o), newVolumeResolveCmd(o),
	)
	img := &cobra.Command{Use: "image", Aliases: []string{"images"}, Short: "Read-only gold-master images"}
	img.AddCommand(newImageImportCmd(o))
	disk := &cobra.Command{Use: "disk", Aliases: []string{"disks"}, Short: "The pool's disks"}
	disk.AddCommand(newDiskListCmd(o), newDiskReplaceCmd(o))
	cmd.AddCommand(vol, img, disk, newStorageCheckCmd(o), newStorageStatsCmd(o), newWitnessCmd(),
		newStorageControllerCmd(o), newStorageMirrorCmd(o))
	return cmd
}

func init() { rootCmd.AddCommand(newStorageCmd()) }

func usageErr(err error) error { return &ExitError{Code: exitUsage, Err: err} }

// storageArgs wants exactly n arguments and reports a mismatch as a usage error (exit 2).
func storageArgs(n int) cobra.PositionalArgs {
	return func(cmd *cobra.Command, args []string) error {
		if err := cobra.ExactArgs(n)(cmd, args); err != nil {
			return usageErr(fmt.Errorf("%w (usage: %s)", err, cmd.UseLine()))
		}
		return nil
	}
}

// client builds the admin client, finding the token.
func (o *storageOpts) client() (*adminclient.Client, error) {
	tok := o.token
	if tok == "" {
		tok = os.Getenv("GROW_TOKEN")
	}
	if tok == "" && isLocalURL(o.controller) {
		if b, err := os.ReadFile(o.tokenFile); err == nil {
			tok = strings.TrimSpace(string(b))
		}
	}
	if tok == "" {
		return nil, &ExitError{Code: exitAuth, Err: errors.New("No token: pass --token or set $GROW_TOKEN (the controller keeps it in DATA/admin.token)")}
	}
	c, err := adminclient.New(o.controller, tok)
	if err != nil {
		return nil, usageErr(err)
	}
	if o.caCert != "" {
		if c, err = c.WithCACert(o.caCert); err != nil {
			return nil, usageErr(err)
		}
	}
	return c, nil
}

func isLocalURL(s string) bool {
	u, err := url.Parse(s)
	if err != nil {
		return false
	}
	h := u.Hostname()
	if h == "localhost" {
		return true
	}
	ip := net.ParseIP(h)
	return ip != nil && ip.IsLoopback()
}

// apiErr maps an admin API error to the CLI's exit codes.
func apiErr(err error) error {
	if err == nil {
		return nil
	}
	var ae *adminclient.APIError
	if !errors.As(err, &ae) {
		return err
	}
	switch {
	case ae.Status == http.StatusUnauthorized || ae.Status == http.StatusForbidden:
		return &ExitError{Code: exitAuth, Err: fmt.Errorf("The controller refused the token: %s", ae.Message)}
	case ae.Status == http.StatusBadRequest:
		return &ExitError{Code: exitUsage, Err: err}
	case ae.Status == http.StatusNotFound:
		return &ExitError{Code: exitNotFound, Err: err}
	case ae.Status == http.StatusConflict:
		return &ExitError{Code: exitConflict, Err: err}
	}
	return err
}

func parseSizeFlag(name, s string) (int64, error) {
	if s == "" {
		return 0, usageErr(fmt.Errorf("--%s is required (for example --%s 10GiB)", name, name))
	}
	n, err := units.ParseSize(s)
	if err != nil {
		return 0, usageErr(fmt.Errorf("Invalid --%s: %w", name, err))
	}
	if n <= 0 {
		return 0, usageErr(fmt.Errorf("Invalid --%s %q: must be positive", name, s))
	}
	return n, nil
}

func (o *storageOpts) printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func (o *storageOpts) printVolumes(w io.Writer, vols []adminclient.Volume) error {
	if o.output == "json" {
		return o.printJSON(w, vols)
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	mirrored := false
	for _, v := range vols {
		mirrored = mirrored || v.Mirror != nil
	}
	if mirrored {
		return printMirroredVolumes(tw, vols)
	}
	fmt.Fprintln(tw, "NAME\tKIND\tSIZE\tALLOCATED\tPARENT\tCLONES\tCREATED")
	for _, v := range vols {
		parent := v.Parent
		if parent == "" {
			parent = "-"
		}
		created := "-"
		if !v.Created.IsZero() {
			created = v.Created.Local().Format(time.DateTime)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%d\t%s\n", v.Name, v.Kind, units.FormatSize(v.Size), units.FormatSize(v.Allocated), parent, v.Children, created)
	}
	return tw.Flush()
}

func newVolumeCreateCmd(o *storageOpts) *cobra.Command {
	var size string
	cmd := &cobra.Command{
		Use:   "create NAME --size SIZE",
		Short: "Create an empty thin volume",
		Args:  storageArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			n, err := parseSizeFlag("size", size)
			if err != nil {
				return err
			}
			c, err := o.client()
			if err != nil {
				return err
			}
			v, err := c.CreateVolume(cmd.Context(), args[0], n)
			if err != nil {
				return apiErr(err)
			}
			return o.printVolumes(cmd.OutOrStdout(), []adminclient.Volume{*v})
		},
	}
	cmd.Flags().StringVar(&size, "size", "", "virtual size, for example 10GiB")
	return cmd
}

func newVolumeListCmd(o *storageOpts) *cobra.Command {
	return &cobra.Command{
		Use:     "list",
		Aliases: []string{"ls"},
		Short:   "List volumes, images and snapshots",
		Args:    storageArgs(0),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := o.client()
			if err != nil {
				return err
			}
			vols, err := c.ListVolumes(cmd.Context())
			if err != nil {
				return apiErr(err)
			}
			return o.printVolumes(cmd.OutOrStdout(), vols)
		},
	}
}

func newVolumeShowCmd(o *storageOpts) *cobra.Command {
	return &cobra.Command{
		Use:   "show NAME",
		Short: "Show one volume, image or snapshot",
		Args:  storageArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := o.client()
			if err != nil {
				return err
			}
			v, err := c.GetVolume(cmd.Context(), args[0])
			if err != nil {
				return apiErr(err)
			}
			if o.output == "json" {
				return o.printJSON(cmd.OutOrStdout(), v)
			}
			return o.printVolumes(cmd.OutOrStdout(), []adminclient.Volume{*v})
		},
	}
}

func newVolumeDeleteCmd(o *storageOpts) *cobra.Command {
	return &cobra.Command{
		Use:     "delete NAME",
		Aliases: []string{"rm"},
		Short:   "Delete a volume, image or snapshot (refused while clones depend on it)",
		Args:    storageArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := o.client()
			if err != nil {
				return err
			}
			if err := c.DeleteVolume(cmd.Context(), args[0]); err != nil {
				return apiErr(err)
			}
			if o.output == "json" {
				return o.printJSON(cmd.OutOrStdout(), map[string]string{"deleted": args[0]})
			}
			fmt.Fprintf(cmd.OutOrStdout(), "Deleted %s\n", args[0])
			return nil
		},
	}
}

func newVolumeResizeCmd(o *storageOpts) *cobra.Command {
	var size string
	cmd := &cobra.Command{
		Use:   "resize NAME --size SIZE",
		Short: "Change a volume's virtual size",
		Args:  storageArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			n, err := parseSizeFlag("size", size)
			if err != nil {
				return err
			}
			c, err := o.client()
			if err != nil {
				return err
			}
			v, err := c.ResizeVolume(cmd.Context(), args[0], n)
			if err != nil {
				return apiErr(err)
			}
			return o.printVolumes(cmd.OutOrStdout(), []adminclient.Volume{*v})
		},
	}
	cmd.Flags().StringVar(&size, "size", "", "new virtual size, for example 20GiB")
	return cmd
}

func (o *storageOpts) printClone(w io.Writer, r *adminclient.CloneResult, verb string) error {
	if o.output == "json" {
		return o.printJSON(w, r)
	}
	fmt.Fprintf(w, "%s %s in %s\n", verb, r.Volume.Name, r.Duration)
	return nil
}

func newVolumeCloneCmd(o *storageOpts) *cobra.Command {
	return &cobra.Command{
		Use:   "clone SOURCE NEW",
		Short: "Create a copy-on-write clone of an image or snapshot (O(1))",
		Args:  storageArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := o.client()
			if err != nil {
				return err
			}
			r, err := c.CloneVolume(cmd.Context(), args[0], args[1])
			if err != nil {
				return apiErr(err)
			}
			return o.printClone(cmd.OutOrStdout(), r, "Cloned "+args[0]+" to")
		},
	}
}

func newVolumeSnapshotCmd(o *storageOpts) *cobra.Command {
	return &cobra.Command{
		Use:   "snapshot NAME SNAP",
		Short: "Freeze a volume's content as the read-only snapshot NAME@SNAP (O(1))",
		Args:  storageArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := o.client()
			if err != nil {
				return err
			}
			r, err := c.Snapshot(cmd.Context(), args[0], args[1])
			if err != nil {
				return apiErr(err)
			}
			return o.printClone(cmd.OutOrStdout(), r, "Created snapshot")
		},
	}
}

func newImageImportCmd(o *storageOpts) *cobra.Command {
	var format string
	cmd := &cobra.Command{
		Use:   "import NAME FILE",
		Short: "Upload a raw or qcow2 file as a read-only image (gold master)",
		Args:  storageArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			name, path := args[0], args[1]
			f, err := os.Open(path)
			if err != nil {
				return usageErr(fmt.Errorf("Failed to open image file: %w", err))
			}
			defer f.Close()
			fi, err := f.Stat()
			if err != nil {
				return fmt.Errorf("Failed to inspect image file %q: %w", path, err)
			}
			if !fi.Mode().IsRegular() {
				return usageErr(fmt.Errorf("Image file %q is not a regular file", path))
			}
			if fi.Size() == 0 {
				return usageErr(fmt.Errorf("Image file %q is empty", path))
			}
			head := make([]byte, 4)
			n, _ := io.ReadFull(f, head)
			detected := adminclient.DetectFormat(head[:n])
			switch format {
			case "":
				format = detected
			case adminclient.FormatRaw, adminclient.FormatQcow2:
				if format != detected && detected == adminclient.FormatQcow2 {
					return usageErr(fmt.Errorf("Image file %q is qcow2, not %s", path, format))
				}
			default:
				return usageErr(fmt.Errorf("Invalid --format %q: want raw or qcow2", format))
			}
			if _, err := f.Seek(0, io.SeekStart); err != nil {
				return fmt.Errorf("Failed to rewind %q: %w", path, err)
			}
			c, err := o.client()
			if err != nil {
				return err
			}
			var progress func(int64)
			var bar *progressbar.ProgressBar
			if o.output != "json" {
				bar = progressbar.NewOptions64(fi.Size(),
					progressbar.OptionSetWriter(cmd.ErrOrStderr()),
					progressbar.OptionSetDescription("Uploading "+name),
					progressbar.OptionShowBytes(true),
					progressbar.OptionThrottle(200*time.Millisecond),
					progressbar.OptionClearOnFinish(),
				)
				progress = func(done int64) { _ = bar.Set64(done) }
			}
			start := time.Now()
			v, err := c.ImportImage(cmd.Context(), name, adminclient.NewSparseReader(f, fi.Size()), fi.Size(), format, progress)
			if bar != nil {
				if err == nil {
					_ = bar.Finish()
				} else {
					_ = bar.Exit()
					fmt.Fprintln(cmd.ErrOrStderr())
				}
			}
			if err != nil {
				return apiErr(err)
			}
			if o.output == "json" {
				return o.printJSON(cmd.OutOrStdout(), v)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "Imported %s (%s, %s virtual) in %s\n", v.Name, format, units.FormatSize(v.Size), time.Since(start).Round(time.Millisecond))
			return nil
		},
	}
	cmd.Flags().StringVar(&format, "format", "", "raw or qcow2 (default: detected from the file)")
	return cmd
}

func newStorageCheckCmd(o *storageOpts) *cobra.Command {
	return &cobra.Command{
		Use:   "check",
		Short: "Check the consistency of the controller's on-disk state",
		Args:  storageArgs(0),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := o.client()
			if err != nil {
				return err
			}
			rep, err := c.Check(cmd.Context())
			if err != nil {
				return apiErr(err)
			}
			if o.output == "json" {
				if err := o.printJSON(cmd.OutOrStdout(), rep); err != nil {
					return err
				}
			} else {
				for _, p := range rep.Problems {
					fmt.Fprintf(cmd.OutOrStdout(), "PROBLEM: %s\n", p)
				}
				if rep.OK {
					fmt.Fprintf(cmd.OutOrStdout(), "OK: %d objects, %d clusters in use, checked in %s\n", rep.Volumes, rep.Clusters, rep.Duration)
				}
			}
			if !rep.OK {
				return fmt.Errorf("Consistency check found %d problem(s)", len(rep.Problems))
			}
			return nil
		},
	}
}

func (o *storageOpts) printPool(w io.Writer, s *adminclient.PoolStatus) error {
	if o.output == "json" {
		return o.printJSON(w, s)
	}
	fmt.Fprintf(w, "Pool: %s, %s usable\n", s.State, units.FormatSize(s.Size))
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "INDEX\tPAIR\tPATH\tSTATE\tREBUILD\tERROR")
	for _, d := range s.Disks {
		rebuild := "-"
		if d.RebuildTotal > 0 {
			rebuild = fmt.Sprintf("%.1f%%", 100*float64(d.RebuildDone)/float64(d.RebuildTotal))
		}
		e := d.Error
		if e == "" {
			e = "-"
		}
		fmt.Fprintf(tw, "%d\t%d\t%s\t%s\t%s\t%s\n", d.Index, d.Pair, d.Path, d.State, rebuild, e)
	}
	return tw.Flush()
}

func newDiskListCmd(o *storageOpts) *cobra.Command {
	return &cobra.Command{
		Use:     "list",
		Aliases: []string{"ls"},
		Short:   "Show the pool's state and its disks",
		Args:    storageArgs(0),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := o.client()
			if err != nil {
				return err
			}
			s, err := c.Pool(cmd.Context())
			if err != nil {
				return apiErr(err)
			}
			return o.printPool(cmd.OutOrStdout(), s)
		},
	}
}

func newDiskReplaceCmd(o *storageOpts) *cobra.Command {
	var noWait bool
	cmd := &cobra.Command{
		Use:   "replace OLD NEW",
		Short: "Replace a pool disk and rebuild its mirror onto NEW while I/O continues",
		Long: `Replace the pool disk OLD (failed or not) with NEW and rebuild the mirror pair onto
it in the background. NEW may be a block device, an existing file, or a path that does
not exist yet (a sparse file as large as the other disks is created). Without
--no-wait the command follows the rebuild with a progress bar.`,
		Args: storageArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := o.client()
			if err != nil {
				return err
			}
			s, err := c.ReplaceDisk(cmd.Context(), args[0], args[1])
			if err != nil {
				return apiErr(err)
			}
			if !noWait {
				if o.output != "json" {
					fmt.Fprintf(cmd.ErrOrStderr(), "Rebuilding onto %s while I/O continues\n", args[1])
				}
				var bar *progressbar.ProgressBar
				progress := func(done, total int64) {
					if o.output == "json" || total <= 0 {
						return
					}
					if bar == nil {
						bar = progressbar.NewOptions64(total,
							progressbar.OptionSetWriter(cmd.ErrOrStderr()),
							progressbar.OptionSetDescription("Rebuild"),
							progressbar.OptionShowBytes(true),
							progressbar.OptionThrottle(200*time.Millisecond),
						)
					}
					_ = bar.Set64(done)
				}
				s, err = c.WaitRebuild(cmd.Context(), 250*time.Millisecond, progress)
				if bar != nil {
					_ = bar.Finish()
					fmt.Fprintln(cmd.ErrOrStderr())
				}
				if err != nil {
					return apiErr(err)
				}
				for _, d := range s.Disks {
					if d.Path == args[1] && d.State != "ok" {
						return fmt.Errorf("Rebuild onto %s did not complete: disk is %s: %s", args[1], d.State, d.Error)
					}
				}
			}
			return o.printPool(cmd.OutOrStdout(), s)
		},
	}
	cmd.Flags().BoolVar(&noWait, "no-wait", false, "return once the rebuild has started")
	return cmd
}

func newStorageStatsCmd(o *storageOpts) *cobra.Command {
	return &cobra.Command{
		Use:   "stats",
		Short: "Show space, cache and I/O counters",
		Args:  storageArgs(0),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := o.client()
			if err != nil {
				return err
			}
			s, err := c.Stats(cmd.Context())
			if err != nil {
				return apiErr(err)
			}
			if o.output == "json" {
				return o.printJSON(cmd.OutOrStdout(), s)
			}
			w := cmd.OutOrStdout()
			fmt.Fprintf(w, "Pool:      %s\n", s.Pool.State)
			fmt.Fprintf(w, "Space:     %s used, %s free of %s (%s pending free)\n", units.FormatSize(s.Used), units.FormatSize(s.Free), units.FormatSize(s.Capacity), units.FormatSize(s.PendingFree))
			fmt.Fprintf(w, "Volumes:   %d\n", s.Volumes)
			fmt.Fprintf(w, "Cache:     %s of %s, %d hits, %d misses\n", units.FormatSize(s.CacheBytes), units.FormatSize(s.CacheSize), s.CacheHits, s.CacheMisses)
			fmt.Fprintf(w, "NBD:       %d open, %d opened; %d reads (%s), %d writes (%s), %d flushes, %d trims, %d zeroes\n",
				s.OpenExports, s.Connections, s.ReadOps, units.FormatSize(s.ReadBytes), s.WriteOps, units.FormatSize(s.WriteBytes), s.FlushOps, s.TrimOps, s.ZeroOps)
			fmt.Fprintf(w, "Uptime:    %s\n", s.Uptime)
			return nil
		},
	}
}
