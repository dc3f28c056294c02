package datapath

import (
	"fmt"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Capability is a Linux capability the datapath needs, and why.
type Capability struct {
	Name  string
	Value int
	Why   string
}

// Capabilities are what the agent needs to install, program and uninstall the
// datapath when bpffs is already mounted (the DaemonSet mounts the host's),
// on every kernel; kernels before 5.11 need MemlockCapability too.
// TestPrivilegedCapabilities runs the datapath with these alone and shows
// that CAP_BPF and CAP_NET_ADMIN are necessary.
var Capabilities = []Capability{
	{"CAP_BPF", unix.CAP_BPF, "create maps and load programs (kernel 5.8+)"},
	{"CAP_NET_ADMIN", unix.CAP_NET_ADMIN, "attach cgroup socket programs; add the proxy address"},
	{"CAP_PERFMON", unix.CAP_PERFMON, "older verifiers (6.1 measured) refuse the programs without it: clang reuses stack slots of spilled pointers for narrower stores, which they allow only with pointer-leak privilege"},
}

// MemlockCapability is needed only where BPF memory is charged to
// RLIMIT_MEMLOCK (before 5.11, which charges the memory cgroup instead):
// the agent raises the limit. Nodes whose capability bounding set lacks it
// (some hardened and CI machines do) cannot start a container that asks for
// it, so the DaemonSet asks for it only through the
// daemonset/kernel-before-5.11 component.
var MemlockCapability = Capability{"CAP_SYS_RESOURCE", unix.CAP_SYS_RESOURCE, "raise RLIMIT_MEMLOCK on kernels before 5.11 (memlock-accounted maps)"}

// RequiredCapabilities are the capabilities the agent needs on this
// kernel.
func RequiredCapabilities() []Capability {
	out := append([]Capability(nil), Capabilities...)
	if MemlockAccounted() {
		out = append(out, MemlockCapability)
	}
	return out
}

// MemlockAccounted reports whether this kernel charges BPF maps to
// RLIMIT_MEMLOCK: releases before 5.11.
func MemlockAccounted() bool {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return true
	}
	return memlockAccounted(unix.ByteSliceToString(u.Release[:]))
}

// memlockAccounted: a release it cannot read counts as accounted (asking
// for the capability is the safe side).
func memlockAccounted(release string) bool {
	major, minor, err := kernelVersion(release)
	if err != nil {
		return true
	}
	return major < 5 || major == 5 && minor < 11
}

// kernelVersion reads "6.1.0-28-cloud-amd64" as 6, 1.
func kernelVersion(release string) (int, int, error) {
	parts := strings.SplitN(release, ".", 3)
	if len(parts) < 2 {
		return 0, 0, fmt.Errorf("kernel release %q", release)
	}
	major, err := strconv.Atoi(parts[0])
	if err != nil {
		return 0, 0, fmt.Errorf("kernel release %q", release)
	}
	minor, err := strconv.Atoi(strings.TrimRightFunc(parts[1], func(r rune) bool { return r < '0' || r > '9' }))
	if err != nil {
		return 0, 0, fmt.Errorf("kernel release %q", release)
	}
	return major, minor, nil
}

// OptionalCapabilities are needed only in some situations.
var OptionalCapabilities = []Capability{
	{"CAP_SYS_ADMIN", unix.CAP_SYS_ADMIN, "mount bpffs when it is absent; let `sluice status` read program tags by id; kernels before 5.8 (no CAP_BPF)"},
}
