// Package demo is `make demo`: a throwaway node with two pods on this kernel,
// the real datapath, and a proxy, showing each connection's fate in a table.
// It is a Go test only to reuse the testbed's cleanup guarantees; it runs when
// EGRESSD_DEMO=1 (make demo) and skips otherwise.
package demo

import (
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"text/tabwriter"
	"time"

	"github.com/egressd/egressd/agent/datapath"
	"github.com/egressd/egressd/test/standin"
	"github.com/egressd/egressd/test/testbed"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

func TestMain(m *testing.M) {
	testbed.Main(m, map[string]testbed.Role{"proxy": standin.Main})
}

func TestDemo(t *testing.T) {
	if os.Getenv("EGRESSD_DEMO") == "" {
		t.Skip("the demo runs with `make demo`")
	}
	start := time.Now()
	say := func(format string, args ...any) { fmt.Printf(format+"\n", args...) }
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}

	say("egressd demo: a throwaway node with two pods, on kernel %s", kernel())
	tb := testbed.New(t, 2)
	selected, plain := tb.Pods[0], tb.Pods[1]
	say("  node netns %s, pods %s (%s) and %s (%s), external server netns %s (%s, %s)",
		tb.Node.Name, selected.Name, selected.IPv4, plain.Name, plain.IPv4, tb.External.Name, testbed.ExternalV4[0], testbed.ExternalV6[0])

	must(datapath.EnsureBPFFS(datapath.DefaultBPFFS))
	pin := filepath.Join(datapath.DefaultBPFFS, "egressd-demo-"+tb.ID)
	dp, err := datapath.Open(datapath.Config{CgroupPath: tb.Root.Path, PinPath: pin})
	must(err)
	t.Cleanup(func() {
		dp.Close()
		must(datapath.Uninstall(pin))
		say("torn down: programs detached, pins, namespaces and cgroups removed")
	})
	must(dp.SetProxy(datapath.Proxy{IPv4: datapath.DefaultProxyIPv4, IPv6: datapath.DefaultProxyIPv6, Port: datapath.DefaultProxyPort}))
	must(dp.SetExclusions(datapath.DefaultExclusions))
	cgid, err := datapath.CgroupID(selected.Cgroup.Path)
	must(err)
	must(dp.SetWorkload(cgid, datapath.Workload{ID: 1, FailMode: datapath.FailClosed}))
	say("  datapath attached to %s, pinned at %s; %s selected (cgroup id %d)", tb.Root.Path, pin, selected.Name, cgid)

	ns, err := netns.GetFromName(tb.Node.Name)
	must(err)
	h, err := netlink.NewHandleAt(ns)
	must(err)
	dev, err := datapath.ProxyAddrs{Handle: h}.Ensure(datapath.DefaultProxyIPv4, datapath.DefaultProxyIPv6)
	must(err)
	h.Close()
	ns.Close()

	echo := testbed.ServeEcho(t)
	for _, a := range append(append([]netip.Addr{}, testbed.ExternalV4...), testbed.ExternalV6...) {
		echo.Add(tb.External.Listen(t, "tcp", netip.AddrPortFrom(a, 443).String()))
	}
	records := filepath.Join(t.TempDir(), "proxy.jsonl")
	proxyName := "stand-in proxy (test/standin: getsockopt SO_ORIGINAL_DST, dial, splice)"
	if os.Getenv("ENVOY_BIN") != "" {
		say("  ENVOY_BIN is set, but the Envoy path needs the xDS server (not built yet): using the stand-in")
	}
	testbed.StartDaemon(t, tb.ProxyCgroup, tb.Node, "proxy", "-records", records,
		"-listen", fmt.Sprintf("%s:%d,[%s]:%d", datapath.DefaultProxyIPv4, datapath.DefaultProxyPort, datapath.DefaultProxyIPv6, datapath.DefaultProxyPort))
	say("  proxy: %s on %s:%d and [%s]:%d (%s); proxy ready", proxyName, datapath.DefaultProxyIPv4, datapath.DefaultProxyPort, datapath.DefaultProxyIPv6, datapath.DefaultProxyPort, dev)
	must(dp.SetReady(true))

	specs := []string{
		"tcp4:203.0.113.7:443",
		"tcp6:[2001:db8:77::7]:443",
		"mapped:203.0.113.8:443",
	}
	say("")
	w := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(w, "POD\tDESTINATION\tREDIRECTED\tORIGINAL DST (proxy)\tAPP'S GETPEERNAME\tSERVER SAW")
	for _, p := range []*testbed.Pod{selected, plain} {
		out := testbed.Run(t, 30*time.Second, p.Cgroup, p.Netns, "client", specs...)
		for _, r := range testbed.Dial(t, out) {
			orig, redirected := "-", "no"
			if rec, ok := standin.FindRecord(records, r.Local, time.Second); ok {
				redirected, orig = "yes", rec.OrigDst
			}
			seen := strings.TrimPrefix(r.Reply, "peer=")
			if r.Err != "" {
				seen = "error: " + r.Err
			}
			fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\n", p.Name, strings.SplitN(r.Spec, ":", 2)[1]+" ("+strings.SplitN(r.Spec, ":", 2)[0]+")", redirected, orig, r.Peer, seen)
		}
	}
	w.Flush()
	say("\n%s is selected: its connections reach the external server from the node's address (the proxy), the proxy", selected.Name)
	say("recovered each original destination, and the application still sees the original peer. %s goes direct.", plain.Name)

	c, err := dp.Counters()
	must(err)
	say("\ndatapath counters (what `egressd status` will show):")
	for i, v := range c.Values() {
		if v != 0 {
			say("  egressd_datapath_%s_total %d", datapath.CounterNames[i], v)
		}
	}
	say("\nnot shown yet: allow/deny policy (xDS server, issue 3) and the agent with a workload file (issue 4)")
	say("demo took %.1fs", time.Since(start).Seconds())
}

func kernel() string {
	b, _ := os.ReadFile("/proc/sys/kernel/osrelease")
	return strings.TrimSpace(string(b))
}
