package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	dto "github.com/prometheus/client_model/go"
	"github.com/sluice-io/sluice/agent/datapath"
	"github.com/sluice-io/sluice/policy"
	"github.com/sluice-io/sluice/xds"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"
)

// syncCgroups is a cgroups map the test changes while the source runs.
type syncCgroups struct {
	mu sync.Mutex
	m  map[string]uint64
}

func (c *syncCgroups) id(p string) (uint64, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if id, ok := c.m[p]; ok {
		return id, nil
	}
	return 0, fmt.Errorf("cgroup %s: %w", p, syscall.ENOENT) // as datapath.CgroupID
}

func (c *syncCgroups) add(p string, id uint64) {
	c.mu.Lock()
	c.m[p] = id
	c.mu.Unlock()
}

// lockedDatapath guards the fake for the source's worker and the test.
type lockedDatapath struct {
	mu sync.Mutex
	f  fakeDatapath
}

func (l *lockedDatapath) SetWorkload(cg uint64, w datapath.Workload) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.f.SetWorkload(cg, w)
}
func (l *lockedDatapath) DeleteWorkload(cg uint64) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.f.DeleteWorkload(cg)
}
func (l *lockedDatapath) Workloads() (map[uint64]datapath.Workload, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.f.Workloads()
}
func (l *lockedDatapath) has(cg uint64) bool {
	m, _ := l.Workloads()
	_, ok := m[cg]
	return ok
}

func testPod(name, uid string, qos corev1.PodQOSClass, ip string, labels, annotations map[string]string) *corev1.Pod {
	l := map[string]string{"sluice.io/redirect": "true"}
	for k, v := range labels {
		l[k] = v
	}
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: name, UID: types.UID(uid), Labels: l, Annotations: annotations},
		Spec:       corev1.PodSpec{NodeName: "node-a"},
		Status:     corev1.PodStatus{Phase: corev1.PodRunning, QOSClass: qos},
	}
	if ip != "" {
		p.Status.PodIPs = []corev1.PodIP{{IP: ip}}
	}
	return p
}

func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestKubeSource(t *testing.T) {
	layout := PodCgroupLayout{Mount: "/cg", Driver: DriverCgroupfs}
	path := func(uid, qos string) string { p, _ := layout.PodCgroup(uid, qos); return p }
	cgs := &syncCgroups{m: map[string]uint64{
		path("uid-web", QoSBurstable):   101,
		path("uid-host", QoSBestEffort): 103,
	}}
	web := testPod("web", "uid-web", corev1.PodQOSBurstable, "10.244.1.5",
		map[string]string{"sluice.io/mode": "enforce"}, map[string]string{"sluice.io/allow": "ok.example.com, bad_host"})
	late := testPod("late", "uid-late", corev1.PodQOSGuaranteed, "10.244.1.6", nil, nil)
	host := testPod("host", "uid-host", corev1.PodQOSBestEffort, "", nil, nil)
	host.Spec.HostNetwork = true
	client := fake.NewClientset(web, late, host, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node-a"}})

	dp := &lockedDatapath{f: fakeDatapath{m: map[uint64]datapath.Workload{999: {ID: 9}}}} // 999: stale, from a previous run
	recorder := record.NewFakeRecorder(100)
	proxy := netip.MustParseAddr("169.254.77.1")
	m := NewMetrics(prometheus.NewRegistry())
	src := &KubeSource{
		Client: clientsetKube{client}, NodeName: "node-a", Layout: layout, HostNetworkIPs: []netip.Addr{proxy},
		Recorder: recorder, Logger: slog.New(slog.NewTextHandler(io.Discard, nil)), RetryBaseDelay: time.Millisecond,
		Metrics: m,
	}
	r, err := NewReconciler(ReconcilerConfig{Datapath: dp, XDS: &fakeXDS{}, Reporter: src, CgroupID: cgs.id,
		Proxy: xds.Proxy{IPv4: proxy, Port: 15001}, Logger: slog.New(slog.NewTextHandler(io.Discard, nil)), Metrics: m})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	synced := make(chan struct{})
	done := make(chan error, 1)
	go func() { done <- src.Run(ctx, r, func() { r.Sync(); close(synced) }) }()
	select {
	case <-synced:
	case <-time.After(10 * time.Second):
		t.Fatal("source never synced")
	}

	if !dp.has(101) || !dp.has(103) {
		t.Fatalf("selected pods not programmed: %v", dp.f.m)
	}
	if dp.has(999) {
		t.Fatal("stale pinned entry survived the first sync")
	}
	st := r.State()
	for _, w := range st.Workloads {
		switch w.Name {
		case "web":
			if w.IPs[0] != netip.MustParseAddr("10.244.1.5") || w.Policy.Mode != policy.Enforce || len(w.Policy.Allow) != 0 {
				t.Errorf("web: %+v", w)
			}
		case "host":
			if len(w.IPs) != 1 || w.IPs[0] != proxy {
				t.Errorf("hostNetwork pod's source addresses %v, want the proxy address", w.IPs)
			}
		}
	}
	wantEvent := func(reason string) {
		t.Helper()
		deadline := time.After(10 * time.Second)
		for {
			select {
			case e := <-recorder.Events:
				if strings.Contains(e, reason) {
					return
				}
			case <-deadline:
				t.Fatalf("no %s event", reason)
			}
		}
	}
	wantEvent("Warning PolicyError")

	// The kubelet has not made late's cgroup: retried, an Event after a
	// few tries, selected once it appears.
	wantEvent("Warning CgroupNotFound")
	// The metrics the file source alone used to move: each missing-cgroup
	// try counts, each programmed change is timed.
	if n := testutil.ToFloat64(m.CgroupFailures); n < cgroupRetriesBeforeEvent {
		t.Errorf("sluice_cgroup_resolution_failures_total %v after the CgroupNotFound event, want at least %d", n, cgroupRetriesBeforeEvent)
	}
	if n := histogramCount(t, m.Reconcile); n != 2 {
		t.Errorf("sluice_reconcile_duration_seconds count %d, want 2 (web and host selected)", n)
	}
	cgs.add(path("uid-late", QoSGuaranteed), 102)
	eventually(t, "late pod selected", func() bool { return dp.has(102) })

	// Deleted and finished pods are deselected.
	if err := client.CoreV1().Pods("shop").Delete(ctx, "web", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "deleted pod deselected", func() bool { return !dp.has(101) })
	host.Status.Phase = corev1.PodSucceeded
	if _, err := client.CoreV1().Pods("shop").UpdateStatus(ctx, host, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "finished pod deselected", func() bool { return !dp.has(103) })
	if n := histogramCount(t, m.Reconcile); n != 5 {
		t.Errorf("sluice_reconcile_duration_seconds count %d, want 5 (3 selected, 2 deselected)", n)
	}
	if n := testutil.ToFloat64(m.SourceErrors.WithLabelValues("kubernetes")); n != 0 {
		t.Errorf("%v kubernetes source errors without any", n)
	}

	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

func TestKubeSourceNeedsNodeName(t *testing.T) {
	err := (&KubeSource{Client: clientsetKube{fake.NewClientset()}}).Run(context.Background(), nil, func() {})
	if err == nil || !strings.Contains(err.Error(), "NODE_NAME") {
		t.Fatalf("err = %v", err)
	}
}

func TestKubeSourceRefusesUnknownNode(t *testing.T) {
	src := &KubeSource{Client: clientsetKube{fake.NewClientset(&corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node-a"}})},
		NodeName: "node-b", Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}
	err := src.Run(context.Background(), nil, func() {})
	if err == nil || !strings.Contains(err.Error(), `node "node-b" does not exist`) {
		t.Fatalf("err = %v", err)
	}
}

func histogramCount(t *testing.T, h prometheus.Histogram) uint64 {
	t.Helper()
	var m dto.Metric
	if err := h.Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetHistogram().GetSampleCount()
}

// A failed watch of the API server is a kubernetes source error: the
// reflector retries, and each failure counts.
func TestKubeSourceCountsWatchErrors(t *testing.T) {
	client := fake.NewClientset(&corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node-a"}})
	var failed atomic.Int32
	client.PrependWatchReactor("pods", func(k8stesting.Action) (bool, watch.Interface, error) {
		failed.Add(1)
		return true, nil, errors.New("test: watch refused")
	})
	m := NewMetrics(prometheus.NewRegistry())
	src := &KubeSource{Client: clientsetKube{client}, NodeName: "node-a", Layout: PodCgroupLayout{Mount: "/cg", Driver: DriverCgroupfs},
		Recorder: record.NewFakeRecorder(10), Logger: slog.New(slog.NewTextHandler(io.Discard, nil)), Metrics: m}
	r, err := NewReconciler(ReconcilerConfig{Datapath: &lockedDatapath{f: fakeDatapath{m: map[uint64]datapath.Workload{}}}, XDS: &fakeXDS{},
		Reporter: src, Proxy: xds.Proxy{IPv4: netip.MustParseAddr("169.254.77.1"), Port: 15001}, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- src.Run(ctx, r, func() {}) }()
	eventually(t, "a watch error counted", func() bool { return testutil.ToFloat64(m.SourceErrors.WithLabelValues("kubernetes")) >= 1 })
	cancel()
	<-done
	if n, f := testutil.ToFloat64(m.SourceErrors.WithLabelValues("kubernetes")), failed.Load(); n > float64(f) {
		t.Errorf("%v source errors counted for %d failed watches", n, f)
	}
}

// The pod informer keeps only what the agent reads: a pod with managed
// fields, a large last-applied annotation and a full spec is cached as
// its names, labels, sluice annotations, node, hostNetwork and status
// fields, and the workload made from it is the same as from the full pod.
func TestTrimPod(t *testing.T) {
	full := testPod("web", "uid-web", corev1.PodQOSBurstable, "10.244.1.5",
		map[string]string{"sluice.io/mode": "enforce", "app": "web"}, map[string]string{"sluice.io/allow": "api.example.com",
			"kubectl.kubernetes.io/last-applied-configuration": strings.Repeat("x", 10000)})
	full.ManagedFields = []metav1.ManagedFieldsEntry{{Manager: "kubectl", Operation: metav1.ManagedFieldsOperationApply}}
	full.Spec.Containers = []corev1.Container{{Name: "app", Image: "example.com/app:1", Env: []corev1.EnvVar{{Name: "A", Value: "b"}}}}
	full.Status.ContainerStatuses = []corev1.ContainerStatus{{Name: "app", Ready: true}}
	got, err := trimPod(full)
	if err != nil {
		t.Fatal(err)
	}
	p := got.(*corev1.Pod)
	if len(p.ManagedFields) != 0 || len(p.Spec.Containers) != 0 || len(p.Status.ContainerStatuses) != 0 {
		t.Errorf("trimmed pod keeps managed fields, containers or container statuses: %+v", p)
	}
	if len(p.Annotations) != 1 || p.Annotations["sluice.io/allow"] != "api.example.com" {
		t.Errorf("annotations %v, want only sluice.io/allow", p.Annotations)
	}
	src := &KubeSource{Layout: PodCgroupLayout{Mount: "/cg", Driver: DriverCgroupfs}}
	a, err := src.workload(full)
	if err != nil {
		t.Fatal(err)
	}
	b, err := src.workload(p)
	if err != nil {
		t.Fatal(err)
	}
	a.Annotations = map[string]string{"sluice.io/allow": a.Annotations["sluice.io/allow"]}
	if !a.Equal(b) || a.CgroupPath != b.CgroupPath {
		t.Errorf("workload from the trimmed pod %+v differs from the full pod's %+v", b, a)
	}
	if tomb, _ := trimPod(cache.DeletedFinalStateUnknown{Key: "ns/web", Obj: full}); tomb == nil {
		t.Error("a tombstone was dropped")
	}
}
