package e2e

import (
	"fmt"
	"net/netip"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/sluice-io/sluice/agent/datapath"
	"github.com/sluice-io/sluice/test/harness"
	"github.com/sluice-io/sluice/test/standin"
	"github.com/sluice-io/sluice/test/testbed"
)

// The DaemonSet update, as the shipped manifests make it (maxSurge 1, the
// proxy's preStop drain; docs/install.md), under a steady stream of
// connections from a fail-open and a fail-closed pod:
//
//  1. the old pod runs: its agent holds the node lock, its proxy serves
//     port 15001;
//  2. the new pod starts beside it: its agent finds the lock held and
//     stands by, serving its own proxy a full configuration on the
//     takeover port 15002; its readiness says standby and yes (the surge
//     goes on), and it programs nothing;
//  3. the old agent gets SIGTERM (the old pod is deleted) while its proxy
//     drains: the new agent takes the lock, adopts the pins and, once its
//     proxy is ready, switches the datapath to 15002;
//  4. the old proxy exits at the end of its drain.
//
// No connection fails, goes direct or is refused; both proxies carried some.
func TestPrivilegedUpgradeTakeover(t *testing.T) {
	e := harness.NewWithoutProxy(t, 2)
	dst := fmt.Sprintf("%s:%d", testbed.ExternalV4[1], harness.ServerPort)
	e.WriteWorkloads(t,
		harness.Workload{Pod: e.TB.Pods[0], Namespace: "shop", Name: "audited", Mode: "audit"},
		harness.Workload{Pod: e.TB.Pods[1], Namespace: "shop", Name: "enforced", Mode: "enforce", Allow: dst})
	takeover := []string{"--workloads-file", e.WorkloadsFile, "--proxy-takeover-port", "15002"}

	oldPod, newPod := e.NewPod(t, "old"), e.NewPod(t, "new")
	oldProxy := e.StartProxyPod(t, oldPod)
	oldAgent := e.StartAgentPod(t, oldPod, true, takeover...)
	harness.WaitFor(t, "the old pod ready", 10*time.Second, func() bool {
		out, ok := e.Health(t, oldPod, true)
		return ok && out == "ok"
	})
	if p := harness.PinnedProxyPort(t, e.PinPath); p != datapath.DefaultProxyPort {
		t.Fatalf("first agent: datapath sends to port %d, want %d", p, datapath.DefaultProxyPort)
	}

	const d = 12 * time.Second
	open := startStream(t, e.TB.Pods[0], d, "tcp4:"+dst, "-interval", "5ms")
	closed := startStream(t, e.TB.Pods[1], d, "tcp4:"+dst, "-interval", "5ms")
	time.Sleep(time.Second)

	newProxy := e.StartProxyPod(t, newPod)
	newAgent := e.StartAgentPod(t, newPod, false, takeover...)
	var standby string
	harness.WaitFor(t, "the new pod ready as a standby", 10*time.Second, func() bool {
		out, ok := e.Health(t, newPod, true)
		standby = out
		return ok
	})
	if !strings.HasPrefix(standby, "standby:") {
		t.Errorf("new agent's readiness while the old holds the lock: %q, want it to say standby", standby)
	}
	if p := harness.PinnedProxyPort(t, e.PinPath); p != datapath.DefaultProxyPort {
		t.Errorf("a standby agent moved the datapath to port %d", p)
	}
	if !strings.Contains(newAgent.Stderr.String(), "standing by") {
		t.Errorf("the standby's log does not say it stands by:\n%s", newAgent.Stderr.String())
	}
	// From the attacker's side: the standby's proxy listens on the
	// takeover port with a full configuration, and a pod dialling it
	// directly (to reach it with no original destination, or the other
	// proxy's listener) is refused at connect(), before any packet.
	dialProxyPortRefused(t, e, 15002, "the standby's takeover port")

	stopped := time.Now()
	harness.StopAgent(t, oldAgent)
	var switched time.Time
	harness.WaitFor(t, "the new agent took over", 15*time.Second, func() bool {
		if harness.PinnedProxyPort(t, e.PinPath) != 15002 {
			return false
		}
		switched = time.Now()
		return true
	})
	harness.WaitFor(t, "the new pod ready", 10*time.Second, func() bool {
		out, ok := e.Health(t, newPod, true)
		return ok && out == "ok"
	})
	t.Logf("takeover: the datapath switched to the new proxy %v after the old agent got SIGTERM", switched.Sub(stopped).Round(time.Millisecond))
	// And after the switch, the draining old proxy's port is the other
	// port: refused too.
	dialProxyPortRefused(t, e, datapath.DefaultProxyPort, "the draining old proxy's port")
	// The old proxy's drain ends.
	time.Sleep(time.Second)
	oldProxy.Signal(syscall.SIGTERM, 5*time.Second)
	drained := time.Now()

	for _, s := range []struct {
		name string
		s    *stream
	}{{"fail-open", open}, {"fail-closed", closed}} {
		tl := s.s.wait(t)
		t.Logf("%s pod: %d connections across the update: %v (during the takeover: %v; after the old proxy exited: %v)",
			s.name, len(tl.at), tl.count, tl.between(stopped, switched), tl.between(drained, time.Now()))
		if tl.count["redirected"] != len(tl.at) {
			t.Errorf("%s pod across the update: %v, want every connection redirected; failures: %v", s.name, tl.count, tl.failures(s.s.start))
		}
		if n := tl.between(drained, time.Now())["redirected"]; n == 0 {
			t.Errorf("%s pod: no connection after the old proxy exited (the stream ended too early to tell)", s.name)
		}
	}
	oldRecs, newRecs := standin.ReadRecords(oldPod.Records), standin.ReadRecords(newPod.Records)
	t.Logf("connections through the old proxy: %d, through the new: %d", len(oldRecs), len(newRecs))
	if len(oldRecs) == 0 || len(newRecs) == 0 {
		t.Errorf("old proxy carried %d, new %d: want both to carry some", len(oldRecs), len(newRecs))
	}
	_ = newProxy
}

// dialProxyPortRefused dials the proxy address at port from both pods (fail
// open and fail closed) and fails unless connect() is refused with EPERM.
func dialProxyPortRefused(t *testing.T, e *harness.Env, port uint16, what string) {
	t.Helper()
	spec := "tcp4:" + netip.AddrPortFrom(datapath.DefaultProxyIPv4, port).String()
	for _, p := range e.TB.Pods[:2] {
		r := testbed.Dial(t, testbed.Run(t, 30*time.Second, p.Cgroup, p.Netns, "client", spec))[0]
		if !strings.Contains(r.Err, "operation not permitted") {
			t.Errorf("pod %s dialling %s (%s): %+v, want EPERM at connect()", p.Name, spec, what, r)
		}
	}
}
