package datapath

import "golang.org/x/sys/unix"

// Capability is a Linux capability the datapath needs, and why.
type Capability struct {
	Name  string
	Value int
	Why   string
}

// Capabilities are what the agent needs to install, program and uninstall the
// datapath when bpffs is already mounted (the DaemonSet mounts the host's).
// TestPrivilegedCapabilities runs the datapath with these alone and shows
// that each is necessary.
var Capabilities = []Capability{
	{"CAP_BPF", unix.CAP_BPF, "create maps and load programs (kernel 5.8+)"},
	{"CAP_NET_ADMIN", unix.CAP_NET_ADMIN, "attach cgroup socket programs; add the proxy address"},
	{"CAP_SYS_RESOURCE", unix.CAP_SYS_RESOURCE, "raise RLIMIT_MEMLOCK on kernels before 5.11 (memlock-accounted maps)"},
	{"CAP_PERFMON", unix.CAP_PERFMON, "older verifiers (6.1 measured) refuse the programs without it: clang reuses stack slots of spilled pointers for narrower stores, which they allow only with pointer-leak privilege"},
}

// OptionalCapabilities are needed only in some situations.
var OptionalCapabilities = []Capability{
	{"CAP_SYS_ADMIN", unix.CAP_SYS_ADMIN, "mount bpffs when it is absent; let `sluice status` read program tags by id; kernels before 5.8 (no CAP_BPF)"},
}
