package xds

import (
	"errors"
	"fmt"
	"net/netip"
	"time"

	bootstrap "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpoint "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	upstreamhttp "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"
)

// XDSClusterName is the bootstrap's static cluster that reaches the agent.
const XDSClusterName = "sluice_xds"

// Defaults of the Envoy bootstrap.
var (
	DefaultAdminAddress = netip.MustParseAddrPort("127.0.0.1:15000")
)

// BootstrapConfig is what `sluice bootstrap` needs to know.
type BootstrapConfig struct {
	// NodeID names this Envoy in the agent's logs (any value works: the
	// agent serves every Envoy the node's configuration).
	NodeID string
	// SocketPath is the agent's ADS unix socket.
	SocketPath string
	// AdminAddress is Envoy's admin listener: loopback only, since admin
	// can reconfigure and stop Envoy. /ready on it is the readiness probe.
	AdminAddress netip.AddrPort
}

// Bootstrap builds Envoy's startup configuration: listeners and clusters
// from the agent over ADS (gRPC, HTTP/2 over the unix socket), admin on
// loopback. It is validated like every served configuration.
func Bootstrap(cfg BootstrapConfig) (*bootstrap.Bootstrap, error) {
	if cfg.NodeID == "" {
		return nil, errors.New("bootstrap: node id is required")
	}
	if cfg.SocketPath == "" {
		return nil, errors.New("bootstrap: xds socket path is required")
	}
	if !cfg.AdminAddress.IsValid() {
		cfg.AdminAddress = DefaultAdminAddress
	}
	b := &builder{}
	ads := &core.ConfigSource{
		ResourceApiVersion:    core.ApiVersion_V3,
		ConfigSourceSpecifier: &core.ConfigSource_Ads{Ads: &core.AggregatedConfigSource{}},
	}
	bs := &bootstrap.Bootstrap{
		Node: &core.Node{Id: cfg.NodeID, Cluster: "sluice"},
		Admin: &bootstrap.Admin{
			Address: socketAddress(cfg.AdminAddress.Addr(), uint32(cfg.AdminAddress.Port())),
		},
		DynamicResources: &bootstrap.Bootstrap_DynamicResources{
			AdsConfig: &core.ApiConfigSource{
				ApiType:             core.ApiConfigSource_GRPC,
				TransportApiVersion: core.ApiVersion_V3,
				GrpcServices: []*core.GrpcService{{
					TargetSpecifier: &core.GrpcService_EnvoyGrpc_{EnvoyGrpc: &core.GrpcService_EnvoyGrpc{ClusterName: XDSClusterName}},
				}},
				SetNodeOnFirstMessageOnly: true,
			},
			LdsConfig: ads,
			CdsConfig: ads,
		},
		StaticResources: &bootstrap.Bootstrap_StaticResources{
			Clusters: []*cluster.Cluster{{
				Name:                 XDSClusterName,
				ClusterDiscoveryType: &cluster.Cluster_Type{Type: cluster.Cluster_STATIC},
				ConnectTimeout:       durationpb.New(time.Second),
				LoadAssignment: &endpoint.ClusterLoadAssignment{
					ClusterName: XDSClusterName,
					Endpoints: []*endpoint.LocalityLbEndpoints{{LbEndpoints: []*endpoint.LbEndpoint{{
						HostIdentifier: &endpoint.LbEndpoint_Endpoint{Endpoint: &endpoint.Endpoint{
							Address: &core.Address{Address: &core.Address_Pipe{Pipe: &core.Pipe{Path: cfg.SocketPath}}},
						}},
					}}}},
				},
				// gRPC needs HTTP/2 to the agent.
				TypedExtensionProtocolOptions: map[string]*anypb.Any{
					httpProtocolOptionsKey: b.any(&upstreamhttp.HttpProtocolOptions{
						UpstreamProtocolOptions: &upstreamhttp.HttpProtocolOptions_ExplicitHttpConfig_{
							ExplicitHttpConfig: &upstreamhttp.HttpProtocolOptions_ExplicitHttpConfig{
								ProtocolConfig: &upstreamhttp.HttpProtocolOptions_ExplicitHttpConfig_Http2ProtocolOptions{
									Http2ProtocolOptions: &core.Http2ProtocolOptions{},
								},
							},
						},
					}),
				},
			}},
		},
	}
	if b.err != nil {
		return nil, b.err
	}
	if err := ValidateBootstrap(bs); err != nil {
		return nil, err
	}
	return bs, nil
}

// ValidateBootstrap checks a bootstrap like Validate checks resources, plus
// sluice's own rules: admin on loopback, ADS through a static cluster that
// exists.
func ValidateBootstrap(bs *bootstrap.Bootstrap) error {
	var errs []error
	if err := validateMessage("bootstrap", bs); err != nil {
		errs = append(errs, err)
	}
	clusters := map[string]bool{}
	for _, c := range bs.GetStaticResources().GetClusters() {
		name := "bootstrap: static cluster " + quoteName(c.GetName())
		if clusters[c.GetName()] {
			errs = append(errs, fmt.Errorf("%s: duplicate cluster name", name))
		}
		clusters[c.GetName()] = true
		errs = append(errs, checkCluster(name, c)...)
	}
	if sa := bs.GetAdmin().GetAddress().GetSocketAddress(); sa != nil {
		a, err := netip.ParseAddr(sa.GetAddress())
		if err != nil || !a.IsLoopback() {
			errs = append(errs, fmt.Errorf("bootstrap: admin address %q is not loopback; Envoy's admin can reconfigure and stop it", sa.GetAddress()))
		}
	}
	for _, g := range bs.GetDynamicResources().GetAdsConfig().GetGrpcServices() {
		if name := g.GetEnvoyGrpc().GetClusterName(); name != "" && !clusters[name] {
			errs = append(errs, fmt.Errorf("bootstrap: ADS names cluster %q, which is not a static cluster", name))
		}
	}
	return errors.Join(errs...)
}
