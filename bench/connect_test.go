package bench

import (
	"encoding/json"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/egressd/egressd/agent/datapath"
	"github.com/egressd/egressd/test/standin"
	"github.com/egressd/egressd/test/testbed"
)

func TestMain(m *testing.M) {
	testbed.Main(m, map[string]testbed.Role{"proxy": standin.Main, "connlat": connlatMain})
}

// pct is the nearest-rank p-quantile (0..1; 1 is the maximum) of
// nanosecond samples: the ceil(p*n)-th smallest.
func pct[T ~int64](xs []T, p float64) time.Duration {
	s := slices.Clone(xs)
	slices.Sort(s)
	i := int(math.Ceil(p*float64(len(s)))) - 1
	return time.Duration(s[max(0, min(len(s)-1, i))])
}

// TestPrivilegedBenchConnect compares, in one process and alternating per
// connection, connect() to an external address that the datapath redirects to
// the proxy against connect() straight to the proxy address (same listener,
// same proxy work, no rewrite), from a selected pod; and the same direct
// connect from an unselected cgroup, where no egressd program does any work.
func TestPrivilegedBenchConnect(t *testing.T) {
	outDir := os.Getenv("EGRESSD_BENCH_OUT")
	if outDir == "" {
		t.Skip("benchmark: run with `make bench`")
	}
	tb := testbed.New(t, 1)
	pod := tb.Pods[0]
	if err := datapath.EnsureBPFFS(datapath.DefaultBPFFS); err != nil {
		t.Fatal(err)
	}
	cfg := datapath.Config{CgroupPath: tb.Root.Path, PinPath: filepath.Join(datapath.DefaultBPFFS, "egressd-bench-"+tb.ID)}
	dp, err := datapath.Open(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dp.Close(); datapath.Uninstall(cfg.PinPath) })
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(dp.SetProxy(datapath.Proxy{IPv4: datapath.DefaultProxyIPv4, Port: datapath.DefaultProxyPort}))
	must(dp.SetExclusions(datapath.DefaultExclusions))
	must(dp.SetReady(true))
	cgid, err := datapath.CgroupID(pod.Cgroup.Path)
	must(err)
	must(dp.SetWorkload(cgid, datapath.Workload{ID: 1}))
	tb.Node.IP(t, "addr", "add", datapath.DefaultProxyIPv4.String()+"/32", "dev", "lo")
	proxy := fmt.Sprintf("%s:%d", datapath.DefaultProxyIPv4, datapath.DefaultProxyPort)
	testbed.StartDaemon(t, tb.ProxyCgroup, tb.Node, "proxy", "-sink", "-listen", proxy)

	const n = 5000
	run := func(cg *testbed.Cgroup, variants ...string) Latencies {
		out := testbed.Run(t, 5*time.Minute, cg, pod.Netns, "connlat", append([]string{"-n", fmt.Sprint(n)}, variants...)...)
		var l Latencies
		must(json.Unmarshal(out, &l))
		return l
	}
	selected := run(pod.Cgroup, "redirected=203.0.113.7:8080", "direct="+proxy)
	unselected := run(tb.Root.Child(t, "unselected"), "unselected="+proxy)
	c, err := dp.Counters()
	must(err)
	if c.RedirectedV4 < n || c.OrigDstAnswered < n {
		t.Fatalf("benchmark did not measure redirects: %+v", c)
	}

	type row struct {
		Variant string  `json:"variant"`
		N       int     `json:"n"`
		P50ns   int64   `json:"p50_ns"`
		P99ns   int64   `json:"p99_ns"`
		P50x    float64 `json:"p50_ratio_to_direct"`
		P99x    float64 `json:"p99_ratio_to_direct"`
	}
	base := selected["direct"]
	var rows []row
	for _, v := range []struct {
		name string
		xs   []int64
	}{{"redirected", selected["redirected"]}, {"direct", base}, {"unselected", unselected["unselected"]}} {
		rows = append(rows, row{v.name, len(v.xs), int64(pct(v.xs, 0.5)), int64(pct(v.xs, 0.99)),
			float64(pct(v.xs, 0.5)) / float64(pct(base, 0.5)), float64(pct(v.xs, 0.99)) / float64(pct(base, 0.99))})
	}
	var md strings.Builder
	fmt.Fprintf(&md, "# connect() cost of the eBPF redirect\n\n%s, %s/%s, %d CPUs, kernel %s\n\n", time.Now().UTC().Format(time.DateOnly), runtime.GOOS, runtime.GOARCH, runtime.NumCPU(), kernel())
	fmt.Fprintf(&md, "%d connects per variant; `redirected` and `direct` alternate in one process.\n\n", n)
	fmt.Fprintf(&md, "| variant | what it does | p50 | p99 | p50 / direct | p99 / direct |\n|---|---|---|---|---|---|\n")
	what := map[string]string{
		"redirected": "selected pod dials 203.0.113.7:8080; connect4 rewrites it to the proxy",
		"direct":     "selected pod dials the proxy address itself (no rewrite)",
		"unselected": "unselected cgroup dials the proxy address",
	}
	for _, r := range rows {
		fmt.Fprintf(&md, "| %s | %s | %v | %v | %.3f | %.3f |\n", r.Variant, what[r.Variant], time.Duration(r.P50ns), time.Duration(r.P99ns), r.P50x, r.P99x)
	}
	t.Log("\n" + md.String())
	must(os.WriteFile(filepath.Join(outDir, "report.md"), []byte(md.String()), 0o644))
	js, _ := json.MarshalIndent(rows, "", "  ")
	must(os.WriteFile(filepath.Join(outDir, "report.json"), js, 0o644))
}

func kernel() string {
	b, err := os.ReadFile("/proc/sys/kernel/osrelease")
	if err != nil {
		return "unknown"
	}
	return strings.TrimSpace(string(b))
}
