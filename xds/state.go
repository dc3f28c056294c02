package xds

import (
	"fmt"
	"github.com/sluice-io/sluice/policy"
	"net/netip"
	"time"
)

// State is the desired state the agent hands to the xDS side: where the
// proxy listens and which workloads it serves. It is a plain value; the
// builders never look at anything else.
type State struct {
	// Proxy is where Envoy listens: the node-local addresses the datapath
	// redirects to (at most one IPv4 and one IPv6) and the port.
	Proxy Proxy
	// Workloads selected on this node. Order does not matter: the builders
	// sort them.
	Workloads []Workload
	// NeverDial are destinations the listener never forwards to, whatever
	// a workload's policy (policy.NodeLocal.All: the node's loopback, its
	// own and the proxy's addresses, link-local, metadata). The datapath
	// never redirects them; the listener refuses them as a second line.
	// The proxy's addresses and loopback are refused even when it is empty.
	NeverDial []netip.Prefix
	// DNSResolvers are what the proxy resolves hostname entries with (the
	// agent's --dns-resolvers: the cluster DNS). Empty: the node's
	// resolv.conf, which rarely knows cluster names.
	DNSResolvers []netip.AddrPort
	// ListenerFiltersTimeout bounds how long the TLS and HTTP inspectors
	// wait for a client's first bytes. Server-first protocols (SMTP, SSH,
	// MySQL) send nothing until the server speaks, so after this long the
	// connection goes on without SNI or HTTP detection. Zero: the default.
	ListenerFiltersTimeout time.Duration
	// TCPIdleTimeout closes a proxied TCP connection (tcp_proxy chains)
	// idle this long; zero: never, as without the proxy (Envoy's default
	// would be 1 h). Dead peers are found by TCP keepalive upstream.
	TCPIdleTimeout time.Duration
	// HTTPStreamIdleTimeout ends an HTTP request idle this long (HCM
	// stream_idle_timeout); zero: never (Envoy's default would be 5 min,
	// which cuts long polls and quiet streams).
	HTTPStreamIdleTimeout time.Duration
	// MaxConnectionsPerChain caps the open connections of each of a
	// workload's filter chains (Envoy's connection_limit filter counts per
	// chain: a workload has up to one per kind, tcp, tls, http per port,
	// deny); beyond it new connections are closed at once. Zero: no cap.
	MaxConnectionsPerChain uint64
}

// DefaultListenerFiltersTimeout is short enough that a server-first
// protocol is only briefly delayed, long enough for any client that speaks
// first to have sent its ClientHello or request line.
const DefaultListenerFiltersTimeout = time.Second

// Proxy is the listener address of the node-local Envoy.
type Proxy struct {
	IPv4 netip.Addr // invalid: no IPv4 listener address
	IPv6 netip.Addr // invalid: no IPv6 listener address
	Port uint16
}

// Addrs returns the configured proxy addresses, IPv4 first.
func (p Proxy) Addrs() []netip.Addr {
	var out []netip.Addr
	if p.IPv4.IsValid() {
		out = append(out, p.IPv4)
	}
	if p.IPv6.IsValid() {
		out = append(out, p.IPv6)
	}
	return out
}

// Workload is one selected pod (or host service) as the proxy sees it: its
// identity for logs, the source addresses its connections come from, and
// its policy.
type Workload struct {
	Namespace string
	Name      string
	IPs       []netip.Addr
	Policy    policy.Policy
	// PolicyError, when the pod's policy did not parse, is the error; it
	// is shown in the log of every connection the proxy denies the pod.
	PolicyError string
}

// ID is the workload's identity in logs, chain names and errors.
func (w Workload) ID() string {
	if w.Namespace == "" {
		return w.Name
	}
	return w.Namespace + "/" + w.Name
}

func (s State) check() error {
	if !s.Proxy.IPv4.IsValid() && !s.Proxy.IPv6.IsValid() {
		return fmt.Errorf("proxy has no address")
	}
	if s.Proxy.IPv4.IsValid() && !s.Proxy.IPv4.Is4() {
		return fmt.Errorf("proxy IPv4 address %s is not IPv4", s.Proxy.IPv4)
	}
	if s.Proxy.IPv6.IsValid() && (!s.Proxy.IPv6.Is6() || s.Proxy.IPv6.Is4In6()) {
		return fmt.Errorf("proxy IPv6 address %s is not IPv6", s.Proxy.IPv6)
	}
	if s.Proxy.Port == 0 {
		return fmt.Errorf("proxy port is 0")
	}
	if s.ListenerFiltersTimeout < 0 || s.TCPIdleTimeout < 0 || s.HTTPStreamIdleTimeout < 0 {
		return fmt.Errorf("negative timeout (listener filters %s, TCP idle %s, HTTP stream idle %s)", s.ListenerFiltersTimeout, s.TCPIdleTimeout, s.HTTPStreamIdleTimeout)
	}
	seen := make(map[string]bool, len(s.Workloads))
	for _, w := range s.Workloads {
		if w.Name == "" {
			return fmt.Errorf("workload in namespace %q has no name", w.Namespace)
		}
		if seen[w.ID()] {
			return fmt.Errorf("workload %s appears twice", w.ID())
		}
		seen[w.ID()] = true
	}
	return nil
}
