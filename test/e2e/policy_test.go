package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/sluice-io/sluice/policy/apis/policy/v1alpha1"
	"github.com/sluice-io/sluice/policy/client/clientset/versioned"
	"github.com/sluice-io/sluice/test/conformance"
	"github.com/sluice-io/sluice/test/harness"
	"github.com/sluice-io/sluice/test/kube"
	"github.com/sluice-io/sluice/test/testbed"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
)

// policyStatus is the part of `sluice status --format json` this test
// reads: each workload's effective policy.
type policyStatus struct {
	Workloads []struct {
		Name     string `json:"name"`
		FailMode string `json:"fail_mode"`
		Enforce  bool   `json:"enforce"`
		Policy   *struct {
			Mode    string   `json:"mode"`
			Sources []string `json:"sources"`
			Allow   int      `json:"allow_entries"`
			Removed int      `json:"removed_by_guardrails"`
		} `json:"policy"`
	} `json:"workloads"`
}

func readPolicies(t *testing.T, e *harness.Env) map[string]string {
	t.Helper()
	var st policyStatus
	if err := json.Unmarshal([]byte(e.Status(t, "--format", "json")), &st); err != nil {
		t.Fatal(err)
	}
	out := map[string]string{}
	for _, w := range st.Workloads {
		if w.Policy == nil {
			out[w.Name] = "no policy in the state"
			continue
		}
		out[w.Name] = fmt.Sprintf("%s fail-%s allow=%d removed=%d from %s", w.Policy.Mode, w.FailMode, w.Policy.Allow, w.Policy.Removed, strings.Join(w.Policy.Sources, " + "))
	}
	return out
}

// TestPrivilegedPolicyObjects runs the agent against a real API server
// with the shipped CRDs and RBAC, and the conformance proxy executing what
// it serves. An EgressPolicy selects an unlabelled pod and enforces it; a
// guardrail forbids a pod's audit label and removes its own annotation's
// entry (what it tried to reach gets nothing); a baseline's grant
// appears; updating and deleting the objects follow within the measured
// time; the status Lease holder marks each object Accepted, and a
// malformed one Accepted=False with the reason.
func TestPrivilegedPolicyObjects(t *testing.T) {
	e := harness.NewEnforcing(t, 2)
	cluster := kube.Start(t, e.TB.Node)
	c := cluster.Client
	ctx := context.Background()
	if _, err := c.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: nodeName}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	install := installSluice(t, cluster)
	pc, err := versioned.NewForConfig(cluster.Config)
	if err != nil {
		t.Fatal(err)
	}
	api := pc.PolicyV1alpha1()
	kubeconfig := cluster.KubeconfigFor(t, install.Namespace.Name, install.SA.Name)
	besteffort := e.TB.Root.Child(t, "kubepods").Child(t, "besteffort")
	e.StartAgent(t, "--kubeconfig", kubeconfig, "--node-name", nodeName,
		"--cgroup-driver", "cgroupfs", "--cgroup-mount", e.TB.Root.Path,
		"--status-lease", install.Namespace.Name+"/sluice-policy-status")

	a, b := testbed.ExternalV4[0], testbed.ExternalV4[1]
	port := uint16(harness.ServerPort)
	hp := func(x netip.Addr) string { return netip.AddrPortFrom(x, port).String() }
	cidr := func(x netip.Addr, ports ...v1alpha1.Port) v1alpha1.EgressRule {
		return v1alpha1.EgressRule{CIDR: x.String(), Ports: ports}
	}
	// expect dials from a pod and checks what the server and the proxy saw:
	// "forwarded" through the proxy, "denied" with nothing arriving
	// anywhere, or "direct" (the server saw the pod itself).
	expect := func(t *testing.T, p *testbed.Pod, cg *testbed.Cgroup, dst netip.Addr, want string) {
		t.Helper()
		res, at, proxy := dialObserved(t, e, cg, p.Netns, "tcp4:"+hp(dst))
		got := fmt.Sprintf("server %q reply %q proxy %q err %q", at, res.Reply, proxy, res.Err)
		switch want {
		case "forwarded":
			if at != hp(dst) || !strings.HasPrefix(res.Reply, "peer="+testbed.NodeV4.String()) || proxy != "forwarded" {
				t.Errorf("%s: %s; want it forwarded through the proxy", hp(dst), got)
			}
		case "denied":
			if at != "" || res.Reply != "" || proxy != "denied-closed" {
				t.Errorf("%s: %s; want it closed by the proxy with nothing arriving", hp(dst), got)
			}
		case "direct":
			if at != hp(dst) || !strings.HasPrefix(res.Reply, "peer="+p.IPv4.String()) || proxy != "" {
				t.Errorf("%s: %s; want it direct from the pod", hp(dst), got)
			}
		}
	}
	waitPolicy := func(what, key, want string) time.Duration {
		t.Helper()
		start := time.Now()
		harness.WaitFor(t, what, 30*time.Second, func() bool { return strings.Contains(readPolicies(t, e)[key], want) })
		return time.Since(start)
	}
	// served waits until the listener Envoy gets says what cond wants.
	served := func(what string, cond func(listener string) bool) {
		t.Helper()
		harness.WaitFor(t, what, 30*time.Second, func() bool { return cond(e.XDSListenerYAML(t)) })
	}

	// An EgressPolicy selects a pod that has no sluice label at all.
	created, err := api.EgressPolicies("default").Create(ctx, &v1alpha1.EgressPolicy{
		ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: "api"},
		Spec: v1alpha1.EgressPolicySpec{PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "api"}},
			Mode: v1alpha1.ModeEnforce, Egress: []v1alpha1.EgressRule{cidr(a, v1alpha1.Port(port))}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	p0, p1 := e.TB.Pods[0], e.TB.Pods[1]
	apiCg := kube.RunPod(t, c, besteffort, kube.Pod("api", nodeName, map[string]string{"app": "api"}, nil), p0.IPv4, p0.IPv6)
	waitPolicy("the EgressPolicy to select default/api", "default/api", "enforce fail-closed allow=1 removed=0 from EgressPolicy default/api")
	served("default/api in the listener", func(l string) bool { return strings.Contains(l, "address_prefix: "+p0.IPv4.String()) })
	harness.WaitFor(t, "the proxy ready", 10*time.Second, func() bool { return readStatus(t, e).Proxy.Ready })
	t.Run("an EgressPolicy enforces an unlabelled pod", func(t *testing.T) {
		expect(t, p0, apiCg, a, "forwarded")
		expect(t, p0, apiCg, b, "denied")
	})
	harness.WaitFor(t, "EgressPolicy api Accepted=True for generation 1", 20*time.Second, func() bool {
		p, err := api.EgressPolicies("default").Get(ctx, "api", metav1.GetOptions{})
		return err == nil && p.Status.ObservedGeneration == created.Generation &&
			meta.IsStatusConditionTrue(p.Status.Conditions, "Accepted")
	})

	// A pod of the old kind: opted in by label, audit mode, an annotation
	// granting b. In audit mode it reaches everything.
	legacyCg := kube.RunPod(t, c, besteffort, kube.Pod("legacy", nodeName,
		map[string]string{"sluice.io/redirect": "true", "sluice.io/mode": "audit"},
		map[string]string{"sluice.io/allow": hp(b)}), p1.IPv4, p1.IPv6)
	waitPolicy("default/legacy selected by its label", "default/legacy", "audit fail-open allow=1 removed=0 from pod labels/annotation")
	served("default/legacy in the listener", func(l string) bool { return strings.Contains(l, "address_prefix: "+p1.IPv4.String()) })
	expect(t, p1, legacyCg, b, "forwarded")

	// The cluster admin: namespaces labelled env=prod are enforced and may
	// reach at most a; every pod may reach a's port (the baseline).
	if _, err := c.CoreV1().Namespaces().Patch(ctx, "default", types.MergePatchType, []byte(`{"metadata":{"labels":{"env":"prod"}}}`), metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := api.ClusterEgressPolicies().Create(ctx, &v1alpha1.ClusterEgressPolicy{
		ObjectMeta: metav1.ObjectMeta{Name: "telemetry"},
		Spec:       v1alpha1.ClusterEgressPolicySpec{Tier: v1alpha1.TierBaseline, Egress: []v1alpha1.EgressRule{cidr(a, v1alpha1.Port(port))}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if _, err := api.ClusterEgressPolicies().Create(ctx, &v1alpha1.ClusterEgressPolicy{
		ObjectMeta: metav1.ObjectMeta{Name: "prod"},
		Spec: v1alpha1.ClusterEgressPolicySpec{Tier: v1alpha1.TierGuardrail, Mode: v1alpha1.ModeEnforce,
			NamespaceSelector: metav1.LabelSelector{MatchLabels: map[string]string{"env": "prod"}},
			Egress:            []v1alpha1.EgressRule{cidr(a)}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitPolicy("the guardrail to enforce default/legacy", "default/legacy",
		"enforce fail-closed allow=1 removed=1 from pod labels/annotation + ClusterEgressPolicy telemetry + ClusterEgressPolicy prod")
	served("default/legacy enforced in the listener", func(l string) bool {
		return strings.Contains(l, "tcp|default/legacy") && !strings.Contains(l, "audit|default/legacy")
	})
	t.Logf("guardrail created -> pod enforced in the served listener: %v", time.Since(start).Round(time.Millisecond))
	t.Run("sluice explain shows the same merge", func(t *testing.T) {
		out, err := exec.Command("ip", "netns", "exec", e.TB.Node.Name, e.Bin, "explain", "--kubeconfig", cluster.Kubeconfig, "default/legacy").CombinedOutput()
		if err != nil {
			t.Fatalf("sluice explain: %v\n%s", err, out)
		}
		for _, want := range []string{
			"settings (ConfigMap sluice-system/sluice-config): SELECTOR=\"sluice.io/redirect=true\"",
			"selected by: the opt-in selector sluice.io/redirect=true, ClusterEgressPolicy prod",
			"effective policy: enforce, fail closed",
			"allow " + hp(a),
			"ClusterEgressPolicy prod: " + hp(b) + " removed",
		} {
			if !strings.Contains(string(out), want) {
				t.Errorf("sluice explain lacks %q:\n%s", want, out)
			}
		}
		out, err = exec.Command("ip", "netns", "exec", e.TB.Node.Name, e.Bin, "explain", "--kubeconfig", cluster.Kubeconfig, "--format", "json", "default/nosuchpod").CombinedOutput()
		if err == nil || !strings.Contains(string(out), "not found") {
			t.Errorf("explain of a missing pod: %v %s", err, out)
		}
	})
	t.Run("a guardrail forbids the audit label and removes the annotation's entry", func(t *testing.T) {
		expect(t, p1, legacyCg, b, "denied")
		expect(t, p1, legacyCg, a, "forwarded") // the baseline's grant
		expect(t, p0, apiCg, a, "forwarded")
		expect(t, p0, apiCg, b, "denied")
	})

	// Updating the EgressPolicy follows: a is no longer granted to api
	// (the baseline still grants a's port: take the server port off by
	// granting another port instead).
	start = time.Now()
	harness.WaitFor(t, "the EgressPolicy updated", 10*time.Second, func() bool {
		p, err := api.EgressPolicies("default").Get(ctx, "api", metav1.GetOptions{})
		if err != nil {
			return false
		}
		p.Spec.Egress = []v1alpha1.EgressRule{cidr(b)}
		_, err = api.EgressPolicies("default").Update(ctx, p, metav1.UpdateOptions{})
		return err == nil
	})
	d := waitPolicy("default/api to follow the update", "default/api", "allow=1 removed=1 from EgressPolicy default/api + ClusterEgressPolicy telemetry + ClusterEgressPolicy prod")
	t.Logf("EgressPolicy updated -> the agent's effective policy: %v", d.Round(time.Millisecond))
	expect(t, p0, apiCg, b, "denied") // the guardrail removed b

	// Deleting the guardrail: legacy is audited again; deleting the
	// EgressPolicy deselects api, which then goes direct.
	if err := api.ClusterEgressPolicies().Delete(ctx, "prod", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitPolicy("default/legacy back to audit", "default/legacy", "audit fail-open allow=2 removed=0")
	served("default/legacy audited in the listener", func(l string) bool { return strings.Contains(l, "audit|default/legacy") })
	expect(t, p1, legacyCg, b, "forwarded")
	start = time.Now()
	if err := api.EgressPolicies("default").Delete(ctx, "api", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	harness.WaitFor(t, "default/api deselected", 30*time.Second, func() bool {
		_, ok := readPolicies(t, e)["default/api"]
		return !ok
	})
	t.Logf("EgressPolicy deleted -> pod deselected: %v", time.Since(start).Round(time.Millisecond))
	served("default/api gone from the listener", func(l string) bool { return !strings.Contains(l, "address_prefix: "+p0.IPv4.String()) })
	expect(t, p0, apiCg, b, "direct")

	// A malformed object the schema cannot catch (a label value with a
	// space): Accepted=False with the reason, in a namespace of its own.
	if _, err := c.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "other"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := api.EgressPolicies("other").Create(ctx, &v1alpha1.EgressPolicy{
		ObjectMeta: metav1.ObjectMeta{Namespace: "other", Name: "typo"},
		Spec:       v1alpha1.EgressPolicySpec{PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "has space"}}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatalf("the API server refused a selector only the agent checks: %v", err)
	}
	harness.WaitFor(t, "EgressPolicy other/typo Accepted=False", 20*time.Second, func() bool {
		p, err := api.EgressPolicies("other").Get(ctx, "typo", metav1.GetOptions{})
		if err != nil {
			return false
		}
		cond := meta.FindStatusCondition(p.Status.Conditions, "Accepted")
		return cond != nil && cond.Status == metav1.ConditionFalse && cond.Reason == "Invalid" && strings.Contains(cond.Message, "spec.podSelector")
	})
	for _, name := range []string{"telemetry"} {
		p, err := api.ClusterEgressPolicies().Get(ctx, name, metav1.GetOptions{})
		if err != nil || !meta.IsStatusConditionTrue(p.Status.Conditions, "Accepted") {
			t.Errorf("ClusterEgressPolicy %s status %+v (%v), want Accepted=True", name, p.Status, err)
		}
	}
	if got := readPolicies(t, e); !slices.Equal(mapKeys(got), []string{"default/legacy"}) {
		t.Errorf("selected %v, want only default/legacy", got)
	}
}

func mapKeys(m map[string]string) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

// dialObserved connects once from a pod and reports what the application
// got, which server (if any) accepted the connection, and the proxy's
// outcome for it ("" when the proxy logged nothing).
func dialObserved(t *testing.T, e *harness.Env, cg *testbed.Cgroup, ns *testbed.Netns, spec string) (res testbed.DialResult, at, proxy string) {
	t.Helper()
	conns, recs := len(e.Echo.Conns()), len(conformance.ReadFinal(e.Records))
	res = testbed.Dial(t, testbed.Run(t, 30*time.Second, cg, ns, "client", spec))[0]
	time.Sleep(50 * time.Millisecond)
	if cs := e.Echo.Conns()[conns:]; len(cs) == 1 {
		at = cs[0].To
	} else if len(cs) > 1 {
		t.Fatalf("one dial reached %d servers", len(cs))
	}
	if rs := conformance.ReadFinal(e.Records)[recs:]; len(rs) == 1 {
		proxy = rs[0].Outcome()
	}
	return res, at, proxy
}
