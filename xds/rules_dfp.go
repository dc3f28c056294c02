package xds

import (
	"fmt"

	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	dfpcluster "github.com/envoyproxy/go-control-plane/envoy/extensions/clusters/dynamic_forward_proxy/v3"
	dnscache "github.com/envoyproxy/go-control-plane/envoy/extensions/common/dynamic_forward_proxy/v3"
	cares "github.com/envoyproxy/go-control-plane/envoy/extensions/network/dns_resolver/cares/v3"
	upstreamhttp "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
	"google.golang.org/protobuf/proto"
)

// checkCustomCluster: the only custom cluster type sluice knows is the
// dynamic forward proxy, with Envoy's load-time rules for it
// (source/extensions/clusters/dynamic_forward_proxy/cluster.cc) and
// sluice's: its DNS cache must drop node-local answers.
func checkCustomCluster(path string, c *cluster.Cluster, ct *cluster.Cluster_CustomClusterType, o walkOpts) []error {
	cfg, ok := unpackAs[*dfpcluster.ClusterConfig](o, ct.GetTypedConfig())
	if ct.GetName() != dfpClusterType || !ok {
		return []error{fmt.Errorf("%s: cluster_type %q (%s): only the dynamic forward proxy cluster is known", path, ct.GetName(), ct.GetTypedConfig().GetTypeUrl())}
	}
	var errs []error
	if c.GetLbPolicy() != cluster.Cluster_CLUSTER_PROVIDED {
		errs = append(errs, fmt.Errorf("%s: a dynamic forward proxy cluster needs lb_policy CLUSTER_PROVIDED, not %s", path, c.GetLbPolicy()))
	}
	if cfg.GetDnsCacheConfig() == nil {
		errs = append(errs, fmt.Errorf("%s: the dynamic forward proxy cluster has no dns_cache_config (sub_clusters_config is not used by sluice)", path))
	}
	if a, ok := c.GetTypedExtensionProtocolOptions()[httpProtocolOptionsKey]; ok && !cfg.GetAllowInsecureClusterOptions() {
		if opts, ok := unpackAs[*upstreamhttp.HttpProtocolOptions](o, a); !ok {
			errs = append(errs, fmt.Errorf("%s: %s: not a %s", path, httpProtocolOptionsKey, typeURL(&upstreamhttp.HttpProtocolOptions{})))
		} else if o := opts.GetUpstreamHttpProtocolOptions(); !o.GetAutoSni() || !o.GetAutoSanValidation() {
			errs = append(errs, fmt.Errorf("%s: Envoy refuses a dynamic forward proxy cluster whose HTTP protocol options lack auto_sni and auto_san_validation (or allow_insecure_cluster_options)", path))
		}
	}
	return errs
}

// dnsCacheAt is a DNS cache configuration found in a resource, with the
// path below the resource it was found at (validateResource).
type dnsCacheAt struct {
	path string
	dc   *dnscache.DnsCacheConfig
}

// checkDNSCacheSet: every DNS cache of one name is configured identically
// wherever it appears (Envoy: "config specified DNS cache ... with different
// settings"). Each, by checkDNSCache, resolves with c-ares through explicit
// resolvers and filters node-local answers out.
func checkDNSCacheSet(caches []dnsCacheAt) []error {
	var errs []error
	byName := map[string]dnsCacheAt{}
	// Chains share their build's configuration: compare each distinct
	// one once (proto.Equal on every chain's was a tenth of an update).
	equal := map[*dnscache.DnsCacheConfig]bool{}
	for _, c := range caches {
		first, ok := byName[c.dc.GetName()]
		switch {
		case !ok:
			byName[c.dc.GetName()] = c
		case c.dc == first.dc || equal[c.dc]:
		case proto.Equal(first.dc, c.dc):
			equal[c.dc] = true
		default:
			errs = append(errs, fmt.Errorf("%s: DNS cache %q differs from its configuration at %s; Envoy requires them identical", c.path, c.dc.GetName(), first.path))
		}
	}
	return errs
}

func checkDNSCache(path string, dc *dnscache.DnsCacheConfig, o walkOpts) []error {
	var errs []error
	switch rc := dc.GetTypedDnsResolverConfig(); {
	case rc == nil:
		errs = append(errs, fmt.Errorf("%s: DNS cache %q has no typed_dns_resolver_config: it would resolve through the node's resolv.conf", path, dc.GetName()))
	case rc.GetName() != caresResolverName || !isA[*cares.CaresDnsResolverConfig](o, rc.GetTypedConfig()):
		errs = append(errs, fmt.Errorf("%s: DNS cache %q: resolver %q (%s) is not c-ares", path, dc.GetName(), rc.GetName(), rc.GetTypedConfig().GetTypeUrl()))
	}
	if len(dc.GetResolvedAddressFilter().GetRanges()) == 0 || dc.GetResolvedAddressFilter().GetInvertMatch() {
		errs = append(errs, fmt.Errorf("%s: DNS cache %q keeps every answer: without resolved_address_filter over the never-dial set, a name that resolves to the node's loopback or the metadata service is dialled (DNS rebinding)", path, dc.GetName()))
	}
	if dc.GetMaxHosts().GetValue() == 0 && dc.GetMaxHosts() != nil {
		errs = append(errs, fmt.Errorf("%s: DNS cache %q: max_hosts 0 resolves nothing", path, dc.GetName()))
	}
	return errs
}
