// Package e2e runs the real sluice agent binary on a netns testbed and
// checks what users see: which connections the proxy received with which
// original destination, what the servers saw, `sluice status`, metrics,
// and that the datapath survives the agent.
package e2e

import (
	"encoding/json"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/sluice-io/sluice/agent/datapath"
	"github.com/sluice-io/sluice/test/conformance"
	"github.com/sluice-io/sluice/test/harness"
	"github.com/sluice-io/sluice/test/testbed"
)

func TestMain(m *testing.M) { testbed.Main(m, harness.Roles) }

type status struct {
	Proxy struct {
		Ready bool `json:"Ready"`
	} `json:"proxy"`
	Workloads []struct {
		ID         uint32 `json:"id"`
		Name       string `json:"name"`
		FailMode   string `json:"fail_mode"`
		Redirected uint64 `json:"redirected"`
	} `json:"workloads"`
	AgentNote   string `json:"agent_note"`
	AttachScope string `json:"attach_scope"`
	Programs    []struct {
		Name     string `json:"name"`
		CgroupID uint64 `json:"cgroup_id"`
		Role     string `json:"role"`
	} `json:"programs"`
	Exclusions       []string `json:"exclusions"`
	NodeLocal        []string `json:"node_local"`
	InFlightCapacity int      `json:"in_flight_capacity"`
}

func readStatus(t *testing.T, e *harness.Env) status {
	t.Helper()
	var st status
	out := e.Status(t, "--format", "json")
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatalf("status json: %v\n%s", err, out)
	}
	return st
}

func dial(t *testing.T, p *testbed.Pod, spec string) testbed.DialResult {
	t.Helper()
	res := testbed.Dial(t, testbed.Run(t, 30*time.Second, p.Cgroup, p.Netns, "client", spec))
	if len(res) != 1 {
		t.Fatalf("%d results", len(res))
	}
	return res[0]
}

// redirected dials from p and reports whether the proxy received the
// connection (its access log has it), checking the original destination it
// recovered and what the server saw. The client speaks first, so the
// proxy's inspectors decide at once.
func redirected(t *testing.T, e *harness.Env, p *testbed.Pod, dst string) bool {
	t.Helper()
	r := testbed.Dial(t, testbed.Run(t, 30*time.Second, p.Cgroup, p.Netns, "client", "-send", "hello", "tcp4:"+dst))[0]
	if r.Err != "" {
		t.Fatalf("dial %s from %s: %s", dst, p.Name, r.Err)
	}
	if r.Peer != dst {
		t.Errorf("getpeername = %s, want %s", r.Peer, dst)
	}
	rec, ok := conformance.FindFinal(e.Records, r.Local, 2*time.Second)
	if !ok {
		if want := "peer=" + p.IPv4.String(); !strings.HasPrefix(r.Reply, want) {
			t.Errorf("direct connection: server saw %q, want %s:*", r.Reply, want)
		}
		return false
	}
	if got := rec.Str("original_destination"); got != dst {
		t.Errorf("proxy recovered %q, want %s", got, dst)
	}
	if want := "peer=" + testbed.NodeV4.String(); !strings.HasPrefix(r.Reply, want) {
		t.Errorf("redirected connection: server saw %q, want %s:*", r.Reply, want)
	}
	return true
}

func TestPrivilegedAgentFileSource(t *testing.T) {
	e := harness.NewEnforcing(t, 2)
	web, other := e.TB.Pods[0], e.TB.Pods[1]
	dst := fmt.Sprintf("%s:%d", testbed.ExternalV4[0], harness.ServerPort)
	e.WriteWorkloads(t, harness.Workload{Pod: web, Namespace: "demo", Name: "web", Mode: "enforce", Allow: dst})

	agent := e.StartAgent(t)
	harness.WaitFor(t, "proxy ready (agent probing the stand-in's /ready)", 10*time.Second, func() bool { return readStatus(t, e).Proxy.Ready })

	if !redirected(t, e, web, dst) {
		t.Fatal("selected pod's connection was not redirected")
	}
	if redirected(t, e, other, dst) {
		t.Fatal("unselected pod's connection was redirected")
	}
	// The node's own addresses are excluded (--exclude-node-addresses).
	nodeDst := fmt.Sprintf("%s:%d", testbed.NodeV4, harness.ServerPort)
	e.Echo.Add(e.TB.Node.Listen(t, "tcp", nodeDst))
	if redirected(t, e, web, nodeDst) {
		t.Fatal("connection to the node's own address was redirected")
	}

	st := readStatus(t, e)
	if !slices.Contains(st.Exclusions, testbed.NodeV4.String()+"/32") {
		t.Errorf("exclusions %v lack the node address %s", st.Exclusions, testbed.NodeV4)
	}
	if len(st.Workloads) != 1 || st.Workloads[0].Name != "demo/web" || st.Workloads[0].FailMode != "closed" || st.Workloads[0].Redirected != 1 {
		t.Fatalf("status workloads %+v, want demo/web fail-closed with 1 redirected", st.Workloads)
	}
	if !strings.Contains(st.AgentNote, "agent running") {
		t.Errorf("status note %q", st.AgentNote)
	}
	if st.InFlightCapacity != datapath.DefaultInFlightEntries {
		t.Errorf("status in-flight capacity %d, want %d", st.InFlightCapacity, datapath.DefaultInFlightEntries)
	}
	id := st.Workloads[0].ID

	m := e.Metrics(t)
	for _, want := range []string{
		`sluice_workload_connections_total{outcome="redirected",workload_namespace="demo",workload_pod="web"} 1`,
		`sluice_proxy_ready 1`,
		`sluice_selected_workloads 1`,
		`sluice_datapath_events_total{event="orig_dst_answered"} 1`,
		`sluice_datapath_inflight_capacity 65536`,
	} {
		if !strings.Contains(m, want) {
			t.Errorf("metrics lack %s; have:\n%s", want, strings.Join(harness.MetricLines(m, "sluice_"), "\n"))
		}
	}
	// The default 30 s readiness lease, renewed by every probe.
	if v := harness.MetricLines(m, "sluice_readiness_lease_remaining_seconds "); len(v) != 1 {
		t.Errorf("readiness lease metric: %v", v)
	} else if left, err := strconv.ParseFloat(strings.Fields(v[0])[1], 64); err != nil || left < 20 || left > 30 {
		t.Errorf("readiness lease remaining %q, want 20-30 s of the default 30 s lease", v[0])
	}
	if v := harness.MetricLines(m, "sluice_xds_versions_total "); len(v) != 1 || v[0] == "sluice_xds_versions_total 0" {
		t.Errorf("xds versions: %v", v)
	}

	// SIGTERM: the control plane stops, the datapath keeps redirecting.
	harness.StopAgent(t, agent)
	if !redirected(t, e, web, dst) {
		t.Fatal("redirection stopped with the agent")
	}
	if st := readStatus(t, e); !strings.Contains(st.AgentNote, "not running") || len(st.Workloads) != 1 || st.Workloads[0].Redirected != 2 {
		t.Fatalf("status after stop: %+v", st)
	}

	// A restarted agent adopts the pinned workload with its counter id,
	// then follows the file.
	e.StartAgent(t)
	if st := readStatus(t, e); len(st.Workloads) != 1 || st.Workloads[0].ID != id || st.Workloads[0].Redirected != 2 {
		t.Fatalf("status after restart: %+v (want id %d, counters kept)", st.Workloads, id)
	}
	if !redirected(t, e, web, dst) {
		t.Fatal("not redirected after restart")
	}
	e.WriteWorkloads(t)
	harness.WaitFor(t, "the workload to be deselected", 10*time.Second, func() bool { return len(readStatus(t, e).Workloads) == 0 })
	if redirected(t, e, web, dst) {
		t.Fatal("deselected pod still redirected")
	}
}
