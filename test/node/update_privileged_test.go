package node

import (
	"context"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/sluice-io/sluice/agent/datapath"
	"github.com/sluice-io/sluice/daemonset"
	"github.com/sluice-io/sluice/test/harness"
	"github.com/sluice-io/sluice/test/testbed"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
)

// updateOnNode rolls the DaemonSet as `kubectl rollout restart` does (a
// new template), under a steady stream of connections from the
// fail-closed hostNetwork pod, and lets the real DaemonSet controller,
// scheduler and kubelet carry out the shipped update strategy: the new pod
// surges beside the old one and turns Ready as a standby, the controller
// deletes the old pod, whose agent exits at once while its proxy drains
// (preStop), and the new agent takes the node over on the other proxy
// port. Not one connection of the stream fails or is refused. In the
// workloads attach scope the old pod's cgroup keeps the proxy's programs
// (retired) while its Envoy drains, and the new pod's has them once it
// took the node over.
func updateOnNode(t *testing.T, n *Node, install *daemonset.Install, pinPath, scope string, apps *afterApps) {
	ctx := context.Background()
	ns := install.Namespace.Name
	agents := func() []corev1.Pod {
		ps, err := n.Cluster.Client.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/component=agent"})
		if err != nil {
			t.Fatal(err)
		}
		return ps.Items
	}
	list, err := n.Cluster.Client.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/component=agent"})
	if err != nil {
		t.Fatal(err)
	}
	if len(list.Items) != 1 {
		t.Fatalf("%d agent pods before the update, want 1", len(list.Items))
	}
	old, oldPod := list.Items[0].Name, list.Items[0]
	var newPodObj *corev1.Pod
	var retiredID uint64 // the old pod's cgroup, in the workloads scope
	portBefore := harness.PinnedProxyPort(t, pinPath)
	// A watch, not polling: its events come in the API server's order, so
	// "the new pod turned Ready before the old one was deleted" is read
	// off their order, however close together they are.
	w, err := n.Cluster.Client.CoreV1().Pods(ns).Watch(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/component=agent", ResourceVersion: list.ResourceVersion})
	if err != nil {
		t.Fatal(err)
	}
	defer w.Stop()

	const d = 20 * time.Second
	streamStart, wait := testbed.StartStream(t, apps.hostnet.cg, apps.hostnet.ns, d+30*time.Second,
		"-duration", d.String(), "-interval", "5ms", "-send", "hello", fmt.Sprintf("tcp4:%s:8080", apps.ext.addr))
	time.Sleep(time.Second)

	patch := fmt.Sprintf(`{"spec":{"template":{"metadata":{"annotations":{"sluice.io/restarted-at":%q}}}}}`, time.Now().UTC().Format(time.RFC3339Nano))
	if _, err := n.Cluster.Client.AppsV1().DaemonSets(ns).Patch(ctx, install.DaemonSet.Name, types.StrategicMergePatchType, []byte(patch), metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
	updated := time.Now()
	var surged, standbyReady, oldDeleting, switched time.Time
	var newPod string
	deadline := time.After(60 * time.Second)
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for switched.IsZero() {
		select {
		case ev, ok := <-w.ResultChan():
			if !ok {
				t.Fatal("the pod watch ended")
			}
			p, isPod := ev.Object.(*corev1.Pod)
			if !isPod {
				continue
			}
			switch {
			case p.Name == old:
				if p.DeletionTimestamp != nil && oldDeleting.IsZero() {
					oldDeleting = time.Now()
				}
			case newPod == "" || p.Name == newPod:
				if newPod == "" {
					newPod, surged = p.Name, time.Now()
				}
				newPodObj = p
				if standbyReady.IsZero() && oldDeleting.IsZero() && podReady(p) {
					standbyReady = time.Now()
				}
			}
		case <-tick.C:
			if newPod != "" && harness.PinnedProxyPort(t, pinPath) != portBefore {
				switched = time.Now()
			}
		case <-deadline:
			t.Fatalf("the new pod did not take the node over within 60 s (new pod %q, Ready %v, old deleted %v)", newPod, !standbyReady.IsZero(), !oldDeleting.IsZero())
		}
	}
	if standbyReady.IsZero() {
		t.Errorf("the old pod was deleted before the new one was Ready: the surge did not wait for the standby")
	}
	since := func(at time.Time) string {
		if at.IsZero() {
			return "never"
		}
		return at.Sub(updated).Round(10 * time.Millisecond).String()
	}
	t.Logf("update: new pod %s created +%s, Ready (standby) +%s, old pod %s deleted +%s, datapath switched from port %d to %d +%s",
		newPod, since(surged), since(standbyReady), old, since(oldDeleting), portBefore, harness.PinnedProxyPort(t, pinPath), since(switched))
	if !oldDeleting.IsZero() {
		t.Logf("takeover: %v from the old pod's deletion to the switch", switched.Sub(oldDeleting).Round(10*time.Millisecond))
	}

	if scope == "workloads" {
		ours := harness.OurPrograms(t, pinPath)
		if eff := harness.Effective(t, n.podCgroup(t, newPodObj), ours); !maps.Equal(eff, harness.ProxyRuns) {
			t.Errorf("after the takeover the new pod runs %v, want the proxy's %v", eff, harness.ProxyRuns)
		}
		// The old pod drains for proxy.drainSeconds: its cgroup is
		// still there, and still runs the proxy's programs.
		oldCg := n.podCgroup(t, &oldPod)
		if eff := harness.Effective(t, oldCg, ours); !maps.Equal(eff, harness.ProxyRuns) {
			t.Errorf("while its Envoy drains the old pod runs %v, want the proxy's %v", eff, harness.ProxyRuns)
		}
		id, err := datapath.CgroupID(oldCg)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := os.Stat(filepath.Join(pinPath, "proxies", strconv.FormatUint(id, 10))); err != nil {
			t.Errorf("the old pod's proxy links are not retired: %v", err)
		}
		retiredID = id
	}

	as := wait()
	if len(as) == 0 {
		t.Fatal("the stream made no connections")
	}
	count := map[string]int{}
	var bad []string
	for _, a := range as {
		o := "failed"
		switch {
		case strings.HasPrefix(a.Reply, "peer="):
			o = "served"
		case strings.Contains(a.Err, "operation not permitted"):
			o = "refused"
		}
		count[o]++
		if o != "served" && len(bad) < 10 {
			bad = append(bad, fmt.Sprintf("+%v %s: %s", streamStart.Add(a.At).Sub(updated).Round(time.Millisecond), o, a.Err))
		}
	}
	t.Logf("fail-closed pod across the update: %d connections: %v", len(as), count)
	if count["served"] != len(as) {
		t.Errorf("fail-closed pod across the update: %v, want every connection served; first others (since the update): %v", count, bad)
	}
	if res, from := apps.ext.dial(t, apps.hostnet, 8081); from != "" || res.Reply != "" {
		t.Errorf("after the update the enforce pod's denied port :8081 was reached from %q (reply %q)", from, res.Reply)
	}
	harness.WaitFor(t, "the old pod gone after its drain", 90*time.Second, func() bool {
		for _, p := range agents() {
			if p.Name == old {
				return false
			}
		}
		return true
	})
	t.Logf("old pod gone +%s after the update", since(time.Now()))
	if scope == "workloads" {
		// The kernel detaches the retired links with the old pod's
		// cgroup; the next agent start removes their pins.
		oldID := retiredID
		harness.WaitFor(t, "the old pod's proxy links defunct", 30*time.Second, func() bool {
			for _, p := range datapath.Programs(pinPath) {
				if p.CgroupID == oldID {
					return false
				}
			}
			return true
		})
	}
}

func podReady(p *corev1.Pod) bool {
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady && c.Status == corev1.ConditionTrue {
			return true
		}
	}
	return false
}
