package datapath

import "golang.org/x/sys/unix"

// Capability is a Linux capability the datapath needs, and why.
type Capability struct {
	Name  string
	Value int
	Why   string
}

// Capabilities are what the agent needs to install and run the datapath. The
// DaemonSet grants exactly these; TestPrivilegedCapabilities runs the
// datapath with nothing else.
var Capabilities = []Capability{
	{"CAP_BPF", unix.CAP_BPF, "create maps and load programs (kernel 5.8+)"},
	{"CAP_NET_ADMIN", unix.CAP_NET_ADMIN, "attach cgroup socket programs; add the proxy address"},
	{"CAP_SYS_ADMIN", unix.CAP_SYS_ADMIN, "mount bpffs when absent; read program tags by id for status"},
	{"CAP_SYS_RESOURCE", unix.CAP_SYS_RESOURCE, "raise RLIMIT_MEMLOCK on kernels before 5.11 (memlock-accounted maps)"},
}
