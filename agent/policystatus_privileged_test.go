package agent

import (
	"context"
	"io"
	"log/slog"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sluice-io/sluice/policy/apis/policy/v1alpha1"
	"github.com/sluice-io/sluice/policy/client/clientset/versioned"
	policyinformers "github.com/sluice-io/sluice/policy/client/informers/externalversions"
	"github.com/sluice-io/sluice/test/kube"
	"github.com/sluice-io/sluice/test/testbed"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// TestPrivilegedStatusWriterOneLeader runs two status writers (two nodes'
// agents) against a real API server with the shipped CRDs: exactly one,
// the Lease holder, writes status; when it stops, the other takes over
// and writes the next change. Conditions follow the generation, and a
// malformed object gets Accepted=False with the reason.
func TestPrivilegedStatusWriterOneLeader(t *testing.T) {
	testbed.RequirePrivileged(t)
	ns := testbed.NewNetns(t, "sluice-lease-"+testbed.RandomID())
	cluster := kube.Start(t, ns)
	ctx := context.Background()
	cluster.InstallCRDs(t)
	if _, err := cluster.Client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "sluice-system"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	pc, err := versioned.NewForConfig(cluster.Config)
	if err != nil {
		t.Fatal(err)
	}
	// The agent's own client: the election runs on its Lease calls.
	kubeAPI, err := NewKubeAPI(cluster.Config)
	if err != nil {
		t.Fatal(err)
	}
	type writer struct {
		w      *StatusWriter
		writes atomic.Int64
		stop   context.CancelFunc
		done   chan struct{}
	}
	start := func(id string) *writer {
		wr := &writer{done: make(chan struct{})}
		wr.w = &StatusWriter{Kube: kubeAPI, Policies: pc.PolicyV1alpha1(), Namespace: "sluice-system", Name: "sluice-policy-status", Identity: id,
			Logger: slog.New(slog.NewTextHandler(io.Discard, nil)), written: func() { wr.writes.Add(1) }}
		f := policyinformers.NewSharedInformerFactory(pc, 0)
		wr.w.use(f.Policy().V1alpha1().EgressPolicies().Informer(), f.Policy().V1alpha1().ClusterEgressPolicies().Informer())
		wctx, cancel := context.WithCancel(ctx)
		wr.stop = cancel
		f.Start(wctx.Done())
		go func() { defer close(wr.done); wr.w.Run(wctx); f.Shutdown() }()
		t.Cleanup(func() { cancel(); <-wr.done })
		return wr
	}
	w1, w2 := start("node-a"), start("node-b")

	api := pc.PolicyV1alpha1()
	create := func(name string, sel map[string]string) *v1alpha1.EgressPolicy {
		p, err := api.EgressPolicies("default").Create(ctx, &v1alpha1.EgressPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: name},
			Spec: v1alpha1.EgressPolicySpec{PodSelector: metav1.LabelSelector{MatchLabels: sel}, Egress: []v1alpha1.EgressRule{{Hostname: "api.example.com"}}}}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	accepted := func(name string, want metav1.ConditionStatus, gen int64) func() bool {
		return func() bool {
			p, err := api.EgressPolicies("default").Get(ctx, name, metav1.GetOptions{})
			if err != nil {
				return false
			}
			c := meta.FindStatusCondition(p.Status.Conditions, ConditionAccepted)
			return c != nil && c.Status == want && c.ObservedGeneration == gen && p.Status.ObservedGeneration == gen
		}
	}
	wait := func(what string, cond func() bool) {
		t.Helper()
		deadline := time.Now().Add(40 * time.Second)
		for !cond() {
			if time.Now().After(deadline) {
				t.Fatalf("timed out waiting for %s", what)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	good := create("good", map[string]string{"app": "web"})
	create("bad", map[string]string{"app": "has space"})
	wait("good Accepted=True", accepted("good", metav1.ConditionTrue, good.Generation))
	wait("bad Accepted=False", accepted("bad", metav1.ConditionFalse, 1))
	bad, _ := api.EgressPolicies("default").Get(ctx, "bad", metav1.GetOptions{})
	if c := meta.FindStatusCondition(bad.Status.Conditions, ConditionAccepted); c.Reason != ReasonInvalid || !containsAll(c.Message, "spec.podSelector", "has space") {
		t.Errorf("bad's condition %+v, want reason Invalid naming the selector", c)
	}

	// A spec change: the new generation is described.
	if good, err = api.EgressPolicies("default").Get(ctx, "good", metav1.GetOptions{}); err != nil {
		t.Fatal(err)
	}
	good.Spec.Egress = append(good.Spec.Egress, v1alpha1.EgressRule{CIDR: "10.0.0.0/8"})
	if good, err = api.EgressPolicies("default").Update(ctx, good, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	wait("good's generation 2 described", accepted("good", metav1.ConditionTrue, good.Generation))
	time.Sleep(time.Second) // anything the other writer would do, it has done
	lease, err := cluster.Client.CoordinationV1().Leases("sluice-system").Get(ctx, "sluice-policy-status", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	holder := *lease.Spec.HolderIdentity
	leader, follower := w1, w2
	if holder == "node-b" {
		leader, follower = w2, w1
	}
	if leader.writes.Load() == 0 || follower.writes.Load() != 0 {
		t.Fatalf("lease held by %s; writes: node-a %d, node-b %d; want only the holder's", holder, w1.writes.Load(), w2.writes.Load())
	}
	t.Logf("%s holds the lease and wrote %d statuses; the other wrote none", holder, leader.writes.Load())

	// The holder stops (releasing the Lease): the other takes over.
	leader.stop()
	<-leader.done
	late := create("late", nil)
	wait("the other agent to take over and describe a new object", accepted("late", metav1.ConditionTrue, late.Generation))
	// The status is visible as soon as the API server has it, a moment
	// before the writer's update call returns and counts it.
	wait("the remaining agent to have written the new status", func() bool { return follower.writes.Load() > 0 })
}

func containsAll(s string, subs ...string) bool {
	for _, sub := range subs {
		if !strings.Contains(s, sub) {
			return false
		}
	}
	return true
}
