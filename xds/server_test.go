package xds

import (
	"context"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// startServer runs an ADS server on a unix socket in a temporary
// directory until the test ends.
func startServer(t *testing.T) (*Server, string) {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "xds.sock")
	s, err := NewServer(ServerConfig{SocketPath: sock, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
		if _, err := os.Stat(sock); !os.IsNotExist(err) {
			t.Errorf("socket %s left behind after shutdown (stat: %v)", sock, err)
		}
	})
	waitFor(t, "socket", func() bool { _, err := os.Stat(sock); return err == nil })
	return s, sock
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// adsClient subscribes the way Envoy does: one ADS stream, CDS then LDS,
// wildcard (no resource names), ACK or NACK by echoing the nonce.
type adsClient struct {
	t      *testing.T
	stream discovery.AggregatedDiscoveryService_StreamAggregatedResourcesClient
	node   *core.Node
}

func dialADS(t *testing.T, sock string) *adsClient {
	t.Helper()
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	stream, err := discovery.NewAggregatedDiscoveryServiceClient(conn).StreamAggregatedResources(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return &adsClient{t: t, stream: stream, node: &core.Node{Id: "test-envoy", Cluster: "sluice"}}
}

func (c *adsClient) send(req *discovery.DiscoveryRequest) {
	c.t.Helper()
	req.Node = c.node
	if err := c.stream.Send(req); err != nil {
		c.t.Fatalf("send: %v", err)
	}
}

func (c *adsClient) recv() *discovery.DiscoveryResponse {
	c.t.Helper()
	resp, err := c.stream.Recv()
	if err != nil {
		c.t.Fatalf("recv: %v", err)
	}
	return resp
}

// recvType receives until a response of typeURL arrives (ADS may push the
// types of one snapshot in any order); the others are ACKed.
func (c *adsClient) recvType(typeURL string) *discovery.DiscoveryResponse {
	c.t.Helper()
	for i := 0; i < 4; i++ {
		resp := c.recv()
		if resp.GetTypeUrl() == typeURL {
			return resp
		}
		c.ack(resp)
	}
	c.t.Fatalf("no %s response", typeURL)
	return nil
}

func (c *adsClient) ack(resp *discovery.DiscoveryResponse) {
	c.t.Helper()
	c.send(&discovery.DiscoveryRequest{TypeUrl: resp.GetTypeUrl(), VersionInfo: resp.GetVersionInfo(), ResponseNonce: resp.GetNonce()})
}

func listenerOf(t *testing.T, resp *discovery.DiscoveryResponse) *listener.Listener {
	t.Helper()
	if len(resp.GetResources()) != 1 {
		t.Fatalf("got %d listeners, want 1", len(resp.GetResources()))
	}
	var l listener.Listener
	if err := resp.GetResources()[0].UnmarshalTo(&l); err != nil {
		t.Fatal(err)
	}
	return &l
}

func chainNames(l *listener.Listener) string {
	var names []string
	for _, c := range l.GetFilterChains() {
		names = append(names, c.GetName())
	}
	return strings.Join(names, " ")
}

func TestADSSubscribeAckUpdateNack(t *testing.T) {
	s, sock := startServer(t)
	ctx := context.Background()

	fi, err := os.Stat(sock)
	if err != nil {
		t.Fatal(err)
	}
	if perm := fi.Mode().Perm(); perm != DefaultSocketMode {
		t.Errorf("socket mode %v, want %v", perm, DefaultSocketMode)
	}

	state := State{Proxy: testProxy, Workloads: []Workload{pod("shop", "web", "audit", "", "10.244.1.5")}}
	v1, _, err := s.Update(ctx, state)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(v1, "1-") {
		t.Fatalf("first version %q, want 1-<hash>", v1)
	}

	c := dialADS(t, sock)
	c.send(&discovery.DiscoveryRequest{TypeUrl: resource.ClusterType})
	cds := c.recv()
	if cds.GetTypeUrl() != resource.ClusterType || cds.GetVersionInfo() != v1 {
		t.Fatalf("CDS response type %s version %s, want %s %s", cds.GetTypeUrl(), cds.GetVersionInfo(), resource.ClusterType, v1)
	}
	var names []string
	for _, a := range cds.GetResources() {
		var cl cluster.Cluster
		if err := a.UnmarshalTo(&cl); err != nil {
			t.Fatal(err)
		}
		names = append(names, cl.GetName())
	}
	slices.Sort(names)
	if strings.Join(names, ",") != DenyClusterName+","+DynamicForwardProxyClusterName+","+OriginalDstClusterName {
		t.Fatalf("clusters %v", names)
	}
	c.ack(cds)
	c.send(&discovery.DiscoveryRequest{TypeUrl: resource.ListenerType})
	lds := c.recvType(resource.ListenerType)
	if lds.GetVersionInfo() != v1 {
		t.Fatalf("LDS version %s, want %s", lds.GetVersionInfo(), v1)
	}
	if l := listenerOf(t, lds); !strings.Contains(chainNames(l), "audit|shop/web") {
		t.Fatalf("listener chains %q lack the workload", chainNames(l))
	}
	c.ack(lds)
	waitFor(t, "ACKs", func() bool {
		st := s.Status()
		return st.Acked[resource.ListenerType] == v1 && st.Acked[resource.ClusterType] == v1
	})

	// A workload changes: a new version reaches the subscriber.
	state.Workloads = append(state.Workloads, pod("shop", "pay", "enforce", "api.stripe.com:443", "10.244.1.9"))
	v2, _, err := s.Update(ctx, state)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(v2, "2-") {
		t.Fatalf("second version %q, want 2-<hash>", v2)
	}
	lds2 := c.recvType(resource.ListenerType)
	if lds2.GetVersionInfo() != v2 {
		t.Fatalf("pushed version %s, want %s", lds2.GetVersionInfo(), v2)
	}
	if l := listenerOf(t, lds2); !strings.Contains(chainNames(l), "tls|shop/pay") {
		t.Fatalf("new version lacks the new workload: %q", chainNames(l))
	}

	// Envoy rejects it: the NACK names the version it kept.
	c.send(&discovery.DiscoveryRequest{
		TypeUrl:       resource.ListenerType,
		VersionInfo:   v1,
		ResponseNonce: lds2.GetNonce(),
		ErrorDetail:   &status.Status{Code: 3, Message: "test: listener rejected"},
	})
	waitFor(t, "NACK", func() bool { return s.Status().NACKs == 1 })
	st := s.Status()
	if n := st.LastNACK; n == nil || n.Message != "test: listener rejected" || n.Kept != v1 || n.Rejected != v2 || n.TypeURL != resource.ListenerType {
		t.Fatalf("LastNACK = %+v", st.LastNACK)
	}
	if st.Acked[resource.ListenerType] != v1 {
		t.Errorf("acked listener version %q after NACK, want %q", st.Acked[resource.ListenerType], v1)
	}
	if st.Streams != 1 {
		t.Errorf("streams = %d, want 1", st.Streams)
	}

	// The same state again is not a new version.
	v, _, err := s.Update(ctx, state)
	if err != nil || v != v2 || s.Status().Versions != 2 {
		t.Fatalf("unchanged state: version %q (want %q), %d versions, err %v", v, v2, s.Status().Versions, err)
	}
	// A state that does not build publishes nothing.
	if _, _, err := s.Update(ctx, State{}); err == nil {
		t.Fatal("Update accepted a state without a proxy address")
	}
	if got := s.Status().Version; got != v2 {
		t.Fatalf("version after a failed update = %q, want %q", got, v2)
	}
}

func TestServerConfigRejected(t *testing.T) {
	for _, cfg := range []ServerConfig{
		{},
		{SocketPath: "/tmp/x.sock", TCPAddr: "0.0.0.0:18000"},
		{SocketPath: "/tmp/x.sock", TCPAddr: "10.0.0.1:18000"},
		{SocketPath: "/tmp/x.sock", TCPAddr: "localhost"},
	} {
		if _, err := NewServer(cfg); err == nil {
			t.Errorf("NewServer(%+v) accepted", cfg)
		}
	}
}

func TestServeRefusesToReplaceAFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "not-a-socket")
	if err := os.WriteFile(path, []byte("keep me"), 0o644); err != nil {
		t.Fatal(err)
	}
	s, err := NewServer(ServerConfig{SocketPath: path, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Serve(context.Background()); err == nil || !strings.Contains(err.Error(), "is not a socket") {
		t.Fatalf("Serve = %v, want a refusal", err)
	}
	if b, _ := os.ReadFile(path); string(b) != "keep me" {
		t.Fatal("Serve clobbered a regular file")
	}
}

// The DaemonSet's Envoy runs as another user: the socket is 0660, and in a
// setgid directory (an emptyDir with fsGroup) it takes the directory's
// group, so Envoy reaches it through that group and nobody else can.
func TestSocketModeForGroup(t *testing.T) {
	dir := t.TempDir()
	const gid = 4242
	asRoot := os.Geteuid() == 0
	if asRoot {
		if err := os.Chown(dir, 0, gid); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(dir, 0o755|os.ModeSetgid); err != nil {
			t.Fatal(err)
		}
	}
	sock := filepath.Join(dir, "xds.sock")
	s, err := NewServer(ServerConfig{SocketPath: sock, SocketMode: 0o660, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx) }()
	defer func() { cancel(); <-done }()
	waitFor(t, "socket mode 0660", func() bool {
		fi, err := os.Stat(sock)
		return err == nil && fi.Mode().Perm() == 0o660
	})
	if asRoot {
		fi, _ := os.Stat(sock)
		if g := fi.Sys().(*syscall.Stat_t).Gid; g != gid {
			t.Errorf("socket group %d, want the setgid directory's %d", g, gid)
		}
	}
}

// The same state (in any workload order) is not built again: same version,
// same issues; a changed state publishes a new version.
func TestUpdateUnchangedState(t *testing.T) {
	srv, err := NewServer(ServerConfig{SocketPath: filepath.Join(t.TempDir(), "x.sock"), Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	st := State{Proxy: testProxy, Workloads: []Workload{
		// One address, two policies: an issue per workload.
		pod("c", "host-a", "enforce", "a.example.com", "192.168.1.10"),
		pod("c", "host-b", "audit", "", "192.168.1.10"),
	}}
	v1, is1, err := srv.Update(context.Background(), st)
	if err != nil || len(is1) == 0 {
		t.Fatalf("first update: %v, issues %v", err, is1)
	}
	st.Workloads[0], st.Workloads[1] = st.Workloads[1], st.Workloads[0]
	v2, is2, err := srv.Update(context.Background(), st)
	if err != nil || v2 != v1 || len(is2) != len(is1) {
		t.Fatalf("unchanged state: version %q (was %q), issues %v, %v", v2, v1, is2, err)
	}
	if n := srv.Status().Versions; n != 1 {
		t.Fatalf("%d versions published, want 1", n)
	}
	st.Workloads[0].IPs = ips("10.244.1.99")
	v3, _, err := srv.Update(context.Background(), st)
	if err != nil || v3 == v1 {
		t.Fatalf("changed state: version %q, %v", v3, err)
	}
}

// TestNACKHoldsUntilTheConfigurationChanges: the snapshot cache answers a
// request naming any version but the snapshot's at once, and a NACK names
// the version Envoy kept. Without the hold, every NACK brings the rejected
// version straight back, and a real Envoy rejects it again: a loop as fast
// as the stream. After a NACK nothing is pushed until a new version is
// published; that one arrives; a new stream (a restarted Envoy) still
// gets the current version.
func TestNACKHoldsUntilTheConfigurationChanges(t *testing.T) {
	s, sock := startServer(t)
	ctx := context.Background()
	state := State{Proxy: testProxy, Workloads: []Workload{pod("shop", "web", "audit", "", "10.244.1.5")}}
	v1, _, err := s.Update(ctx, state)
	if err != nil {
		t.Fatal(err)
	}
	c := dialADS(t, sock)
	resps := make(chan *discovery.DiscoveryResponse, 64)
	go func() {
		for {
			resp, err := c.stream.Recv()
			if err != nil {
				close(resps)
				return
			}
			resps <- resp
		}
	}()
	next := func(within time.Duration) *discovery.DiscoveryResponse {
		select {
		case r := <-resps:
			return r
		case <-time.After(within):
			return nil
		}
	}
	nack := func(r *discovery.DiscoveryResponse) {
		c.send(&discovery.DiscoveryRequest{TypeUrl: r.GetTypeUrl(), ResponseNonce: r.GetNonce(),
			ErrorDetail: &status.Status{Code: 3, Message: "test: rejected"}})
	}
	// Envoy's first subscription: it accepts nothing, so each NACK names
	// no version ("").
	c.send(&discovery.DiscoveryRequest{TypeUrl: resource.ClusterType})
	cds := next(5 * time.Second)
	if cds == nil || cds.GetVersionInfo() != v1 {
		t.Fatalf("first CDS response %v, want version %s", cds, v1)
	}
	nack(cds)
	for i := 0; ; i++ {
		r := next(500 * time.Millisecond)
		if r == nil {
			break
		}
		if i >= 3 {
			t.Fatalf("the rejected version %s came back %d times within 500 ms of each NACK", r.GetVersionInfo(), i+1)
		}
		nack(r)
	}
	waitFor(t, "the NACK recorded", func() bool { return s.Status().NACKs >= 1 })
	if n := s.Status().LastNACK; n == nil || n.Rejected != v1 || n.Kept != "" {
		t.Errorf("LastNACK %+v, want rejected %s kept \"\"", n, v1)
	}
	if got := s.Status().NACKs; got != 1 {
		t.Errorf("%d NACKs, want 1: the rejected version was sent again", got)
	}

	// A new version is pushed to the stream that rejected the last one.
	state.Workloads = append(state.Workloads, pod("shop", "pay", "audit", "", "10.244.1.9"))
	v2, _, err := s.Update(ctx, state)
	if err != nil {
		t.Fatal(err)
	}
	if r := next(5 * time.Second); r == nil || r.GetTypeUrl() != resource.ClusterType || r.GetVersionInfo() != v2 {
		t.Fatalf("after the NACK and a new version: got %v, want CDS %s", r, v2)
	}

	// A restarted Envoy gets the current version on its first request.
	c2 := dialADS(t, sock)
	c2.send(&discovery.DiscoveryRequest{TypeUrl: resource.ClusterType})
	if r := c2.recv(); r.GetVersionInfo() != v2 {
		t.Fatalf("new stream got version %s, want %s", r.GetVersionInfo(), v2)
	}
}
