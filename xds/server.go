package xds

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"maps"
	"net"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"sync"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	clusterservice "github.com/envoyproxy/go-control-plane/envoy/service/cluster/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	listenerservice "github.com/envoyproxy/go-control-plane/envoy/service/listener/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/log"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	serverv3 "github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/protobuf/proto"
)

// DefaultSocketMode: only the agent's user may connect. Envoy runs as the
// same user in the shipped DaemonSet; widen it (0660 and a shared group)
// only if yours does not.
const DefaultSocketMode fs.FileMode = 0o600

// ServerConfig says where the ADS server listens.
type ServerConfig struct {
	// SocketPath is the unix socket Envoy connects to. Required.
	SocketPath string
	// SocketMode is the socket's permission bits; zero: DefaultSocketMode.
	SocketMode fs.FileMode
	// TCPAddr optionally also serves on a loopback TCP address (for an
	// Envoy that cannot reach the socket). Anything but loopback is
	// refused: pods must never reach the control plane.
	TCPAddr string
	Logger  *slog.Logger
	// JSONRoundTrip adds the strict JSON round trip to the validation of
	// every update (Validator.JSONRoundTrip); the agent leaves it out.
	JSONRoundTrip bool
}

// NACK is Envoy's most recent rejection of a configuration.
type NACK struct {
	Time    time.Time
	TypeURL string
	// Version Envoy rejected, and the one it kept.
	Rejected, Kept string
	Message        string
}

// Status is what the agent reports about the control plane (metrics,
// `sluice status`).
type Status struct {
	// Version is the configuration being served ("" before the first).
	Version string
	// Updates that produced a new version; Pushes: responses sent.
	Versions, Pushes uint64
	ACKs, NACKs      uint64
	LastNACK         *NACK
	// Acked is the version Envoy last accepted, per resource type URL.
	Acked map[string]string
	// Streams is the number of connected Envoys (ADS streams).
	Streams int
}

// Server is the embedded ADS server: it builds, validates and publishes
// snapshots, and records what Envoy says about them.
type Server struct {
	cfg   ServerConfig
	log   *slog.Logger
	cache cache.SnapshotCache
	grpc  *grpc.Server
	// validator remembers the filter chains it validated: an update in
	// which few workloads changed validates only theirs.
	validator Validator
	// builder remembers each workload's built parts: an update rebuilds
	// only the workloads that changed.
	builder Builder

	mu     sync.Mutex
	seq    uint64
	hash   string
	status Status
	// streams holds, per ADS stream and resource type, the last response
	// sent: its nonce names the version a NACK rejects.
	streams map[int64]map[string]sent
	// published maps the versions this server published to their sequence
	// numbers, so an ACK can be ordered (and one of a previous agent's
	// versions, which a reconnecting Envoy may report, is not ours).
	published map[string]uint64
	onACK     func(typeURL, version string)
	// stateKey is the digest of the last state published (or found
	// unchanged), and stateIssues its issues.
	stateKey    string
	stateIssues []Issue
	// chainDigests: see Resources.hash; hashMu guards it.
	hashMu       sync.Mutex
	chainDigests map[*listener.FilterChain][sha256.Size]byte
	// up is closed once Serve listens (or failed to).
	up     chan struct{}
	upOnce sync.Once
}

// sent is a response pushed on a stream.
type sent struct{ nonce, version string }

// nodeKey: every Envoy that connects gets the one configuration of this
// node, whatever node id its bootstrap says.
type nodeKey struct{}

func (nodeKey) ID(*core.Node) string { return "sluice" }

// NewServer prepares a server; Serve starts it.
func NewServer(cfg ServerConfig) (*Server, error) {
	if cfg.SocketPath == "" {
		return nil, errors.New("xds: socket path is required")
	}
	if cfg.SocketMode == 0 {
		cfg.SocketMode = DefaultSocketMode
	}
	if cfg.TCPAddr != "" {
		ap, err := netip.ParseAddrPort(cfg.TCPAddr)
		if err != nil {
			return nil, fmt.Errorf("xds: tcp address %q: %w", cfg.TCPAddr, err)
		}
		if !ap.Addr().IsLoopback() {
			return nil, fmt.Errorf("xds: tcp address %s is not loopback; the control plane must not be reachable from pods", ap)
		}
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	s := &Server{cfg: cfg, log: cfg.Logger, streams: map[int64]map[string]sent{}, published: map[string]uint64{}, up: make(chan struct{}),
		chainDigests: map[*listener.FilterChain][sha256.Size]byte{}}
	s.status.Acked = map[string]string{}
	s.validator.JSONRoundTrip = cfg.JSONRoundTrip
	s.cache = cache.NewSnapshotCache(true, nodeKey{}, slogAdapter(s.log))
	xs := serverv3.NewServer(context.Background(), s.cache, s.callbacks())
	s.grpc = grpc.NewServer(
		grpc.KeepaliveParams(keepalive.ServerParameters{Time: 30 * time.Second, Timeout: 5 * time.Second}),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 15 * time.Second, PermitWithoutStream: true}),
	)
	discovery.RegisterAggregatedDiscoveryServiceServer(s.grpc, xs)
	listenerservice.RegisterListenerDiscoveryServiceServer(s.grpc, xs)
	clusterservice.RegisterClusterDiscoveryServiceServer(s.grpc, xs)
	return s, nil
}

// Update builds the configuration for st, validates it, and publishes it
// as a new version if it differs from the one being served. On any error
// nothing is published and the last good configuration stays.
func (s *Server) Update(ctx context.Context, st State) (version string, issues []Issue, err error) {
	// The same state builds the same configuration: skip building and
	// validating it (most of an update's cost) when nothing changed.
	key := stateKey(st)
	s.mu.Lock()
	if key == s.stateKey && s.status.Version != "" {
		v, is := s.status.Version, slices.Clone(s.stateIssues)
		s.mu.Unlock()
		return v, is, nil
	}
	s.mu.Unlock()
	defer func() {
		if err == nil {
			s.mu.Lock()
			s.stateKey, s.stateIssues = key, slices.Clone(issues)
			s.mu.Unlock()
		}
	}()
	r, issues, err := s.builder.Build(st)
	if err != nil {
		return "", nil, err
	}
	if err := s.validator.Validate(r); err != nil {
		return "", issues, fmt.Errorf("generated configuration is invalid, keeping the last good one: %w", err)
	}
	s.hashMu.Lock()
	h, err := r.hash(s.chainDigests)
	s.hashMu.Unlock()
	if err != nil {
		return "", issues, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if h == s.hash {
		return s.status.Version, issues, nil
	}
	// The sequence makes versions monotonic within a run; the hash makes a
	// restarted agent's "1" differ from the last run's "1", which Envoy
	// would otherwise report as already applied.
	version = strconv.FormatUint(s.seq+1, 10) + "-" + h[:12]
	snap, err := cache.NewSnapshot(version, map[resource.Type][]types.Resource{
		resource.ListenerType: toResources(r.Listeners),
		resource.ClusterType:  toResources(r.Clusters),
	})
	if err != nil {
		return "", issues, fmt.Errorf("snapshot: %w", err)
	}
	// No snap.Consistent(): it unpacks every chain's HTTP connection
	// manager (a fifth of an update's cost) to find RDS and EDS names, and
	// the builders use neither (routes inline, clusters without EDS):
	// TestSnapshotConsistent runs it on every kind of chain built.
	if err := s.cache.SetSnapshot(ctx, nodeKey{}.ID(nil), snap); err != nil {
		return "", issues, fmt.Errorf("publish snapshot %s: %w", version, err)
	}
	s.seq++
	s.published[version] = s.seq
	if len(s.published) > 1024 {
		for v, n := range s.published {
			if n+1024 < s.seq {
				delete(s.published, v)
			}
		}
	}
	s.hash = h
	s.status.Version = version
	s.status.Versions++
	s.log.Info("xds configuration published", "version", version, "listeners", len(r.Listeners), "clusters", len(r.Clusters))
	return version, issues, nil
}

func toResources[T types.Resource](in []T) []types.Resource {
	out := make([]types.Resource, len(in))
	for i, r := range in {
		out[i] = r
	}
	return out
}

// hash is a digest of the deterministic encoding of every resource: each
// listener without its filter chains, then a digest of each chain's
// encoding, then the clusters. chains remembers the digests of chains by
// identity (a Builder never modifies a chain it handed out), so the chains
// a previous update encoded are not encoded again, nor those the Validator
// encoded for this one (r.digests); hash replaces its
// contents with this configuration's chains. r must not be read
// concurrently meanwhile: the chains are set aside while a listener is
// encoded.
func (r *Resources) hash(chains map[*listener.FilterChain][sha256.Size]byte) (string, error) {
	h := sha256.New()
	opts := proto.MarshalOptions{Deterministic: true}
	enc := func(m proto.Message) error {
		b, err := opts.Marshal(m)
		if err != nil {
			return fmt.Errorf("encode %s: %w", m.ProtoReflect().Descriptor().FullName(), err)
		}
		h.Write(b)
		return nil
	}
	seen := make(map[*listener.FilterChain][sha256.Size]byte, len(chains))
	for _, l := range r.Listeners {
		cs := l.FilterChains
		l.FilterChains = nil
		err := enc(l)
		l.FilterChains = cs
		if err != nil {
			return "", err
		}
		for _, c := range cs {
			d, ok := chains[c]
			if !ok {
				d, ok = r.digests[c]
			}
			if !ok {
				b, err := opts.Marshal(c)
				if err != nil {
					return "", fmt.Errorf("encode filter chain %q: %w", c.GetName(), err)
				}
				d = sha256.Sum256(b)
			}
			seen[c] = d
			h.Write(d[:])
		}
	}
	for _, c := range r.Clusters {
		if err := enc(c); err != nil {
			return "", err
		}
	}
	clear(chains)
	maps.Copy(chains, seen)
	return hex.EncodeToString(h.Sum(nil)), nil
}

// Status returns a copy of the control plane's state.
func (s *Server) Status() Status {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.status
	st.Acked = make(map[string]string, len(s.status.Acked))
	for k, v := range s.status.Acked {
		st.Acked[k] = v
	}
	if s.status.LastNACK != nil {
		n := *s.status.LastNACK
		st.LastNACK = &n
	}
	st.Streams = len(s.streams)
	return st
}

func (s *Server) callbacks() serverv3.Callbacks {
	return serverv3.CallbackFuncs{
		StreamOpenFunc: func(_ context.Context, id int64, _ string) error {
			s.mu.Lock()
			s.streams[id] = map[string]sent{}
			s.mu.Unlock()
			return nil
		},
		StreamClosedFunc: func(id int64, _ *core.Node) {
			s.mu.Lock()
			delete(s.streams, id)
			s.mu.Unlock()
		},
		StreamRequestFunc: func(id int64, req *discovery.DiscoveryRequest) error {
			s.onRequest(id, req)
			return nil
		},
		StreamResponseFunc: func(_ context.Context, id int64, _ *discovery.DiscoveryRequest, resp *discovery.DiscoveryResponse) {
			s.mu.Lock()
			s.status.Pushes++
			if m := s.streams[id]; m != nil {
				m[resp.GetTypeUrl()] = sent{nonce: resp.GetNonce(), version: resp.GetVersionInfo()}
			}
			s.mu.Unlock()
		},
	}
}

// onRequest tells ACKs from NACKs. A request carrying a response nonce
// answers an earlier push; with error_detail it is a NACK, and the
// version_info is the one Envoy kept (its last good configuration, which it
// goes on using).
//
// A NACK is answered with nothing until the configuration changes. The
// snapshot cache answers any request whose version differs from the
// snapshot's at once, and a NACK names the version Envoy kept, not the one
// it rejected: left alone, every NACK would bring the rejected version back
// by return, and Envoy would reject it again, in a loop as fast as the
// stream carries it. The request is therefore marked as being at the
// rejected version (the version the nonce was sent with), so the cache
// holds the watch until a different version is published.
func (s *Server) onRequest(id int64, req *discovery.DiscoveryRequest) {
	if req.GetResponseNonce() == "" {
		return
	}
	s.mu.Lock()
	var notify func(string, string)
	defer func() {
		s.mu.Unlock()
		if notify != nil {
			notify(req.GetTypeUrl(), req.GetVersionInfo())
		}
	}()
	if d := req.GetErrorDetail(); d != nil {
		kept := req.GetVersionInfo()
		rejected := s.status.Version
		if last, ok := s.streams[id][req.GetTypeUrl()]; ok && last.nonce == req.GetResponseNonce() {
			rejected = last.version
			req.VersionInfo = rejected
		}
		s.status.NACKs++
		s.status.LastNACK = &NACK{
			Time:     time.Now(),
			TypeURL:  req.GetTypeUrl(),
			Rejected: rejected,
			Kept:     kept,
			Message:  d.GetMessage(),
		}
		s.log.Error("envoy rejected the configuration; not resending it until the configuration changes", "type", req.GetTypeUrl(), "rejected", rejected,
			"kept", kept, "stream", id, "error", d.GetMessage())
		return
	}
	s.status.ACKs++
	s.status.Acked[req.GetTypeUrl()] = req.GetVersionInfo()
	notify = s.onACK
}

// OnACK sets a function called (without the server's lock) for every ACK,
// with the resource type and the version Envoy accepted.
func (s *Server) OnACK(f func(typeURL, version string)) {
	s.mu.Lock()
	s.onACK = f
	s.mu.Unlock()
}

// AckedAtLeast reports whether an Envoy has accepted, for typeURL, version
// or a later one this server published.
func (s *Server) AckedAtLeast(typeURL, version string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	want, ok := s.published[version]
	got, ok2 := s.published[s.status.Acked[typeURL]]
	return ok && ok2 && got >= want
}

// Connected reports whether an Envoy holds an ADS stream.
func (s *Server) Connected() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.streams) > 0
}

// Serve listens on the unix socket (and the loopback TCP address, if
// configured) until ctx is done, then stops gracefully and removes the
// socket.
// Listening is closed once Serve listens on its socket (or failed to, and
// returns the error).
func (s *Server) Listening() <-chan struct{} { return s.up }

func (s *Server) Serve(ctx context.Context) error {
	defer s.upOnce.Do(func() { close(s.up) })
	lis, err := listenUnix(s.cfg.SocketPath, s.cfg.SocketMode)
	if err != nil {
		return err
	}
	defer os.Remove(s.cfg.SocketPath)
	listeners := []net.Listener{lis}
	if s.cfg.TCPAddr != "" {
		tl, err := net.Listen("tcp", s.cfg.TCPAddr)
		if err != nil {
			lis.Close()
			return fmt.Errorf("xds: listen %s: %w", s.cfg.TCPAddr, err)
		}
		listeners = append(listeners, tl)
	}
	errc := make(chan error, len(listeners))
	for _, l := range listeners {
		go func() { errc <- s.grpc.Serve(l) }()
	}
	s.log.Info("xds server listening", "socket", s.cfg.SocketPath, "tcp", s.cfg.TCPAddr)
	s.upOnce.Do(func() { close(s.up) })
	select {
	case <-ctx.Done():
		stopped := make(chan struct{})
		go func() { s.grpc.GracefulStop(); close(stopped) }()
		select {
		case <-stopped:
		case <-time.After(5 * time.Second):
			s.grpc.Stop()
		}
		return nil
	case err := <-errc:
		s.grpc.Stop()
		return fmt.Errorf("xds: serve: %w", err)
	}
}

// listenUnix binds the socket, replacing a stale one left by a previous
// run (but never a file that is not a socket), and restricts it to mode.
func listenUnix(path string, mode fs.FileMode) (net.Listener, error) {
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode()&fs.ModeSocket == 0 {
			return nil, fmt.Errorf("xds: %s exists and is not a socket", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("xds: remove stale socket: %w", err)
		}
	}
	lis, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("xds: listen %s: %w", path, err)
	}
	if err := os.Chmod(path, mode); err != nil {
		lis.Close()
		return nil, fmt.Errorf("xds: chmod %s: %w", path, err)
	}
	return lis, nil
}

// slogAdapter routes go-control-plane's logging to slog; its debug chatter
// (every watch) stays at debug.
func slogAdapter(l *slog.Logger) log.Logger {
	return log.LoggerFuncs{
		DebugFunc: func(f string, a ...any) { l.Debug(fmt.Sprintf(f, a...), "component", "go-control-plane") },
		InfoFunc:  func(f string, a ...any) { l.Debug(fmt.Sprintf(f, a...), "component", "go-control-plane") },
		WarnFunc:  func(f string, a ...any) { l.Warn(fmt.Sprintf(f, a...), "component", "go-control-plane") },
		ErrorFunc: func(f string, a ...any) { l.Error(fmt.Sprintf(f, a...), "component", "go-control-plane") },
	}
}
