package xds

import (
	"fmt"
	"strings"

	accesslog "github.com/envoyproxy/go-control-plane/envoy/config/accesslog/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	route "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	stream "github.com/envoyproxy/go-control-plane/envoy/extensions/access_loggers/stream/v3"
	router "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	hcm "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	tcpproxy "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/structpb"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

const (
	tcpProxyFilterName = "envoy.filters.network.tcp_proxy"
	hcmFilterName      = "envoy.filters.network.http_connection_manager"
	routerFilterName   = "envoy.filters.http.router"
	stdoutLoggerName   = "envoy.access_loggers.stdout"

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
	if g.policy.Mode == Audit {
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
	prefix := "sluice." + statName(name)
	if g != nil {
		prefix = "sluice." + statName(g.key)
	}
	tp := &tcpproxy.TcpProxy{
		StatPrefix:       prefix,
		ClusterSpecifier: &tcpproxy.TcpProxy_Cluster{Cluster: cluster},
		AccessLog:        b.accessLog(g, verdict, reason, false),
	}
	return &listener.FilterChain{
		Name: name,
		Filters: append(before, &listener.Filter{
			Name:       tcpProxyFilterName,
			ConfigType: &listener.Filter_TypedConfig{TypedConfig: b.any(tp)},
		}),
	}
}

// httpChain serves plaintext HTTP for one port of an enforce group (port 0:
// ports no hostname entry names). Requests whose Host (port stripped) is
// allowed go to where DNS says that host is, at the original destination's
// port (the dynamic forward proxy), never to the address the pod dialled;
// CONNECT and every other request get a 403 that names sluice and the pod.
func (b *builder) httpChain(g *group, port uint16, hosts []Rule) *listener.FilterChain {
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
		StatPrefix: "sluice." + statName(g.key),
		RouteSpecifier: &hcm.HttpConnectionManager_RouteConfig{RouteConfig: &route.RouteConfiguration{
			Name:         name,
			VirtualHosts: vhosts,
		}},
		HttpFilters: []*hcm.HttpFilter{{
			Name:       routerFilterName,
			ConfigType: &hcm.HttpFilter_TypedConfig{TypedConfig: b.any(&router.Router{SuppressEnvoyHeaders: true})},
		}},
		// Hosts are matched without their port: the port was checked by
		// the filter-chain matcher that chose this chain.
		StripPortMode:     &hcm.HttpConnectionManager_StripAnyHostPort{StripAnyHostPort: true},
		GenerateRequestId: wrapperspb.Bool(false),
		UpgradeConfigs:    []*hcm.HttpConnectionManager_UpgradeConfig{{UpgradeType: "websocket"}},
		AccessLog:         b.accessLog(g, "%ROUTE_NAME%", "Host checked against the allow list", true),
	}
	hcmFilter := func() *listener.Filter {
		return &listener.Filter{Name: hcmFilterName, ConfigType: &listener.Filter_TypedConfig{TypedConfig: b.any(m)}}
	}
	if len(domains) == 0 {
		// Nothing to forward: the chain only answers 403, and needs no DNS
		// cache (every copy counts, per pod).
		return &listener.FilterChain{Name: name, Filters: []*listener.Filter{hcmFilter()}}
	}
	m.HttpFilters = append([]*hcm.HttpFilter{{
		Name:       httpDFPFilterName,
		ConfigType: &hcm.HttpFilter_TypedConfig{TypedConfig: b.any(b.httpForwardProxy())},
	}}, m.HttpFilters...)
	return &listener.FilterChain{Name: name, Filters: []*listener.Filter{b.portFromOriginalDst(), hcmFilter()}}
}

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

// accessLog is one JSON line per connection (per request on HTTP chains)
// on Envoy's stdout, carrying the workload's identity as constants so no
// lookup is needed to tell who connected where.
func (b *builder) accessLog(g *group, verdict, reason string, http bool) []*accesslog.AccessLog {
	ns, pod := "", ""
	if g != nil {
		ns, pod = g.namespace, g.name
	}
	fields := map[string]any{
		"time":                 "%START_TIME%",
		"namespace":            ns,
		"pod":                  pod,
		"verdict":              verdict,
		"reason":               reason,
		"chain":                "%FILTER_CHAIN_NAME%",
		"source":               "%DOWNSTREAM_REMOTE_ADDRESS%",
		"original_destination": "%DOWNSTREAM_LOCAL_ADDRESS%",
		"upstream":             "%UPSTREAM_HOST%",
		"sni":                  "%REQUESTED_SERVER_NAME%",
		"bytes_from_pod":       "%BYTES_RECEIVED%",
		"bytes_to_pod":         "%BYTES_SENT%",
		"duration_ms":          "%DURATION%",
		"response_flags":       "%RESPONSE_FLAGS%",
	}
	if http {
		fields["authority"] = "%REQ(:AUTHORITY)%"
		fields["method"] = "%REQ(:METHOD)%"
		fields["response_code"] = "%RESPONSE_CODE%"
	}
	st, err := structpb.NewStruct(fields)
	if err != nil && b.err == nil {
		b.err = fmt.Errorf("access log format: %w", err)
	}
	logger := &stream.StdoutAccessLog{AccessLogFormat: &stream.StdoutAccessLog_LogFormat{LogFormat: &core.SubstitutionFormatString{
		Format:            &core.SubstitutionFormatString_JsonFormat{JsonFormat: st},
		JsonFormatOptions: &core.JsonFormatOptions{SortProperties: true},
	}}}
	return []*accesslog.AccessLog{{
		Name:       stdoutLoggerName,
		ConfigType: &accesslog.AccessLog_TypedConfig{TypedConfig: b.any(logger)},
	}}
}
