package bench

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/sluice-io/sluice/agent/datapath"
	"github.com/sluice-io/sluice/test/harness"
	"github.com/sluice-io/sluice/test/kube"
	"github.com/sluice-io/sluice/test/testbed"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
)

const (
	benchPods    = 250
	labelChanges = 100
)

// TestPrivilegedBenchControlPlane measures the agent against a real API
// server: the time from a pod's label change to its cgroup id appearing
// in (and leaving) the pinned datapath map, over 100 changes, and the
// agent's resident memory with 250 selected pods.
func TestPrivilegedBenchControlPlane(t *testing.T) {
	outDir := benchOut(t)
	e := harness.New(t, 1)
	cluster := kube.Start(t, e.TB.Node)
	c := cluster.Client
	ctx := context.Background()
	if _, err := c.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node-a"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	cluster.InstallCRDs(t)
	besteffort := e.TB.Root.Child(t, "kubepods").Child(t, "besteffort")
	agent := e.StartAgent(t, "--kubeconfig", cluster.Kubeconfig, "--node-name", "node-a",
		"--cgroup-driver", "cgroupfs", "--cgroup-mount", e.TB.Root.Path)
	rssIdle := rssKiB(t, agent.Cmd.Process.Pid)

	// A pod as the kubelet would have it: created, cgroup made, IPs set.
	makePod := func(name string, i int, labels map[string]string) (*testbed.Cgroup, string) {
		ip := netip.AddrFrom4([4]byte{10, 210, byte(i / 250), byte(i%250 + 1)})
		return kube.RunPod(t, c, besteffort, kube.Pod(name, "node-a", labels, nil), ip), name
	}
	dp, err := datapath.OpenPinned(e.PinPath)
	if err != nil {
		t.Fatal(err)
	}
	defer dp.Close()
	selected := func() int {
		ws, err := dp.Workloads()
		if err != nil {
			t.Fatal(err)
		}
		return len(ws)
	}

	start := time.Now()
	for i := range benchPods {
		labels := map[string]string{"sluice.io/redirect": "true", "sluice.io/mode": "enforce"}
		if i == 7 {
			labels["bench"] = "one"
		}
		makePod(fmt.Sprintf("pod-%03d", i), i, labels)
	}
	harness.WaitFor(t, fmt.Sprintf("%d pods selected", benchPods), 120*time.Second, func() bool { return selected() == benchPods })
	all := time.Since(start)
	time.Sleep(2 * time.Second) // let the xDS snapshot and state settle
	rss250 := rssKiB(t, agent.Cmd.Process.Pid)

	probeCg, probe := makePod("probe", benchPods, nil)
	cgid, err := datapath.CgroupID(probeCg.Path)
	if err != nil {
		t.Fatal(err)
	}
	inMap := func() bool {
		ws, err := dp.Workloads()
		if err != nil {
			t.Fatal(err)
		}
		_, ok := ws[cgid]
		return ok
	}
	// change patches the label and waits for the map: it returns the time
	// from the request's start and from the API server's answer (the
	// change committed; what remains is watch delivery and the agent).
	change := func(on bool) (fromRequest, fromCommit time.Duration) {
		patch := `{"metadata":{"labels":{"sluice.io/redirect":null}}}`
		if on {
			patch = `{"metadata":{"labels":{"sluice.io/redirect":"true"}}}`
		}
		t0 := time.Now()
		if _, err := c.CoreV1().Pods("default").Patch(ctx, probe, types.MergePatchType, []byte(patch), metav1.PatchOptions{}); err != nil {
			t.Fatal(err)
		}
		t1 := time.Now()
		for inMap() != on {
			if time.Since(t0) > 10*time.Second {
				t.Fatalf("probe pod's cgroup in map = %v 10s after the label change", !on)
			}
			runtime.Gosched()
		}
		return time.Since(t0), time.Since(t1)
	}
	var on, off, onCommit, offCommit []time.Duration
	for range labelChanges {
		a, b := change(true)
		on, onCommit = append(on, a), append(onCommit, b)
		a, b = change(false)
		off, offCommit = append(off, a), append(offCommit, b)
	}

	policyRows, policyJSON := benchPolicyChanges(t, cluster, filepath.Join(e.Dir, "xds.sock"), 40)
	rssPolicies := rssKiB(t, agent.Cmd.Process.Pid)

	var b strings.Builder
	fmt.Fprintf(&b, "\n# Control plane: a real kube-apiserver, %d selected pods\n\n", benchPods)
	fmt.Fprintf(&b, "The agent (Kubernetes source) against kube-apiserver v1.37.1 and etcd on the same 2-CPU machine.\n")
	fmt.Fprintf(&b, "etcd's data is on tmpfs. Latency runs to the pinned map changing (polled), over %d changes each way,\n", labelChanges)
	fmt.Fprintf(&b, "from the PATCH request's start, and from the API server's answer (watch delivery plus the agent).\n\n")
	fmt.Fprintf(&b, "| measurement | p50 | p99 | max |\n|---|---|---|---|\n")
	row := func(name string, xs []time.Duration) {
		r := func(p float64) time.Duration { return pct(xs, p).Round(10 * time.Microsecond) }
		fmt.Fprintf(&b, "| %s | %v | %v | %v |\n", name, r(0.5), r(0.99), r(1))
	}
	row("label added -> cgroup id in the map, from the request", on)
	row("label added -> cgroup id in the map, from the answer", onCommit)
	row("label removed -> cgroup id gone, from the request", off)
	row("label removed -> cgroup id gone, from the answer", offCommit)
	b.WriteString("\n")
	fmt.Fprintf(&b, "| agent | value |\n|---|---|\n")
	fmt.Fprintf(&b, "| RSS, no pods | %v |\n| RSS, %d selected pods (enforce, deny-all) | %v |\n", rssIdle, benchPods, rss250)
	fmt.Fprintf(&b, "| RSS, %d selected pods and %d policy objects | %v |\n", benchPods, benchPolicies, rssPolicies)
	fmt.Fprintf(&b, "| %d pods created -> all in the map | %v |\n", benchPods, all.Round(time.Millisecond))
	b.WriteString(policyRows)
	if err := os.WriteFile(filepath.Join(outDir, "controlplane.md"), []byte(b.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	q := func(xs []time.Duration) map[string]int64 {
		return map[string]int64{"p50_ns": int64(pct(xs, 0.5)), "p99_ns": int64(pct(xs, 0.99)), "max_ns": int64(pct(xs, 1))}
	}
	writeJSON(t, filepath.Join(outDir, "controlplane.json"), map[string]any{
		"label_changes":                   labelChanges,
		"label_added_from_request":        q(on),
		"label_added_from_answer":         q(onCommit),
		"label_removed_from_request":      q(off),
		"label_removed_from_answer":       q(offCommit),
		"rss_idle_kib":                    rssIdle.RSS,
		"rss_selected_pods_kib":           rss250.RSS,
		"memory_idle":                     rssIdle,
		"memory_selected_pods":            rss250,
		"memory_with_policies":            rssPolicies,
		"selected_pods":                   benchPods,
		"all_pods_in_map_after_create_ns": int64(all),
		"rss_with_policies_kib":           rssPolicies.RSS,
		"policy":                          policyJSON,
	})
	t.Log(b.String())
}

// memKiB is a process's resident memory from /proc/<pid>/status: all of
// it, the anonymous part (heap, stacks: what the agent allocates) and the
// file-backed part (mostly pages of its own binary, shared and
// reclaimable), in KiB.
type memKiB struct {
	RSS  int `json:"rss_kib"`
	Anon int `json:"anon_kib"`
	File int `json:"file_kib"`
}

func (m memKiB) String() string {
	return fmt.Sprintf("%.1f MiB (anonymous %.1f MiB, file-backed %.1f MiB)", float64(m.RSS)/1024, float64(m.Anon)/1024, float64(m.File)/1024)
}

func rssKiB(t *testing.T, pid int) memKiB {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	var m memKiB
	fields := map[string]*int{"VmRSS:": &m.RSS, "RssAnon:": &m.Anon, "RssFile:": &m.File}
	for _, l := range strings.Split(string(b), "\n") {
		for name, dst := range fields {
			if v, ok := strings.CutPrefix(l, name); ok {
				fmt.Sscanf(strings.TrimSpace(v), "%d", dst)
			}
		}
	}
	if m.RSS == 0 {
		t.Fatal("no VmRSS")
	}
	return m
}
