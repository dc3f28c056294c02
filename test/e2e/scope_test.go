package e2e

import (
	"fmt"
	"maps"
	"strings"
	"testing"
	"time"

	"github.com/sluice-io/sluice/agent/datapath"
	"github.com/sluice-io/sluice/test/harness"
	"github.com/sluice-io/sluice/test/testbed"
)

// linksByCgroup counts the datapath's pinned links per cgroup id.
func linksByCgroup(t *testing.T, pinPath string) map[uint64]int {
	t.Helper()
	out := map[uint64]int{}
	for _, p := range datapath.Programs(pinPath) {
		if p.Err != nil {
			t.Errorf("pinned link %s: %v", p.Name, p.Err)
			continue
		}
		out[p.CgroupID]++
	}
	return out
}

// The agent with --attach-scope=workloads: the programs go to the selected
// pod's cgroup and the proxy's, never to the cgroup above them, so an
// unselected pod runs none; the selected pod is redirected with its
// original destination, across an agent restart, and deselecting it
// detaches its programs.
func TestPrivilegedAgentWorkloadsScope(t *testing.T) {
	e := harness.NewEnforcing(t, 2)
	web, other := e.TB.Pods[0], e.TB.Pods[1]
	dst := fmt.Sprintf("%s:%d", testbed.ExternalV4[0], harness.ServerPort)
	e.WriteWorkloads(t, harness.Workload{Pod: web, Namespace: "demo", Name: "web", Mode: "enforce", Allow: dst})
	args := []string{"--workloads-file", e.WorkloadsFile, "--attach-scope", "workloads", "--proxy-cgroup", e.TB.ProxyCgroup.Path}

	agent := e.StartAgentPod(t, e.DefaultPod(), true, args...)
	harness.WaitFor(t, "proxy ready", 10*time.Second, func() bool { return readStatus(t, e).Proxy.Ready })
	harness.WaitFor(t, "the workload redirected", 10*time.Second, func() bool {
		st := readStatus(t, e)
		return len(st.Workloads) == 1
	})
	ids := map[string]uint64{}
	for name, cg := range map[string]*testbed.Cgroup{"root": e.TB.Root, "proxy": e.TB.ProxyCgroup, "web": web.Cgroup, "other": other.Cgroup} {
		id, err := datapath.CgroupID(cg.Path)
		if err != nil {
			t.Fatal(err)
		}
		ids[name] = id
	}
	links := linksByCgroup(t, e.PinPath)
	if links[ids["root"]] != 0 || links[ids["other"]] != 0 || links[ids["proxy"]] != 2 || links[ids["web"]] != 8 {
		t.Fatalf("links per cgroup %v (ids %v): want the proxy's 2 and the selected pod's 8, none on the root or the unselected pod", links, ids)
	}
	// sluice status says where each link is, by role.
	st := readStatus(t, e)
	roles := map[string]int{}
	for _, p := range st.Programs {
		roles[fmt.Sprintf("%s@%d", p.Role, p.CgroupID)]++
	}
	wantRoles := map[string]int{fmt.Sprintf("proxy@%d", ids["proxy"]): 2, fmt.Sprintf("workload@%d", ids["web"]): 8}
	if st.AttachScope != "workloads" || !maps.Equal(roles, wantRoles) {
		t.Errorf("sluice status: scope %q, links by role %v; want workloads, %v", st.AttachScope, roles, wantRoles)
	}
	if text := e.Status(t); !strings.Contains(text, fmt.Sprintf("attach scope: workloads (the proxy's programs on cgroup [%d]; 1 selected cgroups)", ids["proxy"])) {
		t.Errorf("sluice status does not say the scope:\n%s", text)
	}
	if !redirected(t, e, web, dst) {
		t.Fatal("selected pod's connection was not redirected")
	}
	if redirected(t, e, other, dst) {
		t.Fatal("unselected pod's connection was redirected")
	}

	harness.StopAgent(t, agent)
	if !redirected(t, e, web, dst) {
		t.Fatal("redirection stopped with the agent")
	}
	e.StartAgentPod(t, e.DefaultPod(), true, args...)
	if !redirected(t, e, web, dst) {
		t.Fatal("not redirected after restart")
	}

	e.WriteWorkloads(t)
	harness.WaitFor(t, "the workload to be deselected", 10*time.Second, func() bool { return len(readStatus(t, e).Workloads) == 0 })
	if links := linksByCgroup(t, e.PinPath); links[ids["web"]] != 0 || links[ids["proxy"]] != 2 {
		t.Errorf("links per cgroup after deselecting: %v, want only the proxy's 2", links)
	}
	if redirected(t, e, web, dst) {
		t.Fatal("deselected pod still redirected")
	}
}
