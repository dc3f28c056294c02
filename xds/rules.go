package xds

import (
	"fmt"
	"net/netip"
	"sync"

	xdscore "github.com/cncf/xds/go/xds/core/v3"
	matcher "github.com/cncf/xds/go/xds/type/matcher/v3"
	accesslog "github.com/envoyproxy/go-control-plane/envoy/config/accesslog/v3"
	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	route "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	filelog "github.com/envoyproxy/go-control-plane/envoy/extensions/access_loggers/file/v3"
	stream "github.com/envoyproxy/go-control-plane/envoy/extensions/access_loggers/stream/v3"
	dfphttp "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/dynamic_forward_proxy/v3"
	router "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	httpinspector "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/listener/http_inspector/v3"
	originaldst "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/listener/original_dst/v3"
	proxyprotocol "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/listener/proxy_protocol/v3"
	tlsinspector "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/listener/tls_inspector/v3"
	connlimit "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/connection_limit/v3"
	directresponse "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/direct_response/v3"
	hcm "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	netrbac "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/rbac/v3"
	netsetstate "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/set_filter_state/v3"
	snidfp "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/sni_dynamic_forward_proxy/v3"
	tcpproxy "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	network "github.com/envoyproxy/go-control-plane/envoy/extensions/matching/common_inputs/network/v3"
	ipmatcher "github.com/envoyproxy/go-control-plane/envoy/extensions/matching/input_matchers/ip/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// extension is what the validator knows of one Envoy extension: its
// canonical name and, for network and HTTP filters, whether it is terminal
// (must be last in its chain, and the last must be one).
type extension struct {
	name     string
	terminal bool
}

func typeURL(m proto.Message) string {
	d := m.ProtoReflect().Descriptor()
	if u, ok := typeURLs.Load(d); ok {
		return u.(string)
	}
	u := "type.googleapis.com/" + string(d.FullName())
	typeURLs.Store(d, u)
	return u
}

// typeURLs memoizes typeURL by message descriptor: a build asks for one per
// packed message, and the handful of types it packs are always the same.
var typeURLs sync.Map

// The extensions per category that sluice generates or that a hand-made
// configuration beside it plausibly uses. A type URL outside its category
// is an error, as Envoy finds no factory for it there.
var (
	listenerFilters = map[string]extension{
		typeURL(&originaldst.OriginalDst{}):     {name: originalDstFilterName},
		typeURL(&tlsinspector.TlsInspector{}):   {name: tlsInspectorFilterName},
		typeURL(&httpinspector.HttpInspector{}): {name: httpInspectorFilterName},
		typeURL(&proxyprotocol.ProxyProtocol{}): {name: "envoy.filters.listener.proxy_protocol"},
	}
	networkFilters = map[string]extension{
		typeURL(&tcpproxy.TcpProxy{}):         {name: tcpProxyFilterName, terminal: true},
		typeURL(&hcm.HttpConnectionManager{}): {name: hcmFilterName, terminal: true},
		typeURL(&directresponse.Config{}):     {name: "envoy.filters.network.direct_response", terminal: true},
		typeURL(&netrbac.RBAC{}):              {name: "envoy.filters.network.rbac"},
		typeURL(&netsetstate.Config{}):        {name: setFilterStateName},
		typeURL(&snidfp.FilterConfig{}):       {name: sniDFPFilterName},
		typeURL(&connlimit.ConnectionLimit{}): {name: connectionLimitFilterName},
	}
	httpFilters = map[string]extension{
		typeURL(&router.Router{}):        {name: routerFilterName, terminal: true},
		typeURL(&dfphttp.FilterConfig{}): {name: httpDFPFilterName},
	}
	accessLoggers = map[string]extension{
		typeURL(&stream.StdoutAccessLog{}): {name: stdoutLoggerName},
		typeURL(&stream.StderrAccessLog{}): {name: "envoy.access_loggers.stderr"},
		typeURL(&filelog.FileAccessLog{}):  {name: "envoy.access_loggers.file"},
	}
	networkInputs = map[string]bool{
		typeURL(&network.SourceIPInput{}):            true,
		typeURL(&network.DestinationIPInput{}):       true,
		typeURL(&network.DestinationPortInput{}):     true,
		typeURL(&network.SourcePortInput{}):          true,
		typeURL(&network.DirectSourceIPInput{}):      true,
		typeURL(&network.SourceTypeInput{}):          true,
		typeURL(&network.ServerNameInput{}):          true,
		typeURL(&network.TransportProtocolInput{}):   true,
		typeURL(&network.ApplicationProtocolInput{}): true,
	}
)

// checkExtension: the typed_config's type is one of the category's, and the
// name is that type's canonical name.
func checkExtension(path, category string, known map[string]extension, name string, a *anypb.Any) (extension, error) {
	if a == nil {
		return extension{}, fmt.Errorf("%s: %s %q has no typed_config", path, category, name)
	}
	ext, ok := known[a.GetTypeUrl()]
	if !ok {
		return extension{}, fmt.Errorf("%s: %s %q: type %s is not a %s", path, category, name, a.GetTypeUrl(), category)
	}
	if name != ext.name {
		return ext, fmt.Errorf("%s: %s named %q but its type %s is %q", path, category, name, a.GetTypeUrl(), ext.name)
	}
	return ext, nil
}

// checkCluster: Envoy's rules for the cluster types sluice uses.
func checkCluster(path string, c *cluster.Cluster, o walkOpts) []error {
	var errs []error
	if c.GetType() == cluster.Cluster_ORIGINAL_DST && c.GetClusterType() == nil {
		if c.GetLbPolicy() != cluster.Cluster_CLUSTER_PROVIDED {
			errs = append(errs, fmt.Errorf("%s: an ORIGINAL_DST cluster needs lb_policy CLUSTER_PROVIDED, not %s", path, c.GetLbPolicy()))
		}
		if c.GetLoadAssignment() != nil {
			errs = append(errs, fmt.Errorf("%s: an ORIGINAL_DST cluster must not have a load_assignment", path))
		}
	} else if c.GetLbPolicy() == cluster.Cluster_CLUSTER_PROVIDED && c.GetClusterType() == nil {
		errs = append(errs, fmt.Errorf("%s: lb_policy CLUSTER_PROVIDED is only valid for ORIGINAL_DST clusters, not %s", path, c.GetType()))
	}
	if ct := c.GetClusterType(); ct != nil {
		errs = append(errs, checkCustomCluster(path, c, ct, o)...)
	}
	if c.GetType() == cluster.Cluster_STATIC && c.GetLoadAssignment() != nil {
		for _, lle := range c.GetLoadAssignment().GetEndpoints() {
			for _, e := range lle.GetLbEndpoints() {
				sa := e.GetEndpoint().GetAddress().GetSocketAddress()
				if sa != nil {
					if _, err := netip.ParseAddr(sa.GetAddress()); err != nil {
						errs = append(errs, fmt.Errorf("%s: STATIC cluster endpoint %q is not an IP address", path, sa.GetAddress()))
					}
				}
			}
		}
	}
	return errs
}

// checkListener: addresses, listener filters, filter-chain selection and
// every chain's filters.
func checkListener(path string, l *listener.Listener, clusters map[string]bool, o walkOpts) []error {
	var errs []error
	if l.GetAddress() == nil {
		errs = append(errs, fmt.Errorf("%s: no address", path))
	}
	addrs := []*core.Address{l.GetAddress()}
	for _, a := range l.GetAdditionalAddresses() {
		addrs = append(addrs, a.GetAddress())
	}
	for _, a := range addrs {
		if sa := a.GetSocketAddress(); sa != nil {
			if _, err := netip.ParseAddr(sa.GetAddress()); err != nil {
				errs = append(errs, fmt.Errorf("%s: listener address %q is not an IP address", path, sa.GetAddress()))
			}
		}
	}
	for i, f := range l.GetListenerFilters() {
		if _, err := checkExtension(fmt.Sprintf("%s.listener_filters[%d]", path, i), "listener filter", listenerFilters, f.GetName(), f.GetTypedConfig()); err != nil {
			errs = append(errs, err)
		}
	}
	chains := append([]*listener.FilterChain(nil), l.GetFilterChains()...)
	if l.GetDefaultFilterChain() != nil {
		chains = append(chains, l.GetDefaultFilterChain())
	}
	if l.GetFilterChainMatcher() != nil {
		errs = append(errs, checkMatchedChains(path, l, chains, o)...)
	} else {
		for i, a := range l.GetFilterChains() {
			for _, b := range l.GetFilterChains()[:i] {
				if proto.Equal(a.GetFilterChainMatch(), b.GetFilterChainMatch()) {
					errs = append(errs, fmt.Errorf("%s: filter chains %q and %q have the same filter_chain_match", path, b.GetName(), a.GetName()))
				}
			}
		}
	}
	if c := l.GetDefaultFilterChain(); c != nil {
		errs = append(errs, checkChain(fmt.Sprintf("%s: filter chain %q", path, c.GetName()), c, clusters, o)...)
	}
	// Each of filter_chains is checked by checkChain on its own
	// (Validator, which remembers the chains it has checked).
	return append(errs, checkAccessLogs(path, l.GetAccessLog(), o)...)
}

// checkMatchedChains: with filter_chain_matcher, every chain needs a
// unique name and no filter_chain_match, and every action must name a chain.
func checkMatchedChains(path string, l *listener.Listener, chains []*listener.FilterChain, o walkOpts) []error {
	var errs []error
	names := map[string]bool{}
	for _, c := range chains {
		switch {
		case c.GetName() == "":
			errs = append(errs, fmt.Errorf("%s: filter chains must be named when filter_chain_matcher is used", path))
		case names[c.GetName()]:
			errs = append(errs, fmt.Errorf("%s: duplicate filter chain name %q", path, c.GetName()))
		}
		names[c.GetName()] = true
		if c.GetFilterChainMatch() != nil {
			errs = append(errs, fmt.Errorf("%s: filter chain %q sets filter_chain_match, which filter_chain_matcher ignores", path, c.GetName()))
		}
	}
	if l.GetDefaultFilterChain() != nil {
		// The default chain is not a match target.
		delete(names, l.GetDefaultFilterChain().GetName())
	}
	return append(errs, checkMatcher(path+".filter_chain_matcher", l.GetFilterChainMatcher(), names, o)...)
}

// checkMatcher checks m's inputs, CIDRs and actions. A branch o skips (a
// workload's, unchanged since it was checked with the chains it names,
// which come with it) is not checked again.
func checkMatcher(path string, m *matcher.Matcher, chains map[string]bool, o walkOpts) []error {
	var errs []error
	onMatch := func(p string, om *matcher.Matcher_OnMatch) {
		switch {
		case om == nil:
		case o.skips(om):
		case om.GetMatcher() != nil:
			errs = append(errs, checkMatcher(p, om.GetMatcher(), chains, o)...)
		case om.GetAction() != nil:
			errs = append(errs, checkAction(p, om.GetAction(), chains, o)...)
		}
	}
	if list := m.GetMatcherList(); list != nil {
		for i, fm := range list.GetMatchers() {
			p := fmt.Sprintf("%s.matchers[%d]", path, i)
			errs = append(errs, checkPredicate(p, fm.GetPredicate(), o)...)
			onMatch(p, fm.GetOnMatch())
		}
	}
	if tree := m.GetMatcherTree(); tree != nil {
		errs = append(errs, checkInput(path, tree.GetInput())...)
		for k, om := range tree.GetExactMatchMap().GetMap() {
			onMatch(fmt.Sprintf("%s[%q]", path, k), om)
		}
		for k, om := range tree.GetPrefixMatchMap().GetMap() {
			onMatch(fmt.Sprintf("%s[%q]", path, k), om)
		}
		if cm := tree.GetCustomMatch(); cm != nil {
			msg, err := o.unpack(cm.GetTypedConfig())
			trie, ok := msg.(*matcher.IPMatcher)
			if err != nil || !ok {
				errs = append(errs, fmt.Errorf("%s: custom_match %s: only the IP trie matcher is known", path, cm.GetTypedConfig().GetTypeUrl()))
			}
			for i, rm := range trie.GetRangeMatchers() {
				p := fmt.Sprintf("%s.range_matchers[%d]", path, i)
				for _, r := range rm.GetRanges() {
					errs = append(errs, checkCidr(p, r.GetAddressPrefix(), r.GetPrefixLen())...)
				}
				onMatch(p, rm.GetOnMatch())
			}
		}
	}
	onMatch(path+".on_no_match", m.GetOnNoMatch())
	return errs
}

func checkPredicate(path string, p *matcher.Matcher_MatcherList_Predicate, o walkOpts) []error {
	var errs []error
	if sp := p.GetSinglePredicate(); sp != nil {
		errs = append(errs, checkInput(path, sp.GetInput())...)
		if cm := sp.GetCustomMatch(); cm != nil {
			ip, ok := unpackAs[*ipmatcher.Ip](o, cm.GetTypedConfig())
			if !ok {
				errs = append(errs, fmt.Errorf("%s: custom_match %s: only the IP input matcher is known", path, cm.GetTypedConfig().GetTypeUrl()))
			}
			for _, r := range ip.GetCidrRanges() {
				errs = append(errs, checkCidr(path, r.GetAddressPrefix(), r.GetPrefixLen())...)
			}
		}
	}
	for _, l := range []*matcher.Matcher_MatcherList_Predicate_PredicateList{p.GetAndMatcher(), p.GetOrMatcher()} {
		for i, q := range l.GetPredicate() {
			errs = append(errs, checkPredicate(fmt.Sprintf("%s[%d]", path, i), q, o)...)
		}
	}
	if n := p.GetNotMatcher(); n != nil {
		errs = append(errs, checkPredicate(path+".not", n, o)...)
	}
	return errs
}

func checkInput(path string, in *xdscore.TypedExtensionConfig) []error {
	if !networkInputs[in.GetTypedConfig().GetTypeUrl()] {
		return []error{fmt.Errorf("%s: input %s is not a network matching input", path, in.GetTypedConfig().GetTypeUrl())}
	}
	return nil
}

func checkAction(path string, a *xdscore.TypedExtensionConfig, chains map[string]bool, o walkOpts) []error {
	name, ok := unpackAs[*wrapperspb.StringValue](o, a.GetTypedConfig())
	if !ok {
		return []error{fmt.Errorf("%s: action %s: a filter chain matcher's action must be a google.protobuf.StringValue naming a chain", path, a.GetTypedConfig().GetTypeUrl())}
	}
	if !chains[name.GetValue()] {
		return []error{fmt.Errorf("%s: action names filter chain %q, which does not exist", path, name.GetValue())}
	}
	return nil
}

func checkCidr(path, addr string, bits *wrapperspb.UInt32Value) []error {
	a, err := netip.ParseAddr(addr)
	if err != nil {
		return []error{fmt.Errorf("%s: CIDR address %q is not an IP address", path, addr)}
	}
	if int(bits.GetValue()) > a.BitLen() {
		return []error{fmt.Errorf("%s: CIDR %s/%d: prefix longer than the address", path, addr, bits.GetValue())}
	}
	return nil
}

// checkChain: one terminal network filter, last; the clusters it names exist.
func checkChain(path string, c *listener.FilterChain, clusters map[string]bool, o walkOpts) []error {
	var errs []error
	fs := c.GetFilters()
	if len(fs) == 0 {
		return []error{fmt.Errorf("%s: no network filters", path)}
	}
	for i, f := range fs {
		fp := fmt.Sprintf("%s.filters[%d]", path, i)
		ext, err := checkExtension(fp, "network filter", networkFilters, f.GetName(), f.GetTypedConfig())
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if err := checkTerminal(fp, "network filter", f.GetName(), ext, i == len(fs)-1); err != nil {
			errs = append(errs, err)
		}
		inner, err := o.unpack(f.GetTypedConfig())
		if err != nil {
			continue // reported by validateResource
		}
		switch cfg := inner.(type) {
		case *tcpproxy.TcpProxy:
			errs = append(errs, checkClusterRef(fp, cfg.GetCluster(), clusters)...)
			for _, w := range cfg.GetWeightedClusters().GetClusters() {
				errs = append(errs, checkClusterRef(fp, w.GetName(), clusters)...)
			}
			errs = append(errs, checkAccessLogs(fp, cfg.GetAccessLog(), o)...)
		case *hcm.HttpConnectionManager:
			errs = append(errs, checkHCM(fp, cfg, clusters, o)...)
		}
	}
	return errs
}

// checkTerminal: Envoy wants exactly one terminal filter, last.
func checkTerminal(path, category, name string, ext extension, last bool) error {
	switch {
	case ext.terminal && !last:
		return fmt.Errorf("%s: terminal filter %q must be the last %s of its chain", path, name, category)
	case !ext.terminal && last:
		return fmt.Errorf("%s: the last %s %q is not a terminal filter", path, category, name)
	}
	return nil
}

func checkClusterRef(path, name string, clusters map[string]bool) []error {
	if name != "" && !clusters[name] {
		return []error{fmt.Errorf("%s: cluster %q does not exist", path, name)}
	}
	return nil
}

func checkAccessLogs(path string, logs []*accesslog.AccessLog, o walkOpts) []error {
	errs := checkLogFormats(path, logs, o)
	for i, l := range logs {
		if _, err := checkExtension(fmt.Sprintf("%s.access_log[%d]", path, i), "access logger", accessLoggers, l.GetName(), l.GetTypedConfig()); err != nil {
			errs = append(errs, err)
		}
	}
	return errs
}

// checkHCM: routes inline (sluice serves no RDS), the router last, unique
// virtual host names and domains, clusters that exist, direct responses
// Envoy accepts.
func checkHCM(path string, m *hcm.HttpConnectionManager, clusters map[string]bool, o walkOpts) []error {
	var errs []error
	if m.GetRds() != nil || m.GetScopedRoutes() != nil {
		errs = append(errs, fmt.Errorf("%s: routes must be inline: sluice serves no RDS", path))
	}
	hf := m.GetHttpFilters()
	if len(hf) == 0 {
		errs = append(errs, fmt.Errorf("%s: no HTTP filters (the router must be last)", path))
	}
	for i, f := range hf {
		fp := fmt.Sprintf("%s.http_filters[%d]", path, i)
		ext, err := checkExtension(fp, "HTTP filter", httpFilters, f.GetName(), f.GetTypedConfig())
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if err := checkTerminal(fp, "HTTP filter", f.GetName(), ext, i == len(hf)-1); err != nil {
			errs = append(errs, err)
		}
	}
	errs = append(errs, checkAccessLogs(path, m.GetAccessLog(), o)...)
	rc := m.GetRouteConfig()
	vhosts := map[string]bool{}
	domains := map[string]string{}
	for _, vh := range rc.GetVirtualHosts() {
		vp := fmt.Sprintf("%s: route config %q: virtual host %q", path, rc.GetName(), vh.GetName())
		if vhosts[vh.GetName()] {
			errs = append(errs, fmt.Errorf("%s: duplicate virtual host name", vp))
		}
		vhosts[vh.GetName()] = true
		for _, d := range vh.GetDomains() {
			if other, ok := domains[d]; ok {
				errs = append(errs, fmt.Errorf("%s: domain %q is also in virtual host %q; Envoy permits each domain once", vp, d, other))
			}
			domains[d] = vh.GetName()
		}
		for _, r := range vh.GetRoutes() {
			errs = append(errs, checkRoute(vp, r, clusters)...)
		}
	}
	return errs
}

func checkRoute(path string, r *route.Route, clusters map[string]bool) []error {
	var errs []error
	if ra := r.GetRoute(); ra != nil {
		errs = append(errs, checkClusterRef(path, ra.GetCluster(), clusters)...)
		for _, w := range ra.GetWeightedClusters().GetClusters() {
			errs = append(errs, checkClusterRef(path, w.GetName(), clusters)...)
		}
	}
	if dr := r.GetDirectResponse(); dr != nil {
		if n := len(dr.GetBody().GetInlineString()) + len(dr.GetBody().GetInlineBytes()); n > maxDirectResponseBody {
			errs = append(errs, fmt.Errorf("%s: direct response body is %d bytes; Envoy's limit is %d", path, n, maxDirectResponseBody))
		}
	}
	return errs
}
