package agent

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/sluice-io/sluice/agent/datapath"
	"github.com/sluice-io/sluice/policy"
	policyclient "github.com/sluice-io/sluice/policy/client/clientset/versioned/typed/policy/v1alpha1"
	"github.com/sluice-io/sluice/xds"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/client-go/tools/record"
)

// Config is everything `sluice agent` is told.
type Config struct {
	// AttachCgroup is where the programs attach: the cgroup v2 root on a
	// node (every pod is below it).
	AttachCgroup string
	// AttachScope is where the programs attach (datapath.Scope): node
	// attaches them all to AttachCgroup; workloads attaches the client
	// programs to each selected workload's cgroup and the proxy's to
	// ProxyCgroup, so that unselected cgroups run none.
	AttachScope datapath.Scope
	// ProxyCgroup is the proxy's cgroup v2 directory (AttachScope
	// workloads).
	ProxyCgroup string
	// ProxyPodUID, with AttachScope workloads and no ProxyCgroup, is the
	// uid of the pod the agent and its proxy run in (the DaemonSet's,
	// from the downward API): the proxy cgroup is that pod's cgroup,
	// found through CgroupLayout. Unused in the node scope.
	ProxyPodUID string
	PinPath     string
	Proxy       xds.Proxy
	// ProxyAdmin is Envoy's admin address whose /ready drives the
	// datapath's proxy-ready flag; empty: the proxy is taken as ready.
	ProxyAdmin string
	// Exclude are destinations never redirected, beside loopback and
	// link-local (e.g. the pod and service CIDRs).
	Exclude []netip.Prefix
	// ExcludeNodeAddresses adds the node's own addresses (taken at start)
	// to Exclude: connections to the kubelet and node-local services go
	// direct.
	ExcludeNodeAddresses bool
	ExcludePorts         []uint16
	// Metadata are the cloud metadata-service addresses: never redirected;
	// audit-mode workloads reach them directly (counted), enforce-mode
	// workloads only where an allow entry names the address. nil: none.
	Metadata []netip.Addr
	// DNSResolvers: comma-separated resolvers (ParseResolvers), or
	// ResolvConf. Selected workloads reach them directly; they are the only
	// non-TCP destinations of enforce-mode workloads.
	DNSResolvers string
	// ProxyTimeouts are served to Envoy (idle timeouts).
	ProxyTimeouts Timeouts
	// Names configures the resolver of TCP-hostname rules: its Resolvers
	// are DNSResolvers'; zero TTLs and caps take the defaults, a zero
	// Grace is none (`sluice agent` defaults it to DefaultNameGrace).
	Names NameConfig
	// ReadinessLease: the proxy-ready flag lapses unless the agent renews it
	// within this time (a node whose agent and proxy are gone falls back to
	// each workload's fail mode); zero: no lease.
	ReadinessLease time.Duration
	// InFlightMapSize: capacity of the in-flight map (pending_tuples) when the datapath is
	// installed (datapath.Config.InFlightEntries); zero: the default.
	InFlightMapSize int
	// AllowDowngrade adopts pins of a newer layout (datapath.Config).
	AllowDowngrade bool
	// ProxyTakeoverPort is a second proxy port: an agent that starts while
	// the pinned datapath sends connections to Proxy.Port serves its proxy
	// on this one (and the reverse), and switches the datapath to it once
	// its proxy is ready; an update then never stops the previous proxy
	// before the next serves. Zero: one port.
	ProxyTakeoverPort uint16
	XDSSocket         string
	// XDSSocketMode: the socket's permission bits; zero: owner only. 0660
	// lets a group (the DaemonSet's fsGroup) in, for an Envoy that does not
	// run as the agent's user.
	XDSSocketMode fs.FileMode
	XDSTCP        string
	// Source is "file" or "kubernetes".
	Source string
	// WorkloadsFile is the file source's path.
	WorkloadsFile string
	CgroupMount   string
	// Kubernetes source: the client (NewKubeAPI), this node, the pod
	// selector, and where the kubelet puts pod cgroups.
	KubeClient   KubeAPI
	NodeName     string
	Selector     string
	CgroupLayout PodCgroupLayout
	// PolicyObjects: follow EgressPolicy and ClusterEgressPolicy through
	// PolicyClient (the CRDs must be installed).
	PolicyObjects bool
	PolicyClient  policyclient.PolicyV1alpha1Interface
	// IgnoreAllowAnnotations drops pods' allow annotation (policy.Options).
	IgnoreAllowAnnotations bool
	// ExemptNamespaces are never selected: the agent's own.
	ExemptNamespaces []string
	// StatusLease is NAMESPACE/NAME of the Lease whose holder writes the
	// policy objects' status; "": none.
	StatusLease string
	// FlowLog is where the flow log goes (JSON lines of the datapath's
	// decisions that do not reach the proxy): "-" stdout, "" nowhere, else
	// a file rotated at FlowLogMaxBytes.
	FlowLog         string
	FlowLogMaxBytes int64
	// MetricsAddr serves /metrics, /healthz and /readyz; empty: off.
	MetricsAddr string
	// HealthSocket serves /healthz and /readyz on a unix socket, for
	// probes that must reach this agent and no other: two agents of a
	// hostNetwork DaemonSet share the node's ports during an update
	// (`sluice health` asks it). Empty: none.
	HealthSocket string
	// StateFile is where `sluice status` finds workload names and the
	// control plane's state while the agent runs and after it stopped.
	StateFile string
	Logger    *slog.Logger
	// Ready, if set, is called once the agent serves (tests, the demo).
	Ready func()
}

// Run is the agent: it installs or adopts the pinned datapath, serves xDS,
// follows the workload source and the proxy's health, until ctx is done.
// On return the datapath stays pinned and attached: connections keep
// being redirected, and a restarted agent picks up where this one left.
//
// While another agent holds the node lock (a DaemonSet update's previous
// pod), this one stands by: it follows the same workloads and serves its
// own proxy a full configuration, on the takeover port, but programs
// nothing. Once the lock is its own it adopts the pins and, when the
// previous proxy still serves the node on the other port, keeps the
// datapath pointing there until its own proxy is ready, then switches it:
// no connection goes to a port nobody listens on.
func Run(ctx context.Context, cfg Config) error {
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	if cfg.Source == "kubernetes" && cfg.KubeClient == nil {
		return errors.New("kubernetes source: no API client")
	}
	if cfg.Source != "kubernetes" && cfg.Source != "file" && cfg.Source != "" {
		return fmt.Errorf("workload source %q: want file or kubernetes", cfg.Source)
	}
	if err := datapath.CheckKernel(); err != nil {
		return err
	}
	if err := resolveCgroupDirs(&cfg, log); err != nil {
		return err
	}
	if cfg.ProxyCgroup != "" && !filepath.IsAbs(cfg.ProxyCgroup) {
		cfg.ProxyCgroup = filepath.Join(cfg.CgroupMount, cfg.ProxyCgroup)
	}
	if cfg.AttachScope == datapath.ScopeWorkloads && cfg.ProxyCgroup == "" && cfg.ProxyPodUID != "" {
		cg, err := cfg.CgroupLayout.FindPodCgroup(cfg.ProxyPodUID)
		if err != nil {
			return fmt.Errorf("the proxy's cgroup (this agent's pod): %w", err)
		}
		if b, err := os.ReadFile("/proc/self/cgroup"); err == nil {
			if err := checkOwnCgroup(cg, cfg.CgroupLayout.Mount, string(b)); err != nil {
				return err
			}
		}
		log.Info("the proxy's cgroup is this agent's pod's", "pod_uid", cfg.ProxyPodUID, "proxy_cgroup", cg)
		cfg.ProxyCgroup = cg
	}
	if err := datapath.EnsureBPFFS(filepath.Dir(cfg.PinPath)); err != nil {
		return err
	}
	dns, err := resolvers(cfg.DNSResolvers)
	if err != nil {
		return err
	}
	health := &healthState{}
	if cfg.HealthSocket != "" {
		srv, err := serveHealth(cfg.HealthSocket, health)
		if err != nil {
			return err
		}
		defer srv.Close()
	}
	pinnedPort := pinnedProxyPort(cfg.PinPath)
	cfg.Proxy.Port = chooseProxyPort(cfg, pinnedPort, log)

	xs, err := xds.NewServer(xds.ServerConfig{SocketPath: cfg.XDSSocket, SocketMode: cfg.XDSSocketMode, TCPAddr: cfg.XDSTCP, Logger: log})
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(cfg.XDSSocket), 0o755); err != nil {
		return fmt.Errorf("xds socket directory: %w", err)
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	errc := make(chan error, 8)
	go func() { errc <- xs.Serve(ctx) }()
	// ACKs go to whichever control plane runs (the standby's, then ours).
	var current atomic.Pointer[Reconciler]
	xs.OnACK(func(typeURL, _ string) {
		if r := current.Load(); r != nil && typeURL == resource.ListenerType {
			r.ProxyAccepted()
		}
	})

	// One agent programs a node's pins at a time.
	lock, err := datapath.TryLockNode(cfg.PinPath)
	if err != nil {
		return err
	}
	if lock == nil {
		health.waiting.Store(true)
		log.Warn("another agent on this node holds the node lock (an update's previous agent, or a stuck one): standing by, serving the proxy a full configuration and programming nothing until it exits",
			"lock", datapath.LockPath(cfg.PinPath), "proxy_port", cfg.Proxy.Port)
		sctx, scancel := context.WithCancel(ctx)
		sdone := make(chan struct{})
		go func() {
			defer close(sdone)
			if err := standby(sctx, cfg, xs, &current, health, dns, log); err != nil && sctx.Err() == nil {
				log.Error("standby control plane stopped", "error", err)
			}
		}()
		lock, err = datapath.LockNode(ctx, cfg.PinPath, func(waited time.Duration) {
			if waited > 0 {
				log.Warn("still waiting for the node lock", "lock", datapath.LockPath(cfg.PinPath), "waited", waited.Round(time.Second).String())
			}
		})
		scancel()
		<-sdone
		current.Store(nil)
		if err != nil {
			if ctx.Err() != nil {
				log.Info("stopped while waiting for the node lock")
				return nil
			}
			return err
		}
		health.waiting.Store(false)
		log.Info("took the node lock: taking over the node", "lock", datapath.LockPath(cfg.PinPath))
	}
	defer lock.Unlock()
	health.locked.Store(true)

	dp, err := datapath.Open(datapath.Config{Scope: cfg.AttachScope, CgroupPath: cfg.AttachCgroup, ProxyCgroupPath: cfg.ProxyCgroup, PinPath: cfg.PinPath, InFlightEntries: cfg.InFlightMapSize, AllowDowngrade: cfg.AllowDowngrade})
	if err != nil {
		return err
	}
	defer dp.Close()
	switch from := dp.AdoptedLayout(); {
	case from == 0:
		log.Info("installed the datapath", "layout", datapath.LayoutVersion, "pins", cfg.PinPath)
	case from < datapath.LayoutVersion:
		log.Info("upgraded the pinned datapath in place", "from_layout", from, "layout", datapath.LayoutVersion, "pins", cfg.PinPath)
	case from > datapath.LayoutVersion:
		log.Warn("downgraded the pinned datapath (--allow-downgrade): the newer layout's extra maps stay pinned, unused", "from_layout", from, "layout", datapath.LayoutVersion, "pins", cfg.PinPath)
	default:
		log.Info("adopted the pinned datapath", "layout", datapath.LayoutVersion, "pins", cfg.PinPath)
	}
	if want := cmp.Or(cfg.InFlightMapSize, datapath.DefaultInFlightEntries); dp.InFlightCapacity() != want {
		log.Warn("the pinned datapath keeps its in-flight map size; the new size applies after 'sluice uninstall' (open connections would lose their original destinations)",
			"in_effect", dp.InFlightCapacity(), "asked", want)
	}
	// Taking over from a proxy that still serves the node on the other
	// port: the datapath keeps pointing at it until ours is ready.
	var tk *takeover
	if st, err := dp.ProxyState(); err == nil && st.Effective && st.Port != 0 && st.Port != cfg.Proxy.Port {
		tk = &takeover{from: st.Port}
		log.Info("the previous proxy still serves the node: the datapath keeps sending connections to it until this agent's proxy is ready",
			"previous_port", st.Port, "proxy_port", cfg.Proxy.Port)
	} else if err := dp.SetProxy(datapath.Proxy{IPv4: cfg.Proxy.IPv4, IPv6: cfg.Proxy.IPv6, Port: cfg.Proxy.Port}); err != nil {
		return err
	}
	ifname, added, err := datapath.ProxyAddrs{}.Ensure(cfg.Proxy.Addrs()...)
	if err != nil {
		return err
	}
	if err := dp.MarkAdded(added); err != nil {
		return err
	}
	watch := newNodeWatch(cfg, dp, log)
	nodeLocal, exclude, err := watch.apply(true)
	if err != nil {
		return err
	}
	if err := dp.SetExcludedPorts(cfg.ExcludePorts); err != nil {
		return err
	}
	if err := dp.SetResolvers(dns); err != nil {
		return err
	}
	if len(dns) == 0 {
		log.Warn("no DNS resolvers: enforce-mode pods can reach no DNS server, and the proxy resolves hostname entries with the nameservers of its own resolv.conf",
			"dns_resolvers", cfg.DNSResolvers)
	}
	log.Info("datapath ready", "exclusions", exclude, "node_local", nodeLocal.Prefixes(), "metadata", nodeLocal.MetadataAddrs(), "dns_resolvers", dns, "pins", cfg.PinPath, "attach_scope", cfg.AttachScope.String(), "cgroup", cfg.AttachCgroup, "proxy_cgroup", cfg.ProxyCgroup, "proxy", cfg.Proxy.Addrs(), "port", cfg.Proxy.Port, "interface", ifname)

	reg := prometheus.NewRegistry()
	m := NewMetrics(reg)
	pl, err := startPlane(ctx, planeConfig{cfg: cfg, dp: dp, xds: xs, watch: watch, nodeLocal: nodeLocal, dns: dns, metrics: m, events: true, status: true, hold: tk != nil, log: log}, errc)
	if err != nil {
		return err
	}
	current.Store(pl.rec)
	RegisterCollector(reg, dp, pl.rec, xs, pl.names)
	health.synced, health.takeover = pl.synced, tk

	go probeProxy(ctx, proxyProbe{admin: cfg.ProxyAdmin, lease: cfg.ReadinessLease, dp: dp, m: m, log: log, takeover: tk,
		proxy: cfg.Proxy, rec: pl.rec, xds: xs}, health)
	go writeState(ctx, cfg.StateFile, cfg.Proxy.Port, pl.rec, xs, pl.names, log)
	flowOut, closeFlows, err := openFlowLog(cfg.FlowLog, cfg.FlowLogMaxBytes)
	if err != nil {
		return err
	}
	defer closeFlows()
	if flowOut != nil {
		go runFlowLog(ctx, dp, pl.rec.NameOf, flowOut, log)
	}

	if cfg.MetricsAddr != "" {
		srv, err := serveHTTP(ctx, cfg.MetricsAddr, reg, health, log)
		if err != nil {
			return err
		}
		defer srv.Close()
		log.Info("metrics and health", "address", cfg.MetricsAddr)
	}
	// Ready means serving: the ADS socket accepts Envoy.
	select {
	case <-xs.Listening():
	case err := <-errc:
		return err
	}
	if cfg.Ready != nil {
		cfg.Ready()
	}
	select {
	case <-ctx.Done():
		log.Info("stopping; the datapath stays pinned and keeps redirecting")
		return nil
	case err := <-errc:
		if err == nil && ctx.Err() != nil {
			return nil
		}
		return err
	}
}

func newNodeWatch(cfg Config, dp *datapath.Datapath, log *slog.Logger) *nodeWatch {
	return &nodeWatch{dp: dp, log: log, proxy: cfg.Proxy, metadata: cfg.Metadata, excludeNode: cfg.ExcludeNodeAddresses,
		exclude: append(append([]netip.Prefix{}, datapath.DefaultExclusions...), cfg.Exclude...)}
}

// pinnedProxyPort is the proxy port the pinned datapath sends connections
// to (0: none, or no pins).
func pinnedProxyPort(pinPath string) uint16 {
	d, err := datapath.OpenPinned(pinPath)
	if err != nil {
		return 0
	}
	defer d.Close()
	st, err := d.ProxyState()
	if err != nil {
		return 0
	}
	return st.Port
}

// chooseProxyPort is the port this agent's proxy listens on. With a
// takeover port, the agent keeps the port its pod's proxy already has
// (the state file a previous agent of this pod left: an agent restart
// never moves a running proxy), and otherwise takes the one of the two
// the pinned datapath does not send connections to, so that it can come
// up beside the previous pod's proxy.
func chooseProxyPort(cfg Config, pinned uint16, log *slog.Logger) uint16 {
	main, alt := cfg.Proxy.Port, cfg.ProxyTakeoverPort
	if alt == 0 || alt == main {
		return main
	}
	if st, err := ReadState(cfg.StateFile); err == nil && (st.ProxyPort == main || st.ProxyPort == alt) {
		return st.ProxyPort
	}
	if pinned == main {
		log.Info("the pinned datapath sends connections to the proxy port; this agent's proxy takes the other", "pinned_port", pinned, "proxy_port", alt)
		return alt
	}
	return main
}

// takeover is a switch of the datapath from the previous agent's proxy
// (from) to this agent's, pending until this agent's proxy is ready and has
// accepted this agent's configuration.
type takeover struct {
	from uint16
	done atomic.Bool
}

// planeConfig says what one control plane (standby or active) drives.
type planeConfig struct {
	cfg       Config
	dp        Datapath // the pinned datapath, or a standby's memory
	xds       *xds.Server
	watch     *nodeWatch
	nodeLocal policy.NodeLocal
	dns       []netip.AddrPort
	metrics   *Metrics
	events    bool // report workload problems as Kubernetes Events
	status    bool // write the policy objects' status
	hold      bool // workloads keep waiting for the proxy until Release
	log       *slog.Logger
}

// plane is a running control plane: the workload source feeding the
// reconciler, the hostname resolver and the node address watch.
type plane struct {
	rec    *Reconciler
	names  *Names
	synced *atomic.Bool
}

// startPlane starts the workload source, the reconciler and its xDS
// pushes, the name resolver and the node watch, until ctx ends; a source
// that fails sends its error to errc.
func startPlane(ctx context.Context, pc planeConfig, errc chan<- error) (*plane, error) {
	cfg, log := pc.cfg, pc.log
	events := &logReporter{log: log}
	var kube *KubeSource
	if cfg.Source == "kubernetes" {
		kube = &KubeSource{
			Client: cfg.KubeClient, NodeName: cfg.NodeName, Selector: cfg.Selector, Layout: cfg.CgroupLayout,
			IgnoreAnnotations: cfg.IgnoreAllowAnnotations, ExemptNamespaces: cfg.ExemptNamespaces,
			HostNetworkIPs: cfg.Proxy.Addrs(), Logger: log, Metrics: pc.metrics,
		}
		if pc.events {
			broadcaster := record.NewBroadcaster()
			broadcaster.StartRecordingToSink(cfg.KubeClient.Events())
			go func() { <-ctx.Done(); broadcaster.Shutdown() }()
			kube.Recorder = broadcaster.NewRecorder(KubeScheme, corev1.EventSource{Component: "sluice", Host: cfg.NodeName})
			events.next = kube
		}
		if cfg.PolicyObjects && cfg.PolicyClient != nil {
			kube.Policies = cfg.PolicyClient
			if ns, name, ok := strings.Cut(cfg.StatusLease, "/"); ok && pc.status {
				kube.Status = &StatusWriter{Kube: cfg.KubeClient, Policies: cfg.PolicyClient, Namespace: ns, Name: name, Identity: cfg.NodeName, Logger: log}
			}
		}
	}
	var rec *Reconciler
	ncfg := cfg.Names
	ncfg.Resolvers, ncfg.Logger = pc.dns, log
	ncfg.Refuse = func(a netip.Addr) bool { return rec.Refuse(a) }
	ncfg.OnChange = func() { rec.NameChanged() }
	names := NewNames(ncfg)
	rec, err := NewReconciler(ReconcilerConfig{Datapath: pc.dp, XDS: pc.xds, Proxy: cfg.Proxy, NodeLocal: pc.nodeLocal, DNSResolvers: pc.dns, Names: names, Timeouts: cfg.ProxyTimeouts, Reporter: events, Logger: log, Metrics: pc.metrics, Hold: pc.hold})
	if err != nil {
		return nil, err
	}
	pc.watch.rec = rec
	if pc.metrics != nil {
		events.policyErrors = pc.metrics.PolicyErrors
	}

	go pc.watch.run(ctx, 30*time.Second)
	go names.Run(ctx)
	// No configuration until the sources have delivered their first full
	// view (Sync): a listener built from a partial view would close the
	// connections of every workload not yet seen. Until then a connecting
	// Envoy waits in its initial fetch, is not ready, and each workload
	// gets its fail mode; across an agent restart Envoy keeps the previous
	// agent's configuration.
	go rec.RunXDS(ctx, 100*time.Millisecond)

	synced := &atomic.Bool{}
	markSynced := func() {
		if err := rec.Sync(); err != nil {
			log.Error("remove stale workloads", "error", err)
		}
		synced.Store(true)
	}
	if kube != nil {
		go func() {
			if err := kube.Run(ctx, rec, markSynced); err != nil && ctx.Err() == nil {
				errc <- err
			}
		}()
	} else {
		src := FileSource{Path: cfg.WorkloadsFile, CgroupMount: cfg.CgroupMount}
		go func() {
			err := src.Run(ctx, func(ws []Workload) {
				if err := rec.Replace(ws); err != nil {
					log.Error("workloads not all applied; they keep their previous state", "error", err)
				}
				if !synced.Load() {
					markSynced()
				}
			}, func(err error) {
				pc.metrics.SourceError("file")
				log.Error("workloads file not applied; the last good version stays", "error", err)
			})
			if err != nil && ctx.Err() == nil {
				errc <- err
			}
		}()
	}
	return &plane{rec: rec, names: names, synced: synced}, nil
}

// standby runs while another agent holds the node lock: the same
// workloads, the same xDS configuration for this agent's own proxy (on its
// own port), nothing written to the pins, no Events or policy status (the
// lock holder's job). Readiness says standby once the proxy is ready with
// a full configuration, so that a surge update can go on and stop the
// previous pod, whose exit hands the lock over.
func standby(ctx context.Context, cfg Config, xs *xds.Server, current *atomic.Pointer[Reconciler], health *healthState, dns []netip.AddrPort, log *slog.Logger) error {
	log = log.With("phase", "standby")
	mem := newMemDatapath(cfg.PinPath)
	watch := newNodeWatch(cfg, nil, log)
	nodeLocal, _, err := watch.apply(true)
	if err != nil {
		return err
	}
	errc := make(chan error, 2)
	pl, err := startPlane(ctx, planeConfig{cfg: cfg, dp: mem, xds: xs, watch: watch, nodeLocal: nodeLocal, dns: dns, log: log}, errc)
	if err != nil {
		return err
	}
	current.Store(pl.rec)
	client := proxyClient(cfg.ProxyAdmin)
	t := time.NewTicker(probeInterval)
	defer t.Stop()
	for {
		live := true
		if cfg.ProxyAdmin != "" {
			live, _ = probe(ctx, client, adminURL(cfg.ProxyAdmin))
		}
		v := pl.rec.Pushed()
		ready := pl.synced.Load() && live && v != "" && xs.AckedAtLeast(resource.ListenerType, v)
		if health.standbyReady.Swap(ready) != ready {
			log.Info("standby readiness changed", "ready", ready, "listener_version", v, "proxy_live", live)
		}
		select {
		case <-ctx.Done():
			health.standbyReady.Store(false)
			return nil
		case err := <-errc:
			return err
		case <-t.C:
		}
	}
}

// memDatapath is a standby's datapath: it starts from the pinned workloads
// (so counter ids are adopted as the active agent will) and keeps every
// change in memory.
type memDatapath struct {
	mu sync.Mutex
	ws map[uint64]datapath.Workload
}

func newMemDatapath(pinPath string) *memDatapath {
	m := &memDatapath{ws: map[uint64]datapath.Workload{}}
	if d, err := datapath.OpenPinned(pinPath); err == nil {
		if ws, err := d.Workloads(); err == nil {
			m.ws = ws
		}
		d.Close()
	}
	return m
}

func (m *memDatapath) SetWorkload(cg uint64, w datapath.Workload) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.ws[cg] = w
	return nil
}

func (m *memDatapath) DeleteWorkload(cg uint64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	delete(m.ws, cg)
	return nil
}

func (m *memDatapath) Workloads() (map[uint64]datapath.Workload, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return maps.Clone(m.ws), nil
}

// checkOwnCgroup makes sure this process runs in podCgroup (below mount),
// where its /proc/self/cgroup tells: in a cgroup namespace (the default of
// container runtimes on cgroup v2 hosts) that names the namespace's root,
// "/", and tells nothing.
func checkOwnCgroup(podCgroup, mount, procSelfCgroup string) error {
	for _, line := range strings.Split(procSelfCgroup, "\n") {
		own, ok := strings.CutPrefix(line, "0::")
		if !ok || own == "/" || strings.HasPrefix(own, "/..") {
			continue // a cgroup namespace's root, or outside it: says nothing
		}
		if p := filepath.Join(mount, own); !strings.HasPrefix(p+"/", strings.TrimSuffix(podCgroup, "/")+"/") {
			return fmt.Errorf("the proxy's cgroup: this agent runs in cgroup %s, not in its pod's cgroup %s: check --cgroup-driver, --kubelet-cgroup-root and --proxy-pod-uid", p, podCgroup)
		}
	}
	return nil
}

// resolveCgroupDirs points the cgroup mount (and the attach cgroup and pod
// layout, where they are the mount) at the cgroup v2 hierarchy: on a hybrid
// host, given /sys/fs/cgroup, that is /sys/fs/cgroup/unified.
func resolveCgroupDirs(cfg *Config, log *slog.Logger) error {
	for _, p := range []*string{&cfg.CgroupMount, &cfg.AttachCgroup, &cfg.CgroupLayout.Mount} {
		if *p == "" || datapath.IsCgroup2(*p) {
			continue
		}
		r, err := datapath.ResolveCgroup2(*p)
		if err != nil {
			return err
		}
		log.Info("hybrid cgroup host: using the cgroup v2 hierarchy", "given", *p, "using", r)
		*p = r
	}
	return nil
}

// logReporter counts workload problems (the reconciler logs them) and
// hands them on: the Kubernetes source turns them into Events.
type logReporter struct {
	log          *slog.Logger
	policyErrors prometheus.Counter
	next         Reporter
}

func (l *logReporter) Warn(key, reason, msg string) {
	if reason == "PolicyError" && l.policyErrors != nil {
		l.policyErrors.Inc()
	}
	if l.next != nil {
		l.next.Warn(key, reason, msg)
	}
}

// probeInterval is how often the agent asks Envoy's /ready; three failures
// in a row make the proxy not ready.
const probeInterval = time.Second

// proxyProbe is what probeProxy drives.
type proxyProbe struct {
	admin string
	lease time.Duration
	dp    *datapath.Datapath
	m     *Metrics
	log   *slog.Logger
	// takeover, if set, is pending: the datapath points at the previous
	// proxy until this agent's is ready and has accepted a listener of
	// this agent's (rec's last push, on xds).
	takeover *takeover
	proxy    xds.Proxy
	rec      *Reconciler
	xds      *xds.Server
}

// probeProxy drives the datapath's proxy-ready flag from Envoy's /ready:
// ready on the first LIVE answer, not ready after three failed probes in a
// row (about three seconds), so one slow answer does not flap it. While
// ready, every successful probe renews the readiness lease. A pending
// takeover is completed on the first probe that finds this agent's proxy
// LIVE with this agent's listener accepted; before, the datapath is left
// as the previous agent set it.
func probeProxy(ctx context.Context, pp proxyProbe, health *healthState) {
	dp, m, log := pp.dp, pp.m, pp.log
	set := func(ready bool, why string) {
		if t := pp.takeover; t != nil && !t.done.Load() {
			v := pp.rec.Pushed()
			if !ready || v == "" || !pp.xds.AckedAtLeast(resource.ListenerType, v) {
				return
			}
			if err := dp.SetProxy(datapath.Proxy{IPv4: pp.proxy.IPv4, IPv6: pp.proxy.IPv6, Port: pp.proxy.Port}); err != nil {
				log.Error("switch the datapath to this agent's proxy", "error", err)
				return
			}
			t.done.Store(true)
			pp.rec.Release()
			log.Info("took over: the datapath sends connections to this agent's proxy", "previous_port", t.from, "proxy_port", pp.proxy.Port, "listener_version", v)
		}
		st, err := dp.ProxyState()
		was := err == nil && st.Effective
		if ready {
			err = dp.RenewReady(pp.lease)
		} else if err != nil || st.Ready {
			err = dp.SetReady(false)
		}
		if err != nil {
			log.Error("set proxy ready", "ready", ready, "error", err)
			return
		}
		health.proxyReady.Store(ready)
		m.ProxyReady.Set(b2f(ready))
		if was != ready {
			m.ProxyTransitions.Inc()
			log.Info("proxy readiness changed", "ready", ready, "why", why)
		}
	}
	if pp.admin == "" {
		// Nothing to probe: ready, and the lease is renewed as if probed.
		for {
			set(true, "no proxy admin address to probe")
			if pp.lease == 0 && (pp.takeover == nil || pp.takeover.done.Load()) {
				return
			}
			select {
			case <-ctx.Done():
				return
			case <-time.After(probeInterval):
			}
		}
	}
	client := proxyClient(pp.admin)
	url := adminURL(pp.admin)
	failures := 0
	t := time.NewTicker(probeInterval)
	defer t.Stop()
	for {
		ok, why := probe(ctx, client, url)
		if ok {
			failures = 0
			set(true, why)
		} else if failures++; failures >= 3 {
			set(false, why)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// proxyClient talks to Envoy's admin at admin: host:port, or unix:PATH (a
// socket in the pod, which no other pod on the node shares).
func proxyClient(admin string) *http.Client {
	c := &http.Client{Timeout: time.Second}
	if path, ok := strings.CutPrefix(admin, "unix:"); ok {
		c.Transport = &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", path)
		}}
	}
	return c
}

func adminURL(admin string) string {
	if strings.HasPrefix(admin, "unix:") {
		return "http://envoy-admin/ready"
	}
	return "http://" + admin + "/ready"
}

func probe(ctx context.Context, c *http.Client, url string) (bool, string) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return false, err.Error()
	}
	resp, err := c.Do(req)
	if err != nil {
		return false, err.Error()
	}
	defer resp.Body.Close()
	var buf [64]byte
	n, _ := resp.Body.Read(buf[:])
	body := strings.TrimSpace(string(buf[:n]))
	if resp.StatusCode == http.StatusOK && body == "LIVE" {
		return true, url + ": LIVE"
	}
	return false, fmt.Sprintf("%s: %d %q", url, resp.StatusCode, body)
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// State is what the agent leaves for `sluice status`: names of the
// workloads behind the pinned counter ids, and the control plane's state.
type State struct {
	Updated time.Time `json:"updated"`
	PID     int       `json:"pid"`
	// ProxyPort is the port this agent serves its proxy listeners on: a
	// restarted agent of the same pod keeps it (chooseProxyPort).
	ProxyPort uint16            `json:"proxy_port,omitempty"`
	Workloads map[uint32]string `json:"workloads"`
	// Policies are the workloads' effective policies and their sources.
	Policies map[uint32]WorkloadPolicy `json:"policies,omitempty"`
	XDS      xds.Status                `json:"xds"`
	// Names are the TCP-hostname rules' names and the addresses they
	// allow now.
	Names map[string]NameStatus `json:"names,omitempty"`
}

func writeState(ctx context.Context, path string, port uint16, r *Reconciler, x *xds.Server, names *Names, log *slog.Logger) {
	if path == "" {
		return
	}
	// Every 2 s (the control plane's counters move on their own), and at
	// once when the selection changes, so status names new workloads.
	t := time.NewTicker(2 * time.Second)
	defer t.Stop()
	for {
		st := State{Updated: time.Now().UTC(), PID: os.Getpid(), ProxyPort: port, Workloads: r.Names(), Policies: r.Policies(), XDS: x.Status(), Names: names.Status()}
		if err := writeJSONAtomic(path, st); err != nil {
			log.Warn("write state file", "path", path, "error", err)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-r.Changed():
		}
	}
}

func writeJSONAtomic(path string, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	tmp := path + ".tmp"
	// Owner only: it names every workload of the node.
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// ReadState reads the agent's state file.
func ReadState(path string) (State, error) {
	var st State
	b, err := os.ReadFile(path)
	if err != nil {
		return st, err
	}
	return st, json.Unmarshal(b, &st)
}

// healthState is what /healthz and /readyz answer from.
type healthState struct {
	waiting      atomic.Bool // another agent holds the node lock: standby
	standbyReady atomic.Bool // standby with its proxy ready and configured
	locked       atomic.Bool // this agent holds the lock
	synced       *atomic.Bool
	proxyReady   atomic.Bool // this agent's proxy answers ready
	takeover     *takeover
}

// ready says whether the agent is ready, and why (not).
//
// A standby whose proxy is ready with a full configuration is ready: a
// surge update replaces the previous pod only once the new one is ready,
// and the previous agent's exit is what hands the node lock over. Its
// answer says it is a standby.
func (h *healthState) ready() (bool, string) {
	switch {
	case !h.locked.Load() && h.waiting.Load() && h.standbyReady.Load():
		return true, "standby: another agent on this node holds the node lock; this agent's proxy is ready to take over when it exits"
	case !h.locked.Load() && h.waiting.Load():
		return false, "standby: another agent on this node holds the node lock; this agent's proxy is not ready with a full configuration yet"
	case !h.locked.Load():
		return false, "taking the node lock"
	case h.synced == nil || !h.synced.Load():
		return false, "workloads not synced yet"
	case h.takeover != nil && !h.takeover.done.Load():
		return false, "taking over: the datapath sends connections to the previous proxy until this agent's is ready"
	case !h.proxyReady.Load():
		return false, "the proxy is not ready"
	}
	return true, "ok"
}

func healthHandlers(mux *http.ServeMux, h *healthState) {
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		ok, why := h.ready()
		if !ok {
			http.Error(w, why, http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, why)
	})
}

// serveHealth serves /healthz and /readyz on a unix socket (owner only).
func serveHealth(path string, h *healthState) (*http.Server, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("health socket directory: %w", err)
	}
	os.Remove(path) // a previous agent's, in this pod
	l, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("health socket: %w", err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		l.Close()
		return nil, fmt.Errorf("health socket: %w", err)
	}
	mux := http.NewServeMux()
	healthHandlers(mux, h)
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go srv.Serve(l)
	return srv, nil
}

// serveHTTP serves /metrics, /healthz (the agent is running) and /readyz
// (it holds the node lock, and its sources have delivered a full view and
// it has programmed it).
func serveHTTP(ctx context.Context, addr string, reg *prometheus.Registry, h *healthState, log *slog.Logger) (*http.Server, error) {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg}))
	healthHandlers(mux, h)
	// The node lock's previous holder may still be closing its port (two
	// agents of a hostNetwork DaemonSet share the node's): a few tries.
	var l net.Listener
	var err error
	for try := 0; ; try++ {
		if l, err = net.Listen("tcp", addr); err == nil || !errors.Is(err, syscall.EADDRINUSE) || try == 20 {
			break
		}
		if try == 0 {
			log.Warn("metrics address in use; retrying for 10s (the previous agent may still be stopping)", "address", addr)
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(500 * time.Millisecond):
		}
	}
	if err != nil {
		return nil, fmt.Errorf("metrics: listen %s: %w", addr, err)
	}
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
			slog.Error("metrics server", "error", err)
		}
	}()
	return srv, nil
}
