package conformance

import (
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	xdscore "github.com/cncf/xds/go/xds/core/v3"
	xdsmatcher "github.com/cncf/xds/go/xds/type/matcher/v3"
	network "github.com/envoyproxy/go-control-plane/envoy/extensions/matching/common_inputs/network/v3"
	ipmatcher "github.com/envoyproxy/go-control-plane/envoy/extensions/matching/input_matchers/ip/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// MatchData is what the filter-chain matcher sees of a connection once the
// listener filters ran.
type MatchData struct {
	Source, Destination netip.AddrPort // destination: restored by original_dst
	// TransportProtocol is "tls" when tls_inspector found a ClientHello,
	// else "raw_buffer" (Envoy sets that default before matching).
	TransportProtocol string
	ServerName        string   // SNI; "" if none
	ALPN              []string // from the ClientHello, or http/1.x / h2c from http_inspector
}

// input returns an input's value; ok false is Envoy's "no data" (absl
// nullopt), which matches nothing and sends a tree to on_no_match.
// source/extensions/matching/network/common/inputs.cc and
// application_protocol/config.cc.
func (d MatchData) input(name string) (string, bool) {
	switch name {
	case "destination_ip":
		return d.Destination.Addr().String(), d.Destination.IsValid()
	case "destination_port":
		return strconv.Itoa(int(d.Destination.Port())), d.Destination.IsValid()
	case "source_ip":
		return d.Source.Addr().String(), d.Source.IsValid()
	case "server_name":
		return d.ServerName, d.ServerName != ""
	case "transport_protocol":
		return d.TransportProtocol, d.TransportProtocol != ""
	case "application_protocol":
		// Quoted and comma-joined: 'h2','http/1.1'.
		if len(d.ALPN) == 0 {
			return "", false
		}
		return "'" + strings.Join(d.ALPN, "','") + "'", true
	}
	return "", false
}

// Matcher is a compiled xds.type.matcher.v3.Matcher.
type Matcher struct {
	// A tree: an IP trie over an input.
	Input string
	Trie  []trieNode
	// Or a list.
	List      []fieldMatcher
	OnNoMatch *OnMatch
}

// OnMatch is an action (a filter chain's name) or a nested matcher.
type OnMatch struct {
	Action  string
	Matcher *Matcher
}

type trieNode struct {
	prefix    netip.Prefix
	index     int
	exclusive bool
	onMatch   *OnMatch
}

type fieldMatcher struct {
	pred    *Predicate
	onMatch *OnMatch
}

// Predicate is a compiled predicate.
type Predicate struct {
	And, Or []*Predicate
	Input   string
	// Single predicates: a string match, or the IP input matcher.
	Exact, Suffix string
	IsSuffix      bool
	IgnoreCase    bool
	CIDRs         []netip.Prefix
}

var inputs = map[string]proto.Message{
	"destination_ip":       &network.DestinationIPInput{},
	"destination_port":     &network.DestinationPortInput{},
	"source_ip":            &network.SourceIPInput{},
	"server_name":          &network.ServerNameInput{},
	"transport_protocol":   &network.TransportProtocolInput{},
	"application_protocol": &network.ApplicationProtocolInput{},
}

func compileInput(path string, in *xdscore.TypedExtensionConfig) (string, error) {
	for name, m := range inputs {
		if in.GetTypedConfig().MessageIs(m) {
			if in.GetName() != "envoy.matching.inputs."+name {
				return "", fmt.Errorf("%s: input %s is named %q", path, name, in.GetName())
			}
			return name, nil
		}
	}
	return "", fmt.Errorf("%s: input %q not implemented", path, in.GetName())
}

func compileMatcher(path string, m *xdsmatcher.Matcher, chains map[string]*Chain) (*Matcher, error) {
	out := &Matcher{}
	var err error
	if m.GetOnNoMatch() != nil {
		if out.OnNoMatch, err = compileOnMatch(path+".on_no_match", m.GetOnNoMatch(), chains); err != nil {
			return nil, err
		}
	}
	switch {
	case m.GetMatcherTree() != nil:
		t := m.GetMatcherTree()
		if out.Input, err = compileInput(path+".matcher_tree.input", t.GetInput()); err != nil {
			return nil, err
		}
		cm := t.GetCustomMatch()
		if cm == nil || cm.GetName() != "envoy.matching.custom_matchers.trie_matcher" {
			return nil, fmt.Errorf("%s.matcher_tree: only the trie_matcher custom match is implemented", path)
		}
		if out.Input != "destination_ip" && out.Input != "source_ip" {
			return nil, fmt.Errorf("%s.matcher_tree: a trie over %s is not implemented", path, out.Input)
		}
		var ipm xdsmatcher.IPMatcher
		if err := unpack(path+".matcher_tree.custom_match.typed_config", cm.GetTypedConfig(), &ipm); err != nil {
			return nil, err
		}
		for i, rm := range ipm.GetRangeMatchers() {
			rp := fmt.Sprintf("%s.matcher_tree.custom_match.range_matchers[%d]", path, i)
			om, err := compileOnMatch(rp+".on_match", rm.GetOnMatch(), chains)
			if err != nil {
				return nil, err
			}
			for j, r := range rm.GetRanges() {
				p, err := cidr(fmt.Sprintf("%s.ranges[%d]", rp, j), r.GetAddressPrefix(), r.GetPrefixLen())
				if err != nil {
					return nil, err
				}
				// The trie's nodes are numbered by range matcher, in
				// declaration order (trie_matcher.h).
				out.Trie = append(out.Trie, trieNode{prefix: p, index: i, exclusive: rm.GetExclusive(), onMatch: om})
			}
		}
	case m.GetMatcherList() != nil:
		for i, fm := range m.GetMatcherList().GetMatchers() {
			fp := fmt.Sprintf("%s.matcher_list.matchers[%d]", path, i)
			p, err := compilePredicate(fp+".predicate", fm.GetPredicate())
			if err != nil {
				return nil, err
			}
			om, err := compileOnMatch(fp+".on_match", fm.GetOnMatch(), chains)
			if err != nil {
				return nil, err
			}
			if om.Matcher != nil {
				// Whether a nested list that does not match falls through
				// to the next field matcher changed across Envoy versions;
				// sluice does not rely on it.
				return nil, fmt.Errorf("%s.on_match: a nested matcher in a matcher list is not implemented", fp)
			}
			out.List = append(out.List, fieldMatcher{pred: p, onMatch: om})
		}
	default:
		return nil, fmt.Errorf("%s: neither matcher_tree nor matcher_list", path)
	}
	return out, nil
}

func compileOnMatch(path string, om *xdsmatcher.Matcher_OnMatch, chains map[string]*Chain) (*OnMatch, error) {
	switch {
	case om.GetAction() != nil:
		var s wrapperspb.StringValue
		if err := unpack(path+".action.typed_config", om.GetAction().GetTypedConfig(), &s); err != nil {
			return nil, err
		}
		// The filter chain name action: the chain must exist.
		if chains[s.GetValue()] == nil {
			return nil, fmt.Errorf("%s.action: no filter chain named %q", path, s.GetValue())
		}
		return &OnMatch{Action: s.GetValue()}, nil
	case om.GetMatcher() != nil:
		m, err := compileMatcher(path+".matcher", om.GetMatcher(), chains)
		if err != nil {
			return nil, err
		}
		return &OnMatch{Matcher: m}, nil
	}
	return nil, fmt.Errorf("%s: neither action nor matcher", path)
}

func cidr(path, addr string, plen *wrapperspb.UInt32Value) (netip.Prefix, error) {
	a, err := netip.ParseAddr(addr)
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("%s: %w", path, err)
	}
	p, err := a.Prefix(int(plen.GetValue()))
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("%s: %w", path, err)
	}
	return p, nil
}

func compilePredicate(path string, p *xdsmatcher.Matcher_MatcherList_Predicate) (*Predicate, error) {
	switch {
	case p.GetAndMatcher() != nil, p.GetOrMatcher() != nil:
		list := p.GetAndMatcher()
		if list == nil {
			list = p.GetOrMatcher()
		}
		if len(list.GetPredicate()) < 2 {
			return nil, fmt.Errorf("%s: and/or matchers need at least two predicates", path)
		}
		out := &Predicate{}
		for i, sub := range list.GetPredicate() {
			sp, err := compilePredicate(fmt.Sprintf("%s.predicate[%d]", path, i), sub)
			if err != nil {
				return nil, err
			}
			if p.GetAndMatcher() != nil {
				out.And = append(out.And, sp)
			} else {
				out.Or = append(out.Or, sp)
			}
		}
		return out, nil
	case p.GetSinglePredicate() != nil:
		sp := p.GetSinglePredicate()
		in, err := compileInput(path+".single_predicate.input", sp.GetInput())
		if err != nil {
			return nil, err
		}
		out := &Predicate{Input: in}
		switch {
		case sp.GetValueMatch() != nil:
			vm := sp.GetValueMatch()
			out.IgnoreCase = vm.GetIgnoreCase()
			switch pat := vm.GetMatchPattern().(type) {
			case *xdsmatcher.StringMatcher_Exact:
				out.Exact = pat.Exact
			case *xdsmatcher.StringMatcher_Suffix:
				out.Suffix, out.IsSuffix = pat.Suffix, true
			default:
				return nil, fmt.Errorf("%s.single_predicate.value_match: only exact and suffix are implemented", path)
			}
		case sp.GetCustomMatch() != nil:
			cm := sp.GetCustomMatch()
			var ipm ipmatcher.Ip
			if cm.GetName() != "envoy.matching.matchers.ip" || !cm.GetTypedConfig().MessageIs(&ipm) {
				return nil, fmt.Errorf("%s.single_predicate.custom_match: %q not implemented", path, cm.GetName())
			}
			if err := unpack(path+".single_predicate.custom_match.typed_config", cm.GetTypedConfig(), &ipm); err != nil {
				return nil, err
			}
			for i, r := range ipm.GetCidrRanges() {
				c, err := cidr(fmt.Sprintf("%s.cidr_ranges[%d]", path, i), r.GetAddressPrefix(), r.GetPrefixLen())
				if err != nil {
					return nil, err
				}
				out.CIDRs = append(out.CIDRs, c)
			}
			if len(out.CIDRs) == 0 {
				return nil, fmt.Errorf("%s: the IP matcher needs ranges", path)
			}
		default:
			return nil, fmt.Errorf("%s.single_predicate: no matcher", path)
		}
		return out, nil
	}
	return nil, fmt.Errorf("%s: predicate kind not implemented", path)
}

func (p *Predicate) match(d MatchData) bool {
	switch {
	case p.And != nil:
		for _, s := range p.And {
			if !s.match(d) {
				return false
			}
		}
		return true
	case p.Or != nil:
		return slices.ContainsFunc(p.Or, func(s *Predicate) bool { return s.match(d) })
	}
	v, ok := d.input(p.Input)
	if !ok {
		return false // no data: a value matcher does not match
	}
	if p.CIDRs != nil {
		a, err := netip.ParseAddr(v)
		return err == nil && slices.ContainsFunc(p.CIDRs, func(c netip.Prefix) bool { return c.Contains(a) })
	}
	want, suffix := p.Exact, p.Suffix
	if p.IgnoreCase {
		v, want, suffix = strings.ToLower(v), strings.ToLower(want), strings.ToLower(suffix)
	}
	if p.IsSuffix {
		return strings.HasSuffix(v, suffix)
	}
	return v == want
}

// Match runs the matcher: the chain name and whether anything matched.
func (m *Matcher) Match(d MatchData) (string, bool) {
	if m.List != nil || m.Input == "" {
		for _, fm := range m.List {
			if fm.pred.match(d) {
				return fm.onMatch.run(d)
			}
		}
		return m.OnNoMatch.run(d)
	}
	v, ok := d.input(m.Input)
	if !ok {
		return m.OnNoMatch.run(d)
	}
	a, err := netip.ParseAddr(v)
	if err != nil {
		return m.OnNoMatch.run(d)
	}
	// trie_matcher.h: every range containing the address, longest prefix
	// first, then in declaration order; after the first candidate failed
	// to match, exclusive ones are skipped.
	var cands []trieNode
	for _, n := range m.Trie {
		if n.prefix.Contains(a) {
			cands = append(cands, n)
		}
	}
	slices.SortStableFunc(cands, func(x, y trieNode) int {
		if x.prefix.Bits() != y.prefix.Bits() {
			return y.prefix.Bits() - x.prefix.Bits()
		}
		return x.index - y.index
	})
	first := true
	for _, n := range cands {
		if !first && n.exclusive {
			continue
		}
		if name, ok := n.onMatch.run(d); ok {
			return name, true
		}
		first = false
	}
	return m.OnNoMatch.run(d)
}

func (om *OnMatch) run(d MatchData) (string, bool) {
	switch {
	case om == nil:
		return "", false
	case om.Matcher != nil:
		return om.Matcher.Match(d)
	}
	return om.Action, true
}

// ChainFor is the filter chain Envoy picks for d: the matcher's, else the
// default chain; nil when there is neither (Envoy closes the connection).
func (l *Listener) ChainFor(d MatchData) *Chain {
	if name, ok := l.Matcher.Match(d); ok {
		return l.Chains[name]
	}
	return l.Default
}
