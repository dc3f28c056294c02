package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	iofs "io/fs"
	"log/slog"
	"net/netip"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/sluice-io/sluice/agent"
	"github.com/sluice-io/sluice/agent/datapath"
	"github.com/sluice-io/sluice/policy"
	policyclient "github.com/sluice-io/sluice/policy/client/clientset/versioned/typed/policy/v1alpha1"
	"github.com/sluice-io/sluice/xds"
	"k8s.io/client-go/tools/clientcmd"
)

const defaultStateFile = "/run/sluice/state.json"

// addrFlag is an IP address flag where "" or "none" means no address.
type addrFlag struct{ a *netip.Addr }

func (f addrFlag) String() string {
	if f.a == nil || !f.a.IsValid() {
		return ""
	}
	return f.a.String()
}

func (f addrFlag) Set(s string) error {
	if s == "" || s == "none" {
		*f.a = netip.Addr{}
		return nil
	}
	a, err := netip.ParseAddr(s)
	if err != nil {
		return err
	}
	*f.a = a
	return nil
}

// defaultMetadata is --metadata-addresses' default, policy.DefaultMetadata.
func defaultMetadata() string {
	var s []string
	for _, a := range policy.DefaultMetadata {
		s = append(s, a.String())
	}
	return strings.Join(s, ",")
}

// listFlag is a comma-separated list.
type listFlag []string

func (l *listFlag) String() string { return strings.Join(*l, ",") }
func (l *listFlag) Set(s string) error {
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			*l = append(*l, p)
		}
	}
	return nil
}

func proxyFlags(fs *flag.FlagSet) *xds.Proxy {
	p := &xds.Proxy{IPv4: datapath.DefaultProxyIPv4, IPv6: datapath.DefaultProxyIPv6, Port: datapath.DefaultProxyPort}
	fs.Var(addrFlag{&p.IPv4}, "proxy-ipv4", `node-local IPv4 address Envoy listens on and IPv4 connections are redirected to; "none" for none`)
	fs.Var(addrFlag{&p.IPv6}, "proxy-ipv6", `node-local IPv6 address for IPv6 connections; "none" for none`)
	fs.Func("proxy-port", fmt.Sprintf("port Envoy listens on (default %d)", datapath.DefaultProxyPort), func(s string) error {
		n, err := strconv.ParseUint(s, 10, 16)
		if err != nil || n == 0 {
			return fmt.Errorf("want a port in 1-65535")
		}
		p.Port = uint16(n)
		return nil
	})
	return p
}

func runAgent(args []string, stdout, stderr io.Writer) error {
	cfg, kubeconfig, err := parseAgentFlags(args, stderr)
	if err != nil {
		return err
	}
	if cfg.Source == "kubernetes" {
		rc, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
		if err != nil {
			return fmt.Errorf("kubernetes client: %w", err)
		}
		rc.UserAgent = "sluice/" + version
		if cfg.KubeClient, err = agent.NewKubeAPI(rc); err != nil {
			return fmt.Errorf("kubernetes client: %w", err)
		}
		if cfg.PolicyObjects {
			if cfg.PolicyClient, err = policyclient.NewForConfig(rc); err != nil {
				return fmt.Errorf("policy API client: %w", err)
			}
		}
	}
	if os.Getenv("SLUICE_READY_LINE") != "" {
		// The testbed and the demo wait for this line on stdout.
		cfg.Ready = func() { fmt.Fprintln(stdout, "READY") }
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	return agent.Run(ctx, cfg)
}

// defaultStatusLease is --status-lease's default: in the agent's own
// namespace, from the downward API.
func defaultStatusLease() string {
	if ns := os.Getenv("POD_NAMESPACE"); ns != "" {
		return ns + "/sluice-policy-status"
	}
	return ""
}

// parseAgentFlags turns the agent's command line into its configuration,
// checking every value, without touching the system or the network (the
// DaemonSet test parses the shipped manifest's arguments with it).
func parseAgentFlags(args []string, stderr io.Writer) (agent.Config, string, error) {
	fs := newFlagSet("agent", `Run the node agent: install (or adopt) the pinned eBPF datapath, serve Envoy its
configuration over ADS, follow the workloads and Envoy's health. On SIGTERM the
control plane stops and the datapath stays pinned and redirecting; a restarted
agent picks up where it left off. Needs root or CAP_BPF, CAP_NET_ADMIN,
CAP_PERFMON (and CAP_SYS_RESOURCE before Linux 5.11).

Workloads come from the Kubernetes API (the default: pods on this node that the
opt-in selector, an EgressPolicy or a guardrail ClusterEgressPolicy selects,
each under its effective policy; see docs/policy.md) or, with --workloads-file,
from a YAML file (plain Linux hosts, the demo), reloaded when it changes. See
docs/agent.md.`, stderr)
	mount, _ := datapath.Cgroup2Mount()
	cfg := agent.Config{}
	fs.StringVar(&cfg.WorkloadsFile, "workloads-file", "", "YAML file of workloads to select; without it, pods come from the Kubernetes API")
	kubeconfig := fs.String("kubeconfig", os.Getenv("KUBECONFIG"), "kubeconfig for the Kubernetes source (default $KUBECONFIG, else in-cluster)")
	fs.StringVar(&cfg.NodeName, "node-name", os.Getenv("NODE_NAME"), "this node's name, for the pod field selector (default $NODE_NAME)")
	fs.StringVar(&cfg.Selector, "selector", agent.DefaultSelector, "opt-in label selector: pods whose labels match are redirected, as are pods an EgressPolicy or a guardrail ClusterEgressPolicy selects")
	fs.BoolVar(&cfg.PolicyObjects, "policy-objects", true, "follow the EgressPolicy and ClusterEgressPolicy objects (policy.sluice.io; their CRDs must be installed); false: pods are governed by their own labels and annotation only")
	fs.BoolVar(&cfg.IgnoreAllowAnnotations, "ignore-allow-annotations", false, "ignore every pod's sluice.io/allow annotation: only policy objects grant destinations, so a pod's author cannot widen its own policy (its labels may still select it and make it stricter)")
	exempt := fs.String("exempt-namespaces", os.Getenv("POD_NAMESPACE"), "comma-separated namespaces whose pods are never selected, whatever selects them (default: $POD_NAMESPACE, the agent's own: its pod holds the agent and Envoy, which must not be redirected or cut off by a guardrail over every namespace)")
	fs.StringVar(&cfg.StatusLease, "status-lease", defaultStatusLease(), `NAMESPACE/NAME of the Lease whose holder writes the policy objects' status (exactly one agent of the cluster at a time); "" writes no status (default: $POD_NAMESPACE/sluice-policy-status)`)
	driver := fs.String("cgroup-driver", string(agent.DriverSystemd), "the kubelet's cgroup driver: systemd or cgroupfs")
	fs.StringVar(&cfg.CgroupLayout.KubeletRoot, "kubelet-cgroup-root", "/", "the kubelet's --cgroup-root (kind: /kubelet)")
	fs.StringVar(&cfg.AttachCgroup, "cgroup-attach", mount, "cgroup v2 directory the programs attach to; every selected workload must be below it (default: the cgroup v2 mount)")
	fs.StringVar(&cfg.CgroupMount, "cgroup-mount", mount, "cgroup v2 mount that workload cgroup paths are relative to")
	scope := fs.String("attach-scope", "node", "where the programs attach: node (all of them to --cgroup-attach: every socket below it runs them) or workloads (the client programs to each selected workload's cgroup, the proxy's to --proxy-cgroup: unselected cgroups run nothing; see docs/datapath.md)")
	fs.StringVar(&cfg.ProxyCgroup, "proxy-cgroup", "", "with --attach-scope=workloads: the proxy's cgroup v2 directory (absolute, or relative to --cgroup-mount); it must outlive the proxy process (a slice, or its pod), and no workload may be in it, above it or below it")
	fs.StringVar(&cfg.ProxyPodUID, "proxy-pod-uid", "", "with --attach-scope=workloads and the Kubernetes source, instead of --proxy-cgroup: the uid of the pod this agent and its proxy run in (the DaemonSet passes its own, $(POD_UID)); the proxy's cgroup is that pod's, found as the kubelet names it (--cgroup-driver, --kubelet-cgroup-root). Ignored in the node scope, so one set of flags serves both")
	fs.StringVar(&cfg.PinPath, "pin-path", datapath.DefaultPinPath, "bpffs directory for sluice's pinned programs and maps")
	proxy := proxyFlags(fs)
	fs.StringVar(&cfg.ProxyAdmin, "proxy-admin", xds.DefaultAdminAddress.String(), `Envoy admin address whose /ready drives fail-open/fail-closed; "" treats the proxy as always ready`)
	var exclude, excludePorts listFlag
	fs.Var(&exclude, "exclude", "comma-separated CIDRs never redirected, beside loopback and link-local (e.g. pod and service CIDRs)")
	fs.Var(&excludePorts, "exclude-ports", "comma-separated destination ports never redirected")
	fs.StringVar(&cfg.DNSResolvers, "dns-resolvers", agent.ResolvConf, `comma-separated DNS resolvers (addr, or addr:port, [IPv6]:port; port 53 by default) that selected pods reach directly over UDP and TCP; the only non-TCP destinations of enforce-mode pods. "resolv.conf": the nameservers of /etc/resolv.conf at start (the cluster DNS under dnsPolicy ClusterFirstWithHostNet); "" for none`)
	fs.DurationVar(&cfg.ProxyTimeouts.TCPIdle, "proxy-tcp-idle-timeout", 0, "Envoy closes a proxied TCP connection idle this long; 0: never, as without the proxy (dead peers are found by TCP keepalive upstream)")
	fs.DurationVar(&cfg.ProxyTimeouts.HTTPStreamIdle, "proxy-http-stream-idle-timeout", 0, "Envoy ends an HTTP request that is idle this long (408 before the response starts); 0: never, so long polls and quiet streams live as they would without the proxy")
	fs.Uint64Var(&cfg.ProxyTimeouts.MaxConnectionsPerChain, "proxy-max-connections-per-chain", 10000, "Envoy closes a pod's new connections beyond this many open ones on one of its filter chains (a pod has one per kind: tcp, tls, http per port, deny), so one pod cannot hold the node's Envoy; 0: no cap")
	fs.DurationVar(&cfg.Names.MinTTL, "dns-min-ttl", agent.DefaultNameMinTTL, "TCP-hostname rules (tcp://name:port): look a name up again no sooner than this, whatever its TTL")
	fs.DurationVar(&cfg.Names.MaxTTL, "dns-max-ttl", agent.DefaultNameMaxTTL, "TCP-hostname rules: look a name up again no later than this, whatever its TTL")
	fs.DurationVar(&cfg.Names.Grace, "dns-grace", agent.DefaultNameGrace, "TCP-hostname rules: keep an address allowed this long after its TTL ran out without DNS giving it again (it left DNS, or lookups fail), so clients that resolved it earlier can reconnect")
	fs.IntVar(&cfg.Names.MaxAddrs, "dns-max-addresses", agent.DefaultNameMaxAddrs, "TCP-hostname rules: addresses allowed per name at most (the latest answers first)")
	fs.DurationVar(&cfg.ReadinessLease, "readiness-lease", 30*time.Second, "the proxy-ready flag lapses unless renewed within this time, so a node whose agent and proxy are both gone falls back to each pod's fail mode; 0 disables the lease")
	fs.Func("proxy-takeover-port", "a second proxy port, for updates without a gap: an agent that starts while the pinned datapath sends connections to --proxy-port (the previous agent's proxy) serves its own proxy on this port, and the reverse; once its proxy is ready it switches the datapath over, and the previous proxy drains (docs/install.md). Unset: one port", func(s string) error {
		n, err := strconv.ParseUint(s, 10, 16)
		if err != nil || n == 0 {
			return fmt.Errorf("want a port in 1-65535")
		}
		cfg.ProxyTakeoverPort = uint16(n)
		return nil
	})
	fs.BoolVar(&cfg.AllowDowngrade, "allow-downgrade", false, fmt.Sprintf("adopt pins of a newer datapath layout than this version's (%d): a downgrade. Without it the agent refuses them and exits; with it, the maps this version does not know stay pinned and unused", datapath.LayoutVersion))
	fs.IntVar(&cfg.InFlightMapSize, "inflight-map-size", datapath.DefaultInFlightEntries, fmt.Sprintf("capacity of the in-flight map pending_tuples: redirected connections established and not yet accepted by the proxy, node-wide; %d-%d; 224 bytes of kernel memory per entry with orig_dsts, kept at the same size for a rollback (14 MiB at the default). Applies when the datapath is installed; a pinned datapath keeps its size until 'sluice uninstall'", datapath.MinInFlightEntries, datapath.MaxInFlightEntries))
	fs.BoolVar(&cfg.ExcludeNodeAddresses, "exclude-node-addresses", true, "let connections to this node's own addresses (taken at start) go direct; false refuses them (EPERM). Either way they are never redirected: the proxy would reach the node itself")
	metadata := fs.String("metadata-addresses", defaultMetadata(), `comma-separated cloud metadata-service addresses, never redirected: audit-mode pods reach them directly (counted per pod), enforce-mode pods only where an allow entry names the address (e.g. "169.254.169.254:80"), else EPERM; "" for none`)
	fs.StringVar(&cfg.XDSSocket, "xds-socket", defaultXDSSocket, "unix socket the ADS server listens on")
	socketMode := fs.String("xds-socket-mode", "0600", "the ADS socket's permission bits: 0600 (the agent's user only) or 0660 (also its group: the DaemonSet's fsGroup, for an Envoy running as another user)")
	fs.StringVar(&cfg.XDSTCP, "xds-tcp", "", "also serve ADS on this loopback ip:port")
	fs.StringVar(&cfg.HealthSocket, "health-socket", "", `unix socket serving /healthz and /readyz to this agent's probes only ("sluice health" asks it); "" for none. The DaemonSet uses one: during an update two agents share the node's ports`)
	fs.StringVar(&cfg.FlowLog, "flow-log", "-", `where the flow log goes: one JSON line (type "flow") per decision the datapath makes without the proxy (fail-open direct and fail-closed refused while the proxy is not ready, refused UDP and other non-TCP, node-local and metadata destinations); "-" stdout, "" nowhere, else a file rotated at --flow-log-max-bytes. "sluice flows" reads it`)
	fs.Int64Var(&cfg.FlowLogMaxBytes, "flow-log-max-bytes", 64<<20, "a --flow-log file is moved to FILE.1 when it reaches this size")
	fs.StringVar(&cfg.MetricsAddr, "metrics-address", "127.0.0.1:9464", `address for /metrics, /healthz and /readyz; "" for none`)
	fs.StringVar(&cfg.StateFile, "state-file", defaultStateFile, "file the agent keeps its state in for sluice status")
	logLevel := fs.String("log-level", "info", "debug, info, warn or error (JSON logs on stderr)")
	if err := fs.Parse(args); err != nil {
		return agent.Config{}, "", err
	}
	if fs.NArg() > 0 {
		fs.Usage()
		return agent.Config{}, "", fmt.Errorf("agent takes no arguments, got %q: %w", fs.Args(), errUsage)
	}
	if cfg.AttachCgroup == "" || cfg.CgroupMount == "" {
		return agent.Config{}, "", fmt.Errorf("no cgroup v2 mount found; pass --cgroup-attach and --cgroup-mount")
	}
	var err error
	if cfg.AttachScope, err = datapath.ParseScope(*scope); err != nil {
		return agent.Config{}, "", fmt.Errorf("--attach-scope: %w", err)
	}
	switch {
	case cfg.AttachScope == datapath.ScopeWorkloads && cfg.ProxyCgroup == "" && cfg.ProxyPodUID == "":
		return agent.Config{}, "", errors.New("--attach-scope=workloads needs --proxy-cgroup (the cgroup the proxy runs in, where its programs attach) or, on Kubernetes, --proxy-pod-uid")
	case cfg.AttachScope == datapath.ScopeWorkloads && cfg.ProxyCgroup != "" && cfg.ProxyPodUID != "":
		return agent.Config{}, "", errors.New("--proxy-cgroup and --proxy-pod-uid both say where the proxy runs: give one")
	case cfg.AttachScope == datapath.ScopeWorkloads && cfg.ProxyPodUID != "" && cfg.WorkloadsFile != "":
		return agent.Config{}, "", errors.New("--proxy-pod-uid needs the Kubernetes source (pod cgroups as the kubelet names them); with --workloads-file give --proxy-cgroup")
	case cfg.AttachScope == datapath.ScopeNode && cfg.ProxyCgroup != "":
		return agent.Config{}, "", errors.New("--proxy-cgroup is only used with --attach-scope=workloads")
	}
	var mode uint64
	mode, err = strconv.ParseUint(*socketMode, 8, 32)
	if err != nil || (mode != 0o600 && mode != 0o660) {
		return agent.Config{}, "", fmt.Errorf("--xds-socket-mode %q: want 0600 or 0660 (octal; never world-accessible, always owner read-write)", *socketMode)
	}
	cfg.XDSSocketMode = iofs.FileMode(mode)
	if cfg.DNSResolvers != agent.ResolvConf {
		if _, err := agent.ParseResolvers(cfg.DNSResolvers); err != nil {
			return agent.Config{}, "", fmt.Errorf("--dns-resolvers: %w", err)
		}
	}
	switch {
	case cfg.ProxyTimeouts.TCPIdle < 0 || cfg.ProxyTimeouts.HTTPStreamIdle < 0:
		return agent.Config{}, "", fmt.Errorf("--proxy-tcp-idle-timeout and --proxy-http-stream-idle-timeout cannot be negative")
	case cfg.Names.MinTTL < time.Second:
		return agent.Config{}, "", fmt.Errorf("--dns-min-ttl %v: want at least 1s", cfg.Names.MinTTL)
	case cfg.Names.MaxTTL < cfg.Names.MinTTL:
		return agent.Config{}, "", fmt.Errorf("--dns-max-ttl %v is below --dns-min-ttl %v", cfg.Names.MaxTTL, cfg.Names.MinTTL)
	case cfg.Names.Grace < 0:
		return agent.Config{}, "", fmt.Errorf("--dns-grace %v: negative", cfg.Names.Grace)
	case cfg.Names.MaxAddrs < 1 || cfg.Names.MaxAddrs > 1024:
		return agent.Config{}, "", fmt.Errorf("--dns-max-addresses %d: want 1-1024", cfg.Names.MaxAddrs)
	}
	if cfg.ReadinessLease < 0 || cfg.ReadinessLease > 0 && cfg.ReadinessLease < 5*time.Second {
		return agent.Config{}, "", fmt.Errorf("--readiness-lease %v: want 0 (no lease) or at least 5s (several probe intervals)", cfg.ReadinessLease)
	}
	if cfg.ProxyTakeoverPort != 0 && cfg.ProxyTakeoverPort == proxy.Port {
		return agent.Config{}, "", fmt.Errorf("--proxy-takeover-port %d is --proxy-port: want another port", cfg.ProxyTakeoverPort)
	}
	if cfg.InFlightMapSize < datapath.MinInFlightEntries || cfg.InFlightMapSize > datapath.MaxInFlightEntries {
		return agent.Config{}, "", fmt.Errorf("--inflight-map-size %d: want %d-%d", cfg.InFlightMapSize, datapath.MinInFlightEntries, datapath.MaxInFlightEntries)
	}
	cfg.Source = "file"
	if cfg.WorkloadsFile == "" {
		cfg.Source = "kubernetes"
		if cfg.NodeName == "" {
			return agent.Config{}, "", fmt.Errorf("the Kubernetes source needs --node-name or $NODE_NAME (or use --workloads-file)")
		}
		for _, ns := range strings.Split(*exempt, ",") {
			if ns = strings.TrimSpace(ns); ns == "" {
				continue
			} else if err := checkDNSLabel(ns); err != nil {
				return agent.Config{}, "", fmt.Errorf("--exempt-namespaces: %w", err)
			}
			cfg.ExemptNamespaces = append(cfg.ExemptNamespaces, strings.TrimSpace(ns))
		}
		if cfg.StatusLease != "" {
			ns, name, ok := strings.Cut(cfg.StatusLease, "/")
			if !ok || checkDNSLabel(ns) != nil || checkDNSLabel(name) != nil {
				return agent.Config{}, "", fmt.Errorf("--status-lease %q: want NAMESPACE/NAME (lowercase letters, digits and '-')", cfg.StatusLease)
			}
			if !cfg.PolicyObjects {
				cfg.StatusLease = ""
			}
		}
		cfg.CgroupLayout.Mount = cfg.CgroupMount
		cfg.CgroupLayout.Driver = agent.CgroupDriver(*driver)
		if _, err := cfg.CgroupLayout.PodCgroup("check", agent.QoSBurstable); err != nil {
			return agent.Config{}, "", fmt.Errorf("--cgroup-driver: %w", err)
		}
	}
	cfg.Proxy = *proxy
	for _, s := range exclude {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			a, aerr := netip.ParseAddr(s)
			if aerr != nil {
				return agent.Config{}, "", fmt.Errorf("--exclude %q: not a CIDR or address", s)
			}
			p = netip.PrefixFrom(a, a.BitLen())
		}
		cfg.Exclude = append(cfg.Exclude, p.Masked())
	}
	for _, s := range excludePorts {
		n, err := strconv.ParseUint(s, 10, 16)
		if err != nil || n == 0 {
			return agent.Config{}, "", fmt.Errorf("--exclude-ports %q: want a port in 1-65535", s)
		}
		cfg.ExcludePorts = append(cfg.ExcludePorts, uint16(n))
	}
	for _, s := range strings.Split(*metadata, ",") {
		if s = strings.TrimSpace(s); s == "" {
			continue
		}
		a, err := netip.ParseAddr(s)
		if err != nil || a.Zone() != "" {
			return agent.Config{}, "", fmt.Errorf("--metadata-addresses %q: not an IP address", s)
		}
		cfg.Metadata = append(cfg.Metadata, a.Unmap())
	}
	var level slog.Level
	if err := level.UnmarshalText([]byte(*logLevel)); err != nil {
		return agent.Config{}, "", fmt.Errorf("--log-level %q: %w", *logLevel, err)
	}
	cfg.Logger = slog.New(slog.NewJSONHandler(stderr, &slog.HandlerOptions{Level: level}))
	return cfg, *kubeconfig, nil
}

func runUninstall(args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("uninstall", `Detach sluice's eBPF programs, remove its pins, and remove the proxy
addresses sluice itself put on the node (the pinned datapath records which; an
address that was there before sluice is left alone). Only sluice's own links,
maps and addresses are touched. Stop the agent first.`, stderr)
	pin := fs.String("pin-path", datapath.DefaultPinPath, "bpffs directory of sluice's pins")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		fs.Usage()
		return fmt.Errorf("uninstall takes no arguments, got %q: %w", fs.Args(), errUsage)
	}
	// Read what sluice added before the pins that record it go.
	var added []netip.Addr
	var note string
	switch dp, err := datapath.OpenPinned(*pin); {
	case errors.Is(err, datapath.ErrNotInstalled):
		note = "no pinned datapath"
	case err != nil:
		note = fmt.Sprintf("cannot read which proxy addresses sluice added (%v); left every address in place", err)
	default:
		ps, err := dp.ProxyState()
		dp.Close()
		if err != nil {
			note = fmt.Sprintf("cannot read which proxy addresses sluice added (%v); left every address in place", err)
		}
		added = ps.Added
	}
	if err := datapath.Uninstall(*pin); err != nil {
		return err
	}
	removed, err := (datapath.ProxyAddrs{}).Remove(added...)
	if err != nil {
		return err
	}
	msg := fmt.Sprintf("sluice uninstalled: programs detached, %s removed", *pin)
	if len(removed) > 0 {
		msg += fmt.Sprintf(", proxy addresses %v removed", removed)
	} else {
		msg += ", no proxy address removed (none that sluice added is on the node)"
	}
	if note != "" {
		msg += "; " + note
	}
	fmt.Fprintln(stdout, msg)
	return nil
}

// checkDNSLabel: an RFC 1123 label, as Kubernetes names namespaces.
func checkDNSLabel(s string) error {
	if s == "" || len(s) > 63 || s[0] == '-' || s[len(s)-1] == '-' {
		return fmt.Errorf("%q is not a DNS label", s)
	}
	for _, c := range s {
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-') {
			return fmt.Errorf("%q is not a DNS label", s)
		}
	}
	return nil
}
