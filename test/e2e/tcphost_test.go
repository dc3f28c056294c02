package e2e

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/sluice-io/sluice/agent"
	"github.com/sluice-io/sluice/test/harness"
	"github.com/sluice-io/sluice/test/testbed"
)

// TestPrivilegedTCPHostnameFollowsDNS: a TCP-hostname rule
// (tcp://name:port) allows, for any protocol, the addresses the agent
// resolves the name to, at that port only; when DNS moves the name, the
// new address is allowed, the old one stays allowed for the grace period
// and then is not, and a connection opened before the change keeps
// working throughout. Node-local answers and failed lookups allow nothing.
func TestPrivilegedTCPHostnameFollowsDNS(t *testing.T) {
	e := harness.NewEnforcing(t, 1)
	pod := e.TB.Pods[0]
	oldAddr, newAddr := testbed.ExternalV4[0], testbed.ExternalV4[1]
	port := uint16(harness.ServerPort)
	hp := func(a netip.Addr, p uint16) string { return netip.AddrPortFrom(a, p).String() }
	e.DNS.Set("db.example", oldAddr) // TTL 2 s
	e.DNS.Set("rebind.example", testbed.NodeV4)
	e.DNS.Fail("broken.example")
	e.WriteWorkloads(t, harness.Workload{Pod: pod, Namespace: "shop", Name: "billing", Mode: "enforce",
		Allow: fmt.Sprintf("tcp://db.example:%d, tcp://rebind.example:%[1]d, tcp://broken.example:%[1]d, tcp://nxdomain.example:%[1]d", port)})
	const grace = 4 * time.Second
	e.StartAgent(t, "--workloads-file", e.WorkloadsFile, "--dns-resolvers", harness.DNSResolver.String(),
		"--dns-min-ttl", "1s", "--dns-grace", grace.String())

	names := func() map[string]agent.NameStatus {
		st, err := agent.ReadState(e.StateFile)
		if err != nil {
			return nil
		}
		return st.Names
	}
	allows := func(name string, a netip.Addr) bool {
		return slices.ContainsFunc(names()[name].Addrs, func(na agent.NameAddr) bool { return na.Addr == a })
	}
	harness.WaitFor(t, "db.example resolved and the proxy ready", 10*time.Second, func() bool {
		return allows("db.example", oldAddr) && readStatus(t, e).Proxy.Ready
	})

	// dial connects from the pod and reports what the application read and
	// which server (if any) accepted the connection.
	dial := func(t *testing.T, a netip.Addr, p uint16) (reply, at, proxy string) {
		t.Helper()
		res, at, proxy := dialObserved(t, e, pod.Cgroup, pod.Netns, "tcp4:"+hp(a, p))
		if res.Err != "" {
			t.Logf("%s: %s", hp(a, p), res.Err)
		}
		return res.Reply, at, proxy
	}
	expect := func(t *testing.T, a netip.Addr, p uint16, allowed bool) {
		t.Helper()
		reply, at, proxy := dial(t, a, p)
		switch {
		case allowed && (at != hp(a, p) || !strings.HasPrefix(reply, "peer="+testbed.NodeV4.String()) || proxy != "forwarded"):
			t.Errorf("%s: server %q, reply %q, proxy %q; want it forwarded to that server through the proxy", hp(a, p), at, reply, proxy)
		case !allowed && (at != "" || reply != "" || proxy != "denied-closed"):
			t.Errorf("%s: server %q, reply %q, proxy %q; want it closed with nothing arriving anywhere", hp(a, p), at, reply, proxy)
		}
	}

	t.Run("the answer at the rule's port only", func(t *testing.T) {
		expect(t, oldAddr, port, true)
		expect(t, oldAddr, harness.ExcludedPort, false)
		expect(t, newAddr, port, false)
	})

	// A connection opened now, kept across the DNS change and the expiry.
	hold := testbed.Command(t, pod.Cgroup, pod.Netns, "hold", "tcp4:"+hp(oldAddr, port))
	stdin, stdout := testbed.StartPiped(t, hold)
	t.Cleanup(func() { hold.Process.Kill(); hold.Wait() })
	next := testbed.LineReader(stdout, 5*time.Second)
	if l := next(t); l != "READY peer="+testbed.NodeV4.String() {
		t.Fatalf("long-lived connection: %q, want it through the proxy", l)
	}
	stillOpen := func(t *testing.T, msg string) {
		t.Helper()
		fmt.Fprintln(stdin, msg)
		if l := next(t); l != "echo: "+msg {
			t.Errorf("the connection opened before the DNS change: %q, want %q", l, "echo: "+msg)
		}
	}

	changed := time.Now()
	e.DNS.Set("db.example", newAddr)
	harness.WaitFor(t, "db.example re-resolved", 10*time.Second, func() bool { return allows("db.example", newAddr) })
	t.Logf("the new answer was allowed %v after the DNS change", time.Since(changed).Round(10*time.Millisecond))
	t.Run("after the change: the new address, and the old one in its grace", func(t *testing.T) {
		if !allows("db.example", oldAddr) {
			t.Fatal("the old address left before its grace ended")
		}
		harness.WaitFor(t, "the served listener to allow the new address", 5*time.Second, func() bool {
			return strings.Contains(e.XDSListenerYAML(t), "address_prefix: "+newAddr.String())
		})
		expect(t, newAddr, port, true)
		expect(t, oldAddr, port, true)
		stillOpen(t, "after-change")
	})
	harness.WaitFor(t, "the old address's grace to end", 2*grace+10*time.Second, func() bool { return !allows("db.example", oldAddr) })
	// The agent pushes the listener without the old address at once (its
	// xDS debounce is 100 ms).
	harness.WaitFor(t, "the served listener to drop the old address", 5*time.Second, func() bool {
		return !strings.Contains(e.XDSListenerYAML(t), "address_prefix: "+oldAddr.String())
	})
	t.Run("after the grace: the old address is denied, the open connection stays", func(t *testing.T) {
		expect(t, oldAddr, port, false)
		expect(t, newAddr, port, true)
		stillOpen(t, "after-grace")
	})

	t.Run("node-local answers, failed lookups and NXDOMAIN allow nothing", func(t *testing.T) {
		st := names()
		if r := st["rebind.example"]; len(r.Addrs) != 0 || r.Dropped != 1 {
			t.Errorf("rebind.example (resolves to the node): %+v, want no address and 1 dropped", r)
		}
		if b := st["broken.example"]; len(b.Addrs) != 0 || !strings.Contains(b.Error, "RCodeServerFailure") {
			t.Errorf("broken.example (SERVFAIL): %+v", b)
		}
		if n := st["nxdomain.example"]; len(n.Addrs) != 0 || !strings.Contains(n.Error, "NXDOMAIN") {
			t.Errorf("nxdomain.example: %+v", n)
		}
		m := e.Metrics(t)
		for _, want := range []string{`sluice_tcp_hostname_lookups_total{result="error"}`, `sluice_tcp_hostname_lookups_total{result="nxdomain"}`, "sluice_tcp_hostnames 4"} {
			if !strings.Contains(m, want) {
				t.Errorf("metrics lack %s:\n%s", want, strings.Join(harness.MetricLines(m, "sluice_tcp_hostname"), "\n"))
			}
		}
		if out := e.Status(t); !strings.Contains(out, "db.example") || !strings.Contains(out, newAddr.String()) {
			t.Errorf("sluice status does not show the resolution:\n%s", out)
		}
	})
}
