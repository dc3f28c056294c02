package xds

import (
	"fmt"

	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	dfpcluster "github.com/envoyproxy/go-control-plane/envoy/extensions/clusters/dynamic_forward_proxy/v3"
	dnscache "github.com/envoyproxy/go-control-plane/envoy/extensions/common/dynamic_forward_proxy/v3"
	cares "github.com/envoyproxy/go-control-plane/envoy/extensions/network/dns_resolver/cares/v3"
	upstreamhttp "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/known/anypb"
)

// checkCustomCluster: the only custom cluster type sluice knows is the
// dynamic forward proxy, with Envoy's load-time rules for it
// (source/extensions/clusters/dynamic_forward_proxy/cluster.cc) and
// sluice's: its DNS cache must drop node-local answers.
func checkCustomCluster(path string, c *cluster.Cluster, ct *cluster.Cluster_CustomClusterType) []error {
	var cfg dfpcluster.ClusterConfig
	if ct.GetName() != dfpClusterType || ct.GetTypedConfig().UnmarshalTo(&cfg) != nil {
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
		var opts upstreamhttp.HttpProtocolOptions
		if err := a.UnmarshalTo(&opts); err != nil {
			errs = append(errs, fmt.Errorf("%s: %s: %w", path, httpProtocolOptionsKey, err))
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

// eachField calls f on every message directly held in m's fields, at any
// depth, but not inside an Any (walkAny visits those).
func eachField(path string, m protoreflect.Message, skip func(proto.Message) bool, f func(string, protoreflect.Message)) {
	m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		if fd.Message() == nil || fd.IsMap() {
			return true
		}
		fp := path + "." + string(fd.Name())
		visit := func(p string, fm protoreflect.Message) {
			if _, isAny := fm.Interface().(*anypb.Any); isAny {
				return
			}
			if skip != nil && skip(fm.Interface()) {
				return
			}
			f(p, fm)
			eachField(p, fm, skip, f)
		}
		if fd.IsList() {
			for i := 0; i < v.List().Len(); i++ {
				visit(fmt.Sprintf("%s[%d]", fp, i), v.List().Get(i).Message())
			}
		} else {
			visit(fp, v.Message())
		}
		return true
	})
}

func checkDNSCache(path string, dc *dnscache.DnsCacheConfig) []error {
	var errs []error
	var res cares.CaresDnsResolverConfig
	switch rc := dc.GetTypedDnsResolverConfig(); {
	case rc == nil:
		errs = append(errs, fmt.Errorf("%s: DNS cache %q has no typed_dns_resolver_config: it would resolve through the node's resolv.conf", path, dc.GetName()))
	case rc.GetName() != caresResolverName || rc.GetTypedConfig().UnmarshalTo(&res) != nil:
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
