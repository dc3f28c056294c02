// Package layouts holds the compiled BPF objects of earlier pinned layouts
// (agent/datapath.LayoutVersion), frozen when the next layout replaced
// them, and installs them the way their release did, so that tests can
// upgrade from a real previous datapath. Only tests import it.
//
// Freezing a layout: when a change bumps datapath.LayoutVersion from N to
// N+1, copy the committed agent/datapath/sluice_bpfel.o of the last commit
// with layout N to layoutN/sluice_bpfel.o and add N here with its release's
// attachment table.
package layouts

import (
	"bytes"
	"embed"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/rlimit"
)

//go:embed layout1/sluice_bpfel.o layout2/sluice_bpfel.o layout3/sluice_bpfel.o layout4/sluice_bpfel.o
var objects embed.FS

// attachment is where one program of a release hooks.
type attachment struct {
	prog   string
	attach ebpf.AttachType
}

// releases are the frozen layouts: their attachment tables, as their
// agent/datapath had them.
var releases = map[int][]attachment{
	// Layout 1: frozen from commit e081d26.
	1: layout1,
	// Layout 2 (the layout map): frozen from the commit before the flows
	// ring buffer; the same programs.
	2: layout1,
	// Layout 3 (the flows ring buffer): frozen from commit 5517e85, the
	// last whose in-flight key held the client's port; the same programs.
	3: layout1,
	// Layout 4 (pending_tuples keyed by the client's first sequence
	// number): frozen from commit 1463f3c, the last that kept original
	// destinations in orig_dsts; the same programs.
	4: layout1,
}

var layout1 = []attachment{
	{"sl_connect4", ebpf.AttachCGroupInet4Connect},
	{"sl_connect6", ebpf.AttachCGroupInet6Connect},
	{"sl_sockops", ebpf.AttachCGroupSockOps},
	{"sl_getsockopt", ebpf.AttachCGroupGetsockopt},
	{"sl_getpeername4", ebpf.AttachCgroupInet4GetPeername},
	{"sl_getpeername6", ebpf.AttachCgroupInet6GetPeername},
	{"sl_sock_release", ebpf.AttachCgroupInetSockRelease},
	{"sl_sendmsg4", ebpf.AttachCGroupUDP4Sendmsg},
	{"sl_sendmsg6", ebpf.AttachCGroupUDP6Sendmsg},
	{"sl_sock_create", ebpf.AttachCGroupInetSockCreate},
}

// Versions are the frozen layouts, oldest first.
func Versions() []int { return slices.Sorted(maps.Keys(releases)) }

// Spec is layout version's compiled collection, as its release loaded it
// (minus the .bss section its loader dropped).
func Spec(version int) (*ebpf.CollectionSpec, error) {
	b, err := objects.ReadFile(fmt.Sprintf("layout%d/sluice_bpfel.o", version))
	if err != nil {
		return nil, fmt.Errorf("layout %d is not frozen here: %w", version, err)
	}
	spec, err := ebpf.LoadCollectionSpecFromReader(bytes.NewReader(b))
	if err != nil {
		return nil, err
	}
	delete(spec.Maps, ".bss")
	for name := range spec.Variables {
		delete(spec.Variables, name)
	}
	return spec, nil
}

// Install installs layout version's datapath on cgroupPath, pinned at
// pinPath, as that release's agent did: maps pinned by name and links
// pinned as link_<program>, in a directory renamed into place. The caller
// programs the maps (their definitions are that layout's) and uninstalls.
func Install(version int, cgroupPath, pinPath string) (err error) {
	spec, err := Spec(version)
	if err != nil {
		return err
	}
	// Kernels before 5.11 charge maps to RLIMIT_MEMLOCK, as that release's
	// agent knew.
	if err := rlimit.RemoveMemlock(); err != nil {
		return fmt.Errorf("layout %d: %w", version, err)
	}
	coll, err := ebpf.NewCollection(spec)
	if err != nil {
		return fmt.Errorf("load layout %d: %w", version, err)
	}
	defer coll.Close()
	tmp, err := os.MkdirTemp(filepath.Dir(pinPath), filepath.Base(pinPath)+"-installing-")
	if err != nil {
		return err
	}
	var links []link.Link
	defer func() {
		if err != nil {
			os.RemoveAll(tmp)
		}
		for _, l := range links {
			l.Close()
		}
	}()
	for name, m := range coll.Maps {
		if err := m.Pin(filepath.Join(tmp, name)); err != nil {
			return err
		}
	}
	// From layout 2 on, the release wrote its version (struct layout_info
	// {version, _pad}) before renaming the directory into place.
	if m, ok := coll.Maps["layout"]; ok {
		if err := m.Put(uint32(0), [2]uint32{uint32(version), 0}); err != nil {
			return fmt.Errorf("layout %d: write the version: %w", version, err)
		}
	}
	for _, a := range releases[version] {
		p, ok := coll.Programs[a.prog]
		if !ok {
			return fmt.Errorf("layout %d has no program %s", version, a.prog)
		}
		l, err := link.AttachCgroup(link.CgroupOptions{Path: cgroupPath, Attach: a.attach, Program: p})
		if err != nil {
			return fmt.Errorf("layout %d: attach %s: %w", version, a.prog, err)
		}
		links = append(links, l)
		if err := l.Pin(filepath.Join(tmp, "link_"+a.prog)); err != nil {
			return err
		}
	}
	return os.Rename(tmp, pinPath)
}
