package kernel

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"

	"github.com/sluice-io/sluice/agent/datapath"
	"github.com/sluice-io/sluice/test/testbed"
)

var (
	ext4  = testbed.ExternalV4[0]
	ext4b = testbed.ExternalV4[1]
	ext6  = testbed.ExternalV6[0]
)

func hostport(a netip.Addr, port int) string {
	return netip.AddrPortFrom(a, uint16(port)).String()
}

// A selected pod's connections go through the proxy for IPv4, IPv6 and an
// AF_INET6 socket dialing a v4-mapped address: the proxy recovers the exact
// original destination, the server sees the node (the proxy), and the
// application's getpeername still names the original destination.
func TestPrivilegedRedirect(t *testing.T) {
	f := setup(t, 1)
	pod := f.tb.Pods[0]
	f.selectPod(t, pod, 1, datapath.FailClosed)
	before := f.counters(t)

	cases := []struct {
		spec       string
		wantOrig   string // what SO_ORIGINAL_DST returns to the proxy
		wantPeer   string // what getpeername returns to the application
		wantServer string // the source address the external server saw
		listenerV6 bool   // which proxy listener the connection reached
	}{
		{"tcp4:" + hostport(ext4, serverPort), hostport(ext4, serverPort), hostport(ext4, serverPort), testbed.NodeV4.String(), false},
		{"tcp6:" + hostport(ext6, serverPort), hostport(ext6, serverPort), hostport(ext6, serverPort), testbed.NodeV6.String(), true},
		{"mapped:" + hostport(ext4b, serverPort), hostport(ext4b, serverPort),
			hostport(netip.AddrFrom16(ext4b.As16()), serverPort), testbed.NodeV4.String(), false},
	}
	for _, c := range cases {
		t.Run(strings.Split(c.spec, ":")[0], func(t *testing.T) {
			r := f.dial(t, pod.Cgroup, pod, c.spec)[0]
			if r.Err != "" {
				t.Fatalf("dial %s: %s", c.spec, r.Err)
			}
			if r.Reply != "peer="+c.wantServer {
				t.Errorf("server saw %q, want peer=%s (the node's address: the proxy forwarded it)", r.Reply, c.wantServer)
			}
			if r.Peer != c.wantPeer {
				t.Errorf("getpeername = %s, want the original destination %s", r.Peer, c.wantPeer)
			}
			rec := f.recordFor(t, r.Local)
			if rec.OrigDst != c.wantOrig || rec.Result != "forwarded" {
				t.Errorf("proxy recovered %q (%s, err %q), want %s", rec.OrigDst, rec.Result, rec.Err, c.wantOrig)
			}
			lis := netip.MustParseAddrPort(rec.Listener)
			if lis.Addr().Is6() != c.listenerV6 {
				t.Errorf("connection reached listener %s; want IPv6 listener: %v", rec.Listener, c.listenerV6)
			}
		})
	}

	after := f.counters(t)
	// tcp4 and mapped are IPv4.
	wantCounted(t, before, after, map[string]uint64{"redirected_ipv4": 2, "redirected_ipv6": 1, "orig_dst_answered": 3, "claimed": 3})
	ws, err := f.dp.WorkloadStats()
	if err != nil {
		t.Fatal(err)
	}
	if ws[1].Redirected != 3 {
		t.Errorf("workload 1 redirected = %d, want 3", ws[1].Redirected)
	}
}

// Nothing else is redirected: an unselected process in the selected pod's
// network namespace, UDP, an excluded CIDR, an excluded port.
func TestPrivilegedNotRedirected(t *testing.T) {
	f := setup(t, 1)
	pod := f.tb.Pods[0]
	f.selectPod(t, pod, 1, datapath.FailClosed)
	if err := f.dp.SetExclusions(append(datapath.DefaultExclusions, netip.PrefixFrom(ext4b, 32))); err != nil {
		t.Fatal(err)
	}
	if err := f.dp.SetExcludedPorts([]uint16{excludedPort}); err != nil {
		t.Fatal(err)
	}
	other := f.tb.Root.Child(t, "unselected")
	before := f.counters(t)

	direct := "peer=" + pod.IPv4.String()
	cases := []struct {
		name string
		cg   *testbed.Cgroup
		spec string
	}{
		{"unselected process", other, "tcp4:" + hostport(ext4, serverPort)},
		{"excluded CIDR", pod.Cgroup, "tcp4:" + hostport(ext4b, serverPort)},
		{"excluded CIDR via v4-mapped", pod.Cgroup, "mapped:" + hostport(ext4b, serverPort)},
		{"excluded port", pod.Cgroup, "tcp4:" + hostport(ext4, excludedPort)},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := f.dial(t, c.cg, pod, c.spec)[0]
			if r.Err != "" {
				t.Fatalf("dial: %s", r.Err)
			}
			if r.Reply != direct {
				t.Errorf("server saw %q, want %s (direct, not through the proxy)", r.Reply, direct)
			}
		})
	}
	t.Run("UDP", func(t *testing.T) {
		r := f.dial(t, pod.Cgroup, pod, "udp4:"+hostport(ext4, serverPort))[0]
		if r.Err != "" {
			t.Fatalf("udp: %s", r.Err)
		}
		if r.Peer != hostport(ext4, serverPort) {
			t.Errorf("UDP socket connected to %s, want %s (unchanged)", r.Peer, hostport(ext4, serverPort))
		}
	})

	after := f.counters(t)
	if after.RedirectedV4 != before.RedirectedV4 || after.RedirectedV6 != before.RedirectedV6 {
		t.Errorf("redirect counters moved: before %+v after %+v", before, after)
	}
	if d := after.Excluded - before.Excluded; d != 3 {
		t.Errorf("excluded counted %d, want 3", d)
	}
	if n := len(f.proxyRecords(t)); n != 0 {
		t.Errorf("proxy saw %d connections, want none", n)
	}
}

// A selected pod connecting straight to the proxy address is not redirected
// and the proxy gets no original destination, so it closes the connection
// instead of looping.
func TestPrivilegedDirectToProxy(t *testing.T) {
	f := setup(t, 1)
	pod := f.tb.Pods[0]
	f.selectPod(t, pod, 1, datapath.FailClosed)
	before := f.counters(t)

	for _, spec := range []string{
		fmt.Sprintf("tcp4:%s", hostport(proxyV4, datapath.DefaultProxyPort)),
		fmt.Sprintf("tcp6:%s", hostport(proxyV6, datapath.DefaultProxyPort)),
	} {
		r := f.dial(t, pod.Cgroup, pod, spec)[0]
		if r.Local == "" {
			t.Fatalf("dial %s: %s", spec, r.Err)
		}
		rec := f.recordFor(t, r.Local)
		if rec.OrigDst != "" || rec.Result != "unknown-closed" {
			t.Errorf("%s: proxy recovered %q (%s), want no original destination", spec, rec.OrigDst, rec.Result)
		}
	}
	after := f.counters(t)
	if d := after.ProxyDirect - before.ProxyDirect; d != 2 {
		t.Errorf("proxy_direct counted %d, want 2", d)
	}
	if d := after.OrigDstUnknown - before.OrigDstUnknown; d != 2 {
		t.Errorf("orig_dst_unknown counted %d, want 2", d)
	}
}
