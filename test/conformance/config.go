// Package conformance is a test proxy that runs the configuration sluice's
// agent serves, as Envoy would: it takes the listener and clusters over ADS,
// refuses (NACKs) every field and type it does not implement, and handles
// each connection by executing them: the listener filters, the filter-chain
// matcher, the chain's network filters, the clusters and the access logs.
// It is test-only and implements only what the agent uses; where a rule is
// not obvious, a comment cites the Envoy source or documentation it follows.
// A real Envoy (ENVOY_BIN) remains the reference: what only Envoy can show
// is listed in docs/xds.md.
package conformance

import (
	"sync/atomic"

	"errors"
	"fmt"
	connlimit "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/connection_limit/v3"
	"net"
	"net/netip"
	"sort"
	"time"

	accesslog "github.com/envoyproxy/go-control-plane/envoy/config/accesslog/v3"
	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	route "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	stream "github.com/envoyproxy/go-control-plane/envoy/extensions/access_loggers/stream/v3"
	dfpcluster "github.com/envoyproxy/go-control-plane/envoy/extensions/clusters/dynamic_forward_proxy/v3"
	dfpcommon "github.com/envoyproxy/go-control-plane/envoy/extensions/common/dynamic_forward_proxy/v3"
	httpdfp "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/dynamic_forward_proxy/v3"
	router "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	httpinspector "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/listener/http_inspector/v3"
	originaldst "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/listener/original_dst/v3"
	tlsinspector "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/listener/tls_inspector/v3"
	hcm "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	setfilterstate "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/set_filter_state/v3"
	snidfp "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/sni_dynamic_forward_proxy/v3"
	tcpproxy "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	cares "github.com/envoyproxy/go-control-plane/envoy/extensions/network/dns_resolver/cares/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/structpb"
)

// Config is one accepted configuration: the listener and the clusters.
type Config struct {
	Listener *Listener
	Clusters map[string]*Cluster
}

// Listener is the compiled listener.
type Listener struct {
	Name  string
	Addrs []netip.AddrPort
	// Listener filters, in order; original_dst must come first.
	OriginalDst, TLSInspector, HTTPInspector bool
	FiltersTimeout                           time.Duration
	ContinueOnTimeout                        bool
	Matcher                                  *Matcher
	Chains                                   map[string]*Chain
	Default                                  *Chain
	// AccessLogs log connections that end before a filter chain (closed
	// by a listener filter, or no chain).
	AccessLogs []*AccessLog
}

// Chain is one filter chain: its network filters in order.
type Chain struct {
	Name    string
	Filters []any // *ConnectionLimit, *SetFilterState, *SNIForwardProxy, *TCPProxy, *HTTPConnectionManager
}

// ConnectionLimit is the connection_limit network filter: at most Max
// connections open through this filter instance (per chain; a new
// configuration of the chain starts a new count, as in Envoy).
type ConnectionLimit struct {
	Max    uint64
	active atomic.Int64
}

// SetFilterState sets connection filter state when a connection starts.
type SetFilterState struct{ Values map[string]string } // object key -> format

// SNIForwardProxy resolves the TLS server name through a DNS cache for the
// dynamic forward proxy cluster.
type SNIForwardProxy struct {
	Cache *DNSCache
	Port  uint32
}

// TCPProxy proxies the connection to a cluster.
type TCPProxy struct {
	Cluster    string
	StatPrefix string
	AccessLogs []*AccessLog
	// FlushOnConnected logs when the upstream connects; FlushInterval
	// while the connection lasts (zero: never).
	FlushOnConnected bool
	FlushInterval    time.Duration
	// IdleTimeout closes the connection after this long without bytes
	// either way; zero: never (an explicit 0s; unset is Envoy's 1 h).
	IdleTimeout time.Duration
}

// HTTPConnectionManager serves HTTP/1.x with a route table.
type HTTPConnectionManager struct {
	StatPrefix       string
	Routes           *RouteConfig
	ForwardProxy     *HTTPForwardProxy // the dynamic_forward_proxy HTTP filter, if any
	StripAnyHostPort bool
	StripTrailingDot bool
	// AcceptHTTP10 with DefaultHost10 for requests without Host; off, Envoy
	// answers HTTP/1.0 with 426.
	AcceptHTTP10  bool
	DefaultHost10 string
	// PassServer: server_header_transformation PASS_THROUGH (the default
	// OVERWRITE sets "server: envoy").
	PassServer bool
	// StreamIdle ends a request idle this long; zero: never (unset is
	// Envoy's 5 min).
	StreamIdle time.Duration
	Upgrades   []string
	AccessLogs []*AccessLog
}

// HTTPForwardProxy is the HTTP dynamic_forward_proxy filter.
type HTTPForwardProxy struct {
	Cache           *DNSCache
	FromFilterState bool
}

// RouteConfig is an inline route configuration.
type RouteConfig struct {
	Name   string
	VHosts []*VirtualHost
}

// VirtualHost is one virtual host.
type VirtualHost struct {
	Name    string
	Domains []string
	Routes  []*Route
}

// Route is one route: a match and an action.
type Route struct {
	Name    string
	Prefix  string
	Connect bool // connect_matcher
	// Action: a cluster, or a direct response.
	Cluster    string
	Status     int
	Body       string
	HasTimeout bool
	Timeout    time.Duration
}

// Cluster is one cluster.
type Cluster struct {
	Name           string
	Kind           string // ORIGINAL_DST, STATIC, DYNAMIC_FORWARD_PROXY
	ConnectTimeout time.Duration
	Endpoints      []netip.AddrPort // STATIC
	Cache          *DNSCache        // DYNAMIC_FORWARD_PROXY
	// Keepalive on upstream connections (upstream_connection_options).
	Keepalive *net.KeepAliveConfig
}

// DNSCache is a dynamic forward proxy DNS cache configuration.
type DNSCache struct {
	Name      string
	Resolvers []netip.AddrPort
	// SystemResolvers: the configuration named none, so Resolvers are
	// the nameservers of SystemResolvConf (as c-ares does).
	SystemResolvers          bool
	V4Preferred              bool
	HostTTL, MinRefresh      time.Duration
	FailureBase, FailureMax  time.Duration
	QueryTimeout             time.Duration
	MaxHosts                 int
	Filter                   []netip.Prefix // resolved_address_filter
	resolverKey, wholeConfig string
}

// AccessLog is a stdout access log with a JSON format.
type AccessLog struct {
	Fields map[string]string
	Sorted bool
}

// Compile checks listeners and clusters (as decoded from ADS) and compiles
// them. Any field, type or value the conformance proxy does not implement
// is an error naming its path; so is anything Envoy itself would reject
// that the proxy knows of (a chain the matcher names that does not exist).
func Compile(listeners []*listener.Listener, clusters []*cluster.Cluster) (*Config, error) {
	var errs []error
	for _, l := range listeners {
		if err := checkImplemented("listener["+l.GetName()+"]", l); err != nil {
			errs = append(errs, err)
		}
	}
	for _, c := range clusters {
		if err := checkImplemented("cluster["+c.GetName()+"]", c); err != nil {
			errs = append(errs, err)
		}
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	cfg := &Config{Clusters: map[string]*Cluster{}}
	for _, c := range clusters {
		cc, err := compileCluster(c)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if cfg.Clusters[cc.Name] != nil {
			errs = append(errs, fmt.Errorf("cluster[%s]: duplicate name", cc.Name))
		}
		cfg.Clusters[cc.Name] = cc
	}
	if len(listeners) != 1 {
		errs = append(errs, fmt.Errorf("%d listeners: the conformance proxy implements exactly one", len(listeners)))
	} else {
		l, err := compileListener(listeners[0], cfg.Clusters)
		if err != nil {
			errs = append(errs, err)
		}
		cfg.Listener = l
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	if err := cfg.checkCaches(); err != nil {
		return nil, err
	}
	return cfg, nil
}

// caches lists every DNS cache configuration, where it is used.
func (c *Config) caches() map[string][]*DNSCache {
	out := map[string][]*DNSCache{}
	for _, cl := range c.Clusters {
		if cl.Cache != nil {
			out[cl.Cache.Name] = append(out[cl.Cache.Name], cl.Cache)
		}
	}
	chains := append([]*Chain{c.Listener.Default}, mapValues(c.Listener.Chains)...)
	for _, ch := range chains {
		if ch == nil {
			continue
		}
		for _, f := range ch.Filters {
			switch f := f.(type) {
			case *SNIForwardProxy:
				out[f.Cache.Name] = append(out[f.Cache.Name], f.Cache)
			case *HTTPConnectionManager:
				if f.ForwardProxy != nil {
					out[f.ForwardProxy.Cache.Name] = append(out[f.ForwardProxy.Cache.Name], f.ForwardProxy.Cache)
				}
			}
		}
	}
	return out
}

// checkCaches: one DNS cache per name, so every filter and cluster naming
// it must configure it identically; Envoy refuses the configuration
// otherwise (dns_cache_manager_impl.cc: "config specified DNS cache ...
// with different settings").
func (c *Config) checkCaches() error {
	for name, cs := range c.caches() {
		for _, x := range cs[1:] {
			if x.wholeConfig != cs[0].wholeConfig {
				return fmt.Errorf("DNS cache %q is configured differently in two places", name)
			}
		}
	}
	return nil
}

func mapValues[V any](m map[string]V) []V {
	out := make([]V, 0, len(m))
	for _, k := range sortedKeys(m) {
		out = append(out, m[k])
	}
	return out
}

func duration(d interface{ AsDuration() time.Duration }, isNil bool) time.Duration {
	if isNil {
		return 0
	}
	return d.AsDuration()
}

func unpack(path string, a *anypb.Any, into proto.Message) error {
	if a == nil {
		return fmt.Errorf("%s: missing typed_config", path)
	}
	if err := a.UnmarshalTo(into); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	return nil
}

func socketAddr(path string, a *core.Address, wantUDP bool) (netip.AddrPort, error) {
	sa := a.GetSocketAddress()
	if sa == nil {
		return netip.AddrPort{}, fmt.Errorf("%s: only socket_address is implemented", path)
	}
	if wantUDP != (sa.GetProtocol() == core.SocketAddress_UDP) {
		return netip.AddrPort{}, fmt.Errorf("%s: protocol %s is not implemented here", path, sa.GetProtocol())
	}
	ip, err := netip.ParseAddr(sa.GetAddress())
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("%s: address %q: %w", path, sa.GetAddress(), err)
	}
	if sa.GetPortValue() > 65535 {
		return netip.AddrPort{}, fmt.Errorf("%s: port %d", path, sa.GetPortValue())
	}
	return netip.AddrPortFrom(ip, uint16(sa.GetPortValue())), nil
}

func compileCluster(c *cluster.Cluster) (*Cluster, error) {
	path := "cluster[" + c.GetName() + "]"
	cc := &Cluster{Name: c.GetName(), ConnectTimeout: duration(c.GetConnectTimeout(), c.GetConnectTimeout() == nil)}
	if cc.ConnectTimeout == 0 {
		cc.ConnectTimeout = 5 * time.Second // Envoy's default connect_timeout
	}
	if ka := c.GetUpstreamConnectionOptions().GetTcpKeepalive(); ka != nil {
		// Unset values are the kernel's defaults.
		cc.Keepalive = &net.KeepAliveConfig{Enable: true, Idle: -1, Interval: -1, Count: -1}
		if v := ka.GetKeepaliveTime(); v != nil {
			cc.Keepalive.Idle = time.Duration(v.GetValue()) * time.Second
		}
		if v := ka.GetKeepaliveInterval(); v != nil {
			cc.Keepalive.Interval = time.Duration(v.GetValue()) * time.Second
		}
		if v := ka.GetKeepaliveProbes(); v != nil {
			cc.Keepalive.Count = int(v.GetValue())
		}
	}
	if len(c.GetCircuitBreakers().GetThresholds()) > 1 {
		return nil, fmt.Errorf("%s.circuit_breakers: one threshold (priority DEFAULT) implemented", path)
	}
	for k := range c.GetTypedExtensionProtocolOptions() {
		if k != "envoy.extensions.upstreams.http.v3.HttpProtocolOptions" {
			return nil, fmt.Errorf("%s.typed_extension_protocol_options[%s]: not implemented", path, k)
		}
	}
	switch {
	case c.GetClusterType() != nil:
		ct := c.GetClusterType()
		if ct.GetName() != "envoy.clusters.dynamic_forward_proxy" {
			return nil, fmt.Errorf("%s.cluster_type: %q not implemented", path, ct.GetName())
		}
		if c.GetLbPolicy() != cluster.Cluster_CLUSTER_PROVIDED {
			return nil, fmt.Errorf("%s: a dynamic forward proxy cluster needs lb_policy CLUSTER_PROVIDED", path)
		}
		var cfg dfpcluster.ClusterConfig
		if err := unpack(path+".cluster_type.typed_config", ct.GetTypedConfig(), &cfg); err != nil {
			return nil, err
		}
		cache, err := compileDNSCache(path+".cluster_type.typed_config.dns_cache_config", cfg.GetDnsCacheConfig())
		if err != nil {
			return nil, err
		}
		cc.Kind, cc.Cache = "DYNAMIC_FORWARD_PROXY", cache
	case c.GetType() == cluster.Cluster_ORIGINAL_DST:
		// source/extensions/clusters/original_dst: lb_policy must be
		// CLUSTER_PROVIDED, and no load_assignment.
		if c.GetLbPolicy() != cluster.Cluster_CLUSTER_PROVIDED || c.GetLoadAssignment() != nil {
			return nil, fmt.Errorf("%s: ORIGINAL_DST needs lb_policy CLUSTER_PROVIDED and no load_assignment", path)
		}
		cc.Kind = "ORIGINAL_DST"
	case c.GetType() == cluster.Cluster_STATIC:
		if c.GetLbPolicy() != cluster.Cluster_ROUND_ROBIN {
			return nil, fmt.Errorf("%s: lb_policy %s not implemented for STATIC", path, c.GetLbPolicy())
		}
		if len(c.GetLoadAssignment().GetEndpoints()) > 0 {
			return nil, fmt.Errorf("%s.load_assignment.endpoints: not implemented (sluice's static cluster has none)", path)
		}
		cc.Kind = "STATIC"
	default:
		return nil, fmt.Errorf("%s: cluster type %s not implemented", path, c.GetType())
	}
	return cc, nil
}

func compileDNSCache(path string, d *dfpcommon.DnsCacheConfig) (*DNSCache, error) {
	if d == nil {
		return nil, fmt.Errorf("%s: missing", path)
	}
	c := &DNSCache{
		Name:         d.GetName(),
		HostTTL:      duration(d.GetHostTtl(), d.GetHostTtl() == nil),
		MinRefresh:   duration(d.GetDnsMinRefreshRate(), d.GetDnsMinRefreshRate() == nil),
		FailureBase:  duration(d.GetDnsFailureRefreshRate().GetBaseInterval(), d.GetDnsFailureRefreshRate().GetBaseInterval() == nil),
		FailureMax:   duration(d.GetDnsFailureRefreshRate().GetMaxInterval(), d.GetDnsFailureRefreshRate().GetMaxInterval() == nil),
		QueryTimeout: duration(d.GetDnsQueryTimeout(), d.GetDnsQueryTimeout() == nil),
		MaxHosts:     int(d.GetMaxHosts().GetValue()),
	}
	// Envoy's defaults (dns_cache.proto): host_ttl 5 min, min refresh 5 s,
	// query timeout 5 s, max_hosts 1024.
	if c.HostTTL == 0 {
		c.HostTTL = 5 * time.Minute
	}
	if c.MinRefresh == 0 {
		c.MinRefresh = 5 * time.Second
	}
	if c.QueryTimeout == 0 {
		c.QueryTimeout = 5 * time.Second
	}
	if d.GetMaxHosts() == nil {
		c.MaxHosts = 1024
	}
	switch d.GetDnsLookupFamily() {
	case cluster.Cluster_V4_PREFERRED:
		c.V4Preferred = true
	default:
		return nil, fmt.Errorf("%s.dns_lookup_family: %s not implemented", path, d.GetDnsLookupFamily())
	}
	rc := d.GetTypedDnsResolverConfig()
	if rc.GetName() != "envoy.network.dns_resolver.cares" {
		return nil, fmt.Errorf("%s.typed_dns_resolver_config: %q not implemented (c-ares only)", path, rc.GetName())
	}
	var ca cares.CaresDnsResolverConfig
	if err := unpack(path+".typed_dns_resolver_config.typed_config", rc.GetTypedConfig(), &ca); err != nil {
		return nil, err
	}
	if len(ca.GetResolvers()) == 0 {
		// Without resolvers c-ares takes the nameservers of the proxy's
		// own resolv.conf, read here when the configuration is compiled
		// (c-ares reads it when its channel starts). A file that lists none
		// leaves no resolver: every lookup fails.
		rs, err := readSystemResolvers()
		if err != nil {
			return nil, fmt.Errorf("%s: no resolvers, and the system's: %w", path, err)
		}
		c.Resolvers, c.SystemResolvers = rs, true
	}
	for i, r := range ca.GetResolvers() {
		ap, err := socketAddr(fmt.Sprintf("%s.resolvers[%d]", path, i), r, true)
		if err != nil {
			return nil, err
		}
		c.Resolvers = append(c.Resolvers, ap)
	}
	for i, r := range d.GetResolvedAddressFilter().GetRanges() {
		a, err := netip.ParseAddr(r.GetAddressPrefix())
		if err != nil {
			return nil, fmt.Errorf("%s.resolved_address_filter.ranges[%d]: %w", path, i, err)
		}
		p, err := a.Prefix(int(r.GetPrefixLen().GetValue()))
		if err != nil {
			return nil, fmt.Errorf("%s.resolved_address_filter.ranges[%d]: %w", path, i, err)
		}
		c.Filter = append(c.Filter, p)
	}
	b, _ := proto.MarshalOptions{Deterministic: true}.Marshal(d)
	c.wholeConfig = string(b)
	return c, nil
}

func compileListener(l *listener.Listener, clusters map[string]*Cluster) (*Listener, error) {
	path := "listener[" + l.GetName() + "]"
	cl := &Listener{Name: l.GetName(), Chains: map[string]*Chain{}, ContinueOnTimeout: l.GetContinueOnListenerFiltersTimeout()}
	// Envoy's default listener_filters_timeout is 15 s.
	cl.FiltersTimeout = 15 * time.Second
	if l.GetListenerFiltersTimeout() != nil {
		cl.FiltersTimeout = l.GetListenerFiltersTimeout().AsDuration()
	}
	a, err := socketAddr(path+".address", l.GetAddress(), false)
	if err != nil {
		return nil, err
	}
	cl.Addrs = append(cl.Addrs, a)
	for i, aa := range l.GetAdditionalAddresses() {
		a, err := socketAddr(fmt.Sprintf("%s.additional_addresses[%d]", path, i), aa.GetAddress(), false)
		if err != nil {
			return nil, err
		}
		cl.Addrs = append(cl.Addrs, a)
	}
	for i, f := range l.GetListenerFilters() {
		fp := fmt.Sprintf("%s.listener_filters[%d]", path, i)
		switch {
		case f.GetTypedConfig().MessageIs(&originaldst.OriginalDst{}):
			if i != 0 {
				return nil, fmt.Errorf("%s: original_dst must be the first listener filter", fp)
			}
			cl.OriginalDst = true
		case f.GetTypedConfig().MessageIs(&tlsinspector.TlsInspector{}):
			cl.TLSInspector = true
		case f.GetTypedConfig().MessageIs(&httpinspector.HttpInspector{}):
			if !cl.TLSInspector {
				return nil, fmt.Errorf("%s: http_inspector before tls_inspector is not implemented", fp)
			}
			cl.HTTPInspector = true
		default:
			return nil, fmt.Errorf("%s: %q not implemented", fp, f.GetName())
		}
	}
	for i, fc := range l.GetFilterChains() {
		c, err := compileChain(fmt.Sprintf("%s.filter_chains[%d]", path, i), fc, clusters)
		if err != nil {
			return nil, err
		}
		if c.Name == "" || cl.Chains[c.Name] != nil {
			return nil, fmt.Errorf("%s.filter_chains[%d]: chain names must be unique and set (the matcher names them)", path, i)
		}
		cl.Chains[c.Name] = c
	}
	if l.GetDefaultFilterChain() != nil {
		if cl.Default, err = compileChain(path+".default_filter_chain", l.GetDefaultFilterChain(), clusters); err != nil {
			return nil, err
		}
	}
	if cl.AccessLogs, err = compileAccessLogs(path+".access_log", l.GetAccessLog()); err != nil {
		return nil, err
	}
	if l.GetFilterChainMatcher() == nil {
		return nil, fmt.Errorf("%s: no filter_chain_matcher: filter_chain_match is not implemented", path)
	}
	if cl.Matcher, err = compileMatcher(path+".filter_chain_matcher", l.GetFilterChainMatcher(), cl.Chains); err != nil {
		return nil, err
	}
	return cl, nil
}

func compileChain(path string, fc *listener.FilterChain, clusters map[string]*Cluster) (*Chain, error) {
	c := &Chain{Name: fc.GetName()}
	n := len(fc.GetFilters())
	for i, f := range fc.GetFilters() {
		fp := fmt.Sprintf("%s.filters[%d]", path, i)
		tc := f.GetTypedConfig()
		terminal := false
		switch {
		case tc.MessageIs(&setfilterstate.Config{}):
			var sc setfilterstate.Config
			if err := unpack(fp, tc, &sc); err != nil {
				return nil, err
			}
			v := &SetFilterState{Values: map[string]string{}}
			for j, fs := range sc.GetOnNewConnection() {
				format := fs.GetFormatString().GetTextFormatSource().GetInlineString()
				if fs.GetFormatString().GetTextFormatSource() == nil {
					return nil, fmt.Errorf("%s.on_new_connection[%d]: only an inline text format is implemented", fp, j)
				}
				if _, err := parseFormat(format); err != nil {
					return nil, fmt.Errorf("%s.on_new_connection[%d]: %w", fp, j, err)
				}
				switch fs.GetObjectKey() {
				case "envoy.upstream.dynamic_port":
				default:
					return nil, fmt.Errorf("%s.on_new_connection[%d]: object key %q not implemented", fp, j, fs.GetObjectKey())
				}
				v.Values[fs.GetObjectKey()] = format
			}
			c.Filters = append(c.Filters, v)
		case tc.MessageIs(&connlimit.ConnectionLimit{}):
			var cl connlimit.ConnectionLimit
			if err := unpack(fp, tc, &cl); err != nil {
				return nil, err
			}
			if cl.GetMaxConnections().GetValue() == 0 {
				return nil, fmt.Errorf("%s: max_connections must be at least 1", fp)
			}
			c.Filters = append(c.Filters, &ConnectionLimit{Max: cl.GetMaxConnections().GetValue()})
		case tc.MessageIs(&snidfp.FilterConfig{}):
			var sc snidfp.FilterConfig
			if err := unpack(fp, tc, &sc); err != nil {
				return nil, err
			}
			cache, err := compileDNSCache(fp+".dns_cache_config", sc.GetDnsCacheConfig())
			if err != nil {
				return nil, err
			}
			c.Filters = append(c.Filters, &SNIForwardProxy{Cache: cache, Port: sc.GetPortValue()})
		case tc.MessageIs(&tcpproxy.TcpProxy{}):
			var tp tcpproxy.TcpProxy
			if err := unpack(fp, tc, &tp); err != nil {
				return nil, err
			}
			// A cluster that does not exist (yet) is no config error: Envoy
			// looks it up per connection (no cluster: flag NC).
			logs, err := compileAccessLogs(fp+".access_log", tp.GetAccessLog())
			if err != nil {
				return nil, err
			}
			idle := time.Hour
			if tp.GetIdleTimeout() != nil {
				idle = tp.GetIdleTimeout().AsDuration()
			}
			opts := tp.GetAccessLogOptions()
			c.Filters = append(c.Filters, &TCPProxy{Cluster: tp.GetCluster(), StatPrefix: tp.GetStatPrefix(), AccessLogs: logs, IdleTimeout: idle,
				FlushOnConnected: opts.GetFlushAccessLogOnConnected(), FlushInterval: duration(opts.GetAccessLogFlushInterval(), opts.GetAccessLogFlushInterval() == nil)})
			terminal = true
		case tc.MessageIs(&hcm.HttpConnectionManager{}):
			m, err := compileHCM(fp, tc, clusters)
			if err != nil {
				return nil, err
			}
			c.Filters = append(c.Filters, m)
			terminal = true
		default:
			return nil, fmt.Errorf("%s: network filter %q not implemented", fp, f.GetName())
		}
		if terminal != (i == n-1) {
			return nil, fmt.Errorf("%s: tcp_proxy and http_connection_manager are terminal filters and must come last", fp)
		}
	}
	if n == 0 {
		return nil, fmt.Errorf("%s: no filters", path)
	}
	// A DNS cache is one per name: every filter and cluster using a name
	// must configure it identically (Envoy rejects the config otherwise).
	return c, nil
}

func compileHCM(fp string, tc *anypb.Any, clusters map[string]*Cluster) (*HTTPConnectionManager, error) {
	var h hcm.HttpConnectionManager
	if err := unpack(fp, tc, &h); err != nil {
		return nil, err
	}
	if h.GetCodecType() != hcm.HttpConnectionManager_AUTO {
		return nil, fmt.Errorf("%s.codec_type: %s not implemented", fp, h.GetCodecType())
	}
	if h.GetGenerateRequestId() == nil || h.GetGenerateRequestId().GetValue() {
		return nil, fmt.Errorf("%s.generate_request_id: request ids are not implemented; set it false", fp)
	}
	m := &HTTPConnectionManager{StatPrefix: h.GetStatPrefix(), StripAnyHostPort: h.GetStripAnyHostPort(), StripTrailingDot: h.GetStripTrailingHostDot(),
		AcceptHTTP10: h.GetHttpProtocolOptions().GetAcceptHttp_10(), DefaultHost10: h.GetHttpProtocolOptions().GetDefaultHostForHttp_10()}
	m.StreamIdle = 5 * time.Minute
	if h.GetStreamIdleTimeout() != nil {
		m.StreamIdle = h.GetStreamIdleTimeout().AsDuration()
	}
	switch h.GetServerHeaderTransformation() {
	case hcm.HttpConnectionManager_OVERWRITE:
	case hcm.HttpConnectionManager_PASS_THROUGH:
		m.PassServer = true
	default:
		return nil, fmt.Errorf("%s.server_header_transformation: %s not implemented", fp, h.GetServerHeaderTransformation())
	}
	for i, u := range h.GetUpgradeConfigs() {
		if u.GetUpgradeType() != "websocket" {
			return nil, fmt.Errorf("%s.upgrade_configs[%d]: %q not implemented", fp, i, u.GetUpgradeType())
		}
		m.Upgrades = append(m.Upgrades, "websocket")
	}
	rc := h.GetRouteConfig()
	if rc == nil {
		return nil, fmt.Errorf("%s: only an inline route_config is implemented", fp)
	}
	m.Routes = &RouteConfig{Name: rc.GetName()}
	for i, vh := range rc.GetVirtualHosts() {
		vp := fmt.Sprintf("%s.route_config.virtual_hosts[%d]", fp, i)
		v := &VirtualHost{Name: vh.GetName(), Domains: vh.GetDomains()}
		for j, r := range vh.GetRoutes() {
			rp := fmt.Sprintf("%s.routes[%d]", vp, j)
			cr := &Route{Name: r.GetName()}
			switch {
			case r.GetMatch().GetConnectMatcher() != nil:
				cr.Connect = true
			case r.GetMatch().GetPathSpecifier() != nil:
				p, ok := r.GetMatch().GetPathSpecifier().(*route.RouteMatch_Prefix)
				if !ok {
					return nil, fmt.Errorf("%s.match: only prefix and connect_matcher are implemented", rp)
				}
				cr.Prefix = p.Prefix
			default:
				return nil, fmt.Errorf("%s.match: no path specifier", rp)
			}
			switch {
			case r.GetDirectResponse() != nil:
				cr.Status = int(r.GetDirectResponse().GetStatus())
				cr.Body = r.GetDirectResponse().GetBody().GetInlineString()
			case r.GetRoute() != nil:
				cr.Cluster = r.GetRoute().GetCluster()
				if t := r.GetRoute().GetTimeout(); t != nil {
					cr.HasTimeout, cr.Timeout = true, t.AsDuration()
				}
			default:
				return nil, fmt.Errorf("%s: only route and direct_response actions are implemented", rp)
			}
			v.Routes = append(v.Routes, cr)
		}
		m.Routes.VHosts = append(m.Routes.VHosts, v)
	}
	filters := h.GetHttpFilters()
	if len(filters) == 0 || !filters[len(filters)-1].GetTypedConfig().MessageIs(&router.Router{}) {
		return nil, fmt.Errorf("%s.http_filters: the router must be the last HTTP filter", fp)
	}
	for i, f := range filters[:len(filters)-1] {
		hp := fmt.Sprintf("%s.http_filters[%d]", fp, i)
		var dc httpdfp.FilterConfig
		if !f.GetTypedConfig().MessageIs(&dc) {
			return nil, fmt.Errorf("%s: HTTP filter %q not implemented", hp, f.GetName())
		}
		if err := unpack(hp, f.GetTypedConfig(), &dc); err != nil {
			return nil, err
		}
		cache, err := compileDNSCache(hp+".dns_cache_config", dc.GetDnsCacheConfig())
		if err != nil {
			return nil, err
		}
		m.ForwardProxy = &HTTPForwardProxy{Cache: cache, FromFilterState: dc.GetAllowDynamicHostFromFilterState()}
	}
	var r router.Router
	if err := unpack(fp+".http_filters[router]", filters[len(filters)-1].GetTypedConfig(), &r); err != nil {
		return nil, err
	}
	if !r.GetSuppressEnvoyHeaders() {
		return nil, fmt.Errorf("%s: the router's x-envoy-* headers are not implemented; set suppress_envoy_headers", fp)
	}
	logs, err := compileAccessLogs(fp+".access_log", h.GetAccessLog())
	if err != nil {
		return nil, err
	}
	m.AccessLogs = logs
	return m, nil
}

func compileAccessLogs(path string, logs []*accesslog.AccessLog) ([]*AccessLog, error) {
	var out []*AccessLog
	for i, l := range logs {
		lp := fmt.Sprintf("%s[%d]", path, i)
		var so stream.StdoutAccessLog
		if !l.GetTypedConfig().MessageIs(&so) {
			return nil, fmt.Errorf("%s: access logger %q not implemented (stdout only)", lp, l.GetName())
		}
		if err := unpack(lp, l.GetTypedConfig(), &so); err != nil {
			return nil, err
		}
		js := so.GetLogFormat().GetJsonFormat()
		if js == nil {
			return nil, fmt.Errorf("%s.log_format: only json_format is implemented", lp)
		}
		al := &AccessLog{Fields: map[string]string{}, Sorted: so.GetLogFormat().GetJsonFormatOptions().GetSortProperties()}
		for k, v := range js.GetFields() {
			if _, isStr := v.GetKind().(*structpb.Value_StringValue); !isStr {
				return nil, fmt.Errorf("%s.log_format.json_format.%s: only string values are implemented", lp, k)
			}
			sv := v.GetStringValue()
			if _, err := parseFormat(sv); err != nil {
				return nil, fmt.Errorf("%s.log_format.json_format.%s: %w", lp, k, err)
			}
			al.Fields[k] = sv
		}
		out = append(out, al)
	}
	return out, nil
}

// sortedKeys returns m's keys in order.
func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}
