package policy

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"
)

func TestParseAllowList(t *testing.T) {
	p := netip.MustParsePrefix
	cases := []struct {
		in   string
		want []Rule
	}{
		{"", nil},
		{"api.github.com", []Rule{{Host: "api.github.com"}}},
		{"API.GitHub.com.:443", []Rule{{Host: "api.github.com", Port: 443}}},
		{"*.googleapis.com", []Rule{{Host: "*.googleapis.com"}}},
		{"203.0.113.0/24:5432", []Rule{{Prefix: p("203.0.113.0/24"), Port: 5432}}},
		{"203.0.113.7", []Rule{{Prefix: p("203.0.113.7/32")}}},
		{"[2001:db8::/32]:443", []Rule{{Prefix: p("2001:db8::/32"), Port: 443}}},
		{"2001:db8::/32", []Rule{{Prefix: p("2001:db8::/32")}}},
		{"[2001:db8::1]", []Rule{{Prefix: p("2001:db8::1/128")}}},
		{"::ffff:192.0.2.1", []Rule{{Prefix: p("192.0.2.1/32")}}},
		{" a.example.com ,\n\n b.example.com:80,\r\n", []Rule{{Host: "a.example.com"}, {Host: "b.example.com", Port: 80}}},
		{"localhost", []Rule{{Host: "localhost"}}},
	}
	for _, c := range cases {
		got, err := ParseAllowList(c.in)
		if err != nil {
			t.Errorf("%q: %v", c.in, err)
			continue
		}
		if !slices.Equal(got, c.want) {
			t.Errorf("%q = %+v, want %+v", c.in, got, c.want)
		}
	}
}

func TestParseAllowListErrors(t *testing.T) {
	cases := []struct{ in, want string }{
		{"api..github.com", `entry 1 "api..github.com": empty label`},
		{"ok.com,bad_host.com", `entry 2 "bad_host.com": character '_' is not allowed`},
		{"*.com", "at least two labels"},
		{"foo.*.com", "'*' is only allowed as the whole first label"},
		{"*", "'*' is only allowed"},
		{"example.com:0", "port 0 is not in 1-65535"},
		{"example.com:65536", "not in 1-65535"},
		{"example.com:080", "not in 1-65535"},
		{"example.com:https", `port "https" is not a number`},
		{"example.com:", "empty port"},
		{"203.0.113.1/24", "host bits set; did you mean 203.0.113.0/24?"},
		{"203.0.113.300", "not a valid IP address"},
		{"10.0.0.0/33", "not a valid CIDR"},
		{"2001:db8::/32:443", "[addr]:port"},
		{"[2001:db8::/32", "missing ']'"},
		{"[203.0.113.0/24]:80", "brackets are for IPv6"},
		{"[2001:db8::1]x", "unexpected text after ']'"},
		{"[fe80::1%eth0]", "zones are not allowed"},
		{"bücher.de", "punycode"},
		{"-a.example.com", "starts or ends with '-'"},
		{strings.Repeat("a", 64) + ".com", "longer than 63"},
	}
	for _, c := range cases {
		rules, err := ParseAllowList(c.in)
		if err == nil {
			t.Errorf("%q accepted as %+v", c.in, rules)
			continue
		}
		if !strings.Contains(err.Error(), c.want) {
			t.Errorf("%q: error %q, want it to say %q", c.in, err, c.want)
		}
		var ee *EntryError
		if !errors.As(err, &ee) {
			t.Errorf("%q: %v is not an *EntryError", c.in, err)
		}
		if rules != nil {
			t.Errorf("%q: rules %v returned with an error", c.in, rules)
		}
	}
	many := strings.Repeat("a.example.com,", MaxAllowEntries+1)
	if _, err := ParseAllowList(many); err == nil || !strings.Contains(err.Error(), "more than 1024 entries") {
		t.Errorf("too many entries: %v", err)
	}
	if _, err := ParseAllowList(strings.Repeat("x", MaxAllowBytes+1)); err == nil {
		t.Error("oversized annotation accepted")
	}
}

func TestParsePolicySafestOnError(t *testing.T) {
	cases := []struct {
		name       string
		labels     map[string]string
		allow      string
		wantMode   Mode
		wantRules  int
		wantClosed bool
		wantErr    bool
	}{
		{"default audit", nil, "", Audit, 0, false, false},
		{"audit with list", map[string]string{LabelMode: "audit"}, "a.example.com", Audit, 1, false, false},
		{"enforce", map[string]string{LabelMode: "enforce"}, "a.example.com,10.0.0.0/8", Enforce, 2, true, false},
		{"enforce fail-open override", map[string]string{LabelMode: "enforce", LabelFailMode: "open"}, "a.example.com", Enforce, 1, false, false},
		{"audit fail-closed override", map[string]string{LabelFailMode: "closed"}, "", Audit, 0, true, false},
		{"enforce, one bad entry: deny-all", map[string]string{LabelMode: "enforce"}, "a.example.com,bad_", Enforce, 0, true, true},
		{"audit, bad entry: still audited", nil, "bad_", Audit, 0, false, true},
		{"unknown mode: deny-all", map[string]string{LabelMode: "enforcing"}, "a.example.com", Enforce, 0, true, true},
		{"unknown mode cannot fail open", map[string]string{LabelMode: "block", LabelFailMode: "open"}, "", Enforce, 0, true, true},
		{"bad fail mode", map[string]string{LabelMode: "enforce", LabelFailMode: "maybe"}, "a.example.com", Enforce, 0, true, true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p, err := ParsePolicy(c.labels, map[string]string{AnnotationAllow: c.allow})
			if (err != nil) != c.wantErr {
				t.Fatalf("err = %v, want error: %v", err, c.wantErr)
			}
			if p.Mode != c.wantMode || len(p.Allow) != c.wantRules || p.FailClosed != c.wantClosed {
				t.Errorf("policy = %+v, want mode %s, %d rules, fail-closed %v", p, c.wantMode, c.wantRules, c.wantClosed)
			}
		})
	}
}

// FuzzParseAllowList: the parser never panics, and what it accepts is within
// the grammar: valid hostnames or masked prefixes, ports in range, and every
// rule renders back to text that parses to the same rule.
func FuzzParseAllowList(f *testing.F) {
	for _, s := range []string{"api.github.com:443", "*.googleapis.com", "203.0.113.0/24:5432",
		"[2001:db8::/32]:443", "2001:db8::1", "a,b\nc", "[::1]", "bücher.de", "1.2.3.4:65535"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		rules, err := ParseAllowList(s)
		if err != nil {
			if rules != nil {
				t.Fatalf("rules with an error: %v", rules)
			}
			return
		}
		for _, r := range rules {
			if r.IsHost() == r.Prefix.IsValid() {
				t.Fatalf("rule is neither or both host and prefix: %+v", r)
			}
			if r.IsHost() {
				if h, reason := parseHost(r.Host); reason != "" || h != r.Host {
					t.Fatalf("accepted host %q is not canonical (%s)", r.Host, reason)
				}
			} else if r.Prefix.Masked() != r.Prefix || r.Prefix.Addr().Zone() != "" || r.Prefix.Addr().Is4In6() {
				t.Fatalf("accepted prefix %v is not canonical", r.Prefix)
			}
			back, err := ParseAllowList(r.String())
			if err != nil || len(back) != 1 || back[0] != r {
				t.Fatalf("%+v renders as %q which parses to %+v, %v", r, r.String(), back, err)
			}
		}
	})
}

// Hostname entries whose last label is numeric would match IP literals
// sent as SNI or Host.
func TestNumericHostnamesRefused(t *testing.T) {
	for _, entry := range []string{"*.0.0.1", "*.168.1.1:443", "example.123"} {
		if _, err := ParseAllowList(entry); err == nil || !strings.Contains(err.Error(), "numeric") {
			t.Errorf("%q: %v, want it refused as numeric", entry, err)
		}
	}
	if _, err := ParseAllowList("api.example.com, 3com.example, x.example1"); err != nil {
		t.Errorf("names with digits refused: %v", err)
	}
}

func TestMetadataGrants(t *testing.T) {
	meta := []netip.Addr{netip.MustParseAddr("169.254.169.254"), netip.MustParseAddr("fd00:ec2::254")}
	for _, tc := range []struct {
		mode, allow, want string
	}{
		{"enforce", "169.254.169.254:80", "[169.254.169.254:80]"},
		{"enforce", "169.254.169.254", "[169.254.169.254:0]"},
		{"enforce", "169.254.169.254/32:80, [fd00:ec2::254]:80", "[169.254.169.254:80 [fd00:ec2::254]:80]"},
		// A wider CIDR grants nothing: 0.0.0.0/0 means "the internet", not
		// the node's instance credentials.
		{"enforce", "0.0.0.0/0, 169.254.0.0/16, ::/0", "[]"},
		// Other link-local addresses are granted the same way.
		{"enforce", "169.254.20.10:8080, [fe80::1]:80, 10.0.0.1:80", "[169.254.20.10:8080 [fe80::1]:80]"},
		{"enforce", "metadata.example:80", "[]"},
		{"audit", "169.254.169.254:80", "[]"},
	} {
		p, err := ParsePolicy(map[string]string{LabelRedirect: "true", LabelMode: tc.mode}, map[string]string{AnnotationAllow: tc.allow})
		if err != nil {
			t.Fatal(err)
		}
		if got := fmt.Sprint(p.MetadataGrants(meta)); got != tc.want {
			t.Errorf("%s %q: grants %s, want %s", tc.mode, tc.allow, got, tc.want)
		}
	}
}

func TestTCPHostnameEntries(t *testing.T) {
	got, err := ParseAllowList("tcp://DB.Example.com.:5432, TCP://redis.internal.example:6379")
	if err != nil {
		t.Fatal(err)
	}
	want := []Rule{{Host: "db.example.com", Port: 5432, Resolve: true}, {Host: "redis.internal.example", Port: 6379, Resolve: true}}
	if !slices.Equal(got, want) {
		t.Fatalf("got %+v, want %+v", got, want)
	}
	for _, r := range got {
		if r.IsHost() || !r.IsResolved() {
			t.Errorf("%v: IsHost %v IsResolved %v", r, r.IsHost(), r.IsResolved())
		}
		back, err := ParseAllowList(r.String())
		if err != nil || len(back) != 1 || back[0] != r {
			t.Errorf("%v round-trips to %v, %v", r, back, err)
		}
	}
	for in, reason := range map[string]string{
		"tcp://db.example.com":        "needs a port",
		"tcp://*.example.com:5432":    "cannot be a wildcard",
		"tcp://203.0.113.7:5432":      "write an address as a CIDR entry",
		"tcp://[2001:db8::1]:5432":    "write an address as a CIDR entry",
		"tcp://db.example.com:0":      "not in 1-65535",
		"tcp://db..example.com:5432":  "empty label",
		"tcp://db.example.com:5432/x": "not a number",
		"udp://db.example.com:53":     "unknown scheme",
		"https://api.example.com":     "unknown scheme",
	} {
		_, err := ParseAllowList(in)
		if err == nil || !strings.Contains(err.Error(), reason) {
			t.Errorf("%q: error %v, want %q", in, err, reason)
		}
	}
}

// A TCP-hostname rule allows nothing by itself: not the name as SNI or
// Host, not any address; only the addresses Expand adds, at its port.
func TestTCPHostnameExpand(t *testing.T) {
	pol, err := ParsePolicy(map[string]string{LabelMode: "enforce"}, map[string]string{AnnotationAllow: "tcp://db.example.com:5432,tcp://gone.example.com:22"})
	if err != nil {
		t.Fatal(err)
	}
	db := netip.MustParseAddrPort("203.0.113.7:5432")
	if d := pol.Decide(db, "db.example.com", ""); d.Allowed {
		t.Fatalf("unexpanded rule allowed %v: %+v", db, d)
	}
	if d := pol.Decide(db, "", "db.example.com"); d.Allowed {
		t.Fatalf("unexpanded rule allowed Host db.example.com: %+v", d)
	}
	answers := map[string][]netip.Addr{"db.example.com": {netip.MustParseAddr("203.0.113.7"), netip.MustParseAddr("2001:db8::7"), netip.MustParseAddr("::ffff:203.0.113.7")}}
	ex := pol.Expand(func(n string) []netip.Addr { return answers[n] })
	if len(pol.Allow) != 2 {
		t.Fatalf("Expand changed its receiver: %v", pol.Allow)
	}
	via := "tcp://db.example.com:5432"
	wantAdded := []Rule{{Prefix: netip.MustParsePrefix("203.0.113.7/32"), Port: 5432, Via: via}, {Prefix: netip.MustParsePrefix("2001:db8::7/128"), Port: 5432, Via: via}}
	if !slices.Equal(ex.Allow[2:], wantAdded) {
		t.Fatalf("expanded to %v, want the original rules then %v", ex.Allow, wantAdded)
	}
	for _, c := range []struct {
		dst     string
		allowed bool
	}{
		{"203.0.113.7:5432", true},
		{"[2001:db8::7]:5432", true},
		{"203.0.113.7:5433", false}, // the rule's port only
		{"203.0.113.8:5432", false}, // not an answer
		{"198.51.100.1:22", false},  // a name with no answers allows nothing
	} {
		if d := ex.Decide(netip.MustParseAddrPort(c.dst), "", ""); d.Allowed != c.allowed {
			t.Errorf("%s: allowed %v, want %v (%s)", c.dst, d.Allowed, c.allowed, d.Reason)
		}
	}
	if got := pol.ResolvedNames(); !slices.Equal(got, []string{"db.example.com", "gone.example.com"}) {
		t.Errorf("ResolvedNames = %v", got)
	}
	// An answer that is a metadata address grants no metadata access (the
	// agent drops such answers before this, too): only an entry naming the
	// address does.
	md := netip.MustParseAddr("169.254.169.254")
	ex = pol.Expand(func(string) []netip.Addr { return []netip.Addr{md} })
	for _, p := range []Policy{pol, ex} {
		if g := p.MetadataGrants([]netip.Addr{md}); len(g) != 0 {
			t.Errorf("tcp:// rule granted metadata: %v", g)
		}
	}
}
