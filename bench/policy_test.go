package bench

import (
	"bytes"
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/sluice-io/sluice/policy/apis/policy/v1alpha1"
	"github.com/sluice-io/sluice/policy/client/clientset/versioned"
	"github.com/sluice-io/sluice/test/kube"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/proto"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// benchPolicies is how many policy objects the cluster holds while the
// policy changes are measured.
const benchPolicies = 100

// listenerWatch holds an ADS stream as Envoy does (ACKing every
// response) and keeps, for each listener response, when it arrived and
// its serialized form.
type listenerWatch struct {
	mu     sync.Mutex
	pushes []push
	cond   *sync.Cond
}

type push struct {
	at  time.Time
	raw []byte
}

func watchListeners(t *testing.T, socket string) *listenerWatch {
	t.Helper()
	w := &listenerWatch{}
	w.cond = sync.NewCond(&w.mu)
	conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(256<<20)))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(func() { cancel(); conn.Close() })
	stream, err := discovery.NewAggregatedDiscoveryServiceClient(conn).StreamAggregatedResources(ctx)
	if err != nil {
		t.Fatal(err)
	}
	node := &core.Node{Id: "bench", Cluster: "sluice"}
	if err := stream.Send(&discovery.DiscoveryRequest{Node: node, TypeUrl: resource.ListenerType}); err != nil {
		t.Fatal(err)
	}
	go func() {
		for {
			resp, err := stream.Recv()
			if err != nil {
				return
			}
			at := time.Now()
			var raw []byte
			for _, r := range resp.GetResources() {
				b, _ := proto.Marshal(r)
				raw = append(raw, b...)
			}
			w.mu.Lock()
			w.pushes = append(w.pushes, push{at: at, raw: raw})
			w.cond.Broadcast()
			w.mu.Unlock()
			_ = stream.Send(&discovery.DiscoveryRequest{Node: node, TypeUrl: resource.ListenerType, VersionInfo: resp.GetVersionInfo(), ResponseNonce: resp.GetNonce()})
		}
	}()
	return w
}

// waitFor returns when the first listener pushed after index from
// satisfies has, and the index after it.
func (w *listenerWatch) waitFor(t *testing.T, from int, has func([]byte) bool) (time.Time, int) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	w.mu.Lock()
	defer w.mu.Unlock()
	for i := from; ; i++ {
		for i >= len(w.pushes) {
			if time.Now().After(deadline) {
				t.Fatal("no listener with the change within 60 s")
			}
			go func() { time.Sleep(time.Second); w.cond.Broadcast() }()
			w.cond.Wait()
		}
		if has(w.pushes[i].raw) {
			return w.pushes[i].at, i + 1
		}
	}
}

func (w *listenerWatch) len() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return len(w.pushes)
}

// benchPolicyChanges measures a policy change until the listener Envoy is
// served has it, with benchPods selected pods and benchPolicies objects in
// the cluster: an EgressPolicy selecting one pod, and a guardrail bounding
// all of them. It returns the report's rows.
func benchPolicyChanges(t *testing.T, cluster *kube.Cluster, socket string, changes int) (string, map[string]any) {
	ctx := context.Background()
	pc, err := versioned.NewForConfig(cluster.Config)
	if err != nil {
		t.Fatal(err)
	}
	api := pc.PolicyV1alpha1()
	// The cluster's other objects: EgressPolicies in other namespaces, and
	// baselines for namespaces this node has no pod of.
	for i := range benchPolicies - 3 {
		ns := fmt.Sprintf("team-%02d", i%20)
		if i < 20 {
			if _, err := cluster.Client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
				t.Fatal(err)
			}
		}
		rules := []v1alpha1.EgressRule{{Hostname: fmt.Sprintf("svc-%d.example.com", i), Ports: []v1alpha1.Port{443}}, {CIDR: fmt.Sprintf("198.18.%d.0/24", i)}}
		if i%10 == 9 {
			_, err = api.ClusterEgressPolicies().Create(ctx, &v1alpha1.ClusterEgressPolicy{ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("baseline-%02d", i)},
				Spec: v1alpha1.ClusterEgressPolicySpec{Tier: v1alpha1.TierBaseline, NamespaceSelector: metav1.LabelSelector{MatchLabels: map[string]string{"team": ns}}, Egress: rules}}, metav1.CreateOptions{})
		} else {
			_, err = api.EgressPolicies(ns).Create(ctx, &v1alpha1.EgressPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: fmt.Sprintf("p-%02d", i)},
				Spec: v1alpha1.EgressPolicySpec{Mode: v1alpha1.ModeEnforce, Egress: rules}}, metav1.CreateOptions{})
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	// Every pod of the node: 20 entries from a baseline, bounded by the
	// guardrail below.
	base := []v1alpha1.EgressRule{{CIDR: "0.0.0.0/0", Ports: []v1alpha1.Port{443}}}
	for i := range 19 {
		base = append(base, v1alpha1.EgressRule{Hostname: fmt.Sprintf("*.svc%d.example.com", i), Ports: []v1alpha1.Port{443}})
	}
	if _, err := api.ClusterEgressPolicies().Create(ctx, &v1alpha1.ClusterEgressPolicy{ObjectMeta: metav1.ObjectMeta{Name: "default-baseline"},
		Spec: v1alpha1.ClusterEgressPolicySpec{Tier: v1alpha1.TierBaseline, NamespaceSelector: metav1.LabelSelector{MatchLabels: map[string]string{"kubernetes.io/metadata.name": "default"}}, Egress: base}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	one, err := api.EgressPolicies("default").Create(ctx, &v1alpha1.EgressPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: "one-pod"},
		Spec: v1alpha1.EgressPolicySpec{PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"bench": "one"}}, Mode: v1alpha1.ModeEnforce}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	guard, err := api.ClusterEgressPolicies().Create(ctx, &v1alpha1.ClusterEgressPolicy{ObjectMeta: metav1.ObjectMeta{Name: "guardrail"},
		Spec: v1alpha1.ClusterEgressPolicySpec{Tier: v1alpha1.TierGuardrail, Egress: []v1alpha1.EgressRule{{CIDR: "0.0.0.0/0"}, {Hostname: "*.example.com"}}}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	w := watchListeners(t, socket)
	_, next := w.waitFor(t, 0, func([]byte) bool { return true })

	measure := func(apply func(i int), marker func(i int) []byte) []time.Duration {
		var out []time.Duration
		for i := range changes {
			time.Sleep(150 * time.Millisecond) // past the agent's 100 ms debounce: each change is its own
			from := w.len()
			if from > next {
				next = from
			}
			t0 := time.Now()
			apply(i)
			mk := marker(i)
			at, n := w.waitFor(t, next, func(raw []byte) bool { return bytes.Contains(raw, mk) == (i%2 == 0) })
			next = n
			out = append(out, at.Sub(t0))
		}
		return out
	}
	// One pod's EgressPolicy gains (even i) and loses (odd i) a CIDR.
	const oneCIDR = "203.0.113.77"
	onePod := measure(func(i int) {
		p, err := api.EgressPolicies("default").Get(ctx, one.Name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		p.Spec.Egress = nil
		if i%2 == 0 {
			p.Spec.Egress = []v1alpha1.EgressRule{{CIDR: oneCIDR, Ports: []v1alpha1.Port{5432}}}
		}
		if _, err := api.EgressPolicies("default").Update(ctx, p, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
	}, func(int) []byte { return []byte(oneCIDR) })
	// The guardrail, which bounds every selected pod, narrows 0.0.0.0/0
	// to a prefix and back: every pod's policy changes.
	const narrowed = "10.77.0.0"
	allPods := measure(func(i int) {
		p, err := api.ClusterEgressPolicies().Get(ctx, guard.Name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		p.Spec.Egress = []v1alpha1.EgressRule{{CIDR: "0.0.0.0/0"}, {Hostname: "*.example.com"}}
		if i%2 == 0 {
			p.Spec.Egress = []v1alpha1.EgressRule{{CIDR: narrowed + "/16"}, {Hostname: "*.example.com"}}
		}
		if _, err := api.ClusterEgressPolicies().Update(ctx, p, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
	}, func(int) []byte { return []byte(narrowed) })
	var b bytes.Buffer
	fmt.Fprintf(&b, "\nPolicy objects: %d in the cluster (EgressPolicies in 20 other namespaces, baselines, one baseline granting 20 entries\n", benchPolicies)
	fmt.Fprintf(&b, "to every pod of the node, one guardrail over every pod), %d selected pods on the node. Latency from the update request to the first listener pushed on an ADS stream\n", benchPods)
	fmt.Fprintf(&b, "(held as Envoy holds it) that has the change, over %d changes each.\n\n", changes)
	fmt.Fprintf(&b, "| policy change -> new listener served | p50 | p99 | max |\n|---|---|---|---|\n")
	row := func(name string, xs []time.Duration) {
		r := func(p float64) time.Duration { return pct(xs, p).Round(100 * time.Microsecond) }
		fmt.Fprintf(&b, "| %s | %v | %v | %v |\n", name, r(0.5), r(0.99), r(1))
	}
	row("an EgressPolicy selecting 1 pod gains or loses an entry", onePod)
	row(fmt.Sprintf("a guardrail bounding all %d pods narrows or widens", benchPods), allPods)
	q := func(xs []time.Duration) map[string]int64 {
		return map[string]int64{"p50_ns": int64(pct(xs, 0.5)), "p99_ns": int64(pct(xs, 0.99)), "max_ns": int64(pct(xs, 1))}
	}
	return b.String(), map[string]any{"policy_objects": benchPolicies, "changes": changes,
		"egresspolicy_one_pod": q(onePod), "guardrail_all_pods": q(allPods)}
}
