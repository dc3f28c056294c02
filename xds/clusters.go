package xds

import (
	"time"

	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpoint "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	upstreamhttp "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

const (
	httpProtocolOptionsKey = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
	// nodeScaleLimit replaces Envoy's per-cluster circuit-breaker default
	// of 1,024 connections and requests, sized for one service rather than
	// for every selected pod of a node sharing one cluster.
	nodeScaleLimit = 1 << 20
	connectTimeout = 5 * time.Second
)

// originalDstCluster forwards to each connection's original destination.
// Envoy requires lb_policy CLUSTER_PROVIDED and no load_assignment for an
// ORIGINAL_DST cluster; the validator holds us to both.
func (b *builder) originalDstCluster() *cluster.Cluster {
	return &cluster.Cluster{
		Name:                          OriginalDstClusterName,
		ClusterDiscoveryType:          &cluster.Cluster_Type{Type: cluster.Cluster_ORIGINAL_DST},
		LbPolicy:                      cluster.Cluster_CLUSTER_PROVIDED,
		ConnectTimeout:                durationpb.New(connectTimeout),
		CircuitBreakers:               nodeScaleBreakers(),
		TypedExtensionProtocolOptions: b.downstreamProtocol(nil),
		UpstreamConnectionOptions:     upstreamKeepalive(),
		PerConnectionBufferLimitBytes: wrapperspb.UInt32(bufferLimit),
	}
}

// upstreamKeepalive: with no idle timeout, TCP keepalive is what finds an
// upstream that vanished (a peer rebooted, a NAT dropped the flow): probes
// after 5 min of silence, every 30 s, 5 of them, as common server defaults.
func upstreamKeepalive() *cluster.UpstreamConnectionOptions {
	return &cluster.UpstreamConnectionOptions{TcpKeepalive: &core.TcpKeepalive{
		KeepaliveTime:     wrapperspb.UInt32(300),
		KeepaliveInterval: wrapperspb.UInt32(30),
		KeepaliveProbes:   wrapperspb.UInt32(5),
	}}
}

// nodeScaleBreakers: one cluster serves every selected pod of the node.
func nodeScaleBreakers() *cluster.CircuitBreakers {
	limit := wrapperspb.UInt32(nodeScaleLimit)
	return &cluster.CircuitBreakers{Thresholds: []*cluster.CircuitBreakers_Thresholds{{
		Priority:           core.RoutingPriority_DEFAULT,
		MaxConnections:     limit,
		MaxPendingRequests: limit,
		MaxRequests:        limit,
	}}}
}

// downstreamProtocol: HTTP chains speak to the upstream in the protocol
// the pod used (HTTP/1.1 or h2c), as it would have without the proxy.
func (b *builder) downstreamProtocol(common *core.UpstreamHttpProtocolOptions) map[string]*anypb.Any {
	return map[string]*anypb.Any{
		httpProtocolOptionsKey: b.any(&upstreamhttp.HttpProtocolOptions{
			UpstreamHttpProtocolOptions: common,
			UpstreamProtocolOptions: &upstreamhttp.HttpProtocolOptions_UseDownstreamProtocolConfig{
				UseDownstreamProtocolConfig: &upstreamhttp.HttpProtocolOptions_UseDownstreamHttpConfig{
					HttpProtocolOptions:  &core.Http1ProtocolOptions{},
					Http2ProtocolOptions: &core.Http2ProtocolOptions{},
				},
			},
		}),
	}
}

// denyCluster has no endpoints: a tcp_proxy pointed at it closes the
// downstream connection at once without connecting anywhere.
func (b *builder) denyCluster() *cluster.Cluster {
	return &cluster.Cluster{
		Name:                 DenyClusterName,
		ClusterDiscoveryType: &cluster.Cluster_Type{Type: cluster.Cluster_STATIC},
		ConnectTimeout:       durationpb.New(connectTimeout),
		LoadAssignment:       &endpoint.ClusterLoadAssignment{ClusterName: DenyClusterName},
	}
}
