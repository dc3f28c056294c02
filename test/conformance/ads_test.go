package conformance

import (
	"context"
	"io"
	"log/slog"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	serverv3 "github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"github.com/sluice-io/sluice/xds"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"
)

// The proxy over ADS: it ACKs a configuration it implements and applies
// it; it NACKs one that sets a field it does not implement, with the
// field's path in the error and the last accepted version, and keeps that
// configuration.
func TestADSAcksAndNacks(t *testing.T) {
	snapshots := cache.NewSnapshotCache(false, cache.IDHash{}, nil)
	var (
		mu   sync.Mutex
		reqs []*discovery.DiscoveryRequest
	)
	srv := serverv3.NewServer(context.Background(), snapshots, serverv3.CallbackFuncs{
		StreamRequestFunc: func(_ int64, r *discovery.DiscoveryRequest) error {
			mu.Lock()
			reqs = append(reqs, proto.Clone(r).(*discovery.DiscoveryRequest))
			mu.Unlock()
			return nil
		},
	})
	g := grpc.NewServer()
	discovery.RegisterAggregatedDiscoveryServiceServer(g, srv)
	sock := filepath.Join(t.TempDir(), "ads.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	go g.Serve(l)
	t.Cleanup(g.Stop)

	r, _, err := xds.Build(testStates()["enforce-hostnames"])
	if err != nil {
		t.Fatal(err)
	}
	set := func(version string, ls []*listener.Listener, cs []*cluster.Cluster) {
		var lr, cr []types.Resource
		for _, x := range ls {
			lr = append(lr, x)
		}
		for _, x := range cs {
			cr = append(cr, x)
		}
		snap, err := cache.NewSnapshot(version, map[resource.Type][]types.Resource{resource.ListenerType: lr, resource.ClusterType: cr})
		if err != nil {
			t.Fatal(err)
		}
		if err := snapshots.SetSnapshot(context.Background(), "conformance", snap); err != nil {
			t.Fatal(err)
		}
	}
	set("v1", r.Listeners, r.Clusters)

	applied := make(chan *Config, 4)
	ads := &ADS{Socket: sock, NodeID: "conformance", Log: slog.New(slog.NewTextHandler(io.Discard, nil)), Apply: func(c *Config) { applied <- c }}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go ads.Run(ctx)
	select {
	case c := <-applied:
		if c.Listener.Chains["tls|shop/checkout"] == nil {
			t.Fatalf("applied a configuration without the workload's chains: %v", c.Listener.Chains)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no configuration applied")
	}
	waitReq := func(match func(*discovery.DiscoveryRequest) bool) *discovery.DiscoveryRequest {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for time.Now().Before(deadline) {
			mu.Lock()
			for _, q := range reqs {
				if match(q) {
					mu.Unlock()
					return q
				}
			}
			mu.Unlock()
			time.Sleep(10 * time.Millisecond)
		}
		t.Fatal("no such request")
		return nil
	}
	waitReq(func(q *discovery.DiscoveryRequest) bool {
		return q.GetTypeUrl() == resource.ListenerType && q.GetVersionInfo() == "v1" && q.GetErrorDetail() == nil && q.GetResponseNonce() != ""
	})

	// Both types answered: CDS and LDS each applied once.
	waitReq(func(q *discovery.DiscoveryRequest) bool {
		return q.GetTypeUrl() == resource.ClusterType && q.GetVersionInfo() == "v1" && q.GetResponseNonce() != ""
	})
	bad := proto.Clone(r.Listeners[0]).(*listener.Listener)
	bad.DrainType = listener.Listener_MODIFY_ONLY
	set("v2", []*listener.Listener{bad}, r.Clusters)
	nack := waitReq(func(q *discovery.DiscoveryRequest) bool {
		return q.GetTypeUrl() == resource.ListenerType && q.GetErrorDetail() != nil
	})
	if q := nack; q.GetVersionInfo() != "v1" || !strings.Contains(q.GetErrorDetail().GetMessage(), "listener[sluice].drain_type: field envoy.config.listener.v3.Listener.drain_type is not implemented") {
		t.Fatalf("NACK: version %q, error %q", q.GetVersionInfo(), q.GetErrorDetail().GetMessage())
	}
	// The clusters of v2 are accepted (with the v1 listener Envoy keeps);
	// the listener is not.
	waitReq(func(q *discovery.DiscoveryRequest) bool {
		return q.GetTypeUrl() == resource.ClusterType && q.GetVersionInfo() == "v2" && q.GetErrorDetail() == nil
	})
	// The management server may push the refused version again; every
	// answer is the same NACK.
	for _, n := range ads.NACKs() {
		if !strings.Contains(n, "drain_type") {
			t.Fatalf("NACK %q", n)
		}
	}
}
