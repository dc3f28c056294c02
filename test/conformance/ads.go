package conformance

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"time"

	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/proto"
)

// ADS subscribes to an ADS server as Envoy does (state of the world, CDS
// and LDS on one stream) and hands every configuration it accepts to
// apply. A response whose resources do not compile is NACKed with the
// error (field paths included) and the last accepted configuration stays,
// as Envoy keeps its last good one.
type ADS struct {
	Socket string // unix socket path
	NodeID string
	Log    *slog.Logger
	Apply  func(*Config)

	mu       sync.Mutex
	nacks    []string
	versions map[string]string
}

// NACKs returns the error messages of the NACKs sent so far.
func (a *ADS) NACKs() []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return append([]string(nil), a.nacks...)
}

// Run holds the stream until ctx ends or the stream fails.
func (a *ADS) Run(ctx context.Context) error {
	// Envoy's xDS client takes messages of any size.
	conn, err := grpc.NewClient("unix://"+a.Socket, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(256<<20)))
	if err != nil {
		return err
	}
	defer conn.Close()
	stream, err := discovery.NewAggregatedDiscoveryServiceClient(conn).StreamAggregatedResources(ctx)
	if err != nil {
		return err
	}
	node := &core.Node{Id: a.NodeID, Cluster: "sluice"}
	// Envoy asks for clusters first, then listeners.
	for _, t := range []string{resource.ClusterType, resource.ListenerType} {
		if err := stream.Send(&discovery.DiscoveryRequest{Node: node, TypeUrl: t}); err != nil {
			return err
		}
	}
	var (
		listeners []*listener.Listener
		clusters  []*cluster.Cluster
	)
	a.mu.Lock()
	a.versions = map[string]string{}
	a.mu.Unlock()
	for {
		resp, err := stream.Recv()
		if err != nil {
			return err
		}
		l, c := listeners, clusters
		var derr error
		switch resp.GetTypeUrl() {
		case resource.ListenerType:
			l, derr = decode[listener.Listener](resp)
		case resource.ClusterType:
			c, derr = decode[cluster.Cluster](resp)
		default:
			derr = fmt.Errorf("type %s is not implemented by the conformance proxy", resp.GetTypeUrl())
		}
		var cfg *Config
		if derr == nil && len(l) > 0 {
			cfg, derr = Compile(l, c)
		}
		a.mu.Lock()
		req := &discovery.DiscoveryRequest{Node: node, TypeUrl: resp.GetTypeUrl(), ResponseNonce: resp.GetNonce(), VersionInfo: a.versions[resp.GetTypeUrl()]}
		if derr != nil {
			req.ErrorDetail = &status.Status{Code: int32(codes.InvalidArgument), Message: derr.Error()}
			a.nacks = append(a.nacks, derr.Error())
		} else {
			req.VersionInfo = resp.GetVersionInfo()
			a.versions[resp.GetTypeUrl()] = resp.GetVersionInfo()
			listeners, clusters = l, c
		}
		a.mu.Unlock()
		if derr != nil {
			a.Log.Error("NACK", "type", resp.GetTypeUrl(), "version", resp.GetVersionInfo(), "error", derr)
		} else if cfg != nil {
			a.Apply(cfg)
			a.Log.Info("configuration accepted", "type", resp.GetTypeUrl(), "version", resp.GetVersionInfo())
		}
		if err := stream.Send(req); err != nil {
			return err
		}
	}
}

// decode unpacks a response's resources of one type.
func decode[T any, P interface {
	*T
	proto.Message
}](resp *discovery.DiscoveryResponse) ([]P, error) {
	var out []P
	for _, r := range resp.GetResources() {
		m := P(new(T))
		if err := r.UnmarshalTo(m); err != nil {
			return nil, err
		}
		out = append(out, m)
	}
	return out, nil
}

// Server is the conformance proxy as a program: ADS from socket, the
// listener bound where the accepted configuration says (once, on the
// first), the access log to accessLog, /ready on admin once configured.
func Server(ctx context.Context, socket, admin string, accessLog *os.File, log *slog.Logger, ready func()) error {
	p := &Proxy{AccessLog: accessLog}
	bound := make(chan []net.Listener, 1)
	var once sync.Once
	var bindErr error
	ads := &ADS{Socket: socket, NodeID: "conformance", Log: log, Apply: func(cfg *Config) {
		p.SetConfig(cfg)
		once.Do(func() {
			var ls []net.Listener
			// Go listeners are MPTCP by default; Envoy's are plain TCP.
			lc := net.ListenConfig{}
			lc.SetMultipathTCP(false)
			for _, addr := range cfg.Listener.Addrs {
				l, err := lc.Listen(ctx, "tcp", addr.String())
				if err != nil {
					bindErr = fmt.Errorf("bind %s: %w", addr, err)
					log.Error("bind", "error", bindErr)
					continue
				}
				ls = append(ls, l)
				go p.Serve(l)
			}
			bound <- ls
		})
	}}
	if admin != "" {
		// host:port, or unix:PATH as Envoy's admin address.pipe.
		network, addr := "tcp", admin
		if path, ok := strings.CutPrefix(admin, "unix:"); ok {
			network, addr = "unix", path
			os.Remove(path)
		}
		al, err := net.Listen(network, addr)
		if err != nil {
			return err
		}
		if network == "unix" {
			// Envoy's admin pipe mode in the DaemonSet: the pod's group
			// (fsGroup) reaches it, so does the agent.
			if err := os.Chmod(addr, 0o660); err != nil {
				return err
			}
		}
		defer al.Close()
		mux := http.NewServeMux()
		mux.HandleFunc("/ready", func(w http.ResponseWriter, _ *http.Request) {
			if p.Config() == nil || bindErr != nil {
				http.Error(w, "PRE_INITIALIZING", http.StatusServiceUnavailable)
				return
			}
			fmt.Fprintln(w, "LIVE")
		})
		go http.Serve(al, mux)
	}
	if ready != nil {
		ready()
	}
	errc := make(chan error, 1)
	go func() {
		// Envoy reconnects to its management server; so does this.
		for ctx.Err() == nil {
			if err := ads.Run(ctx); err != nil && ctx.Err() == nil {
				log.Warn("ADS stream ended; reconnecting", "error", err)
				select {
				case <-ctx.Done():
				case <-timeAfter():
				}
			}
		}
		errc <- nil
	}()
	<-ctx.Done()
	select {
	case ls := <-bound:
		for _, l := range ls {
			l.Close()
		}
	default:
	}
	return nil
}

func timeAfter() <-chan time.Time { return time.After(200 * time.Millisecond) }
