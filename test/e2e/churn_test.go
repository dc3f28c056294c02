package e2e

import (
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/sluice-io/sluice/agent"
	"github.com/sluice-io/sluice/agent/datapath"
	"github.com/sluice-io/sluice/test/harness"
	"github.com/sluice-io/sluice/test/testbed"
	"sigs.k8s.io/yaml"
)

// mapSizes counts the pinned datapath's per-workload and in-flight entries.
func mapSizes(t *testing.T, e *harness.Env) (workloads, stats, orig, pending int) {
	t.Helper()
	dp, err := datapath.OpenPinned(e.PinPath)
	if err != nil {
		t.Fatal(err)
	}
	defer dp.Close()
	ws, err := dp.Workloads()
	if err != nil {
		t.Fatal(err)
	}
	st, err := dp.WorkloadStats()
	if err != nil {
		t.Fatal(err)
	}
	orig, pending, err = dp.InFlight()
	if err != nil {
		t.Fatal(err)
	}
	return len(ws), len(st), orig, pending
}

// 1,000 pods appear and disappear (file source) while a selected pod
// streams connections: every connection is redirected throughout, and
// afterwards the maps, the per-workload counters and the xDS listener are
// exactly as before, nothing leaked.
func TestPrivilegedChurn1000Pods(t *testing.T) {
	e := harness.NewEnforcing(t, 1)
	pod := e.TB.Pods[0]
	dst := fmt.Sprintf("%s:%d", testbed.ExternalV4[1], harness.ServerPort)
	base := harness.Workload{Pod: pod, Namespace: "shop", Name: "steady", Mode: "enforce", Allow: dst}
	e.WriteWorkloads(t, base)
	e.StartAgent(t)
	harness.WaitFor(t, "the steady pod selected", 10*time.Second, func() bool {
		st := readStatus(t, e)
		return st.Proxy.Ready && len(st.Workloads) == 1
	})
	time.Sleep(500 * time.Millisecond) // let the first xDS push settle
	baseYAML := e.XDSListenerYAML(t)
	w0, s0, _, _ := mapSizes(t, e)

	// Per connection 3 s rather than 1: the agent rebuilds the xDS of 1,000
	// pods on both cores meanwhile, and an answer that is slow is not an
	// interruption.
	s := startStream(t, pod, 30*time.Second, "tcp4:"+dst, "-timeout", "3s")

	// The 1,000 pods: real cgroups, distinct addresses, half enforce.
	const n = 1000
	doc := agent.WorkloadFile{}
	churn := e.TB.Root.Child(t, "churn")
	for i := range n {
		cg := churn.Child(t, fmt.Sprintf("p%d", i))
		fw := agent.FileWorkload{Namespace: "churn", Name: fmt.Sprintf("p%d", i), Cgroup: cg.Path,
			IPs: []string{fmt.Sprintf("10.201.%d.%d", i/250, i%250+1)}, Labels: map[string]string{}, Annotations: map[string]string{}}
		if i%2 == 1 {
			fw.Labels["sluice.io/mode"] = "enforce"
			fw.Annotations["sluice.io/allow"] = fmt.Sprintf("api%d.example.com:443, 192.0.2.%d/32", i, i%250)
		}
		doc.Workloads = append(doc.Workloads, fw)
	}
	writeDoc := func(ws []agent.FileWorkload) {
		b, err := yaml.Marshal(agent.WorkloadFile{Workloads: ws})
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(e.WorkloadsFile+".tmp", b, 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(e.WorkloadsFile+".tmp", e.WorkloadsFile); err != nil {
			t.Fatal(err)
		}
	}
	steady := agent.FileWorkload{Namespace: "shop", Name: "steady", Cgroup: pod.Cgroup.Path, IPs: []string{pod.IPv4.String(), pod.IPv6.String()},
		Labels: map[string]string{"sluice.io/mode": "enforce"}, Annotations: map[string]string{"sluice.io/allow": dst}}

	start := time.Now()
	writeDoc(append([]agent.FileWorkload{steady}, doc.Workloads...))
	harness.WaitFor(t, "1,001 workloads in the datapath", 60*time.Second, func() bool {
		w, _, _, _ := mapSizes(t, e)
		return w == n+1
	})
	harness.WaitFor(t, "the 1,000 pods in the xDS listener", 60*time.Second, func() bool {
		return strings.Contains(e.XDSListenerYAML(t), "churn/p999")
	})
	up := time.Since(start)
	start = time.Now()
	writeDoc([]agent.FileWorkload{steady})
	harness.WaitFor(t, "back to one workload", 60*time.Second, func() bool {
		w, _, _, _ := mapSizes(t, e)
		return w == 1
	})
	harness.WaitFor(t, "the xDS listener back to its baseline", 30*time.Second, func() bool { return e.XDSListenerYAML(t) == baseYAML })
	down := time.Since(start)

	tl := s.wait(t)
	t.Logf("1,000 pods selected in %v (datapath and xDS), removed in %v; steady pod: %d connections %v", up.Round(time.Millisecond), down.Round(time.Millisecond), len(tl.at), tl.count)
	if tl.count["redirected"] != len(tl.at) {
		t.Errorf("steady pod during the churn: %v, want every connection redirected", tl.count)
		for i, o := range tl.outcome {
			if o != "redirected" {
				t.Logf("  %s at +%v: %s", o, tl.at[i].Sub(s.start).Round(time.Millisecond), tl.errs[i])
			}
		}
	}
	w1, s1, orig, pending := mapSizes(t, e)
	if w1 != w0 || s1 != s0 {
		t.Errorf("after the churn: %d workloads, %d counter entries; before: %d, %d", w1, s1, w0, s0)
	}
	harness.WaitFor(t, "no in-flight entries left", 5*time.Second, func() bool {
		_, _, orig, pending = mapSizes(t, e)
		return orig == 0 && pending == 0
	})
}
