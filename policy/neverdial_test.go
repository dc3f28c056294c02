package policy

import (
	"fmt"
	"net/netip"
	"testing"
)

func TestNodeLocal(t *testing.T) {
	n := NodeLocal{
		Proxy:    []netip.Addr{netip.MustParseAddr("169.254.77.1"), netip.MustParseAddr("fd73:6c75:6963:65::1")},
		Node:     []netip.Addr{netip.MustParseAddr("10.0.0.5"), netip.MustParseAddr("::ffff:10.0.0.5"), netip.MustParseAddr("10.200.1.1"), netip.MustParseAddr("10.200.1.1")},
		Metadata: []netip.Addr{netip.MustParseAddr("fd00:ec2::254"), netip.MustParseAddr("169.254.169.254"), netip.MustParseAddr("::ffff:169.254.169.254")},
	}
	// Node addresses once each (a v4-mapped duplicate and a veth gateway
	// repeated per pod collapse), the proxy's, and what is node-local
	// everywhere.
	want := "[0.0.0.0/8 10.0.0.5/32 10.200.1.1/32 127.0.0.0/8 169.254.0.0/16 169.254.77.1/32 ::/128 ::1/128 fd73:6c75:6963:65::1/128 fe80::/10]"
	if got := fmt.Sprint(n.Prefixes()); got != want {
		t.Errorf("Prefixes() = %s\nwant        %s", got, want)
	}
	if got := fmt.Sprint(n.MetadataAddrs()); got != "[169.254.169.254 fd00:ec2::254]" {
		t.Errorf("MetadataAddrs() = %s", got)
	}
	all := map[netip.Prefix]bool{}
	for _, p := range n.All() {
		all[p] = true
	}
	for _, s := range []string{"0.0.0.0/8", "::ffff:0.0.0.0/104", "::/128", "::ffff:127.0.0.0/104", "169.254.169.254/32",
		"::ffff:169.254.169.254/128", "fd00:ec2::254/128", "::ffff:10.0.0.5/128", "fd73:6c75:6963:65::1/128"} {
		if !all[netip.MustParsePrefix(s)] {
			t.Errorf("All() lacks %s: %v", s, n.All())
		}
	}
	// Never everything: the v4-mapped forms cover only node-local IPv4.
	if all[netip.MustParsePrefix("::ffff:0.0.0.0/96")] || all[netip.MustParsePrefix("0.0.0.0/0")] {
		t.Errorf("All() covers every address: %v", n.All())
	}
}

func TestNodeLocalDefaults(t *testing.T) {
	// With nothing known of the node, the set still closes its loopback.
	got := map[netip.Prefix]bool{}
	for _, p := range (NodeLocal{}).Prefixes() {
		got[p] = true
	}
	for _, s := range []string{"0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "::/128", "::1/128", "fe80::/10"} {
		if !got[netip.MustParsePrefix(s)] {
			t.Errorf("default never-dial set lacks %s", s)
		}
	}
}
