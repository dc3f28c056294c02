package policy

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/sluice-io/sluice/policy/apis/policy/v1alpha1"
)

func rules(t testing.TB, s string) []Rule {
	t.Helper()
	rs, err := ParseAllowList(s)
	if err != nil {
		t.Fatal(err)
	}
	return rs
}

func ruleStrings(rs []Rule) string {
	var out []string
	for _, r := range rs {
		out = append(out, r.String())
	}
	return strings.Join(out, ", ")
}

func TestMergeTable(t *testing.T) {
	grant := func(name, allow string) Source { return Source{Tier: Grant, Name: name, Allow: rules(t, allow)} }
	guard := func(name, allow string) Source { return Source{Tier: Guardrail, Name: name, Allow: rules(t, allow)} }
	enforce := func(s Source) Source { s.Mode, s.ModeSet = Enforce, true; return s }
	for _, tc := range []struct {
		name    string
		sources []Source
		mode    Mode
		closed  bool
		allow   string
		removed string // guardrail: entry -> kept; ...
	}{
		{name: "no sources", mode: Audit},
		{name: "one grant", sources: []Source{enforce(grant("ns", "api.example.com:443, 10.0.0.0/8"))},
			mode: Enforce, closed: true, allow: "api.example.com:443, 10.0.0.0/8"},
		{name: "union without repeats", sources: []Source{grant("a", "x.example.com, 10.0.0.0/8"), grant("b", "10.0.0.0/8, y.example.com")},
			mode: Audit, allow: "x.example.com, 10.0.0.0/8, y.example.com"},
		{name: "guardrail keeps what it contains", sources: []Source{
			grant("ns", "api.example.com:443, *.cdn.example.net, evil.example.org, 10.1.0.0/16:5432"),
			guard("g", "*.example.com, *.example.net:443, 10.0.0.0/8")},
			allow:   "api.example.com:443, *.cdn.example.net:443, 10.1.0.0/16:5432",
			removed: "g: *.cdn.example.net -> *.cdn.example.net:443; g: evil.example.org -> "},
		{name: "guardrail narrows a wider entry", sources: []Source{
			grant("ns", "*.example.com, 0.0.0.0/0"),
			guard("g", "api.example.com:443, 203.0.113.0/24")},
			allow:   "api.example.com:443, 203.0.113.0/24",
			removed: "g: *.example.com -> api.example.com:443; g: 0.0.0.0/0 -> 203.0.113.0/24"},
		{name: "wildcard excludes its apex", sources: []Source{grant("ns", "example.com, *.example.com"), guard("g", "*.example.com")},
			allow: "*.example.com", removed: "g: example.com -> "},
		{name: "names and addresses do not meet", sources: []Source{grant("ns", "api.example.com, 10.0.0.1"), guard("g", "10.0.0.0/8")},
			allow: "10.0.0.1", removed: "g: api.example.com -> "},
		{name: "a TCP hostname under a hostname guardrail becomes the hostname", sources: []Source{grant("ns", "tcp://db.example.com:5432, tcp://db.example.org:5432"), guard("g", "*.example.com:5432")},
			allow: "db.example.com:5432", removed: "g: tcp://db.example.com:5432 -> db.example.com:5432; g: tcp://db.example.org:5432 -> "},
		{name: "a TCP hostname under a TCP-hostname guardrail stays one", sources: []Source{grant("ns", "tcp://db.example.com:5432, *.example.com"), guard("g", "tcp://db.example.com:5432")},
			allow: "tcp://db.example.com:5432, db.example.com:5432", removed: "g: *.example.com -> db.example.com:5432"},
		{name: "ports that differ meet nowhere", sources: []Source{grant("ns", "api.example.com:80"), guard("g", "api.example.com:443")},
			removed: "g: api.example.com:80 -> "},
		{name: "IPv4 and IPv6 do not meet", sources: []Source{grant("ns", "0.0.0.0/0, ::/0"), guard("g", "2001:db8::/32")},
			allow: "2001:db8::/32", removed: "g: 0.0.0.0/0 -> ; g: ::/0 -> 2001:db8::/32"},
		{name: "two guardrails both bound", sources: []Source{grant("ns", "*.example.com"), guard("g1", "*.a.example.com"), guard("g2", "x.a.example.com, y.b.example.com")},
			allow: "x.a.example.com", removed: "g1: *.example.com -> *.a.example.com; g2: *.a.example.com -> x.a.example.com"},
		{name: "a baseline is bounded too", sources: []Source{{Tier: Baseline, Name: "b", Allow: rules(t, "otel.example.net:4317, 10.9.9.9")}, guard("g", "*.example.net")},
			allow: "otel.example.net:4317", removed: "g: 10.9.9.9 -> "},
		{name: "strictest mode wins", sources: []Source{{Tier: Grant, Name: "labels", Mode: Audit, ModeSet: true}, enforce(grant("ns", "a.example.com"))},
			mode: Enforce, closed: true, allow: "a.example.com"},
		{name: "enforce with fail open stays open", sources: []Source{{Tier: Grant, Name: "labels", Mode: Enforce, ModeSet: true, Fail: FailOpen}},
			mode: Enforce},
		{name: "fail closed anywhere wins", sources: []Source{{Tier: Grant, Name: "labels", Mode: Enforce, ModeSet: true, Fail: FailOpen}, {Tier: Grant, Name: "ns", Fail: FailClosed}},
			mode: Enforce, closed: true},
		{name: "an enforce source without a fail mode closes", sources: []Source{{Tier: Grant, Name: "labels", Mode: Enforce, ModeSet: true, Fail: FailOpen}, {Tier: Guardrail, Name: "g", Mode: Enforce, ModeSet: true}},
			mode: Enforce, closed: true},
		{name: "an audit-mode guardrail does not enforce", sources: []Source{grant("ns", "a.example.com, b.example.org"), guard("g", "*.example.com")},
			mode: Audit, allow: "a.example.com", removed: "g: b.example.org -> "},
		{name: "a broken grant grants nothing", sources: []Source{grant("ns", "a.example.com"), {Tier: Grant, Name: "bad", Allow: rules(t, "b.example.com"), Err: errors.New("bad entry")}},
			mode: Audit, allow: "a.example.com"},
		{name: "a broken guardrail allows nothing, enforced and closed", sources: []Source{grant("ns", "a.example.com"), {Tier: Guardrail, Name: "bad", Allow: rules(t, "*.example.com"), Err: errors.New("bad entry")}},
			mode: Enforce, closed: true, removed: "bad: a.example.com -> "},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := Merge(tc.sources)
			if e.Policy.Mode != tc.mode || e.Policy.FailClosed != tc.closed {
				t.Errorf("mode %v closed %v, want %v %v", e.Policy.Mode, e.Policy.FailClosed, tc.mode, tc.closed)
			}
			if got := ruleStrings(e.Policy.Allow); got != tc.allow {
				t.Errorf("allow %q, want %q", got, tc.allow)
			}
			var rm []string
			for _, r := range e.Removed {
				rm = append(rm, r.Guardrail+": "+r.Entry.String()+" -> "+ruleStrings(r.Kept))
			}
			if got := strings.Join(rm, "; "); got != tc.removed {
				t.Errorf("removed %q, want %q", got, tc.removed)
			}
			hasErr := slices.ContainsFunc(tc.sources, func(s Source) bool { return s.Err != nil })
			if (e.Err != nil) != hasErr {
				t.Errorf("err %v, want an error: %v", e.Err, hasErr)
			}
			if again := Merge(tc.sources); !again.Equal(e) {
				t.Errorf("not deterministic: %+v then %+v", e, again)
			}
		})
	}
}

// Metadata access needs the grant and every guardrail to name the address:
// a guardrail narrowing 0.0.0.0/0 to it grants nothing (the grant never
// named it), nor does a grant of it under a wider guardrail (the guardrail
// never did: a namespace owner cannot reach the instance's credentials
// because the admin allowed 0.0.0.0/0).
func TestMergeNarrowingGrantsNoMetadata(t *testing.T) {
	md := []netip.Addr{netip.MustParseAddr("169.254.169.254")}
	for _, tc := range []struct {
		grant, guard string
		grants       int
	}{
		{"0.0.0.0/0", "169.254.169.254", 0},
		{"169.254.0.0/16:80", "169.254.169.254", 0},
		{"169.254.169.254", "0.0.0.0/0", 0},
		{"169.254.169.254:80", "169.254.0.0/16", 0},
		{"169.254.169.254", "169.254.169.254", 1},
		{"169.254.169.254", "169.254.169.254:80", 1}, // a port is no widening
	} {
		e := Merge([]Source{
			{Tier: Grant, Name: "ns", Mode: Enforce, ModeSet: true, Allow: rules(t, tc.grant)},
			{Tier: Guardrail, Name: "g", Allow: rules(t, tc.guard)},
		})
		if len(e.Policy.Allow) != 1 {
			t.Fatalf("%s ∩ %s: %v", tc.grant, tc.guard, e.Policy.Allow)
		}
		if got := e.Policy.MetadataGrants(md); len(got) != tc.grants {
			t.Errorf("%s ∩ %s: metadata grants %v, want %d", tc.grant, tc.guard, got, tc.grants)
		}
	}
}

// conn is a destination in the abstract: an address and port; or a name
// and port, either sent by the client (sni: TLS SNI or HTTP Host) or not
// (any protocol to one of the name's addresses).
type conn struct {
	addr netip.Addr
	name string
	sni  bool
	port uint16
}

// allows is what an enforce-mode allow list means, written independently
// of Merge: an address by a prefix; a name the client sends by a hostname
// pattern or a TCP hostname of that name (its addresses, any protocol); a
// name's address without the name sent, by a TCP hostname only.
func allows(rs []Rule, c conn) bool {
	for _, r := range rs {
		if r.Port != 0 && r.Port != c.port {
			continue
		}
		switch {
		case c.name == "":
			if r.Host == "" && r.Prefix.Contains(c.addr) {
				return true
			}
		case r.Resolve:
			if r.Host == c.name {
				return true
			}
		case c.sni:
			if r.Host != "" && hostMatches(r.Host, c.name) {
				return true
			}
		}
	}
	return false
}

var (
	fuzzNames = []string{"example.com", "*.example.com", "a.example.com", "*.a.example.com", "b.a.example.com", "other.org", "*.other.org"}
	fuzzNets  = []string{"0.0.0.0/0", "10.0.0.0/8", "10.1.0.0/16", "10.1.2.3", "169.254.169.254", "169.254.0.0/16", "::/0", "2001:db8::/32", "2001:db8::1"}
	fuzzPorts = []uint16{0, 80, 443}
	fuzzConns []conn
)

func init() {
	for _, p := range fuzzPorts[1:] {
		for _, n := range []string{"example.com", "a.example.com", "b.a.example.com", "x.b.a.example.com", "z.example.com", "other.org", "q.other.org"} {
			fuzzConns = append(fuzzConns, conn{name: n, port: p, sni: true}, conn{name: n, port: p})
		}
		for _, a := range []string{"10.1.2.3", "10.1.9.9", "10.2.0.1", "8.8.8.8", "169.254.169.254", "169.254.1.1", "2001:db8::1", "2001:db8::2", "2001:dead::1"} {
			fuzzConns = append(fuzzConns, conn{addr: netip.MustParseAddr(a), port: p})
		}
	}
}

// fuzzSources reads sources from bytes: per source a header byte (tier,
// mode, fail mode, error) and a count, then one byte per rule.
func fuzzSources(t testing.TB, data []byte) []Source {
	var out []Source
	for len(data) >= 2 && len(out) < 6 {
		h, n := data[0], int(data[1]%5)
		data = data[2:]
		s := Source{Tier: Tier(h % 3), Name: string(rune('a' + len(out)))}
		if h&8 != 0 {
			s.Mode, s.ModeSet = Mode((h>>4)&1), true
		}
		s.Fail = FailMode((h >> 5) % 3)
		if h&0x80 != 0 && h&4 != 0 {
			s.Err = errors.New("broken")
		}
		for ; n > 0 && len(data) > 0; n-- {
			b := data[0]
			data = data[1:]
			port := fuzzPorts[int(b>>6)%len(fuzzPorts)]
			var entry string
			switch {
			case b&0x20 != 0 && b&0x10 != 0 && port != 0:
				name := fuzzNames[int(b&0xf)%len(fuzzNames)]
				if strings.HasPrefix(name, "*") {
					name = name[2:]
				}
				entry = "tcp://" + name
			case b&0x20 != 0:
				entry = fuzzNames[int(b&0xf)%len(fuzzNames)]
			default:
				entry = fuzzNets[int(b&0xf)%len(fuzzNets)]
				if strings.Contains(entry, ":") && port != 0 {
					entry = "[" + entry + "]"
				}
			}
			if port != 0 {
				entry += ":" + []string{"", "80", "443"}[slices.Index(fuzzPorts, port)]
			}
			s.Allow = append(s.Allow, rules(t, entry)...)
		}
		out = append(out, s)
	}
	return out
}

// FuzzMerge checks Merge against the definition, for every abstract
// connection: allowed by the merge exactly when some grant or baseline
// allows it and every guardrail does (a broken guardrail allows nothing, a
// broken grant grants nothing); the mode is the strictest; a metadata
// grant of the merge is one the grants made themselves.
func FuzzMerge(f *testing.F) {
	f.Add([]byte{0x08, 2, 0x21, 0x01, 0x02, 1, 0x20})
	f.Add([]byte{0x18, 3, 0x00, 0x04, 0x65, 0x02, 2, 0x01, 0x24})
	f.Add([]byte{0x1a, 1, 0x31, 0x00, 2, 0x04, 0x62, 0x86, 1, 0x05})
	f.Fuzz(func(t *testing.T, data []byte) {
		sources := fuzzSources(t, data)
		e := Merge(sources)
		var grants []Rule
		enforce := false
		for _, s := range sources {
			if s.Tier != Guardrail && s.Err == nil {
				grants = append(grants, s.Allow...)
			}
			if s.ModeSet && s.Mode == Enforce || s.Tier == Guardrail && s.Err != nil {
				enforce = true
			}
		}
		if (e.Policy.Mode == Enforce) != enforce {
			t.Fatalf("mode %v, want enforce %v", e.Policy.Mode, enforce)
		}
		for _, c := range fuzzConns {
			want := allows(grants, c)
			for _, s := range sources {
				if s.Tier == Guardrail {
					want = want && s.Err == nil && allows(s.Allow, c)
				}
			}
			if got := allows(e.Policy.Allow, c); got != want {
				t.Fatalf("%+v: merged allows %v, want %v\nsources %+v\nmerged %s", c, got, want, sources, ruleStrings(e.Policy.Allow))
			}
		}
		// A metadata grant of the merge is named by a grant and by every
		// guardrail.
		md := []netip.Addr{netip.MustParseAddr("169.254.169.254")}
		named := func(rs []Rule, g netip.AddrPort) bool {
			return slices.ContainsFunc(Policy{Mode: Enforce, Allow: rs}.MetadataGrants(md), func(b netip.AddrPort) bool {
				return b.Addr() == g.Addr() && (b.Port() == 0 || b.Port() == g.Port())
			})
		}
		for _, g := range (Policy{Mode: Enforce, Allow: e.Policy.Allow}).MetadataGrants(md) {
			if !named(grants, g) {
				t.Fatalf("merge grants metadata %v that no grant named", g)
			}
			for _, s := range sources {
				if s.Tier == Guardrail && !named(s.Allow, g) {
					t.Fatalf("merge grants metadata %v that guardrail %s does not name", g, s.Name)
				}
			}
		}
		if !Merge(sources).Equal(e) {
			t.Fatal("Merge is not deterministic")
		}
	})
}

// Objects within the schema's limits cannot make a pod's merge unbounded:
// an object past 1,024 entries once ports are counted is invalid (it
// grants nothing), and grants past 1,024 in all grant nothing.
func TestMergeCaps(t *testing.T) {
	var egress []v1alpha1.EgressRule
	ports := make([]v1alpha1.Port, 32)
	for i := range ports {
		ports[i] = v1alpha1.Port(1000 + i)
	}
	for i := range 256 {
		egress = append(egress, v1alpha1.EgressRule{Hostname: fmt.Sprintf("h%d.example.com", i), Ports: ports})
	}
	if _, err := RulesFromEgress(egress); err == nil || !strings.Contains(err.Error(), "8192 entries") {
		t.Fatalf("256 rules x 32 ports: %v", err)
	}
	var sources []Source
	for i := range 2 {
		s := Source{Tier: Grant, Name: fmt.Sprint("p", i), Mode: Enforce, ModeSet: true}
		for j := range 600 {
			s.Allow = append(s.Allow, Rule{Host: fmt.Sprintf("h%d-%d.example.com", i, j)})
		}
		sources = append(sources, s)
	}
	sources = append(sources, Source{Tier: Guardrail, Name: "g", Allow: rules(t, "*.example.com")})
	e := Merge(sources)
	if len(e.Policy.Allow) != 0 || e.Err == nil || !strings.Contains(e.Err.Error(), "1200 entries") || !e.Policy.FailClosed {
		t.Fatalf("1,200 grants: %d allowed, err %v", len(e.Policy.Allow), e.Err)
	}
	sources[1].Allow = sources[1].Allow[:400]
	if e := Merge(sources); len(e.Policy.Allow) != 1000 || e.Err != nil {
		t.Fatalf("1,000 grants: %d allowed, err %v", len(e.Policy.Allow), e.Err)
	}
}

func BenchmarkMergeWorstCase(b *testing.B) {
	var sources []Source
	for i := range 2 {
		s := Source{Tier: Grant, Name: fmt.Sprint("p", i)}
		for j := range 512 {
			s.Allow = append(s.Allow, Rule{Host: fmt.Sprintf("h%d-%d.example.com", i, j), Port: 443})
		}
		sources = append(sources, s)
	}
	g := Source{Tier: Guardrail, Name: "g"}
	for j := range 1024 {
		g.Allow = append(g.Allow, Rule{Host: fmt.Sprintf("*.z%d.example.org", j)})
	}
	sources = append(sources, g)
	for b.Loop() {
		Merge(sources)
	}
}
