package conformance

import (
	"net/netip"
	"testing"
)

// Envoy's virtual host selection (config_impl.cc findVirtualHost): exact
// domain, then the longest suffix wildcard, then the longest prefix
// wildcard, then "*"; a wildcard needs at least one character of its own.
func TestVirtualHostOrder(t *testing.T) {
	rc := &RouteConfig{VHosts: []*VirtualHost{
		{Name: "star", Domains: []string{"*"}},
		{Name: "suffix-short", Domains: []string{"*.com"}},
		{Name: "suffix-long", Domains: []string{"*.example.com"}},
		{Name: "prefix", Domains: []string{"api.*"}},
		{Name: "exact", Domains: []string{"api.example.com"}},
	}}
	for host, want := range map[string]string{
		"api.example.com":  "exact",
		"www.example.com":  "suffix-long",
		"a.b.example.com":  "suffix-long",
		"example.com":      "suffix-short", // not *.example.com: nothing before the suffix
		"other.com":        "suffix-short",
		"api.example.org":  "prefix",
		"api.":             "star", // "api.*" needs a character after the prefix
		"intranet":         "star",
		"API.EXAMPLE.COM":  "exact",
		"api.example.com.": "prefix", // without strip_trailing_host_dot no suffix wildcard matches
	} {
		m := &HTTPConnectionManager{Routes: rc}
		vh, _ := m.RouteFor(host, "GET", "/")
		got := ""
		if vh != nil {
			got = vh.Name
		}
		if got != want {
			t.Errorf("%q: virtual host %q, want %q", host, got, want)
		}
	}
	// With strip_trailing_host_dot and strip_any_host_port.
	m := &HTTPConnectionManager{Routes: rc, StripTrailingDot: true, StripAnyHostPort: true}
	if vh, _ := m.RouteFor("api.example.com.:8080", "GET", "/"); vh == nil || vh.Name != "exact" {
		t.Errorf("api.example.com.:8080 with both strips: %v", vh)
	}
}

// trie_matcher.h: the longest containing range first, declaration order on
// ties; a candidate whose nested matcher does not match passes to the next
// unless that one is exclusive.
func TestTrieMatcherRules(t *testing.T) {
	p := netip.MustParsePrefix
	never := &OnMatch{Matcher: &Matcher{List: []fieldMatcher{{pred: &Predicate{Input: "server_name", Exact: "never"}, onMatch: &OnMatch{Action: "x"}}}}}
	m := &Matcher{Input: "destination_ip", Trie: []trieNode{
		{prefix: p("10.0.0.0/8"), index: 0, onMatch: &OnMatch{Action: "wide"}},
		{prefix: p("10.1.0.0/16"), index: 1, onMatch: &OnMatch{Action: "narrow"}},
		{prefix: p("10.2.0.0/16"), index: 2, onMatch: never},
		{prefix: p("10.3.0.0/16"), index: 3, onMatch: never},
		{prefix: p("10.3.0.0/24"), index: 4, onMatch: never},
		{prefix: p("10.4.0.0/16"), index: 5, exclusive: true, onMatch: never},
		{prefix: p("10.4.0.0/12"), index: 6, exclusive: true, onMatch: &OnMatch{Action: "exclusive-wide"}},
	}, OnNoMatch: &OnMatch{Action: "none"}}
	for dst, want := range map[string]string{
		"10.1.2.3":    "narrow",         // longest prefix wins
		"10.9.0.1":    "exclusive-wide", // the /12 (10.0.0.0/12) is longer than the /8
		"10.20.0.1":   "wide",
		"10.2.0.1":    "wide", // the /16's nested matcher fails: on to the /8
		"10.3.0.1":    "wide", // two failing candidates, then the /8
		"10.4.0.1":    "wide", // the /16 fails, the exclusive /12 is skipped, the non-exclusive /8 matches
		"192.168.0.1": "none",
	} {
		got, _ := m.Match(MatchData{Destination: netip.AddrPortFrom(netip.MustParseAddr(dst), 1)})
		if got != want {
			t.Errorf("%s: %q, want %q", dst, got, want)
		}
	}
	// No data (no SNI) matches no value matcher.
	if (&Predicate{Input: "server_name", Exact: ""}).match(MatchData{}) {
		t.Error("an empty server name matched")
	}
}
