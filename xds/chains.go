package xds

import (
	"fmt"
	connlimit "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/connection_limit/v3"
	"github.com/sluice-io/sluice/policy"
	"strings"
	"time"

	accesslog "github.com/envoyproxy/go-control-plane/envoy/config/accesslog/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	route "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	router "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	hcm "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	tcpproxy "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/structpb"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

const (
	tcpProxyFilterName = "envoy.filters.network.tcp_proxy"
	hcmFilterName      = "envoy.filters.network.http_connection_manager"
	routerFilterName   = "envoy.filters.http.router"
	stdoutLoggerName   = "envoy.access_loggers.stdout"

	// http10DefaultHost is the Host of an HTTP/1.0 request that sends
	// none: .invalid is reserved (RFC 6761), and no allow entry matches it.
	http10DefaultHost = "http10-no-host.sluice.invalid"

	connectionLimitFilterName = "envoy.filters.network.connection_limit"

	// bufferLimit is the per-connection buffer (listener and upstream):
	// Envoy's default of 1 MiB per connection lets a few thousand slow
	// readers of one pod hold gigabytes; 32 KiB is Envoy's edge advice.
	bufferLimit = 32 << 10

	// maxReasonBytes bounds the policy error quoted in logs and 403s.
	maxReasonBytes = 512
	// Envoy refuses direct_response bodies over 4 KiB by default
	// (max_direct_response_body_size_bytes).
	maxDirectResponseBody = 4096
)

// Verdicts in the access log.
const (
	verdictAllow = "allow"
	verdictDeny  = "deny"
)

// groupChains returns a group's filter chains; the matcher from
// groupOnMatch names exactly these.
func (b *builder) groupChains(g *group) []*listener.FilterChain {
	if g.policy.Mode == policy.Audit {
		return []*listener.FilterChain{b.tcpChain(chainName("audit", g), g, OriginalDstClusterName, verdictAllow, "audit mode")}
	}
	reason := "not in the allow list"
	if g.policyError != "" {
		reason = "policy error: " + oneLine(sanitize(g.policyError, maxReasonBytes))
	}
	chains := []*listener.FilterChain{b.denyChain(chainName("deny", g), g, reason)}
	cidrs, hosts := splitRules(g.policy.Allow)
	if len(cidrs) > 0 {
		chains = append(chains, b.tcpChain(chainName("tcp", g), g, OriginalDstClusterName, verdictAllow, "destination in the allow list"))
	}
	if len(hosts) > 0 {
		// Forwarded to where DNS says the SNI is, at the original port.
		chains = append(chains, b.tcpChain(chainName("tls", g), g, DynamicForwardProxyClusterName, verdictAllow, "SNI in the allow list",
			b.portFromOriginalDst(), b.sniForwardProxy()))
	}
	for _, port := range rulePorts(hosts) {
		if port != 0 {
			chains = append(chains, b.httpChain(g, port, hosts))
		}
	}
	return append(chains, b.httpChain(g, 0, hosts))
}

// denyChain closes the connection: tcp_proxy to a cluster with no
// endpoints fails at once ("UH", no healthy upstream) without a packet
// leaving the node, and its access log records the denial. g may be nil
// for chains that belong to no workload.
func (b *builder) denyChain(name string, g *group, reason string) *listener.FilterChain {
	return b.tcpChain(name, g, DenyClusterName, verdictDeny, reason)
}

// tcpChain ends in a tcp_proxy to cluster, after the filters before.
func (b *builder) tcpChain(name string, g *group, cluster, verdict, reason string, before ...*listener.Filter) *listener.FilterChain {
	prefix := statPrefix(verdict, name)
	if g != nil {
		prefix = statPrefix(verdict, g.key)
	}
	tp := &tcpproxy.TcpProxy{
		StatPrefix:       prefix,
		ClusterSpecifier: &tcpproxy.TcpProxy_Cluster{Cluster: cluster},
		AccessLog:        b.accessLog(g, verdict, reason, logTCP),
		AccessLogOptions: &tcpproxy.TcpProxy_TcpAccessLogOptions{
			FlushAccessLogOnConnected: true,
			AccessLogFlushInterval:    durationpb.New(AccessLogFlushInterval),
		},
		// Set deliberately: 0s is no idle timeout (Envoy's default is 1 h).
		IdleTimeout: durationpb.New(b.state.TCPIdleTimeout),
	}
	return &listener.FilterChain{
		Name: name,
		Filters: append(append(b.connectionLimit(g, name), before...), &listener.Filter{
			Name:       tcpProxyFilterName,
			ConfigType: &listener.Filter_TypedConfig{TypedConfig: b.any(tp)},
		}),
	}
}

// connectionLimit is the first filter of a workload's chain when a cap is
// set: one pod cannot hold all of the node's Envoy.
func (b *builder) connectionLimit(g *group, chain string) []*listener.Filter {
	if g == nil || b.state.MaxConnectionsPerChain == 0 {
		return nil
	}
	cl := &connlimit.ConnectionLimit{
		StatPrefix:     statPrefix("limit", chain),
		MaxConnections: wrapperspb.UInt64(b.state.MaxConnectionsPerChain),
	}
	return []*listener.Filter{{Name: connectionLimitFilterName, ConfigType: &listener.Filter_TypedConfig{TypedConfig: b.any(cl)}}}
}

// httpChain serves plaintext HTTP for one port of an enforce group (port 0:
// ports no hostname entry names). Requests whose Host (port stripped) is
// allowed go to where DNS says that host is, at the original destination's
// port (the dynamic forward proxy), never to the address the pod dialled;
// CONNECT and every other request get a 403 that names sluice and the pod.
func (b *builder) httpChain(g *group, port uint16, hosts []policy.Rule) *listener.FilterChain {
	name := httpChainName(g, port)
	var domains []string
	seen := map[string]bool{}
	for _, r := range hosts {
		if (r.Port == 0 || r.Port == port) && !seen[r.Host] {
			seen[r.Host] = true
			domains = append(domains, r.Host)
		}
	}
	deny := func(match *route.RouteMatch, body string) *route.Route {
		return &route.Route{
			Name:  verdictDeny,
			Match: match,
			Action: &route.Route_DirectResponse{DirectResponse: &route.DirectResponseAction{
				Status: 403,
				Body:   &core.DataSource{Specifier: &core.DataSource_InlineString{InlineString: body}},
			}},
		}
	}
	// CONNECT would open a tunnel to whatever its authority names: HTTP/1.1
	// CONNECT matches only a connect_matcher route, so each virtual host
	// starts with one that answers 403.
	connect := deny(&route.RouteMatch{PathSpecifier: &route.RouteMatch_ConnectMatcher_{ConnectMatcher: &route.RouteMatch_ConnectMatcher{}}},
		connectBody(g))
	var vhosts []*route.VirtualHost
	if len(domains) > 0 {
		vhosts = append(vhosts, &route.VirtualHost{
			Name:    "allow",
			Domains: domains,
			Routes: []*route.Route{connect, {
				Name:  verdictAllow,
				Match: &route.RouteMatch{PathSpecifier: &route.RouteMatch_Prefix{Prefix: "/"}},
				Action: &route.Route_Route{Route: &route.RouteAction{
					ClusterSpecifier: &route.RouteAction_Cluster{Cluster: DynamicForwardProxyClusterName},
					// No route timeout: long polls and streams are the
					// application's business, as they are without sluice.
					Timeout: durationpb.New(0),
				}},
			}},
		})
	}
	vhosts = append(vhosts, &route.VirtualHost{
		Name:    verdictDeny,
		Domains: []string{"*"},
		Routes:  []*route.Route{connect, deny(&route.RouteMatch{PathSpecifier: &route.RouteMatch_Prefix{Prefix: "/"}}, denyBody(g, port))},
	})
	m := &hcm.HttpConnectionManager{
		CodecType:  hcm.HttpConnectionManager_AUTO,
		StatPrefix: statPrefix("http", g.key),
		RouteSpecifier: &hcm.HttpConnectionManager_RouteConfig{RouteConfig: &route.RouteConfiguration{
			Name:         name,
			VirtualHosts: vhosts,
		}},
		HttpFilters: []*hcm.HttpFilter{{
			Name:       routerFilterName,
			ConfigType: &hcm.HttpFilter_TypedConfig{TypedConfig: b.sharedAny("router", func() proto.Message { return &router.Router{SuppressEnvoyHeaders: true} })},
		}},
		// Hosts are matched without their port: the port was checked by
		// the filter-chain matcher that chose this chain.
		StripPortMode: &hcm.HttpConnectionManager_StripAnyHostPort{StripAnyHostPort: true},
		// "Host: api.example.com." is the same name: matched, and sent
		// upstream, without the dot.
		StripTrailingHostDot: true,
		// HTTP/1.0 is still spoken (health checkers, old clients): without
		// this Envoy answers 426. A request without Host gets a host that
		// no entry can match, so it is denied with the 403 that says why.
		HttpProtocolOptions: &core.Http1ProtocolOptions{AcceptHttp_10: true, DefaultHostForHttp_10: http10DefaultHost},
		// Transparent: the upstream's Server header reaches the pod as it
		// would without the proxy (Envoy's default overwrites it).
		ServerHeaderTransformation: hcm.HttpConnectionManager_PASS_THROUGH,
		GenerateRequestId:          wrapperspb.Bool(false),
		// Set deliberately: 0s is none (Envoy's default is 5 min).
		StreamIdleTimeout: durationpb.New(b.state.HTTPStreamIdleTimeout),
		// h2c from a pod: bounded streams and windows (Envoy's defaults
		// allow 2^31 streams and 256 MiB windows per connection).
		Http2ProtocolOptions: &core.Http2ProtocolOptions{
			MaxConcurrentStreams:        wrapperspb.UInt32(100),
			InitialStreamWindowSize:     wrapperspb.UInt32(64 << 10),
			InitialConnectionWindowSize: wrapperspb.UInt32(1 << 20),
		},
		UpgradeConfigs: []*hcm.HttpConnectionManager_UpgradeConfig{{UpgradeType: "websocket"}},
		AccessLog:      b.accessLog(g, "%ROUTE_NAME%", "Host checked against the allow list", logHTTP),
	}
	hcmFilter := func() *listener.Filter {
		return &listener.Filter{Name: hcmFilterName, ConfigType: &listener.Filter_TypedConfig{TypedConfig: b.any(m)}}
	}
	limit := b.connectionLimit(g, name)
	if len(domains) == 0 {
		// Nothing to forward: the chain only answers 403, and needs no DNS
		// cache (every copy counts, per pod).
		return &listener.FilterChain{Name: name, Filters: append(limit, hcmFilter())}
	}
	m.HttpFilters = append([]*hcm.HttpFilter{{
		Name:       httpDFPFilterName,
		ConfigType: &hcm.HttpFilter_TypedConfig{TypedConfig: b.sharedAny("http_dfp", func() proto.Message { return b.httpForwardProxy() })},
	}}, m.HttpFilters...)
	return &listener.FilterChain{Name: name, Filters: append(limit, b.portFromOriginalDst(), hcmFilter())}
}

// statPrefix is one stats name element, without dots: Envoy's tag
// extraction takes the element after "tcp." or "http." as the
// envoy_tcp_prefix / envoy_http_conn_manager_prefix tag, so a dot would push
// the workload into the metric's name. kind (allow, deny, http) keeps
// allowed and denied traffic apart: envoy_tcp_downstream_cx_total{
// envoy_tcp_prefix="sluice_deny_shop_checkout"}. Kubernetes names have no
// '_', so "_" between namespace and name is unambiguous.
func statPrefix(kind, id string) string { return "sluice_" + kind + "_" + statName(id) }

func connectBody(g *group) string {
	return sanitize(fmt.Sprintf("sluice: request denied by the egress policy of %s (mode enforce): CONNECT is never forwarded\n", g.key), maxDirectResponseBody-4)
}

// oneLine joins the lines of a multi-error for a log field or a body.
func oneLine(s string) string { return strings.ReplaceAll(s, "\n", "; ") }

func denyBody(g *group, port uint16) string {
	what := "this host is not in its sluice.io/allow annotation"
	if port != 0 {
		what = fmt.Sprintf("this host is not allowed on port %d by its sluice.io/allow annotation", port)
	}
	if g.policyError != "" {
		what = "its egress policy does not parse, so everything is denied: " + oneLine(sanitize(g.policyError, maxReasonBytes))
	}
	body := fmt.Sprintf("sluice: request denied by the egress policy of %s (mode enforce): %s\n", g.key, what)
	return sanitize(body, maxDirectResponseBody-4)
}

// Access log kinds: which operators a line can fill.
const (
	logTCP      = "tcp"
	logHTTP     = "http"
	logListener = "listener"
)

// AccessLogFlushInterval: a long tcp_proxy connection is logged when it
// connects upstream, every interval while it lasts, and when it ends, so a
// connection open for hours is seen at once, not at its close.
const AccessLogFlushInterval = time.Minute

// accessLog is one JSON line per connection (per request on HTTP chains,
// and on tcp_proxy chains also one when the upstream connects and one per
// AccessLogFlushInterval; log_type tells them apart) on Envoy's stdout,
// carrying the workload's identity as constants so no lookup is needed to
// tell who connected where.
func (b *builder) accessLog(g *group, verdict, reason, kind string) []*accesslog.AccessLog {
	ns, pod := "", ""
	if g != nil {
		ns, pod = g.namespace, g.name
	}
	// A workload's chains of one kind and verdict share one (its two HTTP
	// chains do): built and packed once per build.
	key := logKey{ns, pod, verdict, reason, kind}
	if l, ok := b.logs[key]; ok {
		return l
	}
	if b.logs == nil {
		b.logs = map[logKey][]*accesslog.AccessLog{}
	}
	l := b.newAccessLog(ns, pod, verdict, reason, kind)
	b.logs[key] = l
	return l
}

// logKey is everything an access log is built from.
type logKey struct{ namespace, pod, verdict, reason, kind string }

func (b *builder) newAccessLog(ns, pod, verdict, reason, kind string) []*accesslog.AccessLog {
	// Constants are format strings too: a '%' in a name or a quoted
	// policy error would start a command operator (and an unknown one
	// makes Envoy refuse the whole listener), so it is written "%%".
	lit := func(s string) string { return strings.ReplaceAll(s, "%", "%%") }
	str := structpb.NewStringValue
	return []*accesslog.AccessLog{{
		Name: stdoutLoggerName,
		ConfigType: &accesslog.AccessLog_TypedConfig{TypedConfig: b.logTemplate(kind).pack(b, map[string]*structpb.Value{
			"namespace": str(lit(ns)),
			"pod":       str(lit(pod)),
			"verdict":   str(verdict),
			"reason":    str(lit(reason)),
		})},
	}}
}

// logFields are the fields of a kind of access log that are the same in
// every workload's: Envoy's command operators.
func logFields(kind string) map[string]*structpb.Value {
	str := structpb.NewStringValue
	fields := map[string]*structpb.Value{
		"time":                 str("%START_TIME%"),
		"log_type":             str("%ACCESS_LOG_TYPE%"),
		"connection_id":        str("%CONNECTION_ID%"),
		"source":               str("%DOWNSTREAM_REMOTE_ADDRESS%"),
		"original_destination": str("%DOWNSTREAM_LOCAL_ADDRESS%"),
		"sni":                  str("%REQUESTED_SERVER_NAME%"),
		"duration_ms":          str("%DURATION%"),
		"response_flags":       str("%RESPONSE_FLAGS%"),
		"termination":          str("%CONNECTION_TERMINATION_DETAILS%"),
	}
	if kind != logListener {
		fields["chain"] = str("%FILTER_CHAIN_NAME%")
		fields["upstream"] = str("%UPSTREAM_HOST%")
		fields["upstream_local"] = str("%UPSTREAM_LOCAL_ADDRESS%")
		fields["upstream_failure"] = str("%UPSTREAM_TRANSPORT_FAILURE_REASON%")
		fields["bytes_from_pod"] = str("%BYTES_RECEIVED%")
		fields["bytes_to_pod"] = str("%BYTES_SENT%")
	}
	if kind == logHTTP {
		fields["authority"] = str("%REQ(:AUTHORITY)%")
		fields["method"] = str("%REQ(:METHOD)%")
		fields["response_code"] = str("%RESPONSE_CODE%")
		fields["response_code_details"] = str("%RESPONSE_CODE_DETAILS%")
	}
	return fields
}
