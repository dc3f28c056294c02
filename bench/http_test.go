package bench

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/sluice-io/sluice/test/testbed"
	"github.com/vishvananda/netlink"
)

// httpRTT is the emulated round trip between the node and the server
// namespace: a server in a nearby region.
const httpRTT = 10 * time.Millisecond

// httpRow is one variant at one number of client pods.
type httpRow struct {
	Pods     int     `json:"client_pods"`
	Variant  string  `json:"variant"`
	Requests int     `json:"requests"`
	Errors   int     `json:"errors"`
	PerSec   float64 `json:"requests_per_second"`
	P50ns    int64   `json:"p50_ns"`
	P99ns    int64   `json:"p99_ns"`
	// CPU time per request, in nanoseconds, charged to the client pods'
	// cgroups, the proxy's (the node's proxy, or every pod's sidecar) and
	// the server's.
	ClientCPUns float64 `json:"client_cpu_ns_per_request"`
	ProxyCPUns  float64 `json:"proxy_cpu_ns_per_request"`
	ServerCPUns float64 `json:"server_cpu_ns_per_request"`
	// LinkCPUns is the delay line's: the emulated link, with the kernel's
	// receive path of every packet it passes on (charged to the writer).
	LinkCPUns  float64 `json:"link_cpu_ns_per_request"`
	TotalCPUns float64 `json:"total_cpu_ns_per_request"`
	// Ratios to no proxy at all, and (eBPF rows) to the best proxying
	// peer by p50 at this number of pods.
	PerSecxDirect float64 `json:"rps_ratio_to_no_proxy"`
	P50xDirect    float64 `json:"p50_ratio_to_no_proxy"`
	CPUxDirect    float64 `json:"total_cpu_ratio_to_no_proxy"`
	BestPeer      string  `json:"best_peer,omitempty"`
	P50xBest      float64 `json:"p50_ratio_to_best_peer,omitempty"`
	P99xBest      float64 `json:"p99_ratio_to_best_peer,omitempty"`
	PerSecxBest   float64 `json:"rps_ratio_to_best_peer,omitempty"`
	CPUxBest      float64 `json:"cpu_ratio_to_best_peer,omitempty"`
}

// TestPrivilegedBenchHTTP is the end-to-end benchmark: 1, 16 and 64 client
// pods, each making HTTP/1.1 requests one after another, every request on
// a new connection, to a server namespace behind an emulated 10 ms round
// trip, through a forwarding stand-in proxy (recovers the original
// destination, dials it, splices), for each variant of
// TestPrivilegedBenchConnect and with no proxy at all. It reports
// requests/s, p50/p99 request latency, and CPU time per request of the
// client pods, the proxy and the server (each a cgroup's cpu.stat).
//
// The round trip: this kernel has no netem (CONFIG_NET_SCH_NETEM is not
// set), so the node and the server namespace are joined by the delayline
// role, a TUN device in each and every packet passed across 5 ms later,
// instead of their veth.
func TestPrivilegedBenchHTTP(t *testing.T) {
	outDir := benchOut(t)
	nft, iptables := tool(t, "nft"), tool(t, "iptables")
	counts := []int{1, 16, 64}
	const rounds, window = 3, 1500 * time.Millisecond
	// The datapath on the testbed's root cgroup, every pod selected; the
	// node's proxy forwards and records nothing.
	e := setupBenchPods(t, counts[len(counts)-1], "-quiet")
	tb, dp := e.tb, e.dp
	t.Cleanup(func() { nftDelete(nft, tb.Node) })
	var addrs []netip.Addr
	for _, p := range tb.Pods {
		addrs = append(addrs, p.IPv4)
	}
	applyExclusions(t, dp, scale{Exclusions: 10})

	// The server, outside the cgroup the programs attach to, as a server
	// elsewhere is; 203.0.113.9 is the sidecar variant's destination.
	tb.External.IP(t, "addr", "add", "203.0.113.9/32", "dev", "lo")
	serverCg := testbed.NewRootCgroup(t, "sluice-bench-server")
	testbed.StartDaemon(t, serverCg, tb.External, "httpserver", "-listen", "0.0.0.0:80")
	wanCg := testbed.NewRootCgroup(t, "sluice-bench-wan")
	testbed.StartDaemon(t, wanCg, tb.Node, "delayline", "-name", "wan0", "-peer", tb.External.Path(), "-delay", (httpRTT / 2).String())
	for _, ns := range []*testbed.Netns{tb.Node, tb.External} {
		ns.IP(t, "link", "set", "wan0", "up")
	}
	tb.Node.IP(t, "route", "replace", "203.0.113.0/24", "dev", "wan0", "src", testbed.NodeV4.String())
	tb.External.IP(t, "route", "replace", "10.200.0.0/16", "dev", "wan0")
	tb.External.IP(t, "route", "add", testbed.NodeV4.String()+"/32", "dev", "wan0")

	// Every pod's sidecar, in the proxy's cgroup.
	for _, p := range tb.Pods {
		testbed.StartDaemon(t, tb.ProxyCgroup, p.Netns, "proxy", "-quiet", "-upstream-mark", strconv.Itoa(sidecarMark), "-listen", "127.0.0.1:15001")
	}
	nh := tb.Node.NetlinkHandle(t)
	flush := func() {
		if err := nh.ConntrackTableFlush(netlink.ConntrackTable); err != nil {
			t.Fatalf("flush conntrack: %v", err)
		}
	}

	// The round trip as a TCP handshake sees it, straight to the server.
	hs := connlat(t, tb.Pods[0].Cgroup, tb.Pods[0].Netns, 20, "rtt=203.0.113.8:80")["rtt"]
	measuredRTT := pct(hs, 0.5)

	ebpfDst, nftDst, sidecarDst := "203.0.113.7:80", "203.0.113.8:80", "203.0.113.9:80"
	var rows []httpRow
	for _, n := range counts {
		pods := tb.Pods[:n]
		sc := scale{Workloads: n, Exclusions: 10}
		set, linear := nftSetRuleset(sc, addrs[:n]...), nftRuleset(sc, netip.MustParseAddrPort(nftDst), addrs[:n]...)
		side := sidecarRules(sc)
		res := map[string]*httpCell{}
		cell := func(variant, target string) {
			c := res[variant]
			if c == nil {
				c = &httpCell{}
				res[variant] = c
			}
			c.add(t, runHTTP(t, tb, serverCg, wanCg, pods, target, window))
		}
		phases := []func(){
			func() {
				cell("no proxy", nftDst)
				cell("ebpf", ebpfDst)
			},
			func() {
				nftLoad(t, nft, tb.Node, set)
				cell("ebpf-conntrack", ebpfDst)
				cell("nftables-set", nftDst)
				must(t, nftDelete(nft, tb.Node))
				flush()
			},
			func() {
				nftLoad(t, nft, tb.Node, linear)
				cell("nftables-linear", nftDst)
				must(t, nftDelete(nft, tb.Node))
				flush()
			},
			func() {
				for _, p := range pods {
					iptablesLoad(t, iptables, p.Netns, side)
				}
				cell("iptables-sidecar", sidecarDst)
				for _, p := range pods {
					flushSidecar(t, nft, p.Netns)
				}
				flush()
			},
		}
		begin := time.Now()
		for r := 0; r < rounds; r++ {
			// Each round starts with another phase, so that no variant
			// always runs first.
			for i := range phases {
				phases[(r+i)%len(phases)]()
			}
		}
		t.Logf("%d client pods: %d rounds in %v", n, rounds, time.Since(begin).Round(time.Second))
		peers := []string{"nftables-set", "nftables-linear", "iptables-sidecar"}
		best := peers[0]
		for _, p := range peers {
			if pct(res[p].lat, 0.5) < pct(res[best].lat, 0.5) {
				best = p
			}
		}
		base := res["no proxy"]
		for _, v := range []string{"no proxy", "ebpf", "ebpf-conntrack", "nftables-set", "nftables-linear", "iptables-sidecar"} {
			c := res[v]
			if len(c.lat) == 0 || c.errors*100 > len(c.lat) {
				t.Fatalf("%d pods, %s: %d requests answered, %d failed (first: %s)", n, v, len(c.lat), c.errors, c.firstErr)
			}
			row := httpRow{Pods: n, Variant: v, Requests: len(c.lat), Errors: c.errors,
				PerSec: c.perSec(), P50ns: int64(pct(c.lat, 0.5)), P99ns: int64(pct(c.lat, 0.99)),
				ClientCPUns: c.cpuPer(c.client), ProxyCPUns: c.cpuPer(c.proxy), ServerCPUns: c.cpuPer(c.server),
				LinkCPUns: c.cpuPer(c.link), TotalCPUns: c.cpuPer(c.total()), CPUxDirect: c.cpuPer(c.total()) / base.cpuPer(base.total()),
				PerSecxDirect: c.perSec() / base.perSec(), P50xDirect: ratio(c.lat, base.lat, 0.5)}
			if strings.HasPrefix(v, "ebpf") {
				b := res[best]
				row.BestPeer = best
				row.P50xBest, row.P99xBest = ratio(c.lat, b.lat, 0.5), ratio(c.lat, b.lat, 0.99)
				row.PerSecxBest = c.perSec() / b.perSec()
				row.CPUxBest = c.cpuPer(c.total()) / b.cpuPer(b.total())
			}
			rows = append(rows, row)
		}
	}
	md := httpReport(rows, rounds, window, measuredRTT)
	t.Log("\n" + md)
	must(t, os.WriteFile(filepath.Join(outDir, "http.md"), []byte(md), 0o644))
	writeJSON(t, filepath.Join(outDir, "http.json"), rows)
}

// httpCell accumulates one variant's windows at one number of pods.
type httpCell struct {
	lat                         []int64
	errors                      int
	firstErr                    string
	seconds                     float64
	client, proxy, server, link time.Duration
}

func (c *httpCell) total() time.Duration { return c.client + c.proxy + c.server + c.link }

// httpWindow is one window: every client pod's result and the CPU time
// the cgroups used in it.
type httpWindow struct {
	results                     []HTTPResult
	seconds                     float64
	client, proxy, server, link time.Duration
}

func (c *httpCell) add(t *testing.T, w httpWindow) {
	for _, r := range w.results {
		c.lat = append(c.lat, r.Latencies...)
		if r.Errors > 0 && c.errors == 0 {
			c.firstErr = r.FirstErr
		}
		c.errors += r.Errors
	}
	c.seconds += w.seconds
	c.client += w.client
	c.proxy += w.proxy
	c.server += w.server
	c.link += w.link
}

func (c *httpCell) perSec() float64 { return float64(len(c.lat)) / c.seconds }

func (c *httpCell) cpuPer(d time.Duration) float64 {
	return float64(d.Nanoseconds()) / float64(len(c.lat))
}

// runHTTP runs one window: an httpload client in every pod, all started
// at once once every one of them is ready, each making requests to target
// for window; the CPU time of the pods', the proxy's and the server's
// cgroups and the delay line's is read at the start and once the last client has finished.
func runHTTP(t *testing.T, tb *testbed.Testbed, serverCg, wanCg *testbed.Cgroup, pods []*testbed.Pod, target string, window time.Duration) httpWindow {
	t.Helper()
	type client struct {
		cmd   *exec.Cmd
		stdin io.WriteCloser
		out   *bufio.Reader
	}
	var cs []client
	for _, p := range pods {
		cmd := testbed.Command(t, p.Cgroup, p.Netns, "httpload", "-target", target, "-duration", window.String())
		cmd.Stderr = os.Stderr
		stdin, stdout := testbed.StartPiped(t, cmd)
		cs = append(cs, client{cmd, stdin, bufio.NewReader(stdout)})
	}
	for _, c := range cs {
		if line, err := c.out.ReadString('\n'); err != nil || strings.TrimSpace(line) != "READY" {
			t.Fatalf("httpload: %q, %v", line, err)
		}
	}
	start := time.Now().Add(20 * time.Millisecond)
	for _, c := range cs {
		fmt.Fprintln(c.stdin, start.UnixNano())
		c.stdin.Close()
	}
	time.Sleep(time.Until(start))
	cpu := func() (client, proxy, server, link time.Duration) {
		for _, p := range pods {
			client += cgroupCPU(t, p.Cgroup)
		}
		return client, cgroupCPU(t, tb.ProxyCgroup), cgroupCPU(t, serverCg), cgroupCPU(t, wanCg)
	}
	c0, p0, s0, l0 := cpu()
	w := httpWindow{}
	for _, c := range cs {
		var r HTTPResult
		if err := json.NewDecoder(c.out).Decode(&r); err != nil {
			t.Fatalf("httpload result: %v", err)
		}
		if err := c.cmd.Wait(); err != nil {
			t.Fatalf("httpload: %v", err)
		}
		w.results = append(w.results, r)
	}
	c1, p1, s1, l1 := cpu()
	w.seconds = window.Seconds()
	w.client, w.proxy, w.server, w.link = c1-c0, p1-p0, s1-s0, l1-l0
	return w
}

// cgroupCPU is the CPU time a cgroup's processes have used (cpu.stat's
// usage_usec: present on every cgroup v2, with or without the cpu
// controller).
func cgroupCPU(t *testing.T, cg *testbed.Cgroup) time.Duration {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(cg.Path, "cpu.stat"))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "usage_usec "); ok {
			us, err := strconv.ParseInt(v, 10, 64)
			if err != nil {
				t.Fatal(err)
			}
			return time.Duration(us) * time.Microsecond
		}
	}
	t.Fatalf("%s/cpu.stat has no usage_usec", cg.Path)
	return 0
}

func httpReport(rows []httpRow, rounds int, window, rtt time.Duration) string {
	var md strings.Builder
	fmt.Fprintf(&md, "# End to end: HTTP/1.1 requests, a new connection each, through each redirect and with no proxy\n\n")
	fmt.Fprintf(&md, "%s, %s/%s, %d CPUs, kernel %s. Each client pod makes one request after another for %v, %d windows per variant, the variants alternating; a forwarding stand-in proxy (asks SO_ORIGINAL_DST, dials it, splices) on the node, or in every pod for the sidecar; the server (net/http) behind an emulated %v round trip (a TCP handshake to it measured %v). CPU is per request, from the cgroups' cpu.stat: the client pods, the proxy (the node's, or all sidecars), the server, and the link (the delay line, which the kernel also charges the receive path of every packet it passes on); total is their sum. The best peer is the proxying alternative with the lowest p50.\n\n",
		time.Now().UTC().Format(time.DateOnly), runtime.GOOS, runtime.GOARCH, runtime.NumCPU(), kernel(), window, rounds, httpRTT, rtt.Round(10*time.Microsecond))
	fmt.Fprintf(&md, "| client pods | variant | requests | req/s | p50 | p99 | CPU client | CPU proxy | CPU server | CPU link | CPU total | req/s / no proxy | p50 / no proxy | CPU / no proxy | best peer | p50 / best peer | p99 / best peer | req/s / best peer | CPU / best peer |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
	us := func(ns float64) string { return fmt.Sprintf("%.0f µs", ns/1e3) }
	for _, r := range rows {
		peer := "| | | | | "
		if r.BestPeer != "" {
			peer = fmt.Sprintf("| %s | **%.3f** | %.3f | %.3f | %.3f ", r.BestPeer, r.P50xBest, r.P99xBest, r.PerSecxBest, r.CPUxBest)
		}
		fmt.Fprintf(&md, "| %d | %s | %d | %.0f | %v | %v | %s | %s | %s | %s | %s | %.3f | %.3f | %.3f %s|\n", r.Pods, r.Variant, r.Requests, r.PerSec,
			time.Duration(r.P50ns).Round(time.Microsecond), time.Duration(r.P99ns).Round(time.Microsecond),
			us(r.ClientCPUns), us(r.ProxyCPUns), us(r.ServerCPUns), us(r.LinkCPUns), us(r.TotalCPUns), r.PerSecxDirect, r.P50xDirect, r.CPUxDirect, peer)
	}
	return md.String()
}
