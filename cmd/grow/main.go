// Command grow is the single GrowServer binary: control plane, host agent,
// storage controller and CLI, selected by subcommand.
package main

import (
	"os"
)

func main() {
	if err := rootCmd.Execute(); err != nil {
		os.Exit(exitCode(err))
	}
}
