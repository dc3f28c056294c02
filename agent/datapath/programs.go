package datapath

import (
	"fmt"
	"path/filepath"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
)

// ProgramStatus describes one attached program as the kernel reports it.
type ProgramStatus struct {
	Name       string
	AttachType string
	LinkID     link.ID
	ProgramID  ebpf.ProgramID
	Tag        string // the kernel's hash of the loaded instructions
	CgroupID   uint64
	// Role says whose link it is: RoleNode (the node scope's), RoleProxy
	// (the proxy's, in the workloads scope), RoleRetiredProxy (an earlier
	// proxy's, draining) or RoleWorkload (a selected workload's).
	Role string
	Err  error // set when the pinned link could not be read
}

// The roles of a pinned link (ProgramStatus.Role).
const (
	RoleNode         = "node"
	RoleProxy        = "proxy"
	RoleRetiredProxy = "retired proxy"
	RoleWorkload     = "workload"
)

// PinnedScope says which attach scope the pins at pinPath were made in.
func PinnedScope(pinPath string) Scope { return pinnedScope(pinPath) }

// Programs reports the pinned links of the datapath at pinPath, whether or
// not an agent is running: those attached to its cgroup (every program in
// the node attach scope, the proxy's in the workloads scope), then, in the
// workloads scope, those of every earlier proxy cgroup still pinned
// (retired: an update's previous proxy, draining) and of every selected
// cgroup.
func Programs(pinPath string) []ProgramStatus {
	scope := pinnedScope(pinPath)
	if scope == ScopeNode {
		return programsIn(pinPath, rootAttachments(scope), RoleNode)
	}
	out := programsIn(pinPath, rootAttachments(scope), RoleProxy)
	for _, sub := range []struct {
		dir, role string
		as        []attachment
	}{{retiredDir, RoleRetiredProxy, rootAttachments(ScopeWorkloads)}, {workloadsDir, RoleWorkload, workloadAttachments()}} {
		ids, err := cgroupDirs(pinPath, sub.dir)
		if err != nil {
			out = append(out, ProgramStatus{Name: sub.dir, Role: sub.role, Err: err})
		}
		for _, id := range ids {
			out = append(out, programsIn(cgroupPinDir(pinPath, sub.dir, id), sub.as, sub.role)...)
		}
	}
	return out
}

func programsIn(dir string, as []attachment, role string) []ProgramStatus {
	var out []ProgramStatus
	for _, a := range as {
		s := ProgramStatus{Name: a.prog, AttachType: a.attach.String(), Role: role}
		l, err := link.LoadPinnedLink(linkPin(dir, a.prog), nil)
		if err != nil {
			s.Err = fmt.Errorf("open %s: %w", filepath.Base(linkPin(dir, a.prog)), err)
			out = append(out, s)
			continue
		}
		info, err := l.Info()
		l.Close()
		if err != nil {
			s.Err = fmt.Errorf("link info: %w", err)
			out = append(out, s)
			continue
		}
		s.LinkID, s.ProgramID = info.ID, info.Program
		if cg := info.Cgroup(); cg != nil {
			s.CgroupID = cg.CgroupId
		}
		if p, err := ebpf.NewProgramFromID(info.Program); err == nil {
			if pi, err := p.Info(); err == nil {
				s.Tag = pi.Tag
			}
			p.Close()
		}
		out = append(out, s)
	}
	return out
}
