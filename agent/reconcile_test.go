package agent

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/sluice-io/sluice/agent/datapath"
	"github.com/sluice-io/sluice/policy"
	"github.com/sluice-io/sluice/xds"
	"golang.org/x/sys/unix"
)

// fakeDatapath records what the reconciler programs.
type fakeDatapath struct {
	m    map[uint64]datapath.Workload
	sets int
}

func (f *fakeDatapath) SetWorkload(cg uint64, w datapath.Workload) error {
	f.m[cg] = w
	f.sets++
	return nil
}
func (f *fakeDatapath) DeleteWorkload(cg uint64) error { delete(f.m, cg); return nil }
func (f *fakeDatapath) Workloads() (map[uint64]datapath.Workload, error) {
	out := map[uint64]datapath.Workload{}
	for k, v := range f.m {
		out[k] = v
	}
	return out, nil
}

type fakeXDS struct {
	mu        sync.Mutex
	states    []xds.State
	connected bool
	acked     int // versions up to this are accepted
}

func (f *fakeXDS) setAcked(n int) {
	f.mu.Lock()
	f.acked = n
	f.mu.Unlock()
}

func (f *fakeXDS) Connected() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.connected
}

func (f *fakeXDS) AckedAtLeast(_, version string) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	n, _ := strconv.Atoi(version)
	return n <= f.acked
}

func (f *fakeXDS) Update(_ context.Context, st xds.State) (string, []xds.Issue, error) {
	f.mu.Lock()
	f.states = append(f.states, st)
	n := len(f.states)
	f.mu.Unlock()
	_, issues, err := xds.Build(st)
	return fmt.Sprint(n), issues, err
}

func (f *fakeXDS) statesCopy() []xds.State {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.states)
}

type fakeReporter struct{ got []string }

func (f *fakeReporter) Warn(key, reason, msg string) { f.got = append(f.got, key+" "+reason+": "+msg) }

// cgroups maps paths to ids; a path not in it does not exist.
type cgroups map[string]uint64

func (c cgroups) id(p string) (uint64, error) {
	if id, ok := c[p]; ok {
		return id, nil
	}
	return 0, fmt.Errorf("cgroup %s: %w", p, syscall.ENOENT) // as datapath.CgroupID
}

func newTestReconciler(t *testing.T, pinned map[uint64]datapath.Workload, cg cgroups) (*Reconciler, *fakeDatapath, *fakeXDS, *fakeReporter) {
	t.Helper()
	dp := &fakeDatapath{m: pinned}
	x := &fakeXDS{}
	rep := &fakeReporter{}
	r, err := NewReconciler(ReconcilerConfig{
		Datapath: dp, XDS: x, Reporter: rep, CgroupID: cg.id,
		Proxy:  xds.Proxy{IPv4: netip.MustParseAddr("169.254.77.1"), Port: 15001},
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
	if err != nil {
		t.Fatal(err)
	}
	return r, dp, x, rep
}

func wl(name, cgroup, mode, allow string) Workload {
	w := Workload{Namespace: "ns", Name: name, CgroupPath: cgroup, IPs: []netip.Addr{netip.MustParseAddr("10.0.0.1")},
		Labels: map[string]string{}, Annotations: map[string]string{}}
	if mode != "" {
		w.Labels[policy.LabelMode] = mode
	}
	if allow != "" {
		w.Annotations[policy.AnnotationAllow] = allow
	}
	return w
}

func TestReconcileSelectUpdateRemove(t *testing.T) {
	r, dp, _, _ := newTestReconciler(t, map[uint64]datapath.Workload{}, cgroups{"/cg/a": 100, "/cg/a2": 101, "/cg/b": 200})
	if err := r.Upsert(wl("a", "/cg/a", "", "")); err != nil {
		t.Fatal(err)
	}
	if got := dp.m[100]; got.ID != 1 || got.FailMode != datapath.FailOpen {
		t.Fatalf("audit workload programmed as %+v, want id 1 fail-open", got)
	}
	// The same workload again changes nothing.
	if err := r.Upsert(wl("a", "/cg/a", "", "")); err != nil || dp.sets != 1 {
		t.Fatalf("unchanged upsert: %d sets, err %v", dp.sets, err)
	}
	// Enforce: fail-closed by default, same counter id.
	if err := r.Upsert(wl("a", "/cg/a", "enforce", "x.example.com")); err != nil {
		t.Fatal(err)
	}
	if got := dp.m[100]; got.ID != 1 || got.FailMode != datapath.FailClosed {
		t.Fatalf("enforce workload programmed as %+v", got)
	}
	// A new cgroup for the same workload (service restarted): old one goes.
	if err := r.Upsert(wl("a", "/cg/a2", "enforce", "x.example.com")); err != nil {
		t.Fatal(err)
	}
	if _, old := dp.m[100]; old || dp.m[101].ID != 1 {
		t.Fatalf("after moving cgroups: %v", dp.m)
	}
	if err := r.Upsert(wl("b", "/cg/b", "", "")); err != nil {
		t.Fatal(err)
	}
	if dp.m[200].ID != 2 {
		t.Fatalf("second workload id %d, want 2", dp.m[200].ID)
	}
	if err := r.Remove("ns/a"); err != nil {
		t.Fatal(err)
	}
	if _, ok := dp.m[101]; ok || len(r.Keys()) != 1 {
		t.Fatalf("after remove: map %v, keys %v", dp.m, r.Keys())
	}
	if names := r.Names(); names[2] != "ns/b" || len(names) != 1 {
		t.Fatalf("names %v", names)
	}
}

func TestReconcileMissingCgroupChangesNothing(t *testing.T) {
	r, dp, _, _ := newTestReconciler(t, map[uint64]datapath.Workload{}, cgroups{})
	err := r.Upsert(wl("a", "/cg/not-yet", "", ""))
	if err == nil || !strings.Contains(err.Error(), "ns/a") || !strings.Contains(err.Error(), "no such file") {
		t.Fatalf("err = %v", err)
	}
	if len(dp.m) != 0 || len(r.Keys()) != 0 {
		t.Fatalf("programmed %v / %v for a workload without a cgroup", dp.m, r.Keys())
	}
}

// After a restart: pinned entries of workloads still present keep their
// counter ids and are never deleted; the rest go at Sync, not before.
func TestReconcileAdoptsPinsAndSyncs(t *testing.T) {
	pinned := map[uint64]datapath.Workload{
		100: {ID: 7, FailMode: datapath.FailOpen},
		300: {ID: 3, FailMode: datapath.FailClosed},
	}
	r, dp, _, _ := newTestReconciler(t, pinned, cgroups{"/cg/a": 100, "/cg/new": 400})
	if err := r.Upsert(wl("a", "/cg/a", "", "")); err != nil {
		t.Fatal(err)
	}
	if err := r.Upsert(wl("n", "/cg/new", "", "")); err != nil {
		t.Fatal(err)
	}
	if dp.m[100].ID != 7 {
		t.Fatalf("adopted workload's id %d, want 7 (its pinned id)", dp.m[100].ID)
	}
	if id := dp.m[400].ID; id == 7 || id == 3 || id == 0 {
		t.Fatalf("new workload got id %d, taken or zero", id)
	}
	if _, ok := dp.m[300]; !ok {
		t.Fatal("unclaimed pinned workload removed before Sync")
	}
	if err := r.Sync(); err != nil {
		t.Fatal(err)
	}
	if _, ok := dp.m[300]; ok {
		t.Fatal("unclaimed pinned workload survived Sync")
	}
	if _, ok := dp.m[100]; !ok {
		t.Fatal("claimed workload removed by Sync")
	}
}

func TestReconcilePolicyErrorIsReportedAndSafe(t *testing.T) {
	r, dp, x, rep := newTestReconciler(t, map[uint64]datapath.Workload{}, cgroups{"/cg/a": 100})
	if err := r.Upsert(wl("a", "/cg/a", "enforce", "ok.example.com, bad_host")); err != nil {
		t.Fatal(err)
	}
	if dp.m[100].FailMode != datapath.FailClosed {
		t.Fatal("enforce workload with a policy error is not fail-closed")
	}
	if len(rep.got) != 1 || !strings.Contains(rep.got[0], "ns/a PolicyError") || !strings.Contains(rep.got[0], "deny all") {
		t.Fatalf("reports %q", rep.got)
	}
	// The same error again is not reported again.
	w := wl("a", "/cg/a", "enforce", "ok.example.com, bad_host")
	w.IPs = append(w.IPs, netip.MustParseAddr("10.0.0.9"))
	if err := r.Upsert(w); err != nil || len(rep.got) != 1 {
		t.Fatalf("reports %q, err %v", rep.got, err)
	}
	r.PushXDS(context.Background())
	st := x.states[len(x.states)-1]
	if len(st.Workloads) != 1 || len(st.Workloads[0].Policy.Allow) != 0 || st.Workloads[0].PolicyError == "" {
		t.Fatalf("xds state %+v: want deny-all with the error", st.Workloads)
	}
}

func TestReconcileReplaceAndXDSIssues(t *testing.T) {
	r, dp, _, rep := newTestReconciler(t, map[uint64]datapath.Workload{}, cgroups{"/cg/a": 100, "/cg/b": 200, "/cg/c": 300})
	// a and b share an address with different policies.
	a, b := wl("a", "/cg/a", "", ""), wl("b", "/cg/b", "enforce", "x.example.com")
	if err := r.Replace([]Workload{a, b}); err != nil {
		t.Fatal(err)
	}
	r.PushXDS(context.Background())
	r.PushXDS(context.Background())
	var shared int
	for _, g := range rep.got {
		if strings.Contains(g, "ProxyConfig") && strings.Contains(g, "shares source address") {
			shared++
		}
	}
	if shared != 2 {
		t.Fatalf("want one shared-address report per workload, once: %q", rep.got)
	}
	if err := r.Replace([]Workload{wl("c", "/cg/c", "", "")}); err != nil {
		t.Fatal(err)
	}
	if len(dp.m) != 1 || dp.m[300].ID == 0 {
		t.Fatalf("after replace: %v", dp.m)
	}
}

// TCP-hostname rules of enforce workloads are resolved and turned into
// address rules in the xDS state; node-local answers never are; audit
// workloads resolve nothing; a deselected workload's names are forgotten.
func TestReconcileTCPHostnames(t *testing.T) {
	f := newFakeDNS()
	var r *Reconciler
	names := NewNames(NameConfig{Lookup: f.lookup, Now: f.clock, Refuse: func(a netip.Addr) bool { return r.Refuse(a) }, OnChange: func() { r.NameChanged() }})
	r, err := NewReconciler(ReconcilerConfig{
		Datapath: &fakeDatapath{m: map[uint64]datapath.Workload{}}, XDS: &fakeXDS{}, Names: names,
		CgroupID:  cgroups{"/cg/a": 100, "/cg/b": 200}.id,
		Proxy:     xds.Proxy{IPv4: netip.MustParseAddr("169.254.77.1"), Port: 15001},
		NodeLocal: policy.NodeLocal{Proxy: []netip.Addr{netip.MustParseAddr("169.254.77.1")}, Node: []netip.Addr{netip.MustParseAddr("192.0.2.10")}, Metadata: policy.DefaultMetadata},
		Logger:    slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
	if err != nil {
		t.Fatal(err)
	}
	f.set("db.example.com", time.Minute, "203.0.113.7", "192.0.2.10", "127.0.0.1", "169.254.169.254")
	f.set("audit.example.com", time.Minute, "203.0.113.9")
	if err := r.Upsert(wl("a", "/cg/a", "enforce", "tcp://db.example.com:5432")); err != nil {
		t.Fatal(err)
	}
	if err := r.Upsert(wl("b", "/cg/b", "", "tcp://audit.example.com:22")); err != nil {
		t.Fatal(err)
	}
	names.Step(context.Background())
	if f.count("audit.example.com") != 0 {
		t.Error("an audit workload's name was resolved")
	}
	rules := func() []policy.Rule {
		for _, w := range r.State().Workloads {
			if w.Name == "a" {
				return w.Policy.Allow
			}
		}
		t.Fatal("workload a not in the state")
		return nil
	}
	got := rules()
	want := []policy.Rule{{Host: "db.example.com", Port: 5432, Resolve: true}, {Prefix: netip.MustParsePrefix("203.0.113.7/32"), Port: 5432, Via: "tcp://db.example.com:5432"}}
	if !slices.Equal(got, want) {
		t.Fatalf("state rules %v, want %v (node-local answers dropped)", got, want)
	}
	select {
	case <-r.pending:
	default:
		t.Fatal("a resolution change did not schedule an xDS update")
	}
	// The node gains the answer's address: it is refused at once, before
	// any lookup.
	r.SetNodeLocal(policy.NodeLocal{Node: []netip.Addr{netip.MustParseAddr("203.0.113.7")}})
	if got := rules(); len(got) != 1 {
		t.Fatalf("after the node took the address: %v", got)
	}
	if err := r.Remove("ns/a"); err != nil {
		t.Fatal(err)
	}
	if st := names.Status(); len(st) != 0 {
		t.Fatalf("names still wanted after the workload left: %v", st)
	}
}

// Nothing is published before the sources delivered a full view: a
// listener from a partial view would close the connections of every
// workload not yet seen (the conformance proxy found this across an agent
// restart).
func TestReconcileNoXDSBeforeSync(t *testing.T) {
	r, _, x, _ := newTestReconciler(t, map[uint64]datapath.Workload{}, cgroups{"/cg/a": 100})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go r.RunXDS(ctx, time.Millisecond)
	if err := r.Upsert(wl("a", "/cg/a", "", "")); err != nil {
		t.Fatal(err)
	}
	time.Sleep(50 * time.Millisecond)
	if n := len(x.statesCopy()); n != 0 {
		t.Fatalf("%d xDS updates before Sync", n)
	}
	if err := r.Sync(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(2 * time.Second)
	for len(x.statesCopy()) == 0 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if st := x.statesCopy(); len(st) != 1 || len(st[0].Workloads) != 1 {
		t.Fatalf("after Sync: %d updates, want one with the workload", len(st))
	}
}

// A new workload (or one with new addresses) waits for Envoy: its datapath
// entry says "awaiting proxy" (its fail mode applies) until Envoy has
// accepted a listener version that contains it; a workload adopted from
// the pins after a restart, or one selected while no Envoy is on ADS, does
// not wait.
func TestReconcileAwaitsProxyACK(t *testing.T) {
	r, dp, x, _ := newTestReconciler(t, map[uint64]datapath.Workload{300: {ID: 7}}, cgroups{"/cg/a": 100, "/cg/b": 200, "/cg/old": 300})
	x.connected = true
	if err := r.Upsert(wl("a", "/cg/a", "enforce", "203.0.113.0/24")); err != nil {
		t.Fatal(err)
	}
	if err := r.Upsert(wl("old", "/cg/old", "", "")); err != nil {
		t.Fatal(err)
	}
	if !dp.m[100].AwaitingProxy {
		t.Fatal("a new workload is redirected before Envoy has its listener")
	}
	if dp.m[300].AwaitingProxy {
		t.Fatal("a workload adopted from the pins waits: Envoy kept the previous listener with it")
	}
	if err := r.Sync(); err != nil {
		t.Fatal(err)
	}
	r.PushXDS(context.Background()) // version "1"
	if !dp.m[100].AwaitingProxy {
		t.Fatal("stopped waiting before any ACK")
	}
	x.setAcked(1)
	r.ProxyAccepted()
	if got := dp.m[100]; got.AwaitingProxy || got.FailMode != datapath.FailClosed || !got.Enforce {
		t.Fatalf("after the ACK: %+v, want redirected, enforce, fail-closed", got)
	}
	// New addresses: wait again, for a version pushed after the change.
	w := wl("a", "/cg/a", "enforce", "203.0.113.0/24")
	w.IPs = []netip.Addr{netip.MustParseAddr("10.0.0.9")}
	if err := r.Upsert(w); err != nil {
		t.Fatal(err)
	}
	r.ProxyAccepted()
	if !dp.m[100].AwaitingProxy {
		t.Fatal("new addresses redirected before a listener with them was accepted")
	}
	r.PushXDS(context.Background()) // version "2"
	if !dp.m[100].AwaitingProxy {
		t.Fatal("version 1's ACK released a workload only version 2 has")
	}
	x.setAcked(2)
	r.ProxyAccepted()
	if dp.m[100].AwaitingProxy {
		t.Fatal("still waiting after version 2's ACK")
	}
	// No Envoy on ADS: nothing to wait for.
	x.mu.Lock()
	x.connected = false
	x.mu.Unlock()
	if err := r.Upsert(wl("b", "/cg/b", "", "")); err != nil {
		t.Fatal(err)
	}
	if dp.m[200].AwaitingProxy {
		t.Fatal("waits for an Envoy that is not connected")
	}
}

type refusingDatapath struct {
	fakeDatapath
	err error
}

func (f *refusingDatapath) SetWorkload(uint64, datapath.Workload) error { return f.err }

// The reconciler records its metrics whichever source calls it: each
// programmed change is timed, a missing cgroup (and only that) counts as a
// cgroup failure, and a datapath that refuses a workload counts by reason.
func TestReconcilerMetrics(t *testing.T) {
	m := NewMetrics(prometheus.NewRegistry())
	dp := &refusingDatapath{fakeDatapath: fakeDatapath{m: map[uint64]datapath.Workload{}}}
	cg := cgroups{"/cg/a": 100}
	id := func(p string) (uint64, error) {
		if p == "/cg/not-cgroup2" {
			return 0, fmt.Errorf("cgroup %s: not on a cgroup2 filesystem", p)
		}
		return cg.id(p)
	}
	r, err := NewReconciler(ReconcilerConfig{Datapath: dp, XDS: &fakeXDS{}, Reporter: &fakeReporter{}, CgroupID: id, Metrics: m,
		Proxy: xds.Proxy{IPv4: netip.MustParseAddr("169.254.77.1"), Port: 15001}, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Upsert(wl("gone", "/cg/gone", "", "")); err == nil {
		t.Fatal("a missing cgroup was selected")
	}
	if err := r.Upsert(wl("odd", "/cg/not-cgroup2", "", "")); err == nil {
		t.Fatal("a cgroup that is not cgroup2 was selected")
	}
	if n := testutil.ToFloat64(m.CgroupFailures); n != 1 {
		t.Errorf("cgroup failures %v, want 1 (the missing one only)", n)
	}
	dp.err = fmt.Errorf("select cgroup 100: update: %w", unix.E2BIG)
	if err := r.Upsert(wl("a", "/cg/a", "", "")); err == nil {
		t.Fatal("a refused workload was reported selected")
	}
	dp.err = fmt.Errorf("select cgroup 100: %w", unix.EPERM)
	r.Upsert(wl("a", "/cg/a", "", ""))
	if full, other := testutil.ToFloat64(m.DatapathFailures.WithLabelValues("map_full")), testutil.ToFloat64(m.DatapathFailures.WithLabelValues("other")); full != 1 || other != 1 {
		t.Errorf("datapath failures map_full %v other %v, want 1 and 1", full, other)
	}
	dp.err = nil
	if err := r.Upsert(wl("a", "/cg/a", "", "")); err != nil {
		t.Fatal(err)
	}
	r.Upsert(wl("a", "/cg/a", "", "")) // unchanged: nothing programmed, nothing timed
	if err := r.Remove("ns/a"); err != nil {
		t.Fatal(err)
	}
	// The two refused tries, the select and the deselect.
	if n := histogramCount(t, m.Reconcile); n != 4 {
		t.Errorf("reconcile duration count %d, want 4", n)
	}
}

// After a push, once no change has come for quietAfterPush, RunXDS hands
// the freed memory back once; changes that keep coming postpone it.
func TestReconcileReleasesMemoryWhenQuiet(t *testing.T) {
	r, _, x, _ := newTestReconciler(t, map[uint64]datapath.Workload{}, cgroups{"/cg/a": 100, "/cg/b": 101})
	var released atomic.Int32
	r.releaseMemory = func() { released.Add(1) }
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go r.RunXDS(ctx, time.Millisecond)
	if err := r.Sync(); err != nil {
		t.Fatal(err)
	}
	// Changes every quarter of the quiet period: no release meanwhile.
	for i := range 6 {
		if err := r.Upsert(wl("a", "/cg/a", "enforce", fmt.Sprintf("10.%d.0.0/16", i+1))); err != nil {
			t.Fatal(err)
		}
		time.Sleep(quietAfterPush / 4)
	}
	if n := released.Load(); n != 0 {
		t.Fatalf("memory released %d times while changes kept coming", n)
	}
	if len(x.statesCopy()) < 2 {
		t.Fatalf("%d pushes", len(x.statesCopy()))
	}
	deadline := time.Now().Add(5 * quietAfterPush)
	for released.Load() == 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(quietAfterPush + 100*time.Millisecond)
	if n := released.Load(); n != 1 {
		t.Fatalf("memory released %d times after the changes stopped, want once", n)
	}
}
