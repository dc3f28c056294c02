package testbed

import (
	"fmt"
	"net/netip"
	"testing"
)

// Addresses of the topology. Everything lives in namespaces the testbed
// creates; none of it is routed off the machine (the node namespace has no
// interface but lo and the veths below).
//
//	pod<i> eth0 10.200.<i>.2/24, fd00:200:<i>::2/64  --veth--  node p<i> 10.200.<i>.1, fd00:200:<i>::1
//	node ext   198.51.100.1/24, 2001:db8:100::1/64   --veth--  external eth0 198.51.100.2, 2001:db8:100::2
//	external lo: ExternalV4 (203.0.113.7, .8), ExternalV6 (2001:db8:77::7, ::8), DNSV4 (203.0.113.53)
var (
	ExternalV4 = []netip.Addr{netip.MustParseAddr("203.0.113.7"), netip.MustParseAddr("203.0.113.8")}
	ExternalV6 = []netip.Addr{netip.MustParseAddr("2001:db8:77::7"), netip.MustParseAddr("2001:db8:77::8")}
	// NodeV4 and NodeV6 are the node's addresses facing the external
	// namespace: what an external server sees when the proxy forwards.
	NodeV4 = netip.MustParseAddr("198.51.100.1")
	NodeV6 = netip.MustParseAddr("2001:db8:100::1")
)

// Pod is a pod: a network namespace joined to the node, and a cgroup.
type Pod struct {
	Name   string
	Netns  *Netns
	Cgroup *Cgroup
	IPv4   netip.Addr
	IPv6   netip.Addr
}

// Testbed is one node with pods and an external server namespace.
type Testbed struct {
	ID string
	// Root is the cgroup the datapath attaches to; it holds ProxyCgroup,
	// and every pod's cgroup.
	Root        *Cgroup
	ProxyCgroup *Cgroup
	Node        *Netns
	External    *Netns
	Pods        []*Pod
}

// New builds a testbed with the given number of pods.
func New(t testing.TB, pods int) *Testbed {
	t.Helper()
	RequirePrivileged(t)
	id := RandomID()
	tb := &Testbed{ID: id}
	tb.Root = NewRootCgroup(t, "sluice-test-"+id)
	tb.ProxyCgroup = tb.Root.Child(t, "proxy")

	tb.Node = NewNetns(t, "slc-"+id+"-node")
	tb.Node.Sysctl(t, "net.ipv4.ip_forward", "1")
	tb.Node.Sysctl(t, "net.ipv6.conf.all.forwarding", "1")

	tb.External = NewNetns(t, "slc-"+id+"-ext")
	tb.Node.IP(t, "link", "add", "ext", "type", "veth", "peer", "name", "eth0", "netns", tb.External.Name)
	tb.Node.IP(t, "addr", "add", NodeV4.String()+"/24", "dev", "ext")
	tb.Node.IP(t, "addr", "add", NodeV6.String()+"/64", "dev", "ext", "nodad")
	tb.Node.IP(t, "link", "set", "ext", "up")
	tb.External.IP(t, "addr", "add", "198.51.100.2/24", "dev", "eth0")
	tb.External.IP(t, "addr", "add", "2001:db8:100::2/64", "dev", "eth0", "nodad")
	tb.External.IP(t, "link", "set", "eth0", "up")
	for _, a := range ExternalV4 {
		tb.External.IP(t, "addr", "add", a.String()+"/32", "dev", "lo")
	}
	for _, a := range ExternalV6 {
		tb.External.IP(t, "addr", "add", a.String()+"/128", "dev", "lo", "nodad")
	}
	tb.External.IP(t, "addr", "add", DNSV4.String()+"/32", "dev", "lo")
	tb.Node.IP(t, "route", "add", "203.0.113.0/24", "via", "198.51.100.2")
	tb.Node.IP(t, "-6", "route", "add", "2001:db8:77::/64", "via", "2001:db8:100::2")
	tb.External.IP(t, "route", "add", "10.200.0.0/16", "via", NodeV4.String())
	tb.External.IP(t, "-6", "route", "add", "fd00:200::/32", "via", NodeV6.String())

	for i := 1; i <= pods; i++ {
		tb.Pods = append(tb.Pods, tb.addPod(t, i))
	}
	return tb
}

func (tb *Testbed) addPod(t testing.TB, i int) *Pod {
	t.Helper()
	name := fmt.Sprintf("pod%d", i)
	p := &Pod{
		Name:   name,
		Netns:  NewNetns(t, fmt.Sprintf("slc-%s-%s", tb.ID, name)),
		Cgroup: tb.Root.Child(t, name),
		IPv4:   netip.MustParseAddr(fmt.Sprintf("10.200.%d.2", i)),
		IPv6:   netip.MustParseAddr(fmt.Sprintf("fd00:200:%x::2", i)),
	}
	nodeSide := fmt.Sprintf("p%d", i)
	gw4, gw6 := fmt.Sprintf("10.200.%d.1", i), fmt.Sprintf("fd00:200:%x::1", i)
	tb.Node.IP(t, "link", "add", nodeSide, "type", "veth", "peer", "name", "eth0", "netns", p.Netns.Name)
	tb.Node.IP(t, "addr", "add", gw4+"/24", "dev", nodeSide)
	tb.Node.IP(t, "addr", "add", gw6+"/64", "dev", nodeSide, "nodad")
	tb.Node.IP(t, "link", "set", nodeSide, "up")
	p.Netns.IP(t, "addr", "add", p.IPv4.String()+"/24", "dev", "eth0")
	p.Netns.IP(t, "addr", "add", p.IPv6.String()+"/64", "dev", "eth0", "nodad")
	p.Netns.IP(t, "link", "set", "eth0", "up")
	p.Netns.IP(t, "route", "add", "default", "via", gw4)
	p.Netns.IP(t, "-6", "route", "add", "default", "via", gw6)
	return p
}
