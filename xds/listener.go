package xds

import (
	"net/netip"
	"slices"
	"strconv"

	xdscore "github.com/cncf/xds/go/xds/core/v3"
	matcher "github.com/cncf/xds/go/xds/type/matcher/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	httpinspector "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/listener/http_inspector/v3"
	originaldst "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/listener/original_dst/v3"
	tlsinspector "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/listener/tls_inspector/v3"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// Canonical extension names. Envoy picks an extension by the type URL of
// its typed_config; the names are what its admin output and logs show, and
// the validator holds us to the real ones.
const (
	originalDstFilterName   = "envoy.filters.listener.original_dst"
	tlsInspectorFilterName  = "envoy.filters.listener.tls_inspector"
	httpInspectorFilterName = "envoy.filters.listener.http_inspector"
)

// Names of the filter chains that are not per workload. Per-workload chains
// are named "<kind>|<namespace>/<name>[|<port>]"; '|' never occurs in a
// Kubernetes name, so the two kinds cannot collide.
const (
	chainLoop          = "loop"
	chainUnknownSource = "unknown-source"
	chainDefault       = "no-match"
)

// listener builds the single listener: the proxy addresses, the listener
// filters that recover the original destination and sniff SNI and HTTP, a
// filter-chain matcher that looks at the source address first, and one set
// of filter chains per group of workloads.
func (b *builder) listener(groups []*group) *listener.Listener {
	addrs := b.state.Proxy.Addrs()
	port := uint32(b.state.Proxy.Port)
	timeout := b.state.ListenerFiltersTimeout
	if timeout == 0 {
		timeout = DefaultListenerFiltersTimeout
	}
	l := &listener.Listener{
		Name:    ListenerName,
		Address: socketAddress(addrs[0], port),
		ListenerFilters: []*listener.ListenerFilter{
			// original_dst first: it asks the kernel (our
			// cgroup/getsockopt program) for SO_ORIGINAL_DST and makes
			// that the connection's local address, which is what the
			// matcher, the access log and the ORIGINAL_DST cluster see.
			{Name: originalDstFilterName, ConfigType: &listener.ListenerFilter_TypedConfig{TypedConfig: b.any(&originaldst.OriginalDst{})}},
			{Name: tlsInspectorFilterName, ConfigType: &listener.ListenerFilter_TypedConfig{TypedConfig: b.any(&tlsinspector.TlsInspector{})}},
			{Name: httpInspectorFilterName, ConfigType: &listener.ListenerFilter_TypedConfig{TypedConfig: b.any(&httpinspector.HttpInspector{})}},
		},
		ListenerFiltersTimeout:           durationpb.New(timeout),
		ContinueOnListenerFiltersTimeout: true,
		FilterChainMatcher:               b.filterChainMatcher(groups),
		DefaultFilterChain:               b.denyChain(chainDefault, nil, "no filter chain matched"),
		StatPrefix:                       ListenerName,
		PerConnectionBufferLimitBytes:    wrapperspb.UInt32(bufferLimit),
		// Connections a listener filter closes (an oversized ClientHello)
		// never reach a chain; without this they are never logged.
		AccessLog: b.accessLog(nil, verdictDeny, "closed by a listener filter", logListener),
	}
	for _, a := range addrs[1:] {
		l.AdditionalAddresses = append(l.AdditionalAddresses, &listener.AdditionalAddress{Address: socketAddress(a, port)})
	}
	l.FilterChains = append(l.FilterChains,
		b.denyChain(chainLoop, nil, "destination is node-local (proxy, node, loopback, link-local, metadata)"),
		b.denyChain(chainUnknownSource, nil, "source is not a selected workload"),
	)
	for i := range groups {
		l.FilterChains = append(l.FilterChains, b.parts[i].chains...)
	}
	return l
}

func socketAddress(a netip.Addr, port uint32) *core.Address {
	return &core.Address{Address: &core.Address_SocketAddress{SocketAddress: &core.SocketAddress{
		Protocol:      core.SocketAddress_TCP,
		Address:       a.String(),
		PortSpecifier: &core.SocketAddress_PortValue{PortValue: port},
	}}}
}

// loopRanges are destinations the proxy never connects to: its own
// addresses (a connection whose original destination could not be
// recovered keeps the proxy address as its local address, and forwarding it
// would loop), loopback (Envoy's admin listens there) and the state's
// never-dial set (the node itself, link-local, metadata: Envoy runs in the
// node's network namespace, where 0.0.0.0 is the node's loopback).
func (b *builder) loopRanges() []netip.Prefix {
	var out []netip.Prefix
	for _, a := range b.state.Proxy.Addrs() {
		out = append(out, netip.PrefixFrom(a, a.BitLen()))
	}
	out = append(out, netip.MustParsePrefix("127.0.0.0/8"), netip.MustParsePrefix("::1/128"))
	for _, p := range b.state.NeverDial {
		if !slices.Contains(out, p) {
			out = append(out, p)
		}
	}
	return out
}

// filterChainMatcher selects a chain per connection. Envoy's classic
// filter_chain_match compares server names before source addresses and
// never backtracks, which would route one pod's TLS by another pod's SNI
// rules; the matcher API lets us test the destination (loops) and then the
// source address before anything else:
//
//	destination in loopRanges        -> loop (closed)
//	source in a workload's addresses -> audit chain, or the enforce matcher
//	anything else                    -> unknown-source (closed)
func (b *builder) filterChainMatcher(groups []*group) *matcher.Matcher {
	bySource := &matcher.Matcher_OnMatch{OnMatch: &matcher.Matcher_OnMatch_Action{Action: b.chainAction(chainUnknownSource)}}
	if len(groups) > 0 {
		bySource = &matcher.Matcher_OnMatch{OnMatch: &matcher.Matcher_OnMatch_Matcher{Matcher: &matcher.Matcher{
			MatcherType: &matcher.Matcher_MatcherTree_{MatcherTree: &matcher.Matcher_MatcherTree{
				Input:    b.input("source_ip", &sourceIPInput),
				TreeType: &matcher.Matcher_MatcherTree_CustomMatch{CustomMatch: b.sourceTrie()},
			}},
			OnNoMatch: &matcher.Matcher_OnMatch{OnMatch: &matcher.Matcher_OnMatch_Action{Action: b.chainAction(chainUnknownSource)}},
		}}}
	}
	return &matcher.Matcher{
		MatcherType: &matcher.Matcher_MatcherTree_{MatcherTree: &matcher.Matcher_MatcherTree{
			Input: b.input("destination_ip", &destinationIPInput),
			TreeType: &matcher.Matcher_MatcherTree_CustomMatch{CustomMatch: b.ipTrie([]*matcher.IPMatcher_IPRangeMatcher{{
				Ranges:    cidrRanges(b.loopRanges()),
				OnMatch:   &matcher.Matcher_OnMatch{OnMatch: &matcher.Matcher_OnMatch_Action{Action: b.chainAction(chainLoop)}},
				Exclusive: true,
			}})},
		}},
		OnNoMatch: bySource,
	}
}

// sourceTrie is the trie over the groups' pod addresses, each range
// leading to its group's branch. Its Any is the concatenation of the
// branches' encodings: a repeated field's elements are encoded one after
// another, so this is the deterministic encoding of the whole
// (TestSourceTrieEncoding), without encoding again the branches a previous
// build encoded.
func (b *builder) sourceTrie() *xdscore.TypedExtensionConfig {
	m := &matcher.IPMatcher{RangeMatchers: make([]*matcher.IPMatcher_IPRangeMatcher, len(b.parts))}
	n := 0
	for i, p := range b.parts {
		m.RangeMatchers[i] = p.rangeMatcher
		n += len(p.rangeBytes)
	}
	value := make([]byte, 0, n)
	for _, p := range b.parts {
		value = append(value, p.rangeBytes...)
	}
	a := &anypb.Any{TypeUrl: typeURL(m), Value: value}
	b.remember(a, m)
	return &xdscore.TypedExtensionConfig{Name: trieMatcherName, TypedConfig: a}
}

func hostPrefixes(ips []netip.Addr) []netip.Prefix {
	out := make([]netip.Prefix, len(ips))
	for i, ip := range ips {
		out[i] = netip.PrefixFrom(ip, ip.BitLen())
	}
	return out
}

func cidrRanges(ps []netip.Prefix) []*xdscore.CidrRange {
	var out []*xdscore.CidrRange
	for _, p := range ps {
		out = append(out, &xdscore.CidrRange{AddressPrefix: p.Addr().String(), PrefixLen: wrapU32(p.Bits())})
	}
	return out
}

func envoyCidrRanges(ps []netip.Prefix) []*core.CidrRange {
	var out []*core.CidrRange
	for _, p := range ps {
		out = append(out, &core.CidrRange{AddressPrefix: p.Addr().String(), PrefixLen: wrapU32(p.Bits())})
	}
	return out
}

func portString(p uint16) string { return strconv.Itoa(int(p)) }
