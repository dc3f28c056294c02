package e2e

import (
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/sluice-io/sluice/agent/datapath"
	"github.com/sluice-io/sluice/test/harness"
	"github.com/sluice-io/sluice/test/testbed"
	"github.com/vishvananda/netlink"
)

// nodeHasAddr reports whether the node's lo carries a.
func nodeHasAddr(t *testing.T, e *harness.Env, a netip.Addr) bool {
	t.Helper()
	h := e.TB.Node.NetlinkHandle(t)
	lo, err := h.LinkByName("lo")
	if err != nil {
		t.Fatal(err)
	}
	list, err := h.AddrList(lo, netlink.FAMILY_ALL)
	if err != nil {
		t.Fatal(err)
	}
	for _, x := range list {
		if ip, ok := netip.AddrFromSlice(x.IP); ok && ip.Unmap() == a {
			return true
		}
	}
	return false
}

// uninstall runs `sluice uninstall` in the node's netns and returns its
// output.
func uninstall(t *testing.T, e *harness.Env) string {
	t.Helper()
	out, err := testbed.ExecCommand(t, e.AgentCgroup, e.TB.Node, e.Bin, "uninstall", "--pin-path", e.PinPath).CombinedOutput()
	if err != nil {
		t.Fatalf("sluice uninstall: %v\n%s", err, out)
	}
	return string(out)
}

// `sluice uninstall` removes the proxy addresses the agent added, and only
// those: an address that was on the node before the agent came is left in
// place and not reported as removed, whatever the flags say.
func TestPrivilegedUninstallRemovesOnlyWhatItAdded(t *testing.T) {
	v4, v6 := datapath.DefaultProxyIPv4, datapath.DefaultProxyIPv6

	t.Run("addresses that were there before", func(t *testing.T) {
		e := harness.New(t, 1) // the harness puts both proxy addresses on lo first
		e.WriteWorkloads(t)
		agent := e.StartAgent(t)
		harness.WaitFor(t, "proxy ready", 10*time.Second, func() bool { return readStatus(t, e).Proxy.Ready })
		harness.StopAgent(t, agent)
		out := uninstall(t, e)
		if !strings.Contains(out, "no proxy address removed") {
			t.Errorf("uninstall said %q, want that it removed no proxy address", out)
		}
		if !nodeHasAddr(t, e, v4) || !nodeHasAddr(t, e, v6) {
			t.Errorf("uninstall removed addresses it did not add")
		}
	})

	t.Run("addresses the agent added", func(t *testing.T) {
		e := harness.New(t, 1)
		// A fresh node: take the harness's addresses away (the stand-in
		// proxy keeps its bound sockets), so the agent adds them itself.
		for _, a := range []netip.Addr{v4, v6} {
			e.TB.Node.IP(t, "addr", "del", netip.PrefixFrom(a, a.BitLen()).String(), "dev", "lo")
		}
		e.WriteWorkloads(t)
		agent := e.StartAgent(t)
		harness.WaitFor(t, "the agent put the proxy addresses on the node", 10*time.Second, func() bool {
			return nodeHasAddr(t, e, v4) && nodeHasAddr(t, e, v6)
		})
		harness.StopAgent(t, agent)
		out := uninstall(t, e)
		if !strings.Contains(out, "proxy addresses ["+v4.String()+" "+v6.String()+"] removed") {
			t.Errorf("uninstall said %q, want both proxy addresses removed", out)
		}
		if nodeHasAddr(t, e, v4) || nodeHasAddr(t, e, v6) {
			t.Errorf("proxy addresses still on the node after uninstall")
		}
		// A second uninstall finds nothing and says so.
		if out := uninstall(t, e); !strings.Contains(out, "no pinned datapath") {
			t.Errorf("second uninstall said %q", out)
		}
	})
}

// An address the node gets after the agent started (a CNI bridge, a
// renumbered interface) joins the never-dial set and the node-address
// exclusions: a selected pod's connection to it goes direct from the pod,
// as to any node address, never through the proxy, which would dial the
// node from the node itself. Removed again, it leaves both.
func TestPrivilegedNodeAddressesFollowed(t *testing.T) {
	e := harness.New(t, 1)
	pod := e.TB.Pods[0]
	e.WriteWorkloads(t, harness.Workload{Pod: pod, Namespace: "shop", Name: "audited", Mode: "audit"})
	e.StartAgent(t)
	harness.WaitFor(t, "the pod selected and the proxy ready", 10*time.Second, func() bool {
		st := readStatus(t, e)
		return st.Proxy.Ready && len(st.Workloads) == 1
	})
	late := netip.MustParseAddr("10.99.0.1")
	host := late.String() + "/32"
	e.TB.Node.IP(t, "addr", "add", host, "dev", "lo")
	srv := testbed.ServeEcho(t, e.TB.Node.Listen(t, "tcp", netip.AddrPortFrom(late, 9470).String()))
	has := func(list []string) bool { return slices.Contains(list, host) }
	harness.WaitFor(t, "the new node address in the never-dial set and the exclusions", 10*time.Second, func() bool {
		st := readStatus(t, e)
		return has(st.NodeLocal) && has(st.Exclusions)
	})
	r := dial(t, pod, "tcp4:"+netip.AddrPortFrom(late, 9470).String())
	if r.Reply != "peer="+pod.IPv4.String() {
		t.Errorf("connection to the new node address: %+v; want it direct from the pod (%s), never through the proxy", r, pod.IPv4)
	}
	if got := srv.Peers(); len(got) != 1 {
		t.Errorf("the node listener saw %v, want exactly the pod's connection", got)
	}
	e.TB.Node.IP(t, "addr", "del", host, "dev", "lo")
	harness.WaitFor(t, "the address gone from both again", 10*time.Second, func() bool {
		st := readStatus(t, e)
		return !has(st.NodeLocal) && !has(st.Exclusions)
	})
}
