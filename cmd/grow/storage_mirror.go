package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/growserver/grow/internal/storage/adminclient"
	"github.com/growserver/grow/internal/units"
)

// printMirroredVolumes is the volume table of a mirrored controller: role and state columns.
func printMirroredVolumes(tw *tabwriter.Writer, vols []adminclient.Volume) error {
	fmt.Fprintln(tw, "NAME\tKIND\tSIZE\tALLOCATED\tROLE\tSTATE\tEPOCH\tHOME\tPRIMARY\tDIRTY\tNBD")
	for _, v := range vols {
		role, state, epoch, home, primary, dirty := "-", "-", "-", "-", "-", "-"
		if m := v.Mirror; m != nil {
			role, state, epoch, home, dirty = m.Role, m.State, fmt.Sprint(m.Epoch), m.Home, units.FormatSize(m.DirtyBytes)
			if m.Primary != "" {
				primary = m.Primary
			}
			if m.State == adminclient.MirrorResyncing && m.Resync.Total > 0 {
				state = fmt.Sprintf("resyncing %d%%", m.Resync.Done*100/m.Resync.Total)
			}
		}
		nbdAddr := v.NBDAddress
		if nbdAddr == "" {
			nbdAddr = "-"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", v.Name, v.Kind, units.FormatSize(v.Size), units.FormatSize(v.Allocated),
			role, state, epoch, home, primary, dirty, nbdAddr)
	}
	return tw.Flush()
}

func newVolumeResolveCmd(o *storageOpts) *cobra.Command {
	var keep string
	cmd := &cobra.Command{
		Use:   "resolve NAME --keep CONTROLLER",
		Short: "Settle a split mirrored volume by keeping one controller's data",
		Long: `Settle a volume frozen because both controllers of the pair wrote to it alone.
CONTROLLER's data is kept and copied over the other side; the other side's data is
first kept there as the snapshot NAME@split-TIME, so nothing is thrown away silently.`,
		Args: storageArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if keep == "" {
				return usageErr(errors.New("--keep CONTROLLER is required"))
			}
			c, err := o.client()
			if err != nil {
				return err
			}
			v, err := c.Resolve(cmd.Context(), args[0], keep)
			if err != nil {
				return apiErr(err)
			}
			if o.output == "json" {
				return o.printJSON(cmd.OutOrStdout(), v)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "Resolved %s: keeping the data of %s; the other side resyncs from it\n", args[0], keep)
			return nil
		},
	}
	cmd.Flags().StringVar(&keep, "keep", "", "name of the controller whose data is kept")
	return cmd
}

func newStorageControllerCmd(o *storageOpts) *cobra.Command {
	cmd := &cobra.Command{Use: "controller", Short: "Planned maintenance of a mirrored controller pair"}
	var timeout time.Duration
	mk := func(use, short, long string, step func(*adminclient.Client, context.Context, string) (*adminclient.MoveResult, error)) *cobra.Command {
		c := &cobra.Command{
			Use: use, Short: short, Long: long, Args: storageArgs(1),
			RunE: func(cmd *cobra.Command, args []string) error {
				cl, err := o.client()
				if err != nil {
					return err
				}
				return followMove(cmd.Context(), cmd.ErrOrStderr(), cmd.OutOrStdout(), o, args[0], timeout, func(ctx context.Context) (*adminclient.MoveResult, error) {
					return step(cl, ctx, args[0])
				})
			},
		}
		c.Flags().DurationVar(&timeout, "timeout", 30*time.Minute, "give up after this long")
		return c
	}
	cmd.AddCommand(
		mk("drain NAME", "Move every primary off controller NAME so it can be stopped",
			`Hand every volume whose primary is NAME over to its partner (writes quiesced and
flushed, epoch bumped through the witness, service address moved, NBD clients
reconnected) with no I/O error in guests. Volumes still resyncing are waited for.
NAME then serves nothing and can be stopped; it stays drained until resumed.`,
			(*adminclient.Client).Drain),
		mk("resume NAME", "Give controller NAME its home volumes back once resynced",
			`Wait until every volume whose home is NAME is resynced onto it, then hand its primary
back to NAME (with its service address). Run it after NAME is back up.`,
			(*adminclient.Client).Resume),
	)
	return cmd
}

// followMove repeats a drain or resume step until it reports done, showing progress.
func followMove(ctx context.Context, errw, out io.Writer, o *storageOpts, name string, timeout time.Duration, step func(context.Context) (*adminclient.MoveResult, error)) error {
	deadline := time.Now().Add(timeout)
	moved := []string{}
	lastMsg := ""
	for {
		res, err := step(ctx)
		if err != nil {
			// A partner that is not reachable yet (just started) is waited for.
			if adminclient.StatusOf(err) != http.StatusServiceUnavailable || time.Now().After(deadline) {
				return apiErr(err)
			}
			res = &adminclient.MoveResult{Message: err.Error()}
		}
		moved = append(moved, res.Moved...)
		if res.Done {
			res.Moved = moved
			if o.output == "json" {
				return o.printJSON(out, res)
			}
			fmt.Fprintf(out, "%s: %d volume(s) moved. %s\n", name, len(moved), res.Message)
			return nil
		}
		msg := fmt.Sprintf("waiting for %d volume(s): %s", len(res.Waiting), strings.Join(res.Waiting, ", "))
		if len(res.Waiting) == 0 {
			msg = "waiting"
		}
		if res.Resync.Total > 0 {
			msg += fmt.Sprintf(" (resync %s of %s)", units.FormatSize(res.Resync.Done), units.FormatSize(res.Resync.Total))
		}
		if res.Message != "" {
			msg += ": " + res.Message
		}
		if msg != lastMsg && o.output != "json" {
			fmt.Fprintln(errw, msg)
			lastMsg = msg
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("Gave up after %s: %s", timeout, msg)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(time.Second):
		}
	}
}

func newStorageMirrorCmd(o *storageOpts) *cobra.Command {
	cmd := &cobra.Command{Use: "mirror", Short: "The mirrored controller pair"}
	status := &cobra.Command{
		Use:   "status",
		Short: "Summarise the pair: partner, witness, volumes per state, resync progress",
		Args:  storageArgs(0),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := o.client()
			if err != nil {
				return err
			}
			s, err := c.MirrorStatus(cmd.Context())
			if err != nil {
				return apiErr(err)
			}
			if o.output == "json" {
				return o.printJSON(cmd.OutOrStdout(), s)
			}
			w := cmd.OutOrStdout()
			yes := map[bool]string{true: "reachable", false: "UNREACHABLE"}
			fmt.Fprintf(w, "Controller:  %s (serves %s)\n", s.Name, orNone(strings.Join(s.Serves, ", ")))
			fmt.Fprintf(w, "Partner:     %s at %s, %s\n", orNone(s.Partner), s.PartnerURL, yes[s.PartnerReachable])
			if s.WitnessConfigured {
				fmt.Fprintf(w, "Witness:     %s\n", yes[s.WitnessReachable])
			} else {
				fmt.Fprintln(w, "Witness:     none (a lost partner freezes volumes)")
			}
			if s.Fenced {
				fmt.Fprintln(w, "FENCED:      partner and witness lost; volumes frozen, service addresses given up")
			}
			states := make([]string, 0, len(s.States))
			for k, n := range s.States {
				states = append(states, fmt.Sprintf("%s %d", k, n))
			}
			sort.Strings(states)
			fmt.Fprintf(w, "Volumes:     %d (%s)\n", len(s.Volumes), orNone(strings.Join(states, ", ")))
			rate := "unlimited"
			if s.ResyncRate > 0 {
				rate = units.FormatSize(s.ResyncRate) + "/s"
			}
			fmt.Fprintf(w, "Resync:      %s of %s running, rate %s, %s copied since start\n", units.FormatSize(s.Resync.Done), units.FormatSize(s.Resync.Total), rate, units.FormatSize(s.ResyncBytes))
			if s.MetaPending > 0 {
				fmt.Fprintf(w, "Made alone:  %d volume creations and deletions, replayed to the partner when it returns\n", s.MetaPending)
			}
			return nil
		},
	}
	rate := &cobra.Command{
		Use:   "rate SIZE",
		Short: "Set the resync rate limit per second on both controllers (0: unlimited)",
		Args:  storageArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			n, err := units.ParseSize(args[0])
			if err != nil || n < 0 {
				return usageErr(fmt.Errorf("Invalid rate %q: want a size per second such as 50MiB (0: unlimited)", args[0]))
			}
			c, err := o.client()
			if err != nil {
				return err
			}
			if err := c.SetResyncRate(cmd.Context(), n); err != nil {
				return apiErr(err)
			}
			if o.output != "json" {
				fmt.Fprintf(cmd.OutOrStdout(), "Resync rate set to %s/s\n", units.FormatSize(n))
			}
			return nil
		},
	}
	cmd.AddCommand(status, rate)
	return cmd
}

func orNone(s string) string {
	if s == "" {
		return "none"
	}
	return s
}
