package bench

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sluice-io/sluice/agent/datapath"
	"github.com/sluice-io/sluice/test/testbed"
)

// scopeRow is one variant of the attach-scope benchmark.
type scopeRow struct {
	Variant    string  `json:"variant"`
	N          int     `json:"n"`
	P50ns      int64   `json:"p50_ns"`
	P99ns      int64   `json:"p99_ns"`
	ConnPerSec float64 `json:"conn_per_sec"`
	P50xNone   float64 `json:"p50_x_no_programs"`
	P99xNone   float64 `json:"p99_x_no_programs"`
	CPSxNone   float64 `json:"conn_per_sec_x_no_programs"`
}

// TestPrivilegedBenchScope measures the two attach scopes side by side in
// one run (issue 17's goal 1), against the bare proxy hop with no program
// attached on either side:
//
//   - ebpf / unselected: the node scope, every program on the attach
//     cgroup (the testbed's root): a selected pod redirected, and an
//     unselected cgroup below the attach point dialling the bare proxy;
//   - ebpf-workloads / unselected-workloads: a second datapath in the
//     workloads scope, on cgroups beside the first one's: its client
//     programs on the selected pod's cgroup only, sockops and getsockopt
//     on its own proxy's (a second stand-in proxy on the proxy address,
//     another port), and an unselected cgroup beside them, which runs no
//     program at all;
//   - no-programs: a cgroup beside both dials the bare proxy.
//
// Every client runs in the same pod network namespace; five rounds of
// 1,000 connections per variant, the variants rotated between rounds.
func TestPrivilegedBenchScope(t *testing.T) {
	outDir := benchOut(t)
	e := setupBench(t, "-sink")
	tb, pod := e.tb, e.pod
	unselected := tb.Root.Child(t, "unselected")
	detached, bare := startBareProxy(t, tb)

	scoped := testbed.NewRootCgroup(t, "sluice-test-"+tb.ID+"-scoped")
	scopedProxy, scopedPod, scopedUnsel := scoped.Child(t, "proxy"), scoped.Child(t, "pod"), scoped.Child(t, "unselected")
	cfg := datapath.Config{Scope: datapath.ScopeWorkloads, ProxyCgroupPath: scopedProxy.Path,
		PinPath: filepath.Join(datapath.DefaultBPFFS, "sluice-bench-"+tb.ID+"-scoped")}
	dp, err := datapath.Open(cfg)
	must(t, err)
	t.Cleanup(func() { dp.Close(); datapath.Uninstall(cfg.PinPath) })
	const scopedPort = 15011
	must(t, dp.SetProxy(datapath.Proxy{IPv4: datapath.DefaultProxyIPv4, Port: scopedPort}))
	must(t, dp.SetReady(true))
	must(t, dp.SetExclusions(datapath.DefaultExclusions))
	cgid, err := datapath.CgroupID(scopedPod.Path)
	must(t, err)
	must(t, dp.SetWorkload(cgid, datapath.Workload{ID: 1, CgroupPath: scopedPod.Path}))
	testbed.StartDaemon(t, scopedProxy, tb.Node, "proxy", "-sink", "-listen", fmt.Sprintf("%s:%d", datapath.DefaultProxyIPv4, scopedPort))

	dst := "203.0.113.7:8080"
	type variant struct {
		name string
		cg   *testbed.Cgroup
		dst  string
	}
	variants := []variant{
		{"ebpf", pod.Cgroup, dst},
		{"ebpf-workloads", scopedPod, dst},
		{"unselected", unselected, bare},
		{"unselected-workloads", scopedUnsel, bare},
		{"no-programs", detached, bare},
	}
	const perRound, rounds = 1000, 5
	samples := Latencies{}
	c0, err := dp.Counters()
	must(t, err)
	for r := 0; r < rounds; r++ {
		for i := range variants {
			v := variants[(i+r)%len(variants)]
			for k, xs := range connlat(t, v.cg, pod.Netns, perRound, v.name+"="+v.dst) {
				samples[k] = append(samples[k], xs...)
			}
		}
	}
	c1, err := dp.Counters()
	must(t, err)
	if red := c1.RedirectedV4 - c0.RedirectedV4; red != rounds*perRound {
		t.Fatalf("the workloads scope redirected %d connections, want %d", red, rounds*perRound)
	}
	none := samples["no-programs"]
	var rows []scopeRow
	var md strings.Builder
	fmt.Fprintf(&md, "# Attach scopes against no programs attached\n\n")
	fmt.Fprintf(&md, "Kernel %s. %d rounds of %d connections per variant, rotated; one pod network namespace. ebpf, unselected: the node scope (every program on the attach cgroup). ebpf-workloads, unselected-workloads: a second datapath in the workloads scope (client programs on the selected pod's cgroup, sockops and getsockopt on its proxy's). no-programs: a cgroup beside both. Issue 17's goal 1: ebpf within 1.05x of no-programs (p50 and p99), unselected within 1.01x.\n\n", kernel(), rounds, perRound)
	fmt.Fprintf(&md, "| variant | connect p50 | connect p99 | conn/s | p50 x no-programs | p99 x no-programs | conn/s x no-programs |\n|---|---|---|---|---|---|---|\n")
	for _, v := range variants {
		xs := samples[v.name]
		row := scopeRow{Variant: v.name, N: len(xs), P50ns: int64(pct(xs, 0.5)), P99ns: int64(pct(xs, 0.99)),
			ConnPerSec: perSecond(samples[v.name+"/cycle"]), P50xNone: ratio(xs, none, 0.5), P99xNone: ratio(xs, none, 0.99)}
		row.CPSxNone = row.ConnPerSec / perSecond(samples["no-programs/cycle"])
		rows = append(rows, row)
		fmt.Fprintf(&md, "| %s | %v | %v | %.0f | %.3f | %.3f | %.3f |\n", v.name, pct(xs, 0.5), pct(xs, 0.99), row.ConnPerSec, row.P50xNone, row.P99xNone, row.CPSxNone)
	}
	t.Log("\n" + md.String())
	must(t, os.WriteFile(filepath.Join(outDir, "scope.md"), []byte(md.String()), 0o644))
	writeJSON(t, filepath.Join(outDir, "scope.json"), rows)
}
