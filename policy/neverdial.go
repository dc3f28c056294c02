// Package policy holds sluice's policy model. This file defines the
// never-dial set: destinations a selected workload's connection is never
// redirected to, and that the proxy never forwards to, whatever the policy
// says. The datapath (which refuses or excludes them at connect) and the
// xDS builder (whose listener closes them, as defence in depth) both take it
// from here, so the two can never disagree.
package policy

import (
	"net/netip"
	"slices"
)

// DefaultMetadata are the cloud instance-metadata addresses: AWS, GCP,
// Azure, OpenStack and others answer at 169.254.169.254; AWS's IPv6
// endpoint is fd00:ec2::254, GCE's fd20:ce::254; Alibaba Cloud's is
// 100.100.100.200; Azure's WireServer (agent and extension configuration)
// is 168.63.129.16, which also serves Azure DNS: list it as a resolver
// where pods use it for DNS.
var DefaultMetadata = []netip.Addr{
	netip.MustParseAddr("169.254.169.254"),
	netip.MustParseAddr("fd00:ec2::254"),
	netip.MustParseAddr("fd20:ce::254"),
	netip.MustParseAddr("100.100.100.200"),
	netip.MustParseAddr("168.63.129.16"),
}

// alwaysNodeLocal are node-local on every node. The proxy runs in the node's
// network namespace, so a connection it makes to any of these on a pod's
// behalf reaches the node itself: Linux connects 0.0.0.0 and :: to loopback,
// where Envoy's admin, the kubelet's healthz and the CRI streaming server
// listen; link-local is the node's own link.
var alwaysNodeLocal = []netip.Prefix{
	netip.MustParsePrefix("0.0.0.0/8"),
	netip.MustParsePrefix("127.0.0.0/8"),
	netip.MustParsePrefix("169.254.0.0/16"),
	netip.MustParsePrefix("::/128"),
	netip.MustParsePrefix("::1/128"),
	netip.MustParsePrefix("fe80::/10"),
}

// NodeLocal describes one node's never-dial set.
type NodeLocal struct {
	// Proxy are the proxy's listener addresses.
	Proxy []netip.Addr
	// Node are the node's own addresses.
	Node []netip.Addr
	// Metadata are the metadata-service addresses. They are never-dial too,
	// but a class of their own: see MetadataGrants.
	Metadata []netip.Addr
}

// Prefixes returns the node-local prefixes (metadata addresses aside),
// unmapped, deduplicated and sorted.
func (n NodeLocal) Prefixes() []netip.Prefix {
	out := slices.Clone(alwaysNodeLocal)
	for _, a := range slices.Concat(n.Proxy, n.Node) {
		if a.IsValid() {
			a = a.Unmap().WithZone("")
			out = append(out, netip.PrefixFrom(a, a.BitLen()))
		}
	}
	return sortedUnique(out)
}

// MetadataAddrs returns the metadata addresses, unmapped, deduplicated and
// sorted.
func (n NodeLocal) MetadataAddrs() []netip.Addr {
	var out []netip.Addr
	for _, a := range n.Metadata {
		if a.IsValid() {
			out = append(out, a.Unmap().WithZone(""))
		}
	}
	slices.SortFunc(out, netip.Addr.Compare)
	return slices.Compact(out)
}

// All returns every never-dial prefix, metadata included, and for each IPv4
// prefix its v4-mapped IPv6 form too: for a proxy that matches destination
// addresses as it finds them on a dual-stack socket.
func (n NodeLocal) All() []netip.Prefix {
	out := n.Prefixes()
	for _, a := range n.MetadataAddrs() {
		out = append(out, netip.PrefixFrom(a, a.BitLen()))
	}
	for _, p := range slices.Clone(out) {
		if p.Addr().Is4() {
			out = append(out, netip.PrefixFrom(netip.AddrFrom16(p.Addr().As16()), p.Bits()+96))
		}
	}
	return sortedUnique(out)
}

func sortedUnique(ps []netip.Prefix) []netip.Prefix {
	for i, p := range ps {
		ps[i] = p.Masked()
	}
	slices.SortFunc(ps, func(a, b netip.Prefix) int {
		if c := a.Addr().Compare(b.Addr()); c != 0 {
			return c
		}
		return a.Bits() - b.Bits()
	})
	return slices.Compact(ps)
}
