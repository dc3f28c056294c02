package harness

import (
	"os"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/sluice-io/sluice/agent/datapath"
	"golang.org/x/sys/unix"
)

// HookTypes are the attach types of every program of the datapath.
var HookTypes = []ebpf.AttachType{
	ebpf.AttachCGroupInet4Connect, ebpf.AttachCGroupInet6Connect,
	ebpf.AttachCGroupUDP4Sendmsg, ebpf.AttachCGroupUDP6Sendmsg,
	ebpf.AttachCGroupInetSockCreate, ebpf.AttachCGroupSockOps,
	ebpf.AttachCGroupGetsockopt, ebpf.AttachCgroupInet4GetPeername, ebpf.AttachCgroupInet6GetPeername,
}

// ProxyRuns is what a proxy's cgroup runs in the workloads attach scope:
// the accepted side's sockops and getsockopt (SO_ORIGINAL_DST), once each.
var ProxyRuns = map[ebpf.AttachType]int{ebpf.AttachCGroupSockOps: 1, ebpf.AttachCGroupGetsockopt: 1}

// WorkloadRuns is what a selected workload's cgroup runs in the workloads
// attach scope: every program but getsockopt, once each.
func WorkloadRuns() map[ebpf.AttachType]int {
	out := map[ebpf.AttachType]int{}
	for _, typ := range HookTypes {
		if typ != ebpf.AttachCGroupGetsockopt {
			out[typ] = 1
		}
	}
	return out
}

// OurPrograms are the ids of the programs of the datapath's pinned links
// at pinPath.
func OurPrograms(t testing.TB, pinPath string) map[ebpf.ProgramID]bool {
	t.Helper()
	ours := map[ebpf.ProgramID]bool{}
	for _, p := range datapath.Programs(pinPath) {
		if p.Err == nil {
			ours[p.ProgramID] = true
		}
	}
	if len(ours) == 0 {
		t.Fatalf("the datapath at %s has no pinned links", pinPath)
	}
	return ours
}

// Effective counts, per attach type, the programs of ours that a socket of
// cgroup cg runs: the kernel's effective arrays (BPF_F_QUERY_EFFECTIVE),
// whatever is attached at the cgroup or its ancestors.
func Effective(t testing.TB, cg string, ours map[ebpf.ProgramID]bool) map[ebpf.AttachType]int {
	t.Helper()
	dir, err := os.Open(cg)
	if err != nil {
		t.Fatal(err)
	}
	defer dir.Close()
	out := map[ebpf.AttachType]int{}
	for _, typ := range HookTypes {
		res, err := link.QueryPrograms(link.QueryOptions{Target: int(dir.Fd()), Attach: typ, QueryFlags: unix.BPF_F_QUERY_EFFECTIVE})
		if err != nil {
			t.Fatalf("query %s of %s: %v", typ, cg, err)
		}
		for _, p := range res.Programs {
			if ours[p.ID] {
				out[typ]++
			}
		}
	}
	return out
}

// Total is how many programs m counts.
func Total(m map[ebpf.AttachType]int) int {
	n := 0
	for _, v := range m {
		n += v
	}
	return n
}
