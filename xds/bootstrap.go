package xds

import (
	"errors"
	"fmt"
	overload "github.com/envoyproxy/go-control-plane/envoy/config/overload/v3"
	downstreamconns "github.com/envoyproxy/go-control-plane/envoy/extensions/resource_monitors/downstream_connections/v3"
	fixedheap "github.com/envoyproxy/go-control-plane/envoy/extensions/resource_monitors/fixed_heap/v3"
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
	// AdminSocket, if set, puts admin on this unix socket (mode 0660: the
	// DaemonSet's agent reaches it through the pod's fsGroup)
	// instead of AdminAddress: reachable only through the pod's own
	// filesystem, so two Envoys on one node (an update's old and new pod,
	// both hostNetwork) never claim the same admin port.
	AdminSocket string
	// MaxHeapBytes is what Envoy's overload manager measures its heap
	// against: at 95% it shrinks the heap, at 98% it stops accepting
	// requests and connections, so one pod cannot push the node's only
	// Envoy into the container's OOM kill. Set it below the container's
	// memory limit. Zero: DefaultMaxHeapBytes.
	MaxHeapBytes uint64
	// MaxDownstreamConnections caps Envoy's open downstream connections
	// (the global downstream connection monitor); beyond it new
	// connections are closed at once. Zero: DefaultMaxDownstreamConnections.
	MaxDownstreamConnections uint64
}

// Overload manager defaults: the DaemonSet's Envoy container has a 512 MiB
// memory limit.
const (
	DefaultMaxHeapBytes             = 400 << 20
	DefaultMaxDownstreamConnections = 50000
)

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
	if cfg.MaxHeapBytes == 0 {
		cfg.MaxHeapBytes = DefaultMaxHeapBytes
	}
	if cfg.MaxDownstreamConnections == 0 {
		cfg.MaxDownstreamConnections = DefaultMaxDownstreamConnections
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
		OverloadManager: b.overloadManager(cfg),
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
	if cfg.AdminSocket != "" {
		bs.Admin.Address = &core.Address{Address: &core.Address_Pipe{Pipe: &core.Pipe{Path: cfg.AdminSocket, Mode: 0o660}}}
	}
	if err := ValidateBootstrap(bs); err != nil {
		return nil, err
	}
	return bs, nil
}

// overloadManager: Envoy protects itself (and so every selected pod of the
// node) from one pod's load: heap pressure shrinks the heap, then stops new
// requests and connections; the global connection monitor refuses
// connections beyond the cap.
func (b *builder) overloadManager(cfg BootstrapConfig) *overload.OverloadManager {
	trigger := func(threshold float64) []*overload.Trigger {
		return []*overload.Trigger{{Name: fixedHeapMonitor, TriggerOneof: &overload.Trigger_Threshold{Threshold: &overload.ThresholdTrigger{Value: threshold}}}}
	}
	return &overload.OverloadManager{
		RefreshInterval: durationpb.New(250 * time.Millisecond),
		ResourceMonitors: []*overload.ResourceMonitor{
			{Name: fixedHeapMonitor, ConfigType: &overload.ResourceMonitor_TypedConfig{TypedConfig: b.any(&fixedheap.FixedHeapConfig{MaxHeapSizeBytes: cfg.MaxHeapBytes})}},
			{Name: connectionsMonitor, ConfigType: &overload.ResourceMonitor_TypedConfig{TypedConfig: b.any(&downstreamconns.DownstreamConnectionsConfig{MaxActiveDownstreamConnections: int64(cfg.MaxDownstreamConnections)})}},
		},
		Actions: []*overload.OverloadAction{
			{Name: "envoy.overload_actions.shrink_heap", Triggers: trigger(0.95)},
			{Name: "envoy.overload_actions.stop_accepting_requests", Triggers: trigger(0.98)},
			{Name: "envoy.overload_actions.stop_accepting_connections", Triggers: trigger(0.98)},
		},
	}
}

const (
	fixedHeapMonitor   = "envoy.resource_monitors.fixed_heap"
	connectionsMonitor = "envoy.resource_monitors.global_downstream_max_connections"
)

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
		errs = append(errs, checkCluster(name, c, walkOpts{})...)
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
