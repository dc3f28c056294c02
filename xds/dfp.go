package xds

import (
	"net/netip"
	"time"

	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	dfpcluster "github.com/envoyproxy/go-control-plane/envoy/extensions/clusters/dynamic_forward_proxy/v3"
	dnscache "github.com/envoyproxy/go-control-plane/envoy/extensions/common/dynamic_forward_proxy/v3"
	setstate "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/common/set_filter_state/v3"
	dfphttp "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/dynamic_forward_proxy/v3"
	netsetstate "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/set_filter_state/v3"
	snidfp "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/sni_dynamic_forward_proxy/v3"
	cares "github.com/envoyproxy/go-control-plane/envoy/extensions/network/dns_resolver/cares/v3"
	envoymatcher "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// Hostname entries are forwarded by Envoy's dynamic forward proxy: to the
// address DNS gives for the TLS server name or the HTTP Host, at the
// original destination's port, never to the address the client dialled (a
// client that sends an allowed name to any IP would otherwise reach that
// IP). CIDR entries and audit mode keep ORIGINAL_DST.
const (
	DynamicForwardProxyClusterName = "sluice_dynamic_forward_proxy"
	dnsCacheName                   = "sluice"

	dfpClusterType        = "envoy.clusters.dynamic_forward_proxy"
	sniDFPFilterName      = "envoy.filters.network.sni_dynamic_forward_proxy"
	httpDFPFilterName     = "envoy.filters.http.dynamic_forward_proxy"
	setFilterStateName    = "envoy.filters.network.set_filter_state"
	caresResolverName     = "envoy.network.dns_resolver.cares"
	dynamicPortStateKey   = "envoy.upstream.dynamic_port"
	downstreamLocalPortOp = "%DOWNSTREAM_LOCAL_PORT%"

	// DNSCacheMaxHosts bounds the names the node's Envoy keeps resolved at
	// once, across every pod (a wildcard entry's subdomains count one each).
	// When it is full a new name fails: HTTP gets a 503 "DNS cache
	// overflow", TLS is closed, and dns_cache.sluice.host_overflow counts
	// it; names unused for dnsHostTTL are dropped.
	DNSCacheMaxHosts = 4096
	dnsHostTTL       = 5 * time.Minute
	// Envoy re-resolves a name by its DNS TTL, but not more often than
	// this; a failed lookup is retried with backoff between these.
	dnsMinRefresh     = 5 * time.Second
	dnsFailureBackoff = 2 * time.Second
	dnsFailureMax     = 30 * time.Second
	dnsQueryTimeout   = 5 * time.Second
)

// dnsCache is the DNS cache of the dynamic forward proxy cluster and of
// every filter that attaches to it; Envoy requires them to be identical
// (dns_cache_manager_impl.cc: "config specified DNS cache ... with
// different settings"), so one function builds it.
//
// It resolves through the agent's configured resolvers (the cluster DNS),
// not the node's /etc/resolv.conf: Envoy runs in the node's network, whose
// resolver does not know cluster names and may not be the one the policy
// is written against. Answers in the never-dial set are dropped before they
// reach the cache (resolved_address_filter, Envoy 1.39): a name that
// resolves only to the node's loopback, its addresses or the metadata
// service fails as if it had no address (DNS rebinding).
func (b *builder) dnsCache() *dnscache.DnsCacheConfig {
	if b.dns == nil {
		b.dns = b.newDNSCache()
	}
	return b.dns
}

func (b *builder) newDNSCache() *dnscache.DnsCacheConfig {
	resolver := &cares.CaresDnsResolverConfig{
		// An empty list would mean the node's resolv.conf. The search list
		// stays Envoy's resolv.conf's (the DaemonSet's ClusterFirstWithHostNet
		// gives svc.cluster.local and cluster.local), so that an entry such
		// as external.e2e.svc resolves as it would in a pod.
		UseResolversAsFallback: false,
	}
	for _, r := range b.state.DNSResolvers {
		resolver.Resolvers = append(resolver.Resolvers, &core.Address{Address: &core.Address_SocketAddress{SocketAddress: &core.SocketAddress{
			Protocol:      core.SocketAddress_UDP,
			Address:       r.Addr().Unmap().String(),
			PortSpecifier: &core.SocketAddress_PortValue{PortValue: uint32(r.Port())},
		}}})
	}
	return &dnscache.DnsCacheConfig{
		Name:              dnsCacheName,
		DnsLookupFamily:   cluster.Cluster_V4_PREFERRED,
		MaxHosts:          wrapperspb.UInt32(DNSCacheMaxHosts),
		HostTtl:           durationpb.New(dnsHostTTL),
		DnsMinRefreshRate: durationpb.New(dnsMinRefresh),
		DnsQueryTimeout:   durationpb.New(dnsQueryTimeout),
		DnsFailureRefreshRate: &cluster.Cluster_RefreshRate{
			BaseInterval: durationpb.New(dnsFailureBackoff),
			MaxInterval:  durationpb.New(dnsFailureMax),
		},
		TypedDnsResolverConfig: &core.TypedExtensionConfig{Name: caresResolverName, TypedConfig: b.any(resolver)},
		ResolvedAddressFilter:  &envoymatcher.AddressMatcher{Ranges: cidrRanges(b.neverDial())},
	}
}

// neverDial is what the proxy never connects to: loopRanges (the proxy's
// own addresses, loopback and the state's never-dial set), without the
// prefixes another one covers. Every TLS and HTTP chain of every pod
// carries a copy of the DNS cache, so its size counts per pod.
func (b *builder) neverDial() []netip.Prefix {
	all := b.loopRanges()
	var out []netip.Prefix
	for i, p := range all {
		covered := false
		for j, q := range all {
			if i != j && q.Bits() < p.Bits() && q.Contains(p.Addr()) {
				covered = true
				break
			}
		}
		if !covered {
			out = append(out, p)
		}
	}
	return out
}

// dynamicForwardProxyCluster connects to the hosts the DNS cache resolved:
// the name from the SNI (tcp_proxy chains) or the Host (HTTP chains), the
// port from the envoy.upstream.dynamic_port filter state that
// portFromOriginalDst sets.
func (b *builder) dynamicForwardProxyCluster() *cluster.Cluster {
	return &cluster.Cluster{
		Name: DynamicForwardProxyClusterName,
		ClusterDiscoveryType: &cluster.Cluster_ClusterType{ClusterType: &cluster.Cluster_CustomClusterType{
			Name:        dfpClusterType,
			TypedConfig: b.any(&dfpcluster.ClusterConfig{ClusterImplementationSpecifier: &dfpcluster.ClusterConfig_DnsCacheConfig{DnsCacheConfig: b.dnsCache()}}),
		}},
		LbPolicy:        cluster.Cluster_CLUSTER_PROVIDED,
		ConnectTimeout:  durationpb.New(connectTimeout),
		CircuitBreakers: nodeScaleBreakers(),
		// The dynamic forward proxy cluster refuses protocol options without
		// auto_sni and auto_san_validation (cluster.cc, unless
		// allow_insecure_cluster_options). sluice never originates TLS: they
		// have no effect on the plaintext HTTP it forwards.
		TypedExtensionProtocolOptions: b.downstreamProtocol(&core.UpstreamHttpProtocolOptions{AutoSni: true, AutoSanValidation: true}),
		UpstreamConnectionOptions:     upstreamKeepalive(),
		PerConnectionBufferLimitBytes: wrapperspb.UInt32(bufferLimit),
	}
}

// portFromOriginalDst puts the connection's original destination port
// (%DOWNSTREAM_LOCAL_PORT%: the original_dst listener filter made the
// recovered destination the connection's local address) into
// envoy.upstream.dynamic_port, where the SNI and HTTP dynamic forward proxy
// filters and the cluster take the upstream port from. It must run before
// them: the SNI filter reads it when the connection starts.
func (b *builder) portFromOriginalDst() *listener.Filter {
	cfg := b.sharedAny("set_filter_state", func() proto.Message {
		return &netsetstate.Config{OnNewConnection: []*setstate.FilterStateValue{{
			Key: &setstate.FilterStateValue_ObjectKey{ObjectKey: dynamicPortStateKey},
			Value: &setstate.FilterStateValue_FormatString{FormatString: &core.SubstitutionFormatString{
				Format: &core.SubstitutionFormatString_TextFormatSource{TextFormatSource: &core.DataSource{
					Specifier: &core.DataSource_InlineString{InlineString: downstreamLocalPortOp},
				}},
			}},
		}}}
	})
	return &listener.Filter{Name: setFilterStateName, ConfigType: &listener.Filter_TypedConfig{TypedConfig: cfg}}
}

// sniForwardProxy resolves the TLS server name for the tcp_proxy after
// it. port_value is only the fallback should the port state be missing.
func (b *builder) sniForwardProxy() *listener.Filter {
	cfg := b.sharedAny("sni_dfp", func() proto.Message {
		return &snidfp.FilterConfig{
			DnsCacheConfig: b.dnsCache(),
			PortSpecifier:  &snidfp.FilterConfig_PortValue{PortValue: 443},
		}
	})
	return &listener.Filter{Name: sniDFPFilterName, ConfigType: &listener.Filter_TypedConfig{TypedConfig: cfg}}
}

// httpForwardProxy resolves the Host of requests routed to the dynamic
// forward proxy cluster, taking the port from the filter state
// portFromOriginalDst set (the Host's own port is stripped for matching).
// A failed or filtered lookup answers 503 with response flag DF.
func (b *builder) httpForwardProxy() *dfphttp.FilterConfig {
	return &dfphttp.FilterConfig{
		ImplementationSpecifier:         &dfphttp.FilterConfig_DnsCacheConfig{DnsCacheConfig: b.dnsCache()},
		AllowDynamicHostFromFilterState: true,
	}
}
