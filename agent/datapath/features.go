package datapath

import (
	"errors"
	"fmt"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/features"
	"golang.org/x/sys/unix"
)

// Requirement is one kernel feature the datapath cannot work without, and
// the upstream Linux release that introduced it.
type Requirement struct {
	Name  string
	Since string
	probe func() error
}

// Requirements is everything the programs in bpf/ use, probed without
// attaching anything: program and map types, the helpers each program type
// calls, and the attach types (the kernel refuses an expected attach type
// it does not know at load time). Together they make Linux 5.8 the floor;
// `make test-kernels` shows which Debian kernels pass.
var Requirements = []Requirement{
	{"program type cgroup_sock_addr (cgroup/connect4, connect6)", "4.17", progType(ebpf.CGroupSockAddr)},
	{"program type sock_ops", "4.13", progType(ebpf.SockOps)},
	{"program type cgroup_sockopt (cgroup/getsockopt)", "5.3", progType(ebpf.CGroupSockopt)},
	{"program type cgroup_sock (cgroup/sock_create)", "4.10", progType(ebpf.CGroupSock)},
	{"map type sk_storage (socket-local storage)", "5.2", func() error { return features.HaveMapType(ebpf.SkStorage) }},
	{"map type lpm_trie (exclusions)", "4.11", func() error { return features.HaveMapType(ebpf.LPMTrie) }},
	{"attach type cgroup/connect6", "4.17", attachType(ebpf.CGroupSockAddr, ebpf.AttachCGroupInet6Connect)},
	{"attach type cgroup/sendmsg4", "4.18", attachType(ebpf.CGroupSockAddr, ebpf.AttachCGroupUDP4Sendmsg)},
	{"attach type cgroup/sendmsg6", "4.18", attachType(ebpf.CGroupSockAddr, ebpf.AttachCGroupUDP6Sendmsg)},
	{"attach type cgroup/getsockopt", "5.3", attachType(ebpf.CGroupSockopt, ebpf.AttachCGroupGetsockopt)},
	{"attach type cgroup/getpeername4", "5.8", attachType(ebpf.CGroupSockAddr, ebpf.AttachCgroupInet4GetPeername)},
	{"attach type cgroup/getpeername6", "5.8", attachType(ebpf.CGroupSockAddr, ebpf.AttachCgroupInet6GetPeername)},
	{"helper bpf_get_current_ancestor_cgroup_id in cgroup/connect", "5.7", helper(ebpf.CGroupSockAddr, asm.FnGetCurrentAncestorCgroupId)},
	{"helper bpf_get_current_ancestor_cgroup_id in cgroup/sock_create", "5.7", helper(ebpf.CGroupSock, asm.FnGetCurrentAncestorCgroupId)},
	{"helper bpf_get_socket_cookie in cgroup/connect", "4.12", helper(ebpf.CGroupSockAddr, asm.FnGetSocketCookie)},
	{"helper bpf_get_socket_cookie in sock_ops", "5.4", helper(ebpf.SockOps, asm.FnGetSocketCookie)},
	{"helper bpf_sk_storage_get in cgroup/connect and getpeername", "5.3", helper(ebpf.CGroupSockAddr, asm.FnSkStorageGet)},
	{"helper bpf_sk_storage_delete in cgroup/connect", "5.3", helper(ebpf.CGroupSockAddr, asm.FnSkStorageDelete)},
	{"helper bpf_sk_storage_get in sock_ops", "5.3", helper(ebpf.SockOps, asm.FnSkStorageGet)},
	{"helper bpf_sk_storage_get in cgroup/getsockopt", "5.3", helper(ebpf.CGroupSockopt, asm.FnSkStorageGet)},
	{"helper bpf_sock_ops_cb_flags_set", "4.16", helper(ebpf.SockOps, asm.FnSockOpsCbFlagsSet)},
}

// MissingFeatureError names the kernel features the datapath needs and this
// kernel lacks.
type MissingFeatureError struct {
	Kernel  string
	Missing []Requirement
}

func (e *MissingFeatureError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "kernel %s lacks what sluice needs:", e.Kernel)
	for _, r := range e.Missing {
		fmt.Fprintf(&b, "\n  - %s (Linux %s+)", r.Name, r.Since)
	}
	b.WriteString("\nsluice needs Linux 5.8 or later with CONFIG_BPF_SYSCALL and CONFIG_CGROUP_BPF (see docs/install.md)")
	return b.String()
}

// CheckKernel probes every Requirement. It returns a *MissingFeatureError
// naming each missing one, or another error when the probes themselves
// cannot run (no permission to use bpf(2)).
func CheckKernel() error {
	var missing []Requirement
	for _, r := range Requirements {
		err := r.probe()
		switch {
		case err == nil:
		case errors.Is(err, ebpf.ErrNotSupported):
			missing = append(missing, r)
		case errors.Is(err, unix.EPERM):
			return fmt.Errorf("probing kernel features: %w (needs CAP_BPF and CAP_NET_ADMIN, or root)", err)
		default:
			return fmt.Errorf("probing %s: %w", r.Name, err)
		}
	}
	if len(missing) > 0 {
		return &MissingFeatureError{Kernel: kernelRelease(), Missing: missing}
	}
	return nil
}

func kernelRelease() string {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return "(unknown)"
	}
	return unix.ByteSliceToString(u.Release[:])
}

func progType(pt ebpf.ProgramType) func() error {
	return func() error { return features.HaveProgramType(pt) }
}

func helper(pt ebpf.ProgramType, fn asm.BuiltinFunc) func() error {
	return func() error { return features.HaveProgramHelper(pt, fn) }
}

// attachType loads a program that does nothing with the expected attach
// type set; a kernel that does not know the attach type refuses the load
// with EINVAL (or E2BIG for attribute fields it does not know).
func attachType(pt ebpf.ProgramType, at ebpf.AttachType) func() error {
	return func() error {
		if err := features.HaveProgramType(pt); err != nil {
			return err
		}
		prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
			Type:         pt,
			AttachType:   at,
			Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 1), asm.Return()},
			License:      "GPL",
		})
		if err == nil {
			prog.Close()
			return nil
		}
		if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.E2BIG) {
			return fmt.Errorf("%w: %v", ebpf.ErrNotSupported, err)
		}
		return err
	}
}
