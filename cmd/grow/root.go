package main

import (
	"errors"

	"github.com/spf13/cobra"
)

// rootCmd is the top of the command tree; each role adds its commands in its own file.
var rootCmd = &cobra.Command{
	Use:           "grow",
	Short:         "GrowServer: rent out virtual servers on your own hardware",
	SilenceUsage:  true,
	SilenceErrors: false,
}

// Exit codes that scripts can rely on.
const (
	exitOK       = 0
	exitError    = 1 // any failure not listed below
	exitUsage    = 2 // bad flags or arguments
	exitNotFound = 3 // the named object does not exist
	exitConflict = 4 // the request conflicts with current state
	exitAuth     = 5 // missing or refused credentials
)

// ExitError carries a specific exit code through cobra.
type ExitError struct {
	Code int
	Err  error
}

func (e *ExitError) Error() string { return e.Err.Error() }
func (e *ExitError) Unwrap() error { return e.Err }

// exitCode maps an error returned by a command to the process exit code.
func exitCode(err error) int {
	var ee *ExitError
	if errors.As(err, &ee) {
		return ee.Code
	}
	return exitError
}

// hostCmd is the `grow host` noun; the host agent and the control plane both add verbs to it.
var hostCmd = &cobra.Command{
	Use:   "host",
	Short: "Hypervisor hosts and the VMs on them",
}

func init() { rootCmd.AddCommand(hostCmd) }
