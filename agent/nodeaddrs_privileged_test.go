package agent

import (
	"fmt"
	"net/netip"
	"testing"

	"github.com/sluice-io/sluice/test/testbed"
	"github.com/sluice-io/sluice/xds"
)

// kube-proxy's IPVS mode puts every Service address on kube-ipvs0: those
// are not the node's addresses. A veth stands in for the dummy device
// (CONFIG_DUMMY is off on the machines sluice is built on).
func TestPrivilegedNodeAddressesSkipServiceVIPs(t *testing.T) {
	testbed.RequirePrivileged(t)
	ns := testbed.NewNetns(t, "slc-addrs-"+testbed.RandomID())
	ns.IP(t, "link", "add", "kube-ipvs0", "type", "veth", "peer", "name", "eth0")
	ns.IP(t, "addr", "add", "10.96.0.10/32", "dev", "kube-ipvs0")
	ns.IP(t, "addr", "add", "10.0.0.5/24", "dev", "eth0")
	ns.IP(t, "addr", "add", "10.0.0.5/32", "dev", "lo") // the same address twice
	ns.IP(t, "addr", "add", "169.254.77.1/32", "dev", "lo")
	var got []netip.Addr
	err := ns.Do(func() error {
		var err error
		got, err = nodeAddresses(xds.Proxy{IPv4: netip.MustParseAddr("169.254.77.1"), Port: 15001})
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(got) != "[10.0.0.5]" {
		t.Errorf("node addresses %v, want [10.0.0.5]: not the Service VIP, not loopback or the proxy, each once", got)
	}
}
