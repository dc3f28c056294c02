package conformance

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	tcpproxy "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	"github.com/sluice-io/sluice/policy"
	"github.com/sluice-io/sluice/xds"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

var (
	testProxy = xds.Proxy{IPv4: netip.MustParseAddr("169.254.77.1"), IPv6: netip.MustParseAddr("fd73:6c75:6963:65::1"), Port: 15001}
	testLocal = policy.NodeLocal{
		Proxy:    testProxy.Addrs(),
		Node:     []netip.Addr{netip.MustParseAddr("192.168.1.10")},
		Metadata: policy.DefaultMetadata,
	}
	testDNS = []netip.AddrPort{netip.MustParseAddrPort("10.96.0.10:53")}
)

func workload(ns, name, mode, allow string, ips ...string) xds.Workload {
	labels := map[string]string{policy.LabelRedirect: "true"}
	if mode != "" {
		labels[policy.LabelMode] = mode
	}
	pol, err := policy.ParsePolicy(labels, map[string]string{policy.AnnotationAllow: allow})
	w := xds.Workload{Namespace: ns, Name: name, Policy: pol}
	if err != nil {
		w.PolicyError = err.Error()
	}
	for _, ip := range ips {
		w.IPs = append(w.IPs, netip.MustParseAddr(ip))
	}
	return w
}

// testStates cover every kind of chain the builder makes.
func testStates() map[string]xds.State {
	st := func(ws ...xds.Workload) xds.State {
		return xds.State{Proxy: testProxy, NeverDial: testLocal.All(), DNSResolvers: testDNS, Workloads: ws}
	}
	db := workload("db", "billing", "enforce", "tcp://pg.example.com:5432", "10.244.1.9")
	db.Policy = db.Policy.Expand(func(string) []netip.Addr { return []netip.Addr{netip.MustParseAddr("203.0.113.40")} })
	return map[string]xds.State{
		"empty": st(),
		"audit": st(workload("shop", "web", "audit", "", "10.244.1.5", "fd00:244:1::5")),
		"enforce-hostnames": withLimits(st(workload("shop", "checkout", "enforce",
			"api.stripe.com:443, *.googleapis.com, plain.example.com:80, 203.0.113.0/24:5432, [2001:db8::/32]:443", "10.244.1.6", "fd00:244:1::6"))),
		"enforce-cidrs": st(workload("db", "migrator", "enforce", "203.0.113.0/24:5432, 198.51.100.7, [2001:db8::/32]:443, 0.0.0.0/0:8443", "10.244.1.7")),
		"malformed":     st(workload("shop", "broken", "enforce", "api.github.com, bad_host.com", "10.244.1.8")),
		"tcp-hostname":  st(db),
		"many": st(
			workload("a", "one", "audit", "", "10.244.2.1"),
			workload("a", "two", "enforce", "one.example.com:443", "10.244.2.2"),
			workload("b", "three", "enforce", "10.96.0.0/12", "10.244.2.3"),
			workload("b", "four", "enforce", "", "10.244.2.4"),
			// A hostNetwork pair: one address, two policies.
			workload("c", "host-a", "enforce", "a.example.com", "192.168.1.10"),
			workload("c", "host-b", "audit", "", "192.168.1.10"),
		),
	}
}

func withLimits(st xds.State) xds.State {
	st.MaxConnectionsPerChain, st.TCPIdleTimeout, st.HTTPStreamIdleTimeout = 100, time.Hour, time.Minute
	return st
}

func compileState(t testing.TB, st xds.State) *Config {
	t.Helper()
	r, _, err := xds.Build(st)
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := Compile(r.Listeners, r.Clusters)
	if err != nil {
		t.Fatalf("the conformance proxy refuses what the agent serves:\n%v", err)
	}
	return cfg
}

// Everything the agent serves for these states is implemented.
func TestCompileServedConfig(t *testing.T) {
	for name, st := range testStates() {
		t.Run(name, func(t *testing.T) {
			cfg := compileState(t, st)
			if got := cfg.Listener.Addrs; !slices.Equal(got, []netip.AddrPort{netip.MustParseAddrPort("169.254.77.1:15001"), netip.MustParseAddrPort("[fd73:6c75:6963:65::1]:15001")}) {
				t.Errorf("listener addresses %v", got)
			}
			if !cfg.Listener.OriginalDst || !cfg.Listener.TLSInspector || !cfg.Listener.HTTPInspector {
				t.Errorf("listener filters: %+v", cfg.Listener)
			}
		})
	}
}

// A field or type the proxy does not implement is refused with its path:
// the served configuration cannot grow what the tests do not execute.
func TestCompileRefusesWhatItDoesNotImplement(t *testing.T) {
	r, _, err := xds.Build(testStates()["audit"])
	if err != nil {
		t.Fatal(err)
	}
	mutate := func(f func(l *listener.Listener)) error {
		l := proto.Clone(r.Listeners[0]).(*listener.Listener)
		f(l)
		_, err := Compile([]*listener.Listener{l}, r.Clusters)
		return err
	}
	cases := map[string]struct {
		f    func(l *listener.Listener)
		want string
	}{
		"a listener field": {func(l *listener.Listener) {
			l.PerConnectionBufferLimitBytes = nil
			l.TcpBacklogSize = nil
			l.Freebind = nil
			l.DrainType = listener.Listener_MODIFY_ONLY
		},
			"listener[sluice].drain_type: field envoy.config.listener.v3.Listener.drain_type is not implemented"},
		"a tcp_proxy field": {func(l *listener.Listener) {
			f := l.FilterChains[0].Filters[len(l.FilterChains[0].Filters)-1]
			var tp tcpproxy.TcpProxy
			f.GetTypedConfig().UnmarshalTo(&tp)
			tp.MaxConnectAttempts = wrapperspb.UInt32(3)
			a, _ := anypb.New(&tp)
			f.ConfigType = &listener.Filter_TypedConfig{TypedConfig: a}
		}, "<TcpProxy>.max_connect_attempts: field envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy.max_connect_attempts is not implemented"},
		"a type": {func(l *listener.Listener) {
			a, _ := anypb.New(&listener.Listener{})
			l.ListenerFilters[1].ConfigType = &listener.ListenerFilter_TypedConfig{TypedConfig: a}
		}, "listener_filters[1].typed_config: type envoy.config.listener.v3.Listener is not implemented"},
		"a chain the matcher names that does not exist": {func(l *listener.Listener) { l.FilterChains = l.FilterChains[1:] },
			"no filter chain named"},
		"original_dst not first": {func(l *listener.Listener) {
			l.ListenerFilters[0], l.ListenerFilters[1] = l.ListenerFilters[1], l.ListenerFilters[0]
		}, "original_dst must be the first listener filter"},
	}
	for name, c := range cases {
		t.Run(name, func(t *testing.T) {
			err := mutate(c.f)
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("error %v, want %q", err, c.want)
			}
		})
	}
}

// verdict is what the compiled configuration does with one connection.
type verdict struct {
	chain   string
	allowed bool
	dfp     bool // forwarded through the dynamic forward proxy (to DNS's answer)
}

func (c *Config) decide(d MatchData, host, method string) verdict {
	ch := c.Listener.ChainFor(d)
	if ch == nil {
		return verdict{chain: "(none)"}
	}
	v := verdict{chain: ch.Name}
	switch f := ch.Filters[len(ch.Filters)-1].(type) {
	case *TCPProxy:
		cl := c.Clusters[f.Cluster]
		v.allowed = cl.Kind != "STATIC"
		v.dfp = cl.Kind == "DYNAMIC_FORWARD_PROXY"
	case *HTTPConnectionManager:
		if _, r := f.RouteFor(host, method, "/"); r != nil && r.Cluster != "" {
			v.allowed = true
			v.dfp = c.Clusters[r.Cluster].Kind == "DYNAMIC_FORWARD_PROXY"
		}
	}
	return v
}

// The served configuration, executed, decides every probe connection as
// the policy says (policy.Policy.Decide is the oracle): a wrong chain, a
// matcher out of order or a missing range in the generated listener fails
// here.
func TestServedConfigDecidesAsThePolicy(t *testing.T) {
	ports := []uint16{22, 80, 443, 5432, 8080, 8443}
	names := []string{"", "api.stripe.com", "API.Stripe.com", "api.stripe.com.", "storage.googleapis.com", "a.b.googleapis.com", "googleapis.com",
		"plain.example.com", "one.example.com", "a.example.com", "evil.example", "api.stripe.com.evil.test", "pg.example.com"}
	dsts := []string{"203.0.113.5", "203.0.113.40", "198.51.100.7", "198.51.100.8", "10.100.0.1", "2001:db8::1", "2001:db9::1",
		"127.0.0.1", "169.254.169.254", "169.254.77.1", "192.168.1.10", "fd73:6c75:6963:65::1", "::1"}
	n := 0
	for name, st := range testStates() {
		cfg := compileState(t, st)
		var srcs []netip.Addr
		for _, w := range st.Workloads {
			srcs = append(srcs, w.IPs...)
		}
		srcs = append(srcs, netip.MustParseAddr("10.244.9.9")) // no workload's
		for _, src := range srcs {
			var pols []policy.Policy
			for _, w := range st.Workloads {
				if slices.Contains(w.IPs, src) {
					pols = append(pols, w.Policy)
				}
			}
			for _, dstS := range dsts {
				for _, port := range ports {
					dst := netip.AddrPortFrom(netip.MustParseAddr(dstS), port)
					for _, kind := range []string{"tcp", "tls", "tls-alpn", "http", "connect"} {
						for _, sni := range names {
							if (kind == "tcp") != (sni == "") {
								continue
							}
							d := MatchData{Source: netip.AddrPortFrom(src, 40000), Destination: dst, TransportProtocol: "raw_buffer"}
							host, method, osni := "", "GET", ""
							switch kind {
							case "tls", "tls-alpn":
								d.TransportProtocol, d.ServerName, osni = "tls", sni, sni
								if kind == "tls-alpn" {
									d.ALPN = []string{"h2", "http/1.1"}
								}
							case "http", "connect":
								d.ALPN, host = []string{"http/1.1"}, sni+":"+fmt.Sprint(port)
								if kind == "connect" {
									method = "CONNECT"
								}
							}
							got := cfg.decide(d, host, method)
							want := oracle(st, pols, dst, osni, strings.Split(host, ":")[0], method)
							n++
							if got.allowed != want.allowed || got.dfp != want.dfp || (want.chain != "" && got.chain != want.chain) {
								t.Errorf("%s: %s from %s to %s (sni/host %q): served config %+v, policy says %+v", name, kind, src, dst, sni, got, want)
							}
						}
					}
				}
			}
		}
	}
	t.Logf("%d probe connections agree", n)
}

// oracle: what the connection should get. Never-dial destinations hit the
// loop chain whoever asks; a source that is no workload's, or one shared
// by workloads with different policies, is denied; otherwise Decide.
func oracle(st xds.State, pols []policy.Policy, dst netip.AddrPort, sni, host, method string) verdict {
	a := dst.Addr()
	if slices.ContainsFunc(st.NeverDial, func(p netip.Prefix) bool { return p.Contains(a) }) {
		return verdict{chain: "loop"}
	}
	if len(pols) == 0 {
		return verdict{chain: "unknown-source"}
	}
	if len(pols) > 1 && !(slices.EqualFunc(pols[1:], pols[:len(pols)-1], func(x, y policy.Policy) bool { return x.Mode == y.Mode && slices.Equal(x.Allow, y.Allow) })) {
		return verdict{}
	}
	// CONNECT is never forwarded by a hostname entry (a CIDR entry allows
	// any TCP to its range, CONNECT bytes included).
	if method == "CONNECT" && pols[0].Mode == policy.Enforce && !pols[0].Decide(dst, "", "").Allowed {
		return verdict{}
	}
	dec := pols[0].Decide(dst, sni, host)
	return verdict{allowed: dec.Allowed, dfp: dec.Host != ""}
}

// With no resolvers configured (an agent whose --dns-resolvers resolved
// to none), the DNS cache takes the nameservers of the proxy's own
// resolv.conf, as c-ares does; a resolv.conf that lists none leaves every
// lookup failing, with nothing sent.
func TestCompileDNSCacheWithoutResolvers(t *testing.T) {
	dir := t.TempDir()
	old := SystemResolvConf
	t.Cleanup(func() { SystemResolvConf = old })
	SystemResolvConf = filepath.Join(dir, "resolv.conf")
	st := testStates()["enforce-hostnames"]
	st.DNSResolvers = nil

	if err := os.WriteFile(SystemResolvConf, []byte("search svc.cluster.local\nnameserver 10.96.0.10\nnameserver fd00::10\noptions ndots:5\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	cache := compileState(t, st).Clusters[xds.DynamicForwardProxyClusterName].Cache
	want := []netip.AddrPort{netip.MustParseAddrPort("10.96.0.10:53"), netip.MustParseAddrPort("[fd00::10]:53")}
	if !cache.SystemResolvers || !slices.Equal(cache.Resolvers, want) {
		t.Errorf("resolvers %v (system %v), want resolv.conf's %v", cache.Resolvers, cache.SystemResolvers, want)
	}

	for name, content := range map[string]string{"no nameserver": "search example.com\n", "no file": ""} {
		t.Run(name, func(t *testing.T) {
			os.Remove(SystemResolvConf)
			if content != "" {
				if err := os.WriteFile(SystemResolvConf, []byte(content), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			cache := compileState(t, st).Clusters[xds.DynamicForwardProxyClusterName].Cache
			if len(cache.Resolvers) != 0 {
				t.Fatalf("resolvers %v, want none", cache.Resolvers)
			}
			c := (&dnsCaches{}).get(cache)
			if addrs, err := c.resolve(context.Background(), "api.stripe.com"); err == nil {
				t.Errorf("lookup without resolvers answered %v", addrs)
			}
		})
	}
}
