package main

import (
	"errors"
	"fmt"
	"io"

	"github.com/sluice-io/sluice/agent/datapath"
)

func runCheck(args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("check", `Probe this kernel for every eBPF feature the datapath needs (program, map
and attach types, helpers), without attaching anything, and print each with
the Linux release that introduced it. Exits non-zero if one is missing. The
agent runs the same check at start. Needs root or CAP_BPF and CAP_NET_ADMIN.`, stderr)
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		fs.Usage()
		return fmt.Errorf("check takes no arguments: %w", errUsage)
	}
	err := datapath.CheckKernel()
	var mf *datapath.MissingFeatureError
	if err != nil && !errors.As(err, &mf) {
		return err
	}
	missing := map[string]bool{}
	if mf != nil {
		for _, r := range mf.Missing {
			missing[r.Name] = true
		}
	}
	for _, r := range datapath.Requirements {
		verdict := "ok"
		if missing[r.Name] {
			verdict = "MISSING"
		}
		fmt.Fprintf(stdout, "%-8s %-62s Linux %s+\n", verdict, r.Name, r.Since)
	}
	if mf != nil {
		return mf
	}
	fmt.Fprintln(stdout, "this kernel has everything sluice needs")
	return nil
}

func runMountBPFFS(args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("mount-bpffs", `Mount bpffs at --path unless it is there already. The DaemonSet's init
container runs this (privileged, with Bidirectional mount propagation) so
that the host has bpffs and the agent's pins outlive its container. Needs
CAP_SYS_ADMIN when it has to mount.`, stderr)
	path := fs.String("path", datapath.DefaultBPFFS, "where bpffs must be mounted")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		fs.Usage()
		return fmt.Errorf("mount-bpffs takes no arguments: %w", errUsage)
	}
	if err := datapath.EnsureBPFFS(*path); err != nil {
		return err
	}
	fmt.Fprintln(stdout, "bpffs mounted at", *path)
	return nil
}
