// Command sluice is the node agent of sluice: transparent egress control
// for selected pods through a node-local Envoy. See `sluice help`.
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"sort"
)

// version is set at link time (-ldflags "-X main.version=...").
var version = "dev"

type command struct {
	summary string
	run     func(args []string, stdout, stderr io.Writer) error
}

var commands = map[string]command{
	"agent":       {"run the node agent (datapath, xDS server, workloads, proxy health, metrics)", runAgent},
	"check":       {"check that this kernel has every eBPF feature sluice needs", runCheck},
	"flows":       {"show selected pods' connections: the datapath's flow log with the proxy's access log", runFlows},
	"health":      {"ask a running agent's health socket whether it is live or ready (the DaemonSet's probes)", runHealth},
	"explain":     {"explain a pod's policy: what selects it, the effective policy, what guardrails removed", runExplain},
	"mount-bpffs": {"mount bpffs unless it is mounted (the DaemonSet's init container)", runMountBPFFS},
	"bootstrap":   {"print the Envoy bootstrap that connects Envoy to this agent", runBootstrap},
	"status":      {"show the pinned datapath, workloads, counters and xDS state", runStatus},
	"uninstall":   {"detach the programs, remove the pins and the proxy addresses", runUninstall},
	"version":     {"print the version", runVersion},
}

// errUsage: the command line was wrong; the usage has been printed.
var errUsage = errors.New("usage")

func main() {
	err := run(os.Args[1:], os.Stdout, os.Stderr)
	switch {
	case err == nil, errors.Is(err, flag.ErrHelp):
	case errors.Is(err, errUsage):
		os.Exit(2)
	default:
		fmt.Fprintln(os.Stderr, "sluice:", err)
		os.Exit(1)
	}
}

func run(args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 || args[0] == "help" || args[0] == "-h" || args[0] == "--help" {
		usage(stderr)
		if len(args) == 0 {
			return errUsage
		}
		return nil
	}
	c, ok := commands[args[0]]
	if !ok {
		fmt.Fprintf(stderr, "sluice: unknown command %q\n\n", args[0])
		usage(stderr)
		return errUsage
	}
	return c.run(args[1:], stdout, stderr)
}

func usage(w io.Writer) {
	fmt.Fprintln(w, "sluice: transparent egress control for selected pods through a node-local Envoy.")
	fmt.Fprintln(w, "\nUsage: sluice <command> [flags]   (sluice <command> --help for its flags)\n\nCommands:")
	names := make([]string, 0, len(commands))
	for n := range commands {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		fmt.Fprintf(w, "  %-12s %s\n", n, commands[n].summary)
	}
}

// newFlagSet returns a flag set whose --help prints a description and
// every flag with its default.
func newFlagSet(name, description string, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintf(stderr, "Usage: sluice %s [flags]\n\n%s\n\nFlags:\n", name, description)
		fs.PrintDefaults()
	}
	return fs
}

func runVersion(args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("version", "Print sluice's version.", stderr)
	if err := fs.Parse(args); err != nil {
		return err
	}
	fmt.Fprintln(stdout, "sluice", version)
	return nil
}
