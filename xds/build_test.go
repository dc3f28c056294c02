package xds

import (
	"bytes"
	"flag"
	"fmt"
	"github.com/sluice-io/sluice/policy"
	"math/rand/v2"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	tcpproxy "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/known/anypb"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata/golden from the current builders")

var testProxy = Proxy{
	IPv4: netip.MustParseAddr("169.254.77.1"),
	IPv6: netip.MustParseAddr("fd73:6c75:6963:65::1"),
	Port: 15001,
}

// testNeverDial is a node's never-dial set as the agent computes it.
var testNeverDial = policy.NodeLocal{
	Proxy: testProxy.Addrs(), Node: ips("192.0.2.10", "2001:db8:ffff::10"), Metadata: policy.DefaultMetadata,
}.All()

func ips(ss ...string) []netip.Addr {
	var out []netip.Addr
	for _, s := range ss {
		out = append(out, netip.MustParseAddr(s))
	}
	return out
}

// pod builds a workload the way the agent does: ParsePolicy on its labels
// and annotation, the error kept for the logs.
func pod(ns, name, mode, allow string, addrs ...string) Workload {
	labels := map[string]string{policy.LabelRedirect: "true"}
	if mode != "" {
		labels[policy.LabelMode] = mode
	}
	p, err := policy.ParsePolicy(labels, map[string]string{policy.AnnotationAllow: allow})
	w := Workload{Namespace: ns, Name: name, IPs: ips(addrs...), Policy: p}
	if err != nil {
		w.PolicyError = err.Error()
	}
	return w
}

// expanded is w with its TCP-hostname rules turned into answers' addresses,
// as the agent does.
func expanded(w Workload, answers map[string][]netip.Addr) Workload {
	w.Policy = w.Policy.Expand(func(n string) []netip.Addr { return answers[n] })
	return w
}

// goldenCases are representative policies; their YAML is in
// testdata/golden, reviewed by hand against Envoy's documentation.
var goldenCases = []struct {
	name       string
	state      State
	wantIssues []string
}{
	{
		name:  "audit",
		state: State{Proxy: testProxy, Workloads: []Workload{pod("shop", "web-7d9f", "audit", "", "10.244.1.5", "fd00:244:1::5")}},
	},
	{
		name: "enforce-hostnames",
		state: State{Proxy: testProxy, NeverDial: testNeverDial, DNSResolvers: []netip.AddrPort{netip.MustParseAddrPort("10.96.0.10:53")}, Workloads: []Workload{
			pod("shop", "checkout", "enforce", "api.stripe.com:443, *.googleapis.com, status.example.com:80, status.example.com:8080", "10.244.1.6"),
		}},
	},
	{
		name: "enforce-cidrs",
		// With the per-chain connection cap and idle timeouts set.
		state: State{Proxy: testProxy, NeverDial: testNeverDial, MaxConnectionsPerChain: 1000, TCPIdleTimeout: time.Hour, HTTPStreamIdleTimeout: 10 * time.Minute, Workloads: []Workload{
			pod("db", "migrator", "enforce", "203.0.113.0/24:5432, 198.51.100.7, [2001:db8::/32]:443, 0.0.0.0/0:8443", "10.244.1.7", "fd00:244:1::7"),
		}},
	},
	{
		// A TCP-hostname rule as the agent hands it over: expanded to the
		// name's current addresses at its port; the rule itself adds no
		// chain, no server name, no DNS cache entry.
		name: "enforce-tcp-hostname",
		state: State{Proxy: testProxy, NeverDial: testNeverDial, Workloads: []Workload{
			expanded(pod("db", "billing", "enforce", "tcp://pg.example.com:5432, tcp://gone.example.com:22", "10.244.1.9"),
				map[string][]netip.Addr{"pg.example.com": {netip.MustParseAddr("203.0.113.40"), netip.MustParseAddr("2001:db8::40")}}),
		}},
	},
	{
		name: "ipv6-only",
		state: State{Proxy: Proxy{IPv6: testProxy.IPv6, Port: 15001}, Workloads: []Workload{
			pod("v6", "client", "enforce", "[2001:db8:77::/48]:443, ipv6.example.com", "fd00:244:2::9"),
		}},
	},
	{
		name: "malformed",
		state: State{Proxy: testProxy, Workloads: []Workload{
			pod("shop", "broken", "enforce", "api.github.com, bad_host.com, 10.0.0.1/8", "10.244.1.8"),
		}},
	},
	{
		name: "many",
		state: State{Proxy: testProxy, Workloads: []Workload{
			pod("a", "one", "audit", "", "10.244.2.1"),
			pod("a", "two", "enforce", "one.example.com:443", "10.244.2.2"),
			pod("b", "three", "enforce", "10.96.0.0/12", "10.244.2.3"),
			pod("b", "four", "enforce", "", "10.244.2.4"),
			// hostNetwork pods share the node's address: different
			// policies, so the address is denied everything.
			pod("kube-system", "agent-x", "audit", "", "192.0.2.10"),
			pod("kube-system", "agent-y", "enforce", "x.example.com", "192.0.2.10"),
			// No address (not yet known): reported.
			pod("c", "pending", "audit", ""),
		}},
		wantIssues: []string{
			"c/pending: no IP address",
			"kube-system/agent-x: shares source address 192.0.2.10",
			"kube-system/agent-y: shares source address 192.0.2.10",
		},
	},
}

func TestGolden(t *testing.T) {
	for _, tc := range goldenCases {
		t.Run(tc.name, func(t *testing.T) {
			r, issues, err := Build(tc.state)
			if err != nil {
				t.Fatalf("Build: %v", err)
			}
			if err := Validate(r); err != nil {
				t.Fatalf("generated resources do not validate:\n%v", err)
			}
			var got []string
			for _, is := range issues {
				got = append(got, is.Workload+": "+is.Reason)
			}
			if len(got) != len(tc.wantIssues) {
				t.Fatalf("issues = %q, want %d starting with %q", got, len(tc.wantIssues), tc.wantIssues)
			}
			for i := range got {
				if !strings.HasPrefix(got[i], tc.wantIssues[i]) {
					t.Errorf("issue %d = %q, want prefix %q", i, got[i], tc.wantIssues[i])
				}
			}
			y, err := r.YAML()
			if err != nil {
				t.Fatal(err)
			}
			path := filepath.Join("testdata", "golden", tc.name+".yaml")
			if *update {
				if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(path, y, 0o644); err != nil {
					t.Fatal(err)
				}
				return
			}
			want, err := os.ReadFile(path)
			if err != nil {
				t.Fatalf("%v (run go test ./xds -run TestGolden -update to create it)", err)
			}
			if !bytes.Equal(y, want) {
				t.Errorf("%s differs from the builders' output; review the change and run go test ./xds -run TestGolden -update\n%s", path, firstDiff(string(want), string(y)))
			}
		})
	}
}

func firstDiff(a, b string) string {
	al, bl := strings.Split(a, "\n"), strings.Split(b, "\n")
	for i := 0; i < len(al) && i < len(bl); i++ {
		if al[i] != bl[i] {
			return "line " + itoa(i+1) + ":\n  golden: " + al[i] + "\n  built:  " + bl[i]
		}
	}
	return "lengths differ: golden " + itoa(len(al)) + " lines, built " + itoa(len(bl))
}

func itoa(i int) string { return portString(uint16(i)) }

// The same state in any order gives the same bytes: versions change only
// when the configuration does.
func TestBuildDeterministic(t *testing.T) {
	s := goldenCases[len(goldenCases)-1].state
	want := marshalAll(t, s)
	for i := 0; i < 20; i++ {
		shuffled := s
		shuffled.Workloads = slices.Clone(s.Workloads)
		rand.Shuffle(len(shuffled.Workloads), func(i, j int) {
			shuffled.Workloads[i], shuffled.Workloads[j] = shuffled.Workloads[j], shuffled.Workloads[i]
		})
		if got := marshalAll(t, shuffled); !bytes.Equal(got, want) {
			t.Fatalf("shuffle %d: different bytes for the same state", i)
		}
	}
}

func marshalAll(t testing.TB, s State) []byte {
	t.Helper()
	r, _, err := Build(s)
	if err != nil {
		t.Fatal(err)
	}
	var out []byte
	opts := proto.MarshalOptions{Deterministic: true}
	for _, m := range r.messages() {
		b, err := opts.Marshal(m)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, b...)
	}
	return out
}

// Every chain the matcher names exists and every chain is reachable from
// the matcher (or is the default): nothing generated is dead or dangling.
func TestChainsMatchMatcher(t *testing.T) {
	for _, tc := range goldenCases {
		r, _, err := Build(tc.state)
		if err != nil {
			t.Fatal(err)
		}
		l := r.Listeners[0]
		named := map[string]bool{}
		walkAny("", l.GetFilterChainMatcher(), walkOpts{}, func(_ string, m proto.Message) {
			if sv, ok := m.(interface{ GetValue() string }); ok && m.ProtoReflect().Descriptor().FullName() == "google.protobuf.StringValue" {
				named[sv.GetValue()] = true
			}
		}, func(string, error) {})
		for _, c := range l.GetFilterChains() {
			if !named[c.GetName()] {
				t.Errorf("%s: chain %q is never chosen by the matcher", tc.name, c.GetName())
			}
			delete(named, c.GetName())
		}
		for n := range named {
			t.Errorf("%s: matcher names chain %q, which is not generated", tc.name, n)
		}
	}
}

func TestBuildRejectsBadState(t *testing.T) {
	for _, tc := range []struct {
		name  string
		state State
		want  string
	}{
		{"no proxy address", State{Proxy: Proxy{Port: 1}}, "proxy has no address"},
		{"no port", State{Proxy: Proxy{IPv4: testProxy.IPv4}}, "proxy port is 0"},
		{"v6 as v4", State{Proxy: Proxy{IPv4: testProxy.IPv6, Port: 1}}, "is not IPv4"},
		{"duplicate", State{Proxy: testProxy, Workloads: []Workload{{Namespace: "a", Name: "b"}, {Namespace: "a", Name: "b"}}}, "appears twice"},
		{"unnamed", State{Proxy: testProxy, Workloads: []Workload{{Namespace: "a"}}}, "has no name"},
	} {
		if _, _, err := Build(tc.state); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: err = %v, want %q", tc.name, err, tc.want)
		}
	}
}

// A pod with no workloads beside it: the listener still closes everything.
func TestEmptyStateClosesEverything(t *testing.T) {
	r, _, err := Build(State{Proxy: testProxy})
	if err != nil {
		t.Fatal(err)
	}
	if err := Validate(r); err != nil {
		t.Fatal(err)
	}
	for _, c := range r.Listeners[0].GetFilterChains() {
		if !isDenyChain(c) {
			t.Errorf("chain %q forwards with no workloads selected", c.GetName())
		}
	}
}

func isDenyChain(c *listener.FilterChain) bool {
	var tp tcpproxy.TcpProxy
	if err := c.GetFilters()[0].GetTypedConfig().UnmarshalTo(&tp); err != nil {
		return false
	}
	return tp.GetCluster() == DenyClusterName
}

// Whatever a pod writes in its labels and annotation, the configuration
// built from it validates, and an enforce pod never gets a chain that
// forwards unless it declared an entry that parses.
func FuzzBuildFromPod(f *testing.F) {
	for _, s := range []string{"api.github.com:443", "*.googleapis.com, 10.0.0.0/8", "[2001:db8::/32]:443", "bad_host", "a.b:80,a.b:8080,a.b"} {
		f.Add("enforce", s, "shop", "web")
		f.Add("audit", s, "ns", "pod")
	}
	// A '%' in a name or in a quoted policy error is a literal in the
	// access log format (written "%%"), never a command operator.
	f.Add("enforce", "100%.example.com", "ns%", "%DURATION%")
	f.Fuzz(func(t *testing.T, mode, allow, ns, name string) {
		if name == "" {
			return
		}
		p, err := policy.ParsePolicy(map[string]string{policy.LabelMode: mode}, map[string]string{policy.AnnotationAllow: allow})
		w := Workload{Namespace: ns, Name: name, IPs: ips("10.244.1.5"), Policy: p}
		if err != nil {
			w.PolicyError = err.Error()
		}
		r, _, err := Build(State{Proxy: testProxy, Workloads: []Workload{w}})
		if err != nil {
			t.Fatalf("Build: %v", err)
		}
		if err := Validate(r); err != nil {
			t.Fatalf("mode %q allow %q: invalid configuration: %v", mode, allow, err)
		}
		if p.Mode == policy.Enforce && len(p.Allow) == 0 {
			for _, c := range r.Listeners[0].GetFilterChains() {
				if strings.HasPrefix(c.GetName(), "tcp|") || strings.HasPrefix(c.GetName(), "tls|") || strings.HasPrefix(c.GetName(), "audit|") {
					t.Fatalf("deny-all pod got forwarding chain %q", c.GetName())
				}
			}
		}
	})
}

// Stat prefixes are one stats name element (no dots), so that Envoy's tag
// extraction turns them into the envoy_tcp_prefix / envoy_http_conn_manager_prefix
// label instead of leaving the workload in the metric name; allowed and
// denied traffic have different prefixes.
func TestStatPrefixesAreOneElement(t *testing.T) {
	re := regexp.MustCompile(`stat_prefix: (\S+)`)
	for _, tc := range goldenCases {
		r, _, err := Build(tc.state)
		if err != nil {
			t.Fatal(err)
		}
		y, err := r.YAML()
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range re.FindAllStringSubmatch(string(y), -1) {
			if strings.Contains(m[1], ".") {
				t.Errorf("%s: stat_prefix %q has a dot", tc.name, m[1])
			}
		}
	}
	r, _, err := Build(goldenCases[2].state)
	if err != nil {
		t.Fatal(err)
	}
	y, _ := r.YAML()
	for _, want := range []string{"stat_prefix: sluice_allow_db_migrator", "stat_prefix: sluice_deny_db_migrator"} {
		if !strings.Contains(string(y), want) {
			t.Errorf("%s: no %q", goldenCases[2].name, want)
		}
	}
}

// messages lists every resource, listeners first.
func (r *Resources) messages() []proto.Message {
	var out []proto.Message
	for _, l := range r.Listeners {
		out = append(out, l)
	}
	for _, c := range r.Clusters {
		out = append(out, c)
	}
	return out
}

// walkAny calls visit on m and on every message packed in an Any inside it,
// at any depth; anyErr gets the Anys that cannot be unpacked.
func walkAny(path string, m proto.Message, o walkOpts, visit func(string, proto.Message), anyErr func(string, error)) {
	visit(path, m)
	var walk func(string, protoreflect.Message)
	walk = func(p string, rm protoreflect.Message) {
		if o.skips(rm.Interface()) {
			return
		}
		if a, ok := rm.Interface().(*anypb.Any); ok {
			inner, err := o.unpack(a)
			if err != nil {
				anyErr(p, fmt.Errorf("typed_config %q: %w (Envoy rejects type URLs it does not know)", a.GetTypeUrl(), err))
				return
			}
			ip := p + "(" + string(inner.ProtoReflect().Descriptor().FullName()) + ")"
			visit(ip, inner)
			walk(ip, inner.ProtoReflect())
			return
		}
		rm.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
			fp := p + "." + string(fd.Name())
			switch {
			case fd.IsList() && fd.Message() != nil:
				l := v.List()
				for i := 0; i < l.Len(); i++ {
					walk(fmt.Sprintf("%s[%d]", fp, i), l.Get(i).Message())
				}
			case fd.IsMap() && fd.MapValue().Message() != nil:
				v.Map().Range(func(k protoreflect.MapKey, mv protoreflect.Value) bool {
					walk(fmt.Sprintf("%s[%s]", fp, k.String()), mv.Message())
					return true
				})
			case !fd.IsList() && !fd.IsMap() && fd.Message() != nil:
				walk(fp, v.Message())
			}
			return true
		})
	}
	walk(path, m.ProtoReflect())
}
