package xds

import (
	"github.com/sluice-io/sluice/policy"
	"net/netip"
	"slices"
	"strings"

	xdscore "github.com/cncf/xds/go/xds/core/v3"
	matcher "github.com/cncf/xds/go/xds/type/matcher/v3"
	network "github.com/envoyproxy/go-control-plane/envoy/extensions/matching/common_inputs/network/v3"
	ipmatcher "github.com/envoyproxy/go-control-plane/envoy/extensions/matching/input_matchers/ip/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// Network matching inputs (envoy.matching.network.input category).
var (
	sourceIPInput          network.SourceIPInput
	destinationIPInput     network.DestinationIPInput
	destinationPortInput   network.DestinationPortInput
	serverNameInput        network.ServerNameInput
	transportProtocolInput network.TransportProtocolInput
	applicationProtoInput  network.ApplicationProtocolInput
)

const (
	trieMatcherName = "envoy.matching.custom_matchers.trie_matcher"
	ipMatcherName   = "envoy.matching.matchers.ip"
)

// httpProtocols are the values the http_inspector sets, in the quoted form
// the application_protocol input reports them.
var httpProtocols = []string{"'http/1.0'", "'http/1.1'", "'h2c'"}

// groupOnMatch is what the source-address matcher does for a group: audit
// goes straight to its chain; enforce descends into a matcher over the
// group's allow list that ends in its deny chain.
//
// The order of the enforce matcher is what the policy means:
//
//  1. destination in an allowed prefix (and port): any TCP is allowed;
//  2. TLS whose SNI is an allowed hostname (and port): allowed;
//  3. plaintext HTTP: to a chain whose routes check the Host header, one
//     chain per port named in hostname entries and one for the rest,
//     so that a denied request gets a 403 that says why;
//  4. anything else: the deny chain, which closes the connection.
func (b *builder) groupOnMatch(g *group) *matcher.Matcher_OnMatch {
	if g.policy.Mode == policy.Audit {
		return &matcher.Matcher_OnMatch{OnMatch: &matcher.Matcher_OnMatch_Action{Action: b.chainAction(chainName("audit", g))}}
	}
	var fms []*matcher.Matcher_MatcherList_FieldMatcher
	add := func(p *matcher.Matcher_MatcherList_Predicate, chain string) {
		fms = append(fms, &matcher.Matcher_MatcherList_FieldMatcher{
			Predicate: p,
			OnMatch:   &matcher.Matcher_OnMatch{OnMatch: &matcher.Matcher_OnMatch_Action{Action: b.chainAction(chain)}},
		})
	}
	cidrs, hosts := splitRules(g.policy.Allow)
	for _, port := range rulePorts(cidrs) {
		var prefixes []netip.Prefix
		for _, r := range cidrs {
			if r.Port == port {
				prefixes = append(prefixes, r.Prefix)
			}
		}
		add(and(b.destinationIn(g, prefixes), b.portIs(port)), chainName("tcp", g))
	}
	for _, port := range rulePorts(hosts) {
		var names []*matcher.Matcher_MatcherList_Predicate
		for _, r := range hosts {
			if r.Port == port {
				names = append(names, b.serverNameIs(r.Host))
			}
		}
		add(and(b.transportIs("tls"), or(names...), b.portIs(port)), chainName("tls", g))
	}
	plainHTTP := []*matcher.Matcher_MatcherList_Predicate{b.transportIs("raw_buffer"), b.applicationProtocolIsHTTP()}
	for _, port := range rulePorts(hosts) {
		if port != 0 {
			add(and(append(slices.Clone(plainHTTP), b.portIs(port))...), httpChainName(g, port))
		}
	}
	add(and(plainHTTP...), httpChainName(g, 0))
	return &matcher.Matcher_OnMatch{OnMatch: &matcher.Matcher_OnMatch_Matcher{Matcher: &matcher.Matcher{
		MatcherType: &matcher.Matcher_MatcherList_{MatcherList: &matcher.Matcher_MatcherList{Matchers: fms}},
		OnNoMatch:   &matcher.Matcher_OnMatch{OnMatch: &matcher.Matcher_OnMatch_Action{Action: b.chainAction(chainName("deny", g))}},
	}}}
}

// splitRules separates prefix rules from hostname rules, keeping order.
// TCP-hostname rules are neither: they allow only what Policy.Expand
// turned them into.
func splitRules(rules []policy.Rule) (cidrs, hosts []policy.Rule) {
	nh := 0
	for _, r := range rules {
		if r.IsHost() {
			nh++
		}
	}
	cidrs, hosts = make([]policy.Rule, 0, len(rules)-nh), make([]policy.Rule, 0, nh)
	for _, r := range rules {
		switch {
		case r.IsResolved():
		case r.IsHost():
			hosts = append(hosts, r)
		default:
			cidrs = append(cidrs, r)
		}
	}
	return cidrs, hosts
}

// rulePorts lists the distinct ports of rules in ascending order (0, any
// port, first).
func rulePorts(rules []policy.Rule) []uint16 {
	var ports []uint16
	for _, r := range rules {
		ports = append(ports, r.Port)
	}
	slices.Sort(ports)
	return slices.Compact(ports)
}

func chainName(kind string, g *group) string { return kind + "|" + g.key }

func httpChainName(g *group, port uint16) string {
	if port == 0 {
		return "http|" + g.key + "|*"
	}
	return "http|" + g.key + "|" + portString(port)
}

// and joins predicates, dropping nils; Envoy wants two or more in an
// and_matcher, so a single predicate stands alone.
func and(ps ...*matcher.Matcher_MatcherList_Predicate) *matcher.Matcher_MatcherList_Predicate {
	ps = slices.DeleteFunc(ps, func(p *matcher.Matcher_MatcherList_Predicate) bool { return p == nil })
	if len(ps) == 1 {
		return ps[0]
	}
	return &matcher.Matcher_MatcherList_Predicate{MatchType: &matcher.Matcher_MatcherList_Predicate_AndMatcher{
		AndMatcher: &matcher.Matcher_MatcherList_Predicate_PredicateList{Predicate: ps},
	}}
}

func or(ps ...*matcher.Matcher_MatcherList_Predicate) *matcher.Matcher_MatcherList_Predicate {
	if len(ps) == 1 {
		return ps[0]
	}
	return &matcher.Matcher_MatcherList_Predicate{MatchType: &matcher.Matcher_MatcherList_Predicate_OrMatcher{
		OrMatcher: &matcher.Matcher_MatcherList_Predicate_PredicateList{Predicate: ps},
	}}
}

func (b *builder) valueIs(input *xdscore.TypedExtensionConfig, m *matcher.StringMatcher) *matcher.Matcher_MatcherList_Predicate {
	return &matcher.Matcher_MatcherList_Predicate{MatchType: &matcher.Matcher_MatcherList_Predicate_SinglePredicate_{
		SinglePredicate: &matcher.Matcher_MatcherList_Predicate_SinglePredicate{
			Input:   input,
			Matcher: &matcher.Matcher_MatcherList_Predicate_SinglePredicate_ValueMatch{ValueMatch: m},
		},
	}}
}

func exact(s string) *matcher.StringMatcher {
	return &matcher.StringMatcher{MatchPattern: &matcher.StringMatcher_Exact{Exact: s}}
}

// portIs is nil for port 0 (any port), which and() drops.
func (b *builder) portIs(port uint16) *matcher.Matcher_MatcherList_Predicate {
	if port == 0 {
		return nil
	}
	return b.valueIs(b.input("destination_port", &destinationPortInput), exact(portString(port)))
}

func (b *builder) transportIs(proto string) *matcher.Matcher_MatcherList_Predicate {
	return b.valueIs(b.input("transport_protocol", &transportProtocolInput), exact(proto))
}

func (b *builder) applicationProtocolIsHTTP() *matcher.Matcher_MatcherList_Predicate {
	var ps []*matcher.Matcher_MatcherList_Predicate
	for _, p := range httpProtocols {
		ps = append(ps, b.valueIs(b.input("application_protocol", &applicationProtoInput), exact(p)))
	}
	return or(ps...)
}

// serverNameIs matches the SNI case-insensitively: exactly, or for
// "*.example.com" any name ending in ".example.com" (subdomains at any
// depth, not example.com itself), the same as Envoy's suffix wildcards in
// virtual host domains.
func (b *builder) serverNameIs(host string) *matcher.Matcher_MatcherList_Predicate {
	m := &matcher.StringMatcher{IgnoreCase: true, MatchPattern: &matcher.StringMatcher_Exact{Exact: host}}
	if suffix, ok := strings.CutPrefix(host, "*"); ok {
		m.MatchPattern = &matcher.StringMatcher_Suffix{Suffix: suffix}
	}
	return b.valueIs(b.input("server_name", &serverNameInput), m)
}

// destinationIn matches the (recovered original) destination address
// against prefixes with Envoy's LC-trie IP input matcher.
func (b *builder) destinationIn(g *group, prefixes []netip.Prefix) *matcher.Matcher_MatcherList_Predicate {
	return &matcher.Matcher_MatcherList_Predicate{MatchType: &matcher.Matcher_MatcherList_Predicate_SinglePredicate_{
		SinglePredicate: &matcher.Matcher_MatcherList_Predicate_SinglePredicate{
			Input: b.input("destination_ip", &destinationIPInput),
			Matcher: &matcher.Matcher_MatcherList_Predicate_SinglePredicate_CustomMatch{CustomMatch: &xdscore.TypedExtensionConfig{
				Name:        ipMatcherName,
				TypedConfig: b.any(&ipmatcher.Ip{CidrRanges: envoyCidrRanges(prefixes), StatPrefix: statPrefix("ip", g.key)}),
			}},
		},
	}}
}

func (b *builder) input(name string, m proto.Message) *xdscore.TypedExtensionConfig {
	// Each input is one of the constant messages above, by name.
	return &xdscore.TypedExtensionConfig{Name: "envoy.matching.inputs." + name, TypedConfig: b.sharedAny("input "+name, func() proto.Message { return m })}
}

func (b *builder) ipTrie(ranges []*matcher.IPMatcher_IPRangeMatcher) *xdscore.TypedExtensionConfig {
	return &xdscore.TypedExtensionConfig{Name: trieMatcherName, TypedConfig: b.any(&matcher.IPMatcher{RangeMatchers: ranges})}
}

// chainAction is the matcher action that names a filter chain: Envoy wants
// a google.protobuf.StringValue holding the chain's name.
func (b *builder) chainAction(name string) *xdscore.TypedExtensionConfig {
	return &xdscore.TypedExtensionConfig{Name: name, TypedConfig: b.any(wrapperspb.String(name))}
}

func wrapU32(n int) *wrapperspb.UInt32Value { return wrapperspb.UInt32(uint32(n)) }

// statName turns an identity into one stats name element: anything but
// letters, digits, '_' and '-' becomes '_' (Envoy splits stat names on '.').
func statName(s string) string {
	return strings.Map(func(r rune) rune {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9', r == '_', r == '-':
			return r
		}
		return '_'
	}, s)
}
