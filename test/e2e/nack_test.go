package e2e

import (
	"context"
	"path/filepath"
	"strings"
	"testing"
	"time"

	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/sluice-io/sluice/test/harness"
	rpcstatus "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
)

// An ADS client standing in for Envoy subscribes to the real agent, ACKs
// the first listener and NACKs the next: the agent counts the NACK in its
// metrics, `sluice status` names the rejected and the kept version, and
// the agent goes on serving (a later version is pushed and can be ACKed).
func TestPrivilegedNACKVisible(t *testing.T) {
	e := harness.New(t, 2)
	web, api := e.TB.Pods[0], e.TB.Pods[1]
	e.WriteWorkloads(t, harness.Workload{Pod: web, Namespace: "shop", Name: "web"})
	e.StartAgent(t)

	conn, err := grpc.NewClient("unix://"+filepath.Join(e.Dir, "xds.sock"), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	stream, err := discovery.NewAggregatedDiscoveryServiceClient(conn).StreamAggregatedResources(ctx)
	if err != nil {
		t.Fatal(err)
	}
	node := &core.Node{Id: "fake-envoy"}
	send := func(r *discovery.DiscoveryRequest) {
		t.Helper()
		r.Node, r.TypeUrl = node, resource.ListenerType
		if err := stream.Send(r); err != nil {
			t.Fatal(err)
		}
	}
	// recvWith waits for a listener version that names want.
	recvWith := func(want string) *discovery.DiscoveryResponse {
		t.Helper()
		for {
			resp, err := stream.Recv()
			if err != nil {
				t.Fatalf("recv: %v", err)
			}
			for _, r := range resp.GetResources() {
				if strings.Contains(string(r.GetValue()), want) {
					return resp
				}
			}
			send(&discovery.DiscoveryRequest{VersionInfo: resp.GetVersionInfo(), ResponseNonce: resp.GetNonce()})
		}
	}
	send(&discovery.DiscoveryRequest{})
	good := recvWith("shop/web")
	send(&discovery.DiscoveryRequest{VersionInfo: good.GetVersionInfo(), ResponseNonce: good.GetNonce()})

	e.WriteWorkloads(t, harness.Workload{Pod: web, Namespace: "shop", Name: "web"}, harness.Workload{Pod: api, Namespace: "shop", Name: "api"})
	bad := recvWith("shop/api")
	send(&discovery.DiscoveryRequest{VersionInfo: good.GetVersionInfo(), ResponseNonce: bad.GetNonce(),
		ErrorDetail: &rpcstatus.Status{Code: 3, Message: "fake-envoy: listener rejected"}})

	harness.WaitFor(t, "the NACK in the metrics", 10*time.Second, func() bool {
		return strings.Contains(e.Metrics(t), "sluice_xds_nacks_total 1")
	})
	harness.WaitFor(t, "the NACK in sluice status", 10*time.Second, func() bool {
		return strings.Contains(e.Status(t), "last NACK")
	})
	out := e.Status(t)
	for _, want := range []string{"1 NACKs", "rejected " + bad.GetVersionInfo(), "kept " + good.GetVersionInfo(), "fake-envoy: listener rejected"} {
		if !strings.Contains(out, want) {
			t.Errorf("sluice status lacks %q:\n%s", want, out)
		}
	}

	// The control plane carries on: the next change is pushed and ACKed.
	e.WriteWorkloads(t, harness.Workload{Pod: api, Namespace: "shop", Name: "api"})
	next := recvWith("shop/api")
	for strings.Contains(string(next.GetResources()[0].GetValue()), "shop/web") {
		send(&discovery.DiscoveryRequest{VersionInfo: next.GetVersionInfo(), ResponseNonce: next.GetNonce()})
		next = recvWith("shop/api")
	}
	send(&discovery.DiscoveryRequest{VersionInfo: next.GetVersionInfo(), ResponseNonce: next.GetNonce()})
	harness.WaitFor(t, "the ACK of the next version", 10*time.Second, func() bool {
		return strings.Contains(e.Metrics(t), "sluice_xds_nacks_total 1") && strings.Contains(e.Status(t), next.GetVersionInfo())
	})
}
