package xds

import (
	"net/netip"
	"slices"
	"testing"

	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	dfpcluster "github.com/envoyproxy/go-control-plane/envoy/extensions/clusters/dynamic_forward_proxy/v3"
	hcm "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	tcpproxy "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	cares "github.com/envoyproxy/go-control-plane/envoy/extensions/network/dns_resolver/cares/v3"
)

func filterNames(c *listener.FilterChain) []string {
	var out []string
	for _, f := range c.GetFilters() {
		out = append(out, f.GetName())
	}
	return out
}

// Hostname entries are forwarded where DNS says, never to the address the
// pod dialled: TLS chains set the upstream port from the original
// destination, resolve the SNI and tcp_proxy to the dynamic forward proxy
// cluster; HTTP allow routes go to that cluster through the HTTP filter, and
// CONNECT is answered 403 before any route forwards. CIDR entries keep
// ORIGINAL_DST. The DNS cache resolves through the state's resolvers and
// drops never-dial answers.
func TestHostnameEntriesUseDNS(t *testing.T) {
	resolver := netip.MustParseAddrPort("10.96.0.10:53")
	r, _, err := Build(State{Proxy: testProxy, NeverDial: testNeverDial, DNSResolvers: []netip.AddrPort{resolver}, Workloads: []Workload{
		pod("shop", "checkout", "enforce", "api.example.com:443, status.example.com:80, 203.0.113.0/24", "10.244.1.6"),
	}})
	if err != nil {
		t.Fatal(err)
	}
	if err := Validate(r); err != nil {
		t.Fatal(err)
	}

	tls := chain(t, r, "tls|")
	if got, want := filterNames(tls), []string{setFilterStateName, sniDFPFilterName, tcpProxyFilterName}; !slices.Equal(got, want) {
		t.Errorf("TLS chain filters %v, want %v", got, want)
	}
	var tp tcpproxy.TcpProxy
	if err := tls.GetFilters()[2].GetTypedConfig().UnmarshalTo(&tp); err != nil || tp.GetCluster() != DynamicForwardProxyClusterName {
		t.Errorf("TLS chain forwards to %q (%v), want %s", tp.GetCluster(), err, DynamicForwardProxyClusterName)
	}
	if err := chain(t, r, "tcp|").GetFilters()[0].GetTypedConfig().UnmarshalTo(&tp); err != nil || tp.GetCluster() != OriginalDstClusterName {
		t.Errorf("CIDR chain forwards to %q, want %s", tp.GetCluster(), OriginalDstClusterName)
	}

	http := chain(t, r, "http|shop/checkout|80")
	if got := filterNames(http); !slices.Equal(got, []string{setFilterStateName, hcmFilterName}) {
		t.Errorf("HTTP chain filters %v", got)
	}
	var m hcm.HttpConnectionManager
	if err := http.GetFilters()[1].GetTypedConfig().UnmarshalTo(&m); err != nil {
		t.Fatal(err)
	}
	if hf := m.GetHttpFilters(); len(hf) != 2 || hf[0].GetName() != httpDFPFilterName {
		t.Errorf("HTTP filters %v, want the dynamic forward proxy before the router", hf)
	}
	for _, vh := range m.GetRouteConfig().GetVirtualHosts() {
		first := vh.GetRoutes()[0]
		if first.GetMatch().GetConnectMatcher() == nil || first.GetDirectResponse().GetStatus() != 403 {
			t.Errorf("virtual host %q: first route %v, want CONNECT answered 403", vh.GetName(), first)
		}
		for _, rt := range vh.GetRoutes() {
			if c := rt.GetRoute().GetCluster(); c != "" && c != DynamicForwardProxyClusterName {
				t.Errorf("virtual host %q routes to %q, want only %s", vh.GetName(), c, DynamicForwardProxyClusterName)
			}
		}
	}

	var cfg dfpcluster.ClusterConfig
	if err := dfpCluster(t, r).GetClusterType().GetTypedConfig().UnmarshalTo(&cfg); err != nil {
		t.Fatal(err)
	}
	dc := cfg.GetDnsCacheConfig()
	var filtered []netip.Prefix
	for _, c := range dc.GetResolvedAddressFilter().GetRanges() {
		filtered = append(filtered, netip.PrefixFrom(netip.MustParseAddr(c.GetAddressPrefix()), int(c.GetPrefixLen().GetValue())))
	}
	for _, p := range testNeverDial {
		if !slices.ContainsFunc(filtered, func(f netip.Prefix) bool { return f.Bits() <= p.Bits() && f.Contains(p.Addr()) }) {
			t.Errorf("DNS answers in %s are not dropped (filter %v)", p, filtered)
		}
	}
	for _, a := range []string{"203.0.113.7", "2001:db8:77::7", "10.96.0.10"} {
		if slices.ContainsFunc(filtered, func(f netip.Prefix) bool { return f.Contains(netip.MustParseAddr(a)) }) {
			t.Errorf("DNS answers at %s (an ordinary address) are dropped", a)
		}
	}
	var res cares.CaresDnsResolverConfig
	if err := dc.GetTypedDnsResolverConfig().GetTypedConfig().UnmarshalTo(&res); err != nil {
		t.Fatal(err)
	}
	if rs := res.GetResolvers(); len(rs) != 1 || rs[0].GetSocketAddress().GetAddress() != resolver.Addr().String() ||
		rs[0].GetSocketAddress().GetPortValue() != uint32(resolver.Port()) || res.GetUseResolversAsFallback() {
		t.Errorf("DNS cache resolvers %v, want only %s (not the node's resolv.conf)", rs, resolver)
	}
	if dc.GetMaxHosts().GetValue() != DNSCacheMaxHosts {
		t.Errorf("max_hosts %d", dc.GetMaxHosts().GetValue())
	}
}
