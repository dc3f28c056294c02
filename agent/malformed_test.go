package agent

import (
	"context"
	"fmt"
	"github.com/sluice-io/sluice/policy"
	"io"
	"log/slog"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/sluice-io/sluice/agent/datapath"
	"github.com/sluice-io/sluice/xds"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"
	"k8s.io/client-go/tools/record"
)

// Malformed pods as the API server can hand them over: no IPs yet, an allow
// annotation over the size limit, invalid UTF-8, thousands of entries, a
// mode label that means nothing. The source never stops; each pod is
// selected (its connections still go to the proxy), reported with a clear
// Event, and held to the safest policy: enforce deny-all, fail-closed, and
// in the datapath enforce mode, so no side door opens either.
func TestKubeSourceMalformedPods(t *testing.T) {
	layout := PodCgroupLayout{Mount: "/cg", Driver: DriverCgroupfs}
	cgs := &syncCgroups{m: map[string]uint64{}}
	var many []string
	for i := range 3000 {
		many = append(many, fmt.Sprintf("h%d.io", i))
	}
	enforce := map[string]string{"sluice.io/mode": "enforce"}
	pods := map[string]struct {
		labels, annotations map[string]string
		ip                  string
		event               string // substring of the Warning Event
	}{
		"no-ips":       {enforce, map[string]string{"sluice.io/allow": "api.example.com"}, "", "no IP address"},
		"huge":         {enforce, map[string]string{"sluice.io/allow": strings.Repeat("a.example.com,", 20000)}, "10.244.1.2", "more than 65536"},
		"invalid-utf8": {enforce, map[string]string{"sluice.io/allow": "api.example.com,\xff\xfe.example.com"}, "10.244.1.3", "non-ASCII hostname"},
		"thousands":    {enforce, map[string]string{"sluice.io/allow": strings.Join(many, ",")}, "10.244.1.4", "more than 1024 entries"},
		"bad-mode":     {map[string]string{"sluice.io/mode": "permissive"}, map[string]string{"sluice.io/allow": "0.0.0.0/0"}, "10.244.1.5", "want audit or enforce"},
		"bad-fail":     {map[string]string{"sluice.io/mode": "enforce", "sluice.io/fail-mode": "opne"}, nil, "10.244.1.6", "want open or closed"},
	}
	var objs []*corev1.Pod
	id := uint64(100)
	for name, p := range pods {
		pod := testPod(name, "uid-"+name, corev1.PodQOSBurstable, p.ip, p.labels, p.annotations)
		if p.ip == "" {
			pod.Status.PodIPs = nil
		}
		objs = append(objs, pod)
		path, _ := layout.PodCgroup("uid-"+name, QoSBurstable)
		cgs.add(path, id)
		id++
	}
	client := fake.NewClientset(&corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node-a"}})
	for _, p := range objs {
		if _, err := client.CoreV1().Pods(p.Namespace).Create(context.Background(), p, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	dp := &lockedDatapath{f: fakeDatapath{m: map[uint64]datapath.Workload{}}}
	recorder := record.NewFakeRecorder(100)
	proxy := netip.MustParseAddr("169.254.77.1")
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	src := &KubeSource{Client: clientsetKube{client}, NodeName: "node-a", Layout: layout, Recorder: recorder, Logger: quiet, RetryBaseDelay: time.Millisecond}
	r, err := NewReconciler(ReconcilerConfig{Datapath: dp, XDS: &fakeXDS{}, Reporter: src, CgroupID: cgs.id, Proxy: xds.Proxy{IPv4: proxy, Port: 15001}, Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	synced := make(chan struct{})
	go src.Run(ctx, r, func() { r.Sync(); close(synced) })
	select {
	case <-synced:
	case <-time.After(10 * time.Second):
		t.Fatal("source never synced")
	}
	eventually(t, "every malformed pod selected", func() bool {
		dp.mu.Lock()
		defer dp.mu.Unlock()
		return len(dp.f.m) == len(pods)
	})
	dp.mu.Lock()
	for cg, w := range dp.f.m {
		if !w.Enforce || w.FailMode != datapath.FailClosed {
			t.Errorf("cgroup %d programmed %+v, want enforce and fail-closed", cg, w)
		}
	}
	dp.mu.Unlock()
	st := r.State()
	for _, w := range st.Workloads {
		if w.Name == "no-ips" {
			continue // a valid policy; the proxy closes its connections (below)
		}
		if w.Policy.Mode != policy.Enforce || len(w.Policy.Allow) != 0 || !w.Policy.FailClosed {
			t.Errorf("%s: policy %+v, want enforce deny-all, fail-closed", w.Name, w.Policy)
		}
	}
	// The xDS side reports the pod without addresses (and closes its
	// connections); the reconciler turns that into an Event too.
	_, issues, err := xds.Build(st)
	if err != nil {
		t.Fatalf("xds build of the malformed pods: %v", err)
	}
	for _, is := range issues {
		src.Warn(is.Workload, "ProxyConfig", is.Reason)
	}
	var events []string
	for deadline := time.After(5 * time.Second); len(events) < len(pods); {
		select {
		case e := <-recorder.Events:
			events = append(events, e)
		case <-deadline:
			t.Fatalf("%d events for %d pods: %v", len(events), len(pods), events)
		}
	}
	all := strings.Join(events, "\n")
	for name, p := range pods {
		if !strings.Contains(all, p.event) {
			t.Errorf("pod %s: no Warning event saying %q; events:\n%s", name, p.event, all)
		}
	}
}
