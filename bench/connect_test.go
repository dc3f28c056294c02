package bench

import (
	"encoding/json"
	"fmt"
	"math"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/sluice-io/sluice/agent/datapath"
	"github.com/sluice-io/sluice/test/standin"
	"github.com/sluice-io/sluice/test/testbed"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

func TestMain(m *testing.M) {
	testbed.Main(m, map[string]testbed.Role{"proxy": standin.Main, "connlat": connlatMain, "bulk": bulkMain,
		"httpload": httploadMain, "httpserver": httpserverMain, "delayline": delaylineMain})
}

// pct is the nearest-rank p-quantile (0..1; 1 is the maximum) of
// nanosecond samples: the ceil(p*n)-th smallest.
func pct[T ~int64](xs []T, p float64) time.Duration {
	s := slices.Clone(xs)
	slices.Sort(s)
	i := int(math.Ceil(p*float64(len(s)))) - 1
	return time.Duration(s[max(0, min(len(s)-1, i))])
}

// scale is one datapath size: selected workloads in the map (and, for
// nftables, per-pod rules) and exclusion CIDRs (nftables: return rules
// evaluated first).
type scale struct{ Workloads, Exclusions int }

var scales = []scale{{1, 10}, {1000, 10}, {10000, 10}, {1, 1000}, {1000, 1000}, {10000, 1000}}

// connectRow is one variant at one scale.
type connectRow struct {
	Workloads  int     `json:"workloads"`
	Exclusions int     `json:"exclusions"`
	Variant    string  `json:"variant"`
	N          int     `json:"n"`
	P50ns      int64   `json:"connect_p50_ns"`
	P99ns      int64   `json:"connect_p99_ns"`
	ConnPerSec float64 `json:"connections_per_second"`
	P50xDirect float64 `json:"p50_ratio_to_direct"`
	P99xDirect float64 `json:"p99_ratio_to_direct"`
	// The ratios to the no-programs variant (ebpf, direct, unselected).
	P50xNone float64 `json:"p50_ratio_to_no_programs,omitempty"`
	P99xNone float64 `json:"p99_ratio_to_no_programs,omitempty"`
	CPSxNone float64 `json:"cps_ratio_to_no_programs,omitempty"`
	// Lost: redirected connections whose original destination the proxy
	// could not recover (eBPF rows only).
	Lost uint64 `json:"original_destinations_lost,omitempty"`
	// BestPeer is the alternative with the lowest p50 at this scale; the
	// ratios below are to it (eBPF rows only).
	BestPeer string  `json:"best_peer,omitempty"`
	P50xBest float64 `json:"p50_ratio_to_best_peer,omitempty"`
	P99xBest float64 `json:"p99_ratio_to_best_peer,omitempty"`
	CPSxBest float64 `json:"cps_ratio_to_best_peer,omitempty"`
}

// TestPrivilegedBenchConnect measures connection setup from one selected pod
// to a stand-in proxy that asks SO_ORIGINAL_DST and closes, at each scale,
// against the best-configured alternatives:
//
//   - ebpf: the pod dials 203.0.113.7:8080; connect4 rewrites it to the
//     proxy; no conntrack anywhere;
//   - ebpf-conntrack: the same while the node's namespace runs conntrack (an
//     nftables nat table is loaded, as kube-proxy's is on a real node);
//   - ebpf-notrack: the same with the proxy's address and port exempt from
//     conntrack in the raw hooks (notrackRuleset): what the exemption would
//     save, measured; sluice does not install such rules;
//   - nftables-set: the pod dials 203.0.113.8:8080 (excluded from the eBPF
//     redirect); in the node's nat prerouting chain the exclusions are one
//     interval set and the selected pods one address set, so one DNAT rule
//     matches in O(1) at any scale: how an nftables user would write it;
//   - nftables-linear: one DNAT rule per pod and one return rule per
//     exclusion, the measured pod's last: a strawman, kept and labelled;
//   - iptables-sidecar: the sidecar way: an iptables REDIRECT in the pod's
//     own namespace (exclusions as return rules first) to a proxy listening
//     on the pod's loopback, SO_ORIGINAL_DST answered by the pod's conntrack;
//     a per-pod ruleset, so the number of pods does not matter to it;
//   - direct, direct-conntrack: the pod dials the proxy address itself, the
//     floor, without and with the node's conntrack;
//   - no-programs: a client whose cgroup is outside the datapath's attach
//     point dials a second stand-in proxy, also outside it, on the node's
//     address: the bare proxy hop with no sluice program on either side
//     (issue 17's goal 1 is ebpf within 1.05x of it);
//   - unselected: a client in a cgroup under the attach point that no
//     workload selects dials that second proxy: what the programs cost a
//     pod sluice does not redirect (the goal: within 1.01x).
//
// Rounds alternate the phases (no table; the set table; the linear table;
// the sidecar rules), five times per scale, 1,000 connections per variant
// per round, the variants of a phase rotated within it.
func TestPrivilegedBenchConnect(t *testing.T) {
	outDir := benchOut(t)
	nft, iptables := tool(t, "nft"), tool(t, "iptables")
	e := setupBench(t, "-sink")
	tb, pod, dp, cgid, proxy := e.tb, e.pod, e.dp, e.cgid, e.proxy
	t.Cleanup(func() {
		nftDelete(nft, tb.Node)
		exec.Command("ip", "netns", "exec", pod.Netns.Name, nft, "flush", "ruleset").Run()
	})
	// The sidecar's proxy, on the pod's loopback, in the proxy's cgroup.
	nh := tb.Node.NetlinkHandle(t)
	sidecar := "127.0.0.1:15001"
	testbed.StartDaemon(t, tb.ProxyCgroup, pod.Netns, "proxy", "-sink", "-listen", sidecar)
	// The baselines: a cgroup beside the attach point (no program runs in
	// it) with the bare proxy, and an unselected cgroup under it. The bare
	// proxy listens on one of the node's own addresses, not the proxy's:
	// to an unselected pod it is any destination (the programs treat
	// connections to the proxy address specially, on every port).
	detached, bare := startBareProxy(t, tb)
	unselected := tb.Root.Child(t, "unselected")

	const perRound, rounds = 1000, 5
	ebpfDst, nftDst, sidecarDst := "203.0.113.7:8080", "203.0.113.8:8080", "203.0.113.9:8080"
	var rows []connectRow
	// Where the time goes, at the first scale, before the others.
	applyScale(t, dp, cgid, scales[0])
	timeGoes := whereTheTimeGoes(t, e, ebpfDst, unselected, bare)
	// The scales are measured with the number of workloads growing only,
	// and applyScale touches only the entries that change: deselecting a
	// cgroup scans the workloads map for another one with its workload id,
	// so taking 10,000 away one by one is quadratic, and it took most of
	// the benchmark's time. The report keeps the order of scales.
	order := slices.Clone(scales)
	slices.SortStableFunc(order, func(a, b scale) int { return a.Workloads - b.Workloads })
	for _, sc := range order {
		applyScale(t, dp, cgid, sc)
		linear, set := nftRuleset(sc, netip.MustParseAddrPort(nftDst), pod.IPv4), nftSetRuleset(sc, pod.IPv4)
		side := sidecarRules(sc)

		samples := Latencies{}
		lost := map[string]uint64{} // phase -> redirected connections whose original destination was not answered
		add := func(l Latencies) {
			for k, v := range l {
				samples[k] = append(samples[k], v...)
			}
		}
		// A phase runs its variants; redirected connections whose
		// original destination was not answered are counted per phase.
		spent := map[string]time.Duration{}
		phaseIn := func(name string, cg *testbed.Cgroup, variants ...string) {
			defer func(begin time.Time) { spent[name] += time.Since(begin) }(time.Now())
			c0 := mustCounters(t, dp)
			add(connlat(t, cg, pod.Netns, perRound, variants...))
			// The proxy asks about a connection after the client is done
			// with it (each is reset right after connect()), so it may still
			// be catching up when the client exits: what it has not asked
			// within a second is counted as lost.
			var c1 datapath.Counters
			for deadline := time.Now().Add(time.Second); ; time.Sleep(10 * time.Millisecond) {
				c1 = mustCounters(t, dp)
				if c1.OrigDstAnswered-c0.OrigDstAnswered >= c1.RedirectedV4-c0.RedirectedV4 || time.Now().After(deadline) {
					break
				}
			}
			if red, ans := c1.RedirectedV4-c0.RedirectedV4, c1.OrigDstAnswered-c0.OrigDstAnswered; ans < red {
				// Reported (the Lost column), not hidden: see
				// docs/performance.md and TestPrivilegedBenchConntrackClash.
				lost[name] += red - ans
				t.Logf("%d workloads, %d exclusions, %s: %d connections redirected, %d original destinations answered",
					sc.Workloads, sc.Exclusions, name, red, ans)
			}
		}
		phase := func(name string, variants ...string) { phaseIn(name, pod.Cgroup, variants...) }
		// Conntrack entries of NATed connections outlive their table
		// (TIME_WAIT, 120 s); each phase starts without them.
		flush := func() {
			if err := nh.ConntrackTableFlush(netlink.ConntrackTable); err != nil {
				t.Fatalf("flush conntrack: %v", err)
			}
		}
		begin := time.Now()
		for r := 0; r < rounds; r++ {
			phase("no table", "ebpf="+ebpfDst, "direct="+proxy)
			phaseIn("no table, unselected", unselected, "unselected="+bare)
			phaseIn("no table, no programs", detached, "no-programs="+bare)
			// eBPF with conntrack on. Redirected connections whose tuple
			// clashes in conntrack get their port moved by NAT
			// (TestPrivilegedBenchConntrackClash); the Lost column shows
			// whether any original destination was lost to it.
			nftLoad(t, nft, tb.Node, set)
			phase("set table, eBPF", "ebpf-conntrack="+ebpfDst, "direct-conntrack="+proxy)
			phase("set table", "nftables-set="+nftDst)
			// What would close conntrack's cost: redirected connections
			// exempt from it (not with the set table's DNAT variant: the
			// proxy's replies to DNATed connections must be tracked).
			nftLoad(t, nft, tb.Node, notrackRuleset)
			phase("set table, notrack", "ebpf-notrack="+ebpfDst)
			must(t, nftDeleteTable(nft, tb.Node, "egbench_raw"))
			must(t, nftDelete(nft, tb.Node))
			flush()
			nftLoad(t, nft, tb.Node, linear)
			phase("linear table", "nftables-linear="+nftDst)
			must(t, nftDelete(nft, tb.Node))
			flush()
			iptablesLoad(t, iptables, pod.Netns, side)
			phase("sidecar", "iptables-sidecar="+sidecarDst)
			flushSidecar(t, nft, pod.Netns)
		}
		t.Logf("%d workloads, %d exclusions: %v (phases: %v)", sc.Workloads, sc.Exclusions, time.Since(begin).Round(time.Millisecond), spent)
		base := samples["direct"]
		peers := []string{"nftables-set", "nftables-linear", "iptables-sidecar"}
		best := peers[0]
		for _, p := range peers {
			if pct(samples[p], 0.5) < pct(samples[best], 0.5) {
				best = p
			}
		}
		none := samples["no-programs"]
		for _, v := range []string{"ebpf", "ebpf-conntrack", "ebpf-notrack", "nftables-set", "nftables-linear", "iptables-sidecar", "direct", "direct-conntrack", "unselected", "no-programs"} {
			xs := samples[v]
			row := connectRow{Workloads: sc.Workloads, Exclusions: sc.Exclusions, Variant: v, N: len(xs),
				P50ns: int64(pct(xs, 0.5)), P99ns: int64(pct(xs, 0.99)), ConnPerSec: perSecond(samples[v+"/cycle"]),
				P50xDirect: ratio(xs, base, 0.5), P99xDirect: ratio(xs, base, 0.99)}
			if v == "ebpf" || v == "direct" || v == "unselected" {
				row.P50xNone, row.P99xNone = ratio(xs, none, 0.5), ratio(xs, none, 0.99)
				row.CPSxNone = row.ConnPerSec / perSecond(samples["no-programs/cycle"])
			}
			switch v {
			case "ebpf":
				row.Lost = lost["no table"]
			case "ebpf-conntrack":
				row.Lost = lost["set table, eBPF"]
			case "ebpf-notrack":
				row.Lost = lost["set table, notrack"]
			}
			if strings.HasPrefix(v, "ebpf") {
				row.BestPeer = best
				row.P50xBest, row.P99xBest = ratio(xs, samples[best], 0.5), ratio(xs, samples[best], 0.99)
				row.CPSxBest = row.ConnPerSec / perSecond(samples[best+"/cycle"])
			}
			rows = append(rows, row)
		}
	}
	c, err := dp.Counters()
	must(t, err)
	if want := uint64(len(scales) * rounds * perRound * 2); c.RedirectedV4 < want {
		t.Fatalf("benchmark did not measure redirects: %+v", c)
	}
	slices.SortStableFunc(rows, func(a, b connectRow) int {
		return slices.Index(scales, scale{a.Workloads, a.Exclusions}) - slices.Index(scales, scale{b.Workloads, b.Exclusions})
	})
	md := connectReport(rows) + timeGoes
	t.Log("\n" + md)
	must(t, os.WriteFile(filepath.Join(outDir, "connect.md"), []byte(md), 0o644))
	writeJSON(t, filepath.Join(outDir, "connect.json"), rows)
}

// nftSetRuleset is the redirect as an nftables user writes it at scale sc:
// the exclusions one interval set, the selected pods one address set, one
// rule each: a lookup per connection whatever the number of pods.
// The measured pods are in the set beside made-up ones, sc.Workloads in all.
func nftSetRuleset(sc scale, measured ...netip.Addr) string {
	var excl, pods []string
	for i := 0; i < sc.Exclusions; i++ {
		excl = append(excl, fmt.Sprintf("198.18.%d.%d", (i>>8)&0xff, i&0xff))
	}
	for i := len(measured); i < sc.Workloads; i++ {
		pods = append(pods, fmt.Sprintf("10.%d.%d.%d", 100+i>>16, (i>>8)&0xff, i&0xff))
	}
	for _, p := range measured {
		pods = append(pods, p.String())
	}
	var b strings.Builder
	fmt.Fprintf(&b, "table ip egbench {\n\tset excl { type ipv4_addr; flags interval; elements = { %s } }\n", strings.Join(excl, ", "))
	fmt.Fprintf(&b, "\tset pods { type ipv4_addr; elements = { %s } }\n", strings.Join(pods, ", "))
	b.WriteString("\tchain prerouting {\n\t\ttype nat hook prerouting priority dstnat; policy accept;\n")
	b.WriteString("\t\tip daddr @excl return\n")
	fmt.Fprintf(&b, "\t\tip saddr @pods tcp dport != %d dnat to %s:%d\n", datapath.DefaultProxyPort, datapath.DefaultProxyIPv4, datapath.DefaultProxyPort)
	b.WriteString("\t}\n}\n")
	return b.String()
}

// sidecarMark is the SO_MARK of the sidecar's own upstream sockets, which
// its REDIRECT rule leaves alone (Istio's rules skip its proxy's uid; a mark
// is the same one match).
const sidecarMark = 1337

// sidecarRules are the sidecar's iptables-restore input for the pod's
// namespace: the sidecar's own connections and the exclusions return first,
// then TCP to the sidecar variant's destination (203.0.113.9) is redirected
// to the proxy on the pod's loopback.
func sidecarRules(sc scale) string {
	var b strings.Builder
	b.WriteString("*nat\n:OUTPUT ACCEPT [0:0]\n")
	fmt.Fprintf(&b, "-A OUTPUT -m mark --mark %d -j RETURN\n", sidecarMark)
	for i := 0; i < sc.Exclusions; i++ {
		fmt.Fprintf(&b, "-A OUTPUT -d 198.18.%d.%d/32 -j RETURN\n", (i>>8)&0xff, i&0xff)
	}
	b.WriteString("-A OUTPUT -d 127.0.0.0/8 -j RETURN\n")
	b.WriteString("-A OUTPUT -p tcp -d 203.0.113.9/32 -j REDIRECT --to-ports 15001\n")
	b.WriteString("COMMIT\n")
	return b.String()
}

func iptablesLoad(t *testing.T, iptables string, ns *testbed.Netns, rules string) {
	t.Helper()
	cmd := exec.Command("ip", "netns", "exec", ns.Name, iptables+"-restore")
	cmd.Stdin = strings.NewReader(rules)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("iptables-restore: %v\n%s", err, out)
	}
}

// benchEnv is a testbed with the datapath installed on its root cgroup,
// its pods selected, and the stand-in proxy on the node's proxy address.
type benchEnv struct {
	tb *testbed.Testbed
	// pod is the first pod, cgid its cgroup id.
	pod   *testbed.Pod
	dp    *datapath.Datapath
	cgid  uint64
	proxy string
	// pinPath is where the datapath is pinned (for run-time statistics).
	pinPath string
}

// setupBench is setupBenchPods with one pod.
func setupBench(t *testing.T, proxyArgs ...string) *benchEnv {
	return setupBenchPods(t, 1, proxyArgs...)
}

// setupBenchPods makes a testbed of pods pods, every one selected (workload
// ids 1, 2, ...), and starts the stand-in proxy with proxyArgs.
func setupBenchPods(t *testing.T, pods int, proxyArgs ...string) *benchEnv {
	t.Helper()
	tb := testbed.New(t, pods)
	if err := datapath.EnsureBPFFS(datapath.DefaultBPFFS); err != nil {
		t.Fatal(err)
	}
	cfg := datapath.Config{CgroupPath: tb.Root.Path, PinPath: filepath.Join(datapath.DefaultBPFFS, "sluice-bench-"+tb.ID)}
	dp, err := datapath.Open(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dp.Close(); datapath.Uninstall(cfg.PinPath) })
	must(t, dp.SetProxy(datapath.Proxy{IPv4: datapath.DefaultProxyIPv4, Port: datapath.DefaultProxyPort}))
	must(t, dp.SetReady(true))
	var first uint64
	for i, p := range tb.Pods {
		cgid, err := datapath.CgroupID(p.Cgroup.Path)
		must(t, err)
		must(t, dp.SetWorkload(cgid, datapath.Workload{ID: uint32(i + 1)}))
		if i == 0 {
			first = cgid
		}
	}
	tb.Node.IP(t, "addr", "add", datapath.DefaultProxyIPv4.String()+"/32", "dev", "lo")
	proxy := fmt.Sprintf("%s:%d", datapath.DefaultProxyIPv4, datapath.DefaultProxyPort)
	testbed.StartDaemon(t, tb.ProxyCgroup, tb.Node, "proxy", append(proxyArgs, "-listen", proxy)...)
	must(t, dp.SetExclusions(datapath.DefaultExclusions))
	return &benchEnv{tb: tb, pod: tb.Pods[0], dp: dp, cgid: first, proxy: proxy, pinPath: cfg.PinPath}
}

// flushSidecar removes the sidecar variant's rules from a pod's namespace.
func flushSidecar(t *testing.T, nft string, ns *testbed.Netns) {
	t.Helper()
	if out, err := exec.Command("ip", "netns", "exec", ns.Name, nft, "flush", "ruleset").CombinedOutput(); err != nil {
		t.Fatalf("flush the sidecar's rules: %v\n%s", err, out)
	}
}

// TestPrivilegedBenchBulk sends 256 MiB per transfer through the eBPF
// redirect and straight to the proxy address, alternating, five times each:
// after connect() the redirected socket is an ordinary socket to the proxy,
// so the ratio should be 1 within noise.
func TestPrivilegedBenchBulk(t *testing.T) {
	outDir := benchOut(t)
	e := setupBench(t, "-drain")
	out := testbed.Run(t, 5*time.Minute, e.pod.Cgroup, e.pod.Netns, "bulk", "-mib", "256", "-rounds", "5",
		"ebpf=203.0.113.7:8080", "direct="+e.proxy)
	var mbps map[string][]float64
	if err := json.Unmarshal(out, &mbps); err != nil {
		t.Fatal(err)
	}
	med := func(xs []float64) float64 { s := slices.Clone(xs); slices.Sort(s); return s[len(s)/2] }
	type bulkRow struct {
		Variant       string    `json:"variant"`
		MiBps         []float64 `json:"mib_per_second"`
		MedianMiBps   float64   `json:"median_mib_per_second"`
		RatioToDirect float64   `json:"median_ratio_to_direct"`
	}
	var rows []bulkRow
	for _, v := range []string{"ebpf", "direct"} {
		rows = append(rows, bulkRow{v, mbps[v], med(mbps[v]), med(mbps[v]) / med(mbps["direct"])})
	}
	var md strings.Builder
	fmt.Fprintf(&md, "# Bulk transfer: through the redirect vs straight to the proxy\n\n5 transfers of 256 MiB per variant, alternating, pod to stand-in proxy (which reads and discards).\n\n")
	fmt.Fprintf(&md, "| variant | median MiB/s | runs (MiB/s) | median / direct |\n|---|---|---|---|\n")
	for _, r := range rows {
		fmt.Fprintf(&md, "| %s | %.0f | %.0f | %.3f |\n", r.Variant, r.MedianMiBps, r.MiBps, r.RatioToDirect)
	}
	t.Log("\n" + md.String())
	if err := os.WriteFile(filepath.Join(outDir, "bulk.md"), []byte(md.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	writeJSON(t, filepath.Join(outDir, "bulk.json"), rows)
}

// applyScale puts sc.Workloads entries in the workloads map (the pod's plus
// fake cgroup ids) and sc.Exclusions CIDRs, one of them the nftables
// variant's destination, so that eBPF leaves it to nftables.
func applyScale(t *testing.T, dp *datapath.Datapath, cgid uint64, sc scale) {
	t.Helper()
	fake := func(i int) uint64 { return uint64(1)<<40 + uint64(i) }
	ws, err := dp.Workloads()
	must(t, err)
	for id := range ws {
		if id != cgid && id-fake(0) >= uint64(sc.Workloads) {
			must(t, dp.DeleteWorkload(id))
		}
	}
	for i := 1; i < sc.Workloads; i++ {
		if _, ok := ws[fake(i)]; !ok {
			must(t, dp.SetWorkload(fake(i), datapath.Workload{ID: uint32(i + 1)}))
		}
	}
	applyExclusions(t, dp, sc)
}

// applyExclusions sets sc.Exclusions CIDRs beside the defaults and the
// nftables and sidecar variants' destinations (203.0.113.8 and .9), which
// eBPF leaves to them.
func applyExclusions(t *testing.T, dp *datapath.Datapath, sc scale) {
	t.Helper()
	excl := append(slices.Clone(datapath.DefaultExclusions), netip.MustParsePrefix("203.0.113.8/32"), netip.MustParsePrefix("203.0.113.9/32"))
	for i := 1; i < sc.Exclusions; i++ {
		excl = append(excl, netip.PrefixFrom(netip.AddrFrom4([4]byte{198, 18, byte(i >> 8), byte(i)}), 32))
	}
	must(t, dp.SetExclusions(excl))
}

// benchOut is where a benchmark writes its report; outside `make bench`
// (SLUICE_BENCH_OUT unset) the benchmark is skipped.
func benchOut(t *testing.T) string {
	t.Helper()
	out := os.Getenv("SLUICE_BENCH_OUT")
	if out == "" {
		t.Skip("benchmark: run with `make bench`")
	}
	return out
}

// tool is the path of a program a peer variant needs (make bench installs
// nftables and iptables).
func tool(t *testing.T, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		t.Fatalf("%s is needed: make bench installs it", name)
	}
	return p
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// bareProxyPort is the port of the no-programs variant's proxy (on the
// node's address, outside the attach point).
const bareProxyPort = 15099

// startBareProxy starts the no-programs baseline: a stand-in proxy that
// sinks connections, on one of the node's addresses, in a cgroup beside
// the datapath's attach point (no sluice program runs in it), which
// clients of the baseline join too. It returns the cgroup and the address.
func startBareProxy(t *testing.T, tb *testbed.Testbed) (*testbed.Cgroup, string) {
	t.Helper()
	detached := testbed.NewRootCgroup(t, "sluice-test-"+tb.ID+"-detached")
	bare := fmt.Sprintf("%s:%d", testbed.NodeV4, bareProxyPort)
	testbed.StartDaemon(t, detached, tb.Node, "proxy", "-sink", "-listen", bare)
	return detached, bare
}

// connlat runs the connlat role in cgroup cg and namespace ns.
func connlat(t *testing.T, cg *testbed.Cgroup, ns *testbed.Netns, n int, variants ...string) Latencies {
	t.Helper()
	out := testbed.Run(t, 5*time.Minute, cg, ns, "connlat", append([]string{"-n", fmt.Sprint(n)}, variants...)...)
	var l Latencies
	if err := json.Unmarshal(out, &l); err != nil {
		t.Fatal(err)
	}
	return l
}

// nftRuleset is the linear per-pod redirect at scale sc (a strawman: see
// nftSetRuleset): exclusion CIDRs return first, then one DNAT rule per
// selected pod, sc.Workloads in all, the measured pods' last (the worst
// case of a linear chain), theirs for connections to dst.
func nftRuleset(sc scale, dst netip.AddrPort, measured ...netip.Addr) string {
	var b strings.Builder
	b.WriteString("table ip egbench {\n\tchain prerouting {\n\t\ttype nat hook prerouting priority dstnat; policy accept;\n")
	for i := 0; i < sc.Exclusions; i++ {
		fmt.Fprintf(&b, "\t\tip daddr 198.18.%d.%d return\n", (i>>8)&0xff, i&0xff)
	}
	for i := len(measured); i < sc.Workloads; i++ {
		fmt.Fprintf(&b, "\t\tip saddr 10.%d.%d.%d tcp dport != 15001 dnat to %s:%d\n", 100+i>>16, (i>>8)&0xff, i&0xff, datapath.DefaultProxyIPv4, datapath.DefaultProxyPort)
	}
	for _, p := range measured {
		fmt.Fprintf(&b, "\t\tip saddr %s ip daddr %s tcp dport %d dnat to %s:%d\n", p, dst.Addr(), dst.Port(), datapath.DefaultProxyIPv4, datapath.DefaultProxyPort)
	}
	b.WriteString("\t}\n}\n")
	return b.String()
}

func nftLoad(t *testing.T, nft string, ns *testbed.Netns, ruleset string) {
	t.Helper()
	cmd := exec.Command("ip", "netns", "exec", ns.Name, nft, "-f", "-")
	cmd.Stdin = strings.NewReader(ruleset)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("nft -f: %v\n%s", err, out)
	}
}

// nftDelete removes the benchmark's nftables table from ns.
func nftDelete(nft string, ns *testbed.Netns) error { return nftDeleteTable(nft, ns, "egbench") }

func nftDeleteTable(nft string, ns *testbed.Netns, table string) error {
	return exec.Command("ip", "netns", "exec", ns.Name, nft, "delete", "table", "ip", table).Run()
}

// notrackRuleset exempts connections to and from the proxy's address and
// port from conntrack, in the raw hooks (before conntrack sees a packet):
// how Cilium spares its proxy's traffic. Loaded beside the set table, it
// measures what the exemption would save redirected connections.
var notrackRuleset = fmt.Sprintf(`table ip egbench_raw {
	chain prerouting {
		type filter hook prerouting priority raw; policy accept;
		ip daddr %[1]s tcp dport %[2]d notrack
	}
	chain output {
		type filter hook output priority raw; policy accept;
		ip saddr %[1]s tcp sport %[2]d notrack
	}
}
`, datapath.DefaultProxyIPv4, datapath.DefaultProxyPort)

func ratio(xs, base []int64, p float64) float64 {
	return float64(pct(xs, p)) / float64(pct(base, p))
}

// perSecond is connections per second from socket-to-close cycle times:
// one client, one connection at a time.
func perSecond(cycles []int64) float64 {
	var sum int64
	for _, c := range cycles {
		sum += c
	}
	if sum == 0 {
		return 0
	}
	return float64(len(cycles)) / time.Duration(sum).Seconds()
}

func writeJSON(t *testing.T, path string, v any) {
	t.Helper()
	js, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, js, 0o644); err != nil {
		t.Fatal(err)
	}
}

func connectReport(rows []connectRow) string {
	var md strings.Builder
	fmt.Fprintf(&md, "# Connection setup: eBPF redirect vs nftables (sets; linear) vs an iptables sidecar vs no redirect\n\n")
	fmt.Fprintf(&md, "%s, %s/%s, %d CPUs, kernel %s. One client, one connection at a time, through the stand-in proxy (asks SO_ORIGINAL_DST, closes). The best peer is the alternative with the lowest p50 at that scale.\n\n",
		time.Now().UTC().Format(time.DateOnly), runtime.GOOS, runtime.GOARCH, runtime.NumCPU(), kernel())
	fmt.Fprintf(&md, "| workloads | exclusions | variant | n | connect p50 | connect p99 | conn/s | p50 / direct | p99 / direct | best peer | p50 / best peer | p99 / best peer | conn/s / best peer | orig. dst lost |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
	for _, r := range rows {
		nftCols := "| | | | | "
		if r.BestPeer != "" {
			nftCols = fmt.Sprintf("| %s | **%.3f** | %.3f | %.3f | %d ", r.BestPeer, r.P50xBest, r.P99xBest, r.CPSxBest, r.Lost)
		}
		fmt.Fprintf(&md, "| %d | %d | %s | %d | %v | %v | %.0f | %.3f | %.3f %s|\n", r.Workloads, r.Exclusions, r.Variant, r.N,
			time.Duration(r.P50ns), time.Duration(r.P99ns), r.ConnPerSec, r.P50xDirect, r.P99xDirect, nftCols)
	}
	fmt.Fprintf(&md, "\n## Against no programs attached\n\n")
	fmt.Fprintf(&md, "The same run. no-programs: a client in a cgroup outside the datapath's attach point dials a second stand-in proxy, also outside it (no sluice program on either side). unselected: a client in a cgroup under the attach point that no workload selects dials that proxy. Issue 17's goal 1: ebpf within 1.05x of no-programs (p50 and p99), unselected within 1.01x.\n\n")
	fmt.Fprintf(&md, "| workloads | exclusions | variant | connect p50 | connect p99 | p50 / no programs | p99 / no programs | conn/s / no programs |\n|---|---|---|---|---|---|---|---|\n")
	for _, r := range rows {
		if r.P50xNone == 0 && r.Variant != "no-programs" {
			continue
		}
		ratios := "| | | "
		if r.Variant != "no-programs" {
			ratios = fmt.Sprintf("| **%.3f** | %.3f | %.3f ", r.P50xNone, r.P99xNone, r.CPSxNone)
		}
		fmt.Fprintf(&md, "| %d | %d | %s | %v | %v %s|\n", r.Workloads, r.Exclusions, r.Variant, time.Duration(r.P50ns), time.Duration(r.P99ns), ratios)
	}
	return md.String()
}

func kernel() string {
	b, err := os.ReadFile("/proc/sys/kernel/osrelease")
	if err != nil {
		return "unknown"
	}
	return strings.TrimSpace(string(b))
}

// programStats reads each attached program's run count and total run time
// (kernel.bpf_stats_enabled must be on).
func programStats(t *testing.T, pinPath string) map[string]*ebpf.ProgramStats {
	t.Helper()
	out := map[string]*ebpf.ProgramStats{}
	for _, p := range datapath.Programs(pinPath) {
		if p.Err != nil {
			t.Fatal(p.Err)
		}
		prog, err := ebpf.NewProgramFromID(p.ProgramID)
		if err != nil {
			t.Fatal(err)
		}
		st, err := prog.Stats()
		prog.Close()
		if err != nil {
			t.Fatal(err)
		}
		out[p.Name] = st
	}
	return out
}

// whereTheTimeGoes runs 2,000 redirected and then 2,000 direct connects with
// the kernel's BPF run-time statistics on (they cost a little themselves,
// so this is separate from the timed comparison) and reports, per program,
// runs and nanoseconds per connection for each: what the redirect adds in
// eBPF, against the p50 difference measured above.
func whereTheTimeGoes(t *testing.T, e *benchEnv, ebpfDst string, unselected *testbed.Cgroup, bare string) string {
	t.Helper()
	stats, err := ebpf.EnableStats(uint32(unix.BPF_STATS_RUN_TIME))
	if err != nil {
		t.Fatalf("enable BPF run-time stats: %v", err)
	}
	defer stats.Close()
	const n = 2000
	per := map[string]map[string][2]float64{} // variant -> program -> {runs, ns} per connection
	for _, v := range []string{"ebpf=" + ebpfDst, "direct=" + e.proxy, "unselected=" + bare} {
		cg := e.pod.Cgroup
		if strings.HasPrefix(v, "unselected=") {
			cg = unselected
		}
		before := programStats(t, e.pinPath)
		connlat(t, cg, e.pod.Netns, n, v)
		after := programStats(t, e.pinPath)
		name, _, _ := strings.Cut(v, "=")
		per[name] = map[string][2]float64{}
		for prog, a := range after {
			b := before[prog]
			per[name][prog] = [2]float64{float64(a.RunCount-b.RunCount) / n, float64(a.Runtime-b.Runtime) / n}
		}
	}
	var md strings.Builder
	fmt.Fprintf(&md, "\n## Where the redirect's time goes\n\n")
	fmt.Fprintf(&md, "Kernel BPF run-time statistics (`kernel.bpf_stats_enabled`) over %d redirected and %d direct connections, per connection (client and proxy sides), and %d connections of an unselected pod to the proxy with no programs (what sluice costs a pod it does not redirect):\n\n", n, n, n)
	fmt.Fprintf(&md, "| program | runs (ebpf) | ns (ebpf) | runs (direct) | ns (direct) | ns added | runs (unselected) | ns (unselected) |\n|---|---|---|---|---|---|---|---|\n")
	var names []string
	for prog := range per["ebpf"] {
		names = append(names, prog)
	}
	slices.Sort(names)
	var total [3]float64
	for _, prog := range names {
		a, b, u := per["ebpf"][prog], per["direct"][prog], per["unselected"][prog]
		total[0] += a[1]
		total[1] += b[1]
		total[2] += u[1]
		fmt.Fprintf(&md, "| %s | %.2f | %.0f | %.2f | %.0f | %+.0f | %.2f | %.0f |\n", prog, a[0], a[1], b[0], b[1], a[1]-b[1], u[0], u[1])
	}
	fmt.Fprintf(&md, "| **all programs** | | %.0f | | %.0f | **%+.0f** | | **%.0f** |\n", total[0], total[1], total[0]-total[1], total[2])
	return md.String()
}
