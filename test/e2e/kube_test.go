package e2e

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/sluice-io/sluice/daemonset"
	"github.com/sluice-io/sluice/test/harness"
	"github.com/sluice-io/sluice/test/kube"
	"github.com/sluice-io/sluice/test/testbed"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
)

const nodeName = "node-a"

// TestPrivilegedAgentKubernetes runs the agent against a real API server:
// a labelled pod on this node is redirected once its cgroup exists and its
// address is in the xDS snapshot; a pod on another node and an unlabelled
// pod are not selected; a malformed annotation becomes a Warning Event; an
// agent restart keeps the entries (and redirection goes on meanwhile);
// unlabelling and deleting deselect. The agent authenticates as the
// DaemonSet's service account, with the shipped RBAC.
func TestPrivilegedAgentKubernetes(t *testing.T) {
	e := harness.NewEnforcing(t, 2) // the conformance proxy, executing what the agent serves
	cluster := kube.Start(t, e.TB.Node)
	c := cluster.Client
	ctx := context.Background()
	dst := fmt.Sprintf("%s:%d", testbed.ExternalV4[0], harness.ServerPort)

	for _, n := range []string{nodeName, "node-b"} {
		if _, err := c.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: n}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	// The agent runs as the shipped DaemonSet's service account, so its
	// ClusterRole is shown to be enough for everything below (pods, its
	// node, Events).
	install := installSluice(t, cluster)
	kubeconfig := cluster.KubeconfigFor(t, install.Namespace.Name, install.SA.Name)
	besteffort := e.TB.Root.Child(t, "kubepods").Child(t, "besteffort")
	agentArgs := []string{"--kubeconfig", kubeconfig, "--node-name", nodeName,
		"--cgroup-driver", "cgroupfs", "--cgroup-mount", e.TB.Root.Path}
	agent := e.StartAgent(t, agentArgs...)

	web := kube.RunPod(t, c, besteffort, kube.Pod("web", nodeName,
		map[string]string{"sluice.io/redirect": "true", "sluice.io/mode": "enforce"},
		map[string]string{"sluice.io/allow": dst}), e.TB.Pods[0].IPv4, e.TB.Pods[0].IPv6)
	// Not selected: another node's pod, and an unlabelled pod here.
	if _, err := c.CoreV1().Pods("default").Create(ctx, kube.Pod("elsewhere", "node-b", map[string]string{"sluice.io/redirect": "true"}, nil), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.CoreV1().Pods("default").Create(ctx, kube.Pod("plain", nodeName, nil, nil), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	// Selected, with an annotation that does not parse.
	kube.RunPod(t, c, besteffort, kube.Pod("broken", nodeName,
		map[string]string{"sluice.io/redirect": "true", "sluice.io/mode": "enforce"},
		map[string]string{"sluice.io/allow": "bad_host.example.com"}), e.TB.Pods[1].IPv4, e.TB.Pods[1].IPv6)

	// The agent's state file (names) follows within its 2 s write period.
	names := map[string]string{}
	harness.WaitFor(t, "two workloads selected", 20*time.Second, func() bool {
		clear(names)
		st := readStatus(t, e)
		for _, w := range st.Workloads {
			names[w.Name] = w.FailMode
		}
		_, unnamed := names[""]
		return len(names) == 2 && !unnamed && st.Proxy.Ready
	})
	if names["default/web"] != "closed" || names["default/broken"] != "closed" {
		t.Fatalf("selected %v, want default/web and default/broken, fail-closed", names)
	}

	// The pod's process, in the pod's cgroup and netns, is redirected.
	webRedirected := func() bool {
		t.Helper()
		r := testbed.Dial(t, testbed.Run(t, 30*time.Second, web, e.TB.Pods[0].Netns, "client", "-send", "hello", "tcp4:"+dst))
		if len(r) != 1 {
			t.Fatalf("web's connection: %+v", r)
		}
		if strings.Contains(r[0].Err, "operation not permitted") {
			return false // fail-closed until the proxy has accepted its listener
		}
		if r[0].Err != "" {
			t.Fatalf("web's connection: %+v", r)
		}
		return strings.HasPrefix(r[0].Reply, "peer="+testbed.NodeV4.String())
	}
	harness.WaitFor(t, "web redirected once the proxy has its listener", 10*time.Second, webRedirected)
	if !webRedirected() {
		t.Fatal("web's connection was not redirected")
	}
	// Its address is in the configuration Envoy gets (pushes are
	// debounced by 100 ms).
	webIP := "address_prefix: " + e.TB.Pods[0].IPv4.String()
	harness.WaitFor(t, "web in the xDS listener", 10*time.Second, func() bool {
		l := e.XDSListenerYAML(t)
		return strings.Contains(l, webIP) && strings.Contains(l, "tcp|default/web")
	})

	harness.WaitFor(t, "a PolicyError event on default/broken", 20*time.Second, func() bool {
		evs, err := c.CoreV1().Events("default").List(ctx, metav1.ListOptions{FieldSelector: "involvedObject.name=broken"})
		if err != nil {
			return false
		}
		for _, ev := range evs.Items {
			if ev.Reason == "PolicyError" && ev.Type == corev1.EventTypeWarning && strings.Contains(ev.Message, "bad_host.example.com") {
				return true
			}
		}
		return false
	})

	// Restart: redirection goes on while the agent is down, and the
	// restarted agent keeps every entry with its counter id.
	ids := func() map[string]uint32 {
		out := map[string]uint32{}
		for _, w := range readStatus(t, e).Workloads {
			out[w.Name] = w.ID
		}
		return out
	}
	before := ids()
	harness.StopAgent(t, agent)
	if !webRedirected() {
		t.Fatal("redirection stopped with the agent")
	}
	e.StartAgent(t, agentArgs...)
	harness.WaitFor(t, "the restarted agent to claim its pods", 20*time.Second, func() bool {
		_, unnamed := ids()[""]
		return strings.Contains(readStatus(t, e).AgentNote, "agent running") && !unnamed
	})
	if after := ids(); fmt.Sprint(after) != fmt.Sprint(before) {
		t.Fatalf("entries after restart %v, before %v", after, before)
	}

	// Unlabelled: out of the map and out of the snapshot.
	patch := []byte(`{"metadata":{"labels":{"sluice.io/redirect":null}}}`)
	if _, err := c.CoreV1().Pods("default").Patch(ctx, "web", types.MergePatchType, patch, metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
	harness.WaitFor(t, "web deselected", 20*time.Second, func() bool {
		_, ok := ids()["default/web"]
		return !ok && len(ids()) == 1
	})
	harness.WaitFor(t, "web gone from xDS", 10*time.Second, func() bool {
		return !strings.Contains(e.XDSListenerYAML(t), webIP)
	})
	if webRedirected() {
		t.Fatal("unlabelled pod still redirected")
	}

	zero := int64(0)
	if err := c.CoreV1().Pods("default").Delete(ctx, "broken", metav1.DeleteOptions{GracePeriodSeconds: &zero}); err != nil {
		t.Fatal(err)
	}
	harness.WaitFor(t, "broken deselected", 20*time.Second, func() bool { return len(ids()) == 0 })
}

// installSluice applies the whole install (kubectl apply -k daemonset/:
// the CRDs, RBAC, the DaemonSet) and waits until the policy API is served.
func installSluice(t *testing.T, cluster *kube.Cluster) *daemonset.Install {
	t.Helper()
	install, err := daemonset.Load()
	if err != nil {
		t.Fatal(err)
	}
	var objs [][]byte
	for _, o := range install.Objects {
		objs = append(objs, o.YAML)
	}
	if err := cluster.Apply(context.Background(), false, objs...); err != nil {
		t.Fatal(err)
	}
	cluster.WaitServed(t, "policy.sluice.io/v1alpha1", 4)
	return install
}
