package xds

import (
	"fmt"
	"google.golang.org/protobuf/types/known/structpb"
	"slices"
	"strings"
	"testing"

	xdscore "github.com/cncf/xds/go/xds/core/v3"
	matcher "github.com/cncf/xds/go/xds/type/matcher/v3"
	accesslog "github.com/envoyproxy/go-control-plane/envoy/config/accesslog/v3"
	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpoint "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	route "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	stream "github.com/envoyproxy/go-control-plane/envoy/extensions/access_loggers/stream/v3"
	dfpcluster "github.com/envoyproxy/go-control-plane/envoy/extensions/clusters/dynamic_forward_proxy/v3"
	dnscache "github.com/envoyproxy/go-control-plane/envoy/extensions/common/dynamic_forward_proxy/v3"
	hcm "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	netrbac "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/rbac/v3"
	tcpproxy "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	upstreamhttp "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// validResources is a generated configuration with every kind of chain:
// audit, tcp, tls, http per port, deny.
func validResources(t *testing.T) *Resources {
	t.Helper()
	r, _, err := Build(State{Proxy: testProxy, Workloads: []Workload{
		pod("shop", "checkout", "enforce", "api.stripe.com:443, *.googleapis.com, status.example.com:80, 203.0.113.0/24", "10.244.1.6"),
		pod("shop", "web", "audit", "", "10.244.1.5"),
	}})
	if err != nil {
		t.Fatal(err)
	}
	if err := Validate(r); err != nil {
		t.Fatalf("base configuration does not validate: %v", err)
	}
	return r
}

func mustAny(t *testing.T, m proto.Message) *anypb.Any {
	t.Helper()
	a, err := anypb.New(m)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// chain returns the listener's filter chain with the given name prefix.
func chain(t *testing.T, r *Resources, prefix string) *listener.FilterChain {
	t.Helper()
	for _, c := range r.Listeners[0].GetFilterChains() {
		if strings.HasPrefix(c.GetName(), prefix) {
			return c
		}
	}
	t.Fatalf("no chain %q", prefix)
	return nil
}

// editTyped unpacks the first filter of a chain, lets edit change it and
// packs it back.
func editTyped[T proto.Message](t *testing.T, f *listener.Filter, m T, edit func(T)) {
	t.Helper()
	if err := f.GetTypedConfig().UnmarshalTo(m); err != nil {
		t.Fatal(err)
	}
	edit(m)
	f.ConfigType = &listener.Filter_TypedConfig{TypedConfig: mustAny(t, m)}
}

func editHCM(t *testing.T, r *Resources, edit func(*hcm.HttpConnectionManager)) {
	t.Helper()
	fs := chain(t, r, "http|shop/checkout|80").GetFilters()
	editTyped(t, fs[len(fs)-1], &hcm.HttpConnectionManager{}, edit)
}

func originalDst(r *Resources) *cluster.Cluster { return r.Clusters[0] }

func dfpCluster(t *testing.T, r *Resources) *cluster.Cluster {
	t.Helper()
	for _, c := range r.Clusters {
		if c.GetName() == DynamicForwardProxyClusterName {
			return c
		}
	}
	t.Fatal("no dynamic forward proxy cluster")
	return nil
}

// editDNSCache changes the DNS cache of the dynamic forward proxy cluster
// only (not of the filters that attach to it).
func editDNSCache(t *testing.T, r *Resources, edit func(*dnscache.DnsCacheConfig)) {
	t.Helper()
	c := dfpCluster(t, r)
	var cfg dfpcluster.ClusterConfig
	if err := c.GetClusterType().GetTypedConfig().UnmarshalTo(&cfg); err != nil {
		t.Fatal(err)
	}
	edit(cfg.GetDnsCacheConfig())
	c.GetClusterType().TypedConfig = mustAny(t, &cfg)
}

// Each rule of the validator, fed a resource that breaks it.
// setLogField sets one field of the audit chain's access log format.
// editLog changes the access log of the audit chain's tcp_proxy.
func editLog(t *testing.T, r *Resources, edit func(*stream.StdoutAccessLog)) {
	t.Helper()
	editTyped(t, chain(t, r, "audit|").GetFilters()[0], &tcpproxy.TcpProxy{}, func(tp *tcpproxy.TcpProxy) {
		var l stream.StdoutAccessLog
		if err := tp.AccessLog[0].GetTypedConfig().UnmarshalTo(&l); err != nil {
			t.Fatal(err)
		}
		edit(&l)
		tp.AccessLog[0].ConfigType = &accesslog.AccessLog_TypedConfig{TypedConfig: mustAny(t, &l)}
	})
}

func setLogField(t *testing.T, r *Resources, key, value string) {
	t.Helper()
	editLog(t, r, func(l *stream.StdoutAccessLog) {
		l.GetLogFormat().GetJsonFormat().Fields[key] = structpb.NewStringValue(value)
	})
}

// rejectCase is one rule of the validator and a change to validResources
// that breaks it.
type rejectCase struct {
	name   string
	break_ func(*testing.T, *Resources)
	want   string
}

func TestValidateRejects(t *testing.T) {
	for _, tc := range rejectCases {
		t.Run(tc.name, func(t *testing.T) {
			r := validResources(t)
			tc.break_(t, r)
			err := Validate(r)
			if err == nil {
				t.Fatalf("Validate accepted a resource that breaks the rule")
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error does not say %q:\n%v", tc.want, err)
			}
			// A Validator that has just accepted the unbroken
			// configuration (every chain remembered) still finds it: what
			// it remembers never stands in for what changed.
			v := Validator{JSONRoundTrip: true}
			if err := v.Validate(validResources(t)); err != nil {
				t.Fatal(err)
			}
			if err := v.Validate(r); err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("warm Validator: %v, want an error saying %q", err, tc.want)
			}
		})
	}
}

// A remembered chain is valid only with the clusters it was checked
// against: without the cluster it names, it is checked again and refused.
func TestValidatorRemembersChainsWithTheirClusters(t *testing.T) {
	var v Validator
	if err := v.Validate(validResources(t)); err != nil {
		t.Fatal(err)
	}
	if len(v.chains) == 0 {
		t.Fatal("the Validator remembered no chain")
	}
	r := validResources(t)
	r.Clusters = slices.DeleteFunc(r.Clusters, func(c *cluster.Cluster) bool { return c.GetName() == OriginalDstClusterName })
	if err := v.Validate(r); err == nil || !strings.Contains(err.Error(), OriginalDstClusterName) {
		t.Fatalf("chains naming a removed cluster: %v", err)
	}
	// A failed validation forgets nothing it knew, and learns nothing.
	n := len(v.chains)
	if err := v.Validate(validResources(t)); err != nil || len(v.chains) != n {
		t.Fatalf("after a failure: %v, %d chains remembered, want %d", err, len(v.chains), n)
	}
}

// An Any shared by many chains (builder.sharedAny) is walked once per
// validation, and the DNS caches inside it are still recorded for every
// chain that holds it: a chain remembered for the next validation keeps
// its caches, which checkDNSCacheSet compares with that configuration's.
func TestValidatorRecordsCachesOfSharedAnys(t *testing.T) {
	r, _, err := new(Builder).Build(benchStateN(t, 3))
	if err != nil {
		t.Fatal(err)
	}
	v := &Validator{}
	if err := v.Validate(r); err != nil {
		t.Fatal(err)
	}
	holders := map[*anypb.Any]int{}
	var withCache int
	for _, c := range r.Listeners[0].GetFilterChains() {
		b, err := protojson.Marshal(c)
		if err != nil {
			t.Fatal(err)
		}
		for _, f := range c.GetFilters() {
			if f.GetName() == sniDFPFilterName {
				holders[f.GetTypedConfig()]++
			}
		}
		want := strings.Count(string(b), `"dnsCacheConfig"`)
		if got := len(v.builtChains[c].caches); got != want {
			t.Errorf("chain %q holds %d DNS caches, the validator recorded %d", c.GetName(), want, got)
		}
		if want > 0 {
			withCache++
		}
	}
	if len(holders) != 1 || withCache < 6 {
		t.Fatalf("the SNI forward proxy filter is %d distinct Anys in %d chains with a DNS cache; want one, shared", len(holders), withCache)
	}
}

var rejectCases = []rejectCase{
	{"PGV on a resource", func(t *testing.T, r *Resources) { originalDst(r).Name = "" },
		"Name: value length must be at least 1"},
	{"PGV inside a typed_config Any", func(t *testing.T, r *Resources) {
		editTyped(t, chain(t, r, "audit|").GetFilters()[0], &tcpproxy.TcpProxy{}, func(tp *tcpproxy.TcpProxy) { tp.StatPrefix = "" })
	}, "invalid TcpProxy.StatPrefix: value length must be at least 1"},
	{"PGV inside an Any inside an Any (access log format)", func(t *testing.T, r *Resources) {
		editLog(t, r, func(l *stream.StdoutAccessLog) { l.GetLogFormat().Format = nil })
	}, ".filters[0].typed_config(envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy).access_log[0].typed_config(envoy.extensions.access_loggers.stream.v3.StdoutAccessLog): invalid StdoutAccessLog.LogFormat"},
	{"unknown command operator in an access log format", func(t *testing.T, r *Resources) {
		setLogField(t, r, "bogus", "%UPSTREAM_HOSTNAME_TYPO%")
	}, "log_format.json_format.bogus: unknown command operator %UPSTREAM_HOSTNAME_TYPO%"},
	{"unknown command operator in a nested JSON field", func(t *testing.T, r *Resources) {
		inner, err := structpb.NewStruct(map[string]any{"ok": "%DURATION%", "deep": map[string]any{"bad": "%NOPE%"}})
		if err != nil {
			t.Fatal(err)
		}
		editLog(t, r, func(l *stream.StdoutAccessLog) {
			l.GetLogFormat().GetJsonFormat().Fields["outer"] = structpb.NewStructValue(inner)
		})
	}, "log_format.json_format.outer.deep.bad: unknown command operator %NOPE%"},
	{"unterminated command operator", func(t *testing.T, r *Resources) { setLogField(t, r, "bogus", "%DURATION") },
		"unterminated command operator"},
	{"unknown type URL", func(t *testing.T, r *Resources) {
		chain(t, r, "audit|").GetFilters()[0].GetTypedConfig().TypeUrl = "type.googleapis.com/envoy.extensions.filters.network.made_up.v3.MadeUp"
	}, "Envoy rejects type URLs it does not know"},
	{"JSON round trip (invalid UTF-8)", func(t *testing.T, r *Resources) { r.Listeners[0].StatPrefix = "bad\xff" },
		"to JSON"},
	{"ORIGINAL_DST without CLUSTER_PROVIDED", func(t *testing.T, r *Resources) { originalDst(r).LbPolicy = cluster.Cluster_ROUND_ROBIN },
		"an ORIGINAL_DST cluster needs lb_policy CLUSTER_PROVIDED, not ROUND_ROBIN"},
	{"ORIGINAL_DST with a load_assignment", func(t *testing.T, r *Resources) {
		originalDst(r).LoadAssignment = &endpoint.ClusterLoadAssignment{ClusterName: OriginalDstClusterName}
	}, "an ORIGINAL_DST cluster must not have a load_assignment"},
	{"CLUSTER_PROVIDED on a STATIC cluster", func(t *testing.T, r *Resources) { r.Clusters[1].LbPolicy = cluster.Cluster_CLUSTER_PROVIDED },
		"lb_policy CLUSTER_PROVIDED is only valid for ORIGINAL_DST clusters, not STATIC"},
	{"dynamic forward proxy without CLUSTER_PROVIDED", func(t *testing.T, r *Resources) { dfpCluster(t, r).LbPolicy = cluster.Cluster_ROUND_ROBIN },
		"a dynamic forward proxy cluster needs lb_policy CLUSTER_PROVIDED"},
	{"dynamic forward proxy HTTP options without auto_sni", func(t *testing.T, r *Resources) {
		c := dfpCluster(t, r)
		var o upstreamhttp.HttpProtocolOptions
		if err := c.TypedExtensionProtocolOptions[httpProtocolOptionsKey].UnmarshalTo(&o); err != nil {
			t.Fatal(err)
		}
		o.UpstreamHttpProtocolOptions = nil
		c.TypedExtensionProtocolOptions[httpProtocolOptionsKey] = mustAny(t, &o)
	}, "lack auto_sni and auto_san_validation"},
	{"unknown custom cluster type", func(t *testing.T, r *Resources) {
		dfpCluster(t, r).GetClusterType().Name = "envoy.clusters.redis"
	}, `cluster_type "envoy.clusters.redis"`},
	{"DNS cache differs between cluster and filter", func(t *testing.T, r *Resources) {
		editDNSCache(t, r, func(dc *dnscache.DnsCacheConfig) { dc.MaxHosts = wrapperspb.UInt32(7) })
	}, `DNS cache "sluice" differs from its configuration`},
	{"DNS cache without the rebinding filter", func(t *testing.T, r *Resources) {
		editDNSCache(t, r, func(dc *dnscache.DnsCacheConfig) { dc.ResolvedAddressFilter = nil })
	}, "keeps every answer"},
	{"DNS cache on the node's resolv.conf", func(t *testing.T, r *Resources) {
		editDNSCache(t, r, func(dc *dnscache.DnsCacheConfig) { dc.TypedDnsResolverConfig = nil })
	}, "has no typed_dns_resolver_config"},
	{"duplicate cluster names", func(t *testing.T, r *Resources) {
		r.Clusters = append(r.Clusters, proto.Clone(r.Clusters[1]).(*cluster.Cluster))
	}, `cluster "sluice_deny": duplicate cluster name`},
	{"duplicate listener names", func(t *testing.T, r *Resources) {
		r.Listeners = append(r.Listeners, proto.Clone(r.Listeners[0]).(*listener.Listener))
	}, `listener "sluice": duplicate listener name`},
	{"tcp_proxy names a missing cluster", func(t *testing.T, r *Resources) { r.Clusters = r.Clusters[1:] },
		`cluster "sluice_original_dst" does not exist`},
	{"route names a missing cluster", func(t *testing.T, r *Resources) {
		editHCM(t, r, func(m *hcm.HttpConnectionManager) {
			m.GetRouteConfig().VirtualHosts[0].Routes[1].GetRoute().ClusterSpecifier = &route.RouteAction_Cluster{Cluster: "nope"}
		})
	}, `virtual host "allow": cluster "nope" does not exist`},
	{"terminal filter not last", func(t *testing.T, r *Resources) {
		c := chain(t, r, "audit|")
		c.Filters = append(c.Filters, proto.Clone(c.Filters[0]).(*listener.Filter))
	}, `terminal filter "envoy.filters.network.tcp_proxy" must be the last network filter of its chain`},
	{"last filter not terminal", func(t *testing.T, r *Resources) {
		chain(t, r, "audit|").Filters = []*listener.Filter{{
			Name:       "envoy.filters.network.rbac",
			ConfigType: &listener.Filter_TypedConfig{TypedConfig: mustAny(t, &netrbac.RBAC{StatPrefix: "x"})},
		}}
	}, `the last network filter "envoy.filters.network.rbac" is not a terminal filter`},
	{"chain without filters", func(t *testing.T, r *Resources) { chain(t, r, "audit|").Filters = nil },
		"no network filters"},
	{"network filter name does not match its type", func(t *testing.T, r *Resources) {
		chain(t, r, "audit|").Filters[0].Name = hcmFilterName
	}, `network filter named "envoy.filters.network.http_connection_manager" but its type`},
	{"listener filter name does not match its type", func(t *testing.T, r *Resources) {
		r.Listeners[0].ListenerFilters[0].Name = tlsInspectorFilterName
	}, `listener filter named "envoy.filters.listener.tls_inspector" but its type type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst is "envoy.filters.listener.original_dst"`},
	{"listener filter of another category", func(t *testing.T, r *Resources) {
		r.Listeners[0].ListenerFilters[0].ConfigType = &listener.ListenerFilter_TypedConfig{TypedConfig: mustAny(t, &tcpproxy.TcpProxy{StatPrefix: "x", ClusterSpecifier: &tcpproxy.TcpProxy_Cluster{Cluster: DenyClusterName}})}
	}, "is not a listener filter"},
	{"unnamed chain with a matcher", func(t *testing.T, r *Resources) { chain(t, r, "audit|").Name = "" },
		"filter chains must be named when filter_chain_matcher is used"},
	{"duplicate chain names", func(t *testing.T, r *Resources) { chain(t, r, "tcp|").Name = chain(t, r, "tls|").GetName() },
		`duplicate filter chain name "tls|shop/checkout"`},
	{"matcher names a missing chain", func(t *testing.T, r *Resources) { chain(t, r, "audit|").Name = "renamed" },
		`action names filter chain "audit|shop/web", which does not exist`},
	{"filter_chain_match beside a matcher", func(t *testing.T, r *Resources) {
		chain(t, r, "audit|").FilterChainMatch = &listener.FilterChainMatch{ServerNames: []string{"x.example.com"}}
	}, "sets filter_chain_match, which filter_chain_matcher ignores"},
	{"two chains with the same match (no matcher)", func(t *testing.T, r *Resources) {
		r.Listeners[0].FilterChainMatcher = nil
		r.Listeners[0].FilterChains = r.Listeners[0].FilterChains[:2]
	}, `filter chains "loop" and "unknown-source" have the same filter_chain_match`},
	{"matcher action is not a StringValue", func(t *testing.T, r *Resources) {
		r.Listeners[0].FilterChainMatcher.OnNoMatch = &matcher.Matcher_OnMatch{OnMatch: &matcher.Matcher_OnMatch_Action{Action: &xdscore.TypedExtensionConfig{
			Name: "x", TypedConfig: mustAny(t, wrapperspb.UInt32(1)),
		}}}
	}, "must be a google.protobuf.StringValue naming a chain"},
	{"matcher input is not a network input", func(t *testing.T, r *Resources) {
		r.Listeners[0].FilterChainMatcher.GetMatcherTree().Input = &xdscore.TypedExtensionConfig{Name: "x", TypedConfig: mustAny(t, wrapperspb.String("x"))}
	}, "is not a network matching input"},
	{"matcher CIDR that is not an address", func(t *testing.T, r *Resources) {
		var trie matcher.IPMatcher
		cm := r.Listeners[0].FilterChainMatcher.GetMatcherTree().GetCustomMatch()
		if err := cm.GetTypedConfig().UnmarshalTo(&trie); err != nil {
			t.Fatal(err)
		}
		trie.RangeMatchers[0].Ranges[0].AddressPrefix = "proxy.local"
		cm.TypedConfig = mustAny(t, &trie)
	}, `CIDR address "proxy.local" is not an IP address`},
	{"listener address that is not an IP", func(t *testing.T, r *Resources) {
		r.Listeners[0].Address.GetSocketAddress().Address = "localhost"
	}, `listener address "localhost" is not an IP address`},
	{"router not the last HTTP filter", func(t *testing.T, r *Resources) {
		editHCM(t, r, func(m *hcm.HttpConnectionManager) { m.HttpFilters = append(m.HttpFilters, m.HttpFilters[0]) })
	}, `terminal filter "envoy.filters.http.router" must be the last HTTP filter of its chain`},
	{"RDS instead of inline routes", func(t *testing.T, r *Resources) {
		editHCM(t, r, func(m *hcm.HttpConnectionManager) {
			m.RouteSpecifier = &hcm.HttpConnectionManager_Rds{Rds: &hcm.Rds{
				RouteConfigName: "x",
				ConfigSource:    &core.ConfigSource{ConfigSourceSpecifier: &core.ConfigSource_Ads{Ads: &core.AggregatedConfigSource{}}},
			}}
		})
	}, "routes must be inline"},
	{"the same domain in two virtual hosts", func(t *testing.T, r *Resources) {
		editHCM(t, r, func(m *hcm.HttpConnectionManager) {
			vh := m.GetRouteConfig().VirtualHosts
			vh[1].Domains = append(vh[1].Domains, vh[0].Domains[0])
		})
	}, `virtual host "deny": domain "*.googleapis.com" is also in virtual host "allow"; Envoy permits each domain once`},
	{"direct response body over 4 KiB", func(t *testing.T, r *Resources) {
		editHCM(t, r, func(m *hcm.HttpConnectionManager) {
			dr := m.GetRouteConfig().VirtualHosts[1].Routes[1].GetDirectResponse()
			dr.Body = &core.DataSource{Specifier: &core.DataSource_InlineString{InlineString: strings.Repeat("x", 5000)}}
		})
	}, "direct response body is 5000 bytes; Envoy's limit is 4096"},
	{"access logger name does not match its type", func(t *testing.T, r *Resources) {
		editTyped(t, chain(t, r, "audit|").GetFilters()[0], &tcpproxy.TcpProxy{}, func(tp *tcpproxy.TcpProxy) { tp.AccessLog[0].Name = "envoy.access_loggers.file" })
	}, `access logger named "envoy.access_loggers.file"`},
}

// The walk reads generated structs directly where it has a structPlan, and
// through protoreflect otherwise: both find the same errors and the same
// DNS caches at the same paths, in valid configurations and in every
// configuration TestValidateRejects breaks.
func TestStructWalkMatchesReflectiveWalk(t *testing.T) {
	for _, m := range []proto.Message{&listener.Listener{}, &listener.FilterChain{}, &cluster.Cluster{}, &hcm.HttpConnectionManager{}, &route.RouteConfiguration{}, &tcpproxy.TcpProxy{}} {
		if structPlanOf(m, m.ProtoReflect().Descriptor()) == nil {
			t.Fatalf("%T has no structPlan: the walk would not use it", m)
		}
	}
	walkAll := func(t *testing.T, r *Resources, reflective bool) []string {
		t.Helper()
		reflectiveWalk = reflective
		defer func() { reflectiveWalk = false }()
		var out []string
		record := func(name string, m proto.Message) {
			caches, errs := validateResource(name, m, false, walkOpts{packed: r.packed})
			for _, c := range caches {
				// The contents, not the pointer: an Any is unpacked afresh
				// by each walk unless the builder kept what it packed.
				b, err := proto.MarshalOptions{Deterministic: true}.Marshal(c.dc)
				if err != nil {
					t.Fatal(err)
				}
				out = append(out, fmt.Sprintf("cache %s %x", c.path, b))
			}
			for _, err := range errs {
				out = append(out, "error "+err.Error())
			}
		}
		for i, m := range r.messages() {
			record(fmt.Sprintf("resource[%d]", i), m)
		}
		for _, l := range r.Listeners {
			for i, c := range l.GetFilterChains() {
				record(fmt.Sprintf("%s.filter_chains[%d]", l.GetName(), i), c)
			}
		}
		return out
	}
	compare := func(t *testing.T, r *Resources, wantSome string) {
		t.Helper()
		direct, reflective := walkAll(t, r, false), walkAll(t, r, true)
		if !slices.Equal(direct, reflective) {
			t.Fatalf("struct walk found\n%s\nreflective walk found\n%s", strings.Join(direct, "\n"), strings.Join(reflective, "\n"))
		}
		if !slices.ContainsFunc(direct, func(s string) bool { return strings.HasPrefix(s, wantSome) }) {
			t.Fatalf("neither walk found a %q line:\n%s", wantSome, strings.Join(direct, "\n"))
		}
	}
	t.Run("valid", func(t *testing.T) { compare(t, validResources(t), "cache ") })
	t.Run("bench state", func(t *testing.T) {
		r, _, err := new(Builder).Build(benchStateN(t, 20))
		if err != nil {
			t.Fatal(err)
		}
		compare(t, r, "cache ")
	})
	for _, tc := range rejectCases {
		t.Run(tc.name, func(t *testing.T) {
			r := validResources(t)
			tc.break_(t, r)
			direct, reflective := walkAll(t, r, false), walkAll(t, r, true)
			if !slices.Equal(direct, reflective) {
				t.Fatalf("struct walk found\n%s\nreflective walk found\n%s", strings.Join(direct, "\n"), strings.Join(reflective, "\n"))
			}
		})
	}
}
