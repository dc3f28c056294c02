package agent

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"time"

	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/sluice-io/sluice/agent/datapath"
	"github.com/sluice-io/sluice/policy/client/clientset/versioned"
	"github.com/sluice-io/sluice/xds"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/tools/record"
)

// Config is everything `sluice agent` is told.
type Config struct {
	// AttachCgroup is where the programs attach: the cgroup v2 root on a
	// node (every pod is below it).
	AttachCgroup string
	PinPath      string
	Proxy        xds.Proxy
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
	// InFlightMapSize: capacity of each in-flight map when the datapath is
	// installed (datapath.Config.InFlightEntries); zero: the default.
	InFlightMapSize int
	// AllowDowngrade adopts pins of a newer layout (datapath.Config).
	AllowDowngrade bool
	XDSSocket      string
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
	// Kubernetes source: the client, this node, the pod selector, and where
	// the kubelet puts pod cgroups.
	KubeClient   kubernetes.Interface
	NodeName     string
	Selector     string
	CgroupLayout PodCgroupLayout
	// PolicyObjects: follow EgressPolicy and ClusterEgressPolicy through
	// PolicyClient (the CRDs must be installed).
	PolicyObjects bool
	PolicyClient  versioned.Interface
	// IgnoreAllowAnnotations drops pods' allow annotation (policy.Options).
	IgnoreAllowAnnotations bool
	// ExemptNamespaces are never selected: the agent's own.
	ExemptNamespaces []string
	// StatusLease is NAMESPACE/NAME of the Lease whose holder writes the
	// policy objects' status; "": none.
	StatusLease string
	// MetricsAddr serves /metrics, /healthz and /readyz; empty: off.
	MetricsAddr string
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
func Run(ctx context.Context, cfg Config) error {
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	if cfg.Source == "kubernetes" && cfg.KubeClient == nil {
		return errors.New("kubernetes source: no API client")
	}
	if err := datapath.CheckKernel(); err != nil {
		return err
	}
	if err := resolveCgroupDirs(&cfg, log); err != nil {
		return err
	}
	if err := datapath.EnsureBPFFS(filepath.Dir(cfg.PinPath)); err != nil {
		return err
	}
	dp, err := datapath.Open(datapath.Config{CgroupPath: cfg.AttachCgroup, PinPath: cfg.PinPath, InFlightEntries: cfg.InFlightMapSize, AllowDowngrade: cfg.AllowDowngrade})
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
	if err := dp.SetProxy(datapath.Proxy{IPv4: cfg.Proxy.IPv4, IPv6: cfg.Proxy.IPv6, Port: cfg.Proxy.Port}); err != nil {
		return err
	}
	ifname, added, err := datapath.ProxyAddrs{}.Ensure(cfg.Proxy.Addrs()...)
	if err != nil {
		return err
	}
	if err := dp.MarkAdded(added); err != nil {
		return err
	}
	watch := &nodeWatch{dp: dp, log: log, proxy: cfg.Proxy, metadata: cfg.Metadata, excludeNode: cfg.ExcludeNodeAddresses,
		exclude: append(append([]netip.Prefix{}, datapath.DefaultExclusions...), cfg.Exclude...)}
	nodeLocal, exclude, err := watch.apply(true)
	if err != nil {
		return err
	}
	if err := dp.SetExcludedPorts(cfg.ExcludePorts); err != nil {
		return err
	}
	dns, err := resolvers(cfg.DNSResolvers)
	if err != nil {
		return err
	}
	if err := dp.SetResolvers(dns); err != nil {
		return err
	}
	if len(dns) == 0 {
		log.Warn("no DNS resolvers: enforce-mode pods can reach no DNS server, and the proxy resolves hostname entries with the nameservers of its own resolv.conf",
			"dns_resolvers", cfg.DNSResolvers)
	}
	log.Info("datapath ready", "exclusions", exclude, "node_local", nodeLocal.Prefixes(), "metadata", nodeLocal.MetadataAddrs(), "dns_resolvers", dns, "pins", cfg.PinPath, "cgroup", cfg.AttachCgroup, "proxy", cfg.Proxy.Addrs(), "port", cfg.Proxy.Port, "interface", ifname)

	xs, err := xds.NewServer(xds.ServerConfig{SocketPath: cfg.XDSSocket, SocketMode: cfg.XDSSocketMode, TCPAddr: cfg.XDSTCP, Logger: log})
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(cfg.XDSSocket), 0o755); err != nil {
		return fmt.Errorf("xds socket directory: %w", err)
	}
	reg := prometheus.NewRegistry()
	events := &logReporter{log: log}
	var kube *KubeSource
	if cfg.Source == "kubernetes" {
		broadcaster := record.NewBroadcaster()
		broadcaster.StartRecordingToSink(&typedcorev1.EventSinkImpl{Interface: cfg.KubeClient.CoreV1().Events("")})
		defer broadcaster.Shutdown()
		kube = &KubeSource{
			Client: cfg.KubeClient, NodeName: cfg.NodeName, Selector: cfg.Selector, Layout: cfg.CgroupLayout,
			IgnoreAnnotations: cfg.IgnoreAllowAnnotations, ExemptNamespaces: cfg.ExemptNamespaces,
			HostNetworkIPs: cfg.Proxy.Addrs(), Logger: log,
			Recorder: broadcaster.NewRecorder(scheme.Scheme, corev1.EventSource{Component: "sluice", Host: cfg.NodeName}),
		}
		if cfg.PolicyObjects && cfg.PolicyClient != nil {
			kube.Policies = cfg.PolicyClient
			if ns, name, ok := strings.Cut(cfg.StatusLease, "/"); ok {
				kube.Status = &StatusWriter{Kube: cfg.KubeClient, Policies: cfg.PolicyClient, Namespace: ns, Name: name, Identity: cfg.NodeName, Logger: log}
			}
		}
		events.next = kube
	}
	var rec *Reconciler
	ncfg := cfg.Names
	ncfg.Resolvers, ncfg.Logger = dns, log
	ncfg.Refuse = func(a netip.Addr) bool { return rec.Refuse(a) }
	ncfg.OnChange = func() { rec.NameChanged() }
	names := NewNames(ncfg)
	m := NewMetrics(reg)
	rec, err = NewReconciler(ReconcilerConfig{Datapath: dp, XDS: xs, Proxy: cfg.Proxy, NodeLocal: nodeLocal, DNSResolvers: dns, Names: names, Timeouts: cfg.ProxyTimeouts, Reporter: events, Logger: log, Metrics: m})
	if err != nil {
		return err
	}
	watch.rec = rec
	xs.OnACK(func(typeURL, _ string) {
		if typeURL == resource.ListenerType {
			rec.ProxyAccepted()
		}
	})
	RegisterCollector(reg, dp, rec, xs, names)
	events.policyErrors = m.PolicyErrors
	if kube != nil {
		kube.Metrics = m
	}

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	errc := make(chan error, 4)
	go func() { errc <- xs.Serve(ctx) }()
	go watch.run(ctx, 30*time.Second)
	go names.Run(ctx)
	// No configuration until the sources have delivered their first full
	// view (Sync): a listener built from a partial view would close the
	// connections of every workload not yet seen. Until then a connecting
	// Envoy waits in its initial fetch, is not ready, and each workload
	// gets its fail mode; across an agent restart Envoy keeps the previous
	// agent's configuration.
	go rec.RunXDS(ctx, 100*time.Millisecond)

	var synced atomic.Bool
	markSynced := func() {
		if err := rec.Sync(); err != nil {
			log.Error("remove stale workloads", "error", err)
		}
		synced.Store(true)
	}
	switch cfg.Source {
	case "kubernetes":
		go func() { errc <- kube.Run(ctx, rec, markSynced) }()
	case "file", "":
		src := FileSource{Path: cfg.WorkloadsFile, CgroupMount: cfg.CgroupMount}
		go func() {
			errc <- src.Run(ctx, func(ws []Workload) {
				if err := rec.Replace(ws); err != nil {
					log.Error("workloads not all applied; they keep their previous state", "error", err)
				}
				if !synced.Load() {
					markSynced()
				}
			}, func(err error) {
				m.SourceError("file")
				log.Error("workloads file not applied; the last good version stays", "error", err)
			})
		}()
	default:
		return fmt.Errorf("workload source %q: want file or kubernetes", cfg.Source)
	}

	go probeProxy(ctx, cfg.ProxyAdmin, cfg.ReadinessLease, dp, m, log)
	go writeState(ctx, cfg.StateFile, rec, xs, names, log)

	if cfg.MetricsAddr != "" {
		srv, err := serveHTTP(cfg.MetricsAddr, reg, &synced)
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

// probeProxy drives the datapath's proxy-ready flag from Envoy's /ready:
// ready on the first LIVE answer, not ready after three failed probes in a
// row (about three seconds), so one slow answer does not flap it. While
// ready, every successful probe renews the readiness lease.
func probeProxy(ctx context.Context, admin string, lease time.Duration, dp *datapath.Datapath, m *Metrics, log *slog.Logger) {
	set := func(ready bool, why string) {
		st, err := dp.ProxyState()
		was := err == nil && st.Effective
		if ready {
			err = dp.RenewReady(lease)
		} else if err != nil || st.Ready {
			err = dp.SetReady(false)
		}
		if err != nil {
			log.Error("set proxy ready", "ready", ready, "error", err)
			return
		}
		m.ProxyReady.Set(b2f(ready))
		if was != ready {
			m.ProxyTransitions.Inc()
			log.Info("proxy readiness changed", "ready", ready, "why", why)
		}
	}
	if admin == "" {
		// Nothing to probe: ready, and the lease is renewed as if probed.
		for {
			set(true, "no proxy admin address to probe")
			if lease == 0 {
				return
			}
			select {
			case <-ctx.Done():
				return
			case <-time.After(probeInterval):
			}
		}
	}
	client := &http.Client{Timeout: time.Second}
	url := "http://" + admin + "/ready"
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
	Updated   time.Time         `json:"updated"`
	PID       int               `json:"pid"`
	Workloads map[uint32]string `json:"workloads"`
	// Policies are the workloads' effective policies and their sources.
	Policies map[uint32]WorkloadPolicy `json:"policies,omitempty"`
	XDS      xds.Status                `json:"xds"`
	// Names are the TCP-hostname rules' names and the addresses they
	// allow now.
	Names map[string]NameStatus `json:"names,omitempty"`
}

func writeState(ctx context.Context, path string, r *Reconciler, x *xds.Server, names *Names, log *slog.Logger) {
	if path == "" {
		return
	}
	// Every 2 s (the control plane's counters move on their own), and at
	// once when the selection changes, so status names new workloads.
	t := time.NewTicker(2 * time.Second)
	defer t.Stop()
	for {
		st := State{Updated: time.Now().UTC(), PID: os.Getpid(), Workloads: r.Names(), Policies: r.Policies(), XDS: x.Status(), Names: names.Status()}
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

// serveHTTP serves /metrics, /healthz (the agent is running) and /readyz
// (its sources have delivered a full view and it has programmed it).
func serveHTTP(addr string, reg *prometheus.Registry, synced *atomic.Bool) (*http.Server, error) {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg}))
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		if !synced.Load() {
			http.Error(w, "workloads not synced yet", http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	l, err := net.Listen("tcp", addr)
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
