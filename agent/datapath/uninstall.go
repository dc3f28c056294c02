package datapath

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf/link"
)

// Uninstall detaches sluice's programs and removes its pins. It only touches
// the pins sluice creates in pinPath (its links and maps, by name): programs
// that others attached to the same cgroup are never affected, and unknown
// files in pinPath are left in place and reported. Uninstalling a datapath
// that is not installed is not an error.
func Uninstall(pinPath string) error {
	if _, err := os.Stat(pinPath); errors.Is(err, os.ErrNotExist) {
		return removeLock(pinPath)
	}
	var errs []error
	if err := removeLock(pinPath); err != nil {
		// An agent still runs: uninstall anyway (that is what was asked),
		// and say so.
		errs = append(errs, err)
	}
	// The workloads attach scope's per-cgroup links first (detachDir: the
	// connect programs first), then earlier proxies' links.
	for _, sub := range []struct {
		dir string
		as  []attachment
	}{{workloadsDir, workloadAttachments()}, {retiredDir, rootAttachments(ScopeWorkloads)}} {
		ids, err := cgroupDirs(pinPath, sub.dir)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		for _, id := range ids {
			if err := detachDir(cgroupPinDir(pinPath, sub.dir, id), sub.as); err != nil {
				errs = append(errs, fmt.Errorf("cgroup %d: %w", id, err))
			}
		}
		if err := os.Remove(filepath.Join(pinPath, sub.dir)); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	// The root's links last: in the workloads scope they are the proxy's,
	// which must outlive the workloads' connect programs.
	errs = append(errs, detachLinks(pinPath, attachments())...)
	for name := range (&Datapath{}).mapFields() {
		if err := os.Remove(filepath.Join(pinPath, name)); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("unpin map %s: %w", name, err))
		}
	}
	if err := os.Remove(pinPath); err != nil {
		left, _ := os.ReadDir(pinPath)
		var names []string
		for _, e := range left {
			names = append(names, e.Name())
		}
		errs = append(errs, fmt.Errorf("remove %s (left: %v): %w", pinPath, names, err))
	}
	return errors.Join(errs...)
}

// detachLinks detaches and unpins the links pinned in dir of the programs
// as, in that order; missing pins are skipped. It detaches now, even if a
// running agent still holds a link open; kernels without BPF_LINK_DETACH
// detach when the last reference (the pin and our fd) goes.
func detachLinks(dir string, as []attachment) []error {
	var errs []error
	for _, a := range as {
		l, err := link.LoadPinnedLink(linkPin(dir, a.prog), nil)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("open pinned link %s: %w", a.prog, err))
			continue
		}
		if err := l.Detach(); err != nil && !errors.Is(err, link.ErrNotSupported) {
			errs = append(errs, fmt.Errorf("detach %s: %w", a.prog, err))
		}
		if err := l.Unpin(); err != nil {
			errs = append(errs, fmt.Errorf("unpin %s: %w", a.prog, err))
		}
		l.Close()
	}
	return errs
}
