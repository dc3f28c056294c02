package e2e

import (
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/sluice-io/sluice/agent/datapath"
	"github.com/sluice-io/sluice/test/conformance"
	"github.com/sluice-io/sluice/test/harness"
	"github.com/sluice-io/sluice/test/testbed"
)

// counterDeltas reads the pinned datapath's counters by name.
func counters(t *testing.T, e *harness.Env) map[string]uint64 {
	t.Helper()
	dp, err := datapath.OpenPinned(e.PinPath)
	if err != nil {
		t.Fatal(err)
	}
	defer dp.Close()
	c, err := dp.Counters()
	if err != nil {
		t.Fatal(err)
	}
	return c.ByName()
}

// secretCanary is an annotation value no output of the agent may carry.
const secretCanary = "CANARY-7f3a-do-not-export"

// checkExposure: the pins, the ADS socket and the state file are the
// owner's alone, and neither the metrics nor the state file nor `sluice
// status` carry annotation values (a pod's annotations may hold secrets)
// or allow-list entries.
func checkExposure(t *testing.T, e *harness.Env) {
	paths := []string{e.PinPath, filepath.Join(e.Dir, "xds.sock"), e.StateFile}
	entries, err := os.ReadDir(e.PinPath)
	if err != nil {
		t.Fatal(err)
	}
	for _, en := range entries {
		paths = append(paths, filepath.Join(e.PinPath, en.Name()))
	}
	for _, p := range paths {
		fi, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		if perm := fi.Mode().Perm(); perm&0o077 != 0 {
			t.Errorf("%s has mode %v, want owner-only", p, perm)
		}
	}
	if len(entries) < 10 {
		t.Errorf("only %d pins checked", len(entries))
	}
	state, err := os.ReadFile(e.StateFile)
	if err != nil {
		t.Fatal(err)
	}
	metrics := e.Metrics(t)
	for name, out := range map[string]string{"metrics": metrics, "state file": string(state), "status": e.Status(t, "--format", "json")} {
		for _, leak := range []string{secretCanary, "allowed.example"} {
			if strings.Contains(out, leak) {
				t.Errorf("%s exposes %q", name, leak)
			}
		}
	}
	allowed := map[string]bool{"event": true, "workload_namespace": true, "workload_pod": true, "outcome": true, "map": true, "version": true, "source": true, "le": true, "reason": true, "cause": true, "code": true, "result": true}
	for _, l := range strings.Split(metrics, "\n") {
		if strings.HasPrefix(l, "#") || !strings.Contains(l, "{") {
			continue
		}
		labels := l[strings.Index(l, "{")+1 : strings.LastIndex(l, "}")]
		for _, kv := range strings.Split(labels, ",") {
			if k, _, _ := strings.Cut(kv, "="); !allowed[k] {
				t.Errorf("metric label %q is not one the agent is meant to export: %s", k, l)
			}
		}
	}
}

// bypassCase is one attempt to get out of an enforce-mode pod.
type bypassCase struct {
	name string
	pod  int    // index in the testbed's pods: 0 enforced, 1 unselected, 2 audited
	spec string // client spec (testbed.Dial)
	send string // sent after connecting
	// reply is the prefix of the first line the application reads; "" when
	// it must read nothing. err is a substring of the error it gets.
	reply, err string
	// server: the external TCP server accepts a connection (at: at this
	// address, when set); datagram: the UDP server at this address
	// receives one datagram.
	server   bool
	at       string
	datagram string
	// counter is the datapath counter that records the case.
	counter string
	// proxy is what the proxy's access log says it did ("" for nothing).
	proxy string
	// timeout is the client's, when not the default 3 s.
	timeout time.Duration
	// serverHeader is the Server header the HTTP reply must carry.
	serverHeader string
}

// The bypass matrix: from an enforce-mode pod whose allow list names one
// IPv4 address, one IPv6 address and one hostname, every way out is tried
// with the real agent programming the datapath and a stand-in proxy that
// decides as the generated listener does. For each: what the application
// got, what the external servers saw, which counter recorded it and what
// the proxy did. docs/security.md tabulates the result.
func TestPrivilegedBypassMatrix(t *testing.T) {
	e := harness.NewEnforcing(t, 3)
	pod, other, audited := e.TB.Pods[0], e.TB.Pods[1], e.TB.Pods[2]
	ext4, ext4b := testbed.ExternalV4[0], testbed.ExternalV4[1]
	ext6, ext6b := testbed.ExternalV6[0], testbed.ExternalV6[1]
	hp := func(a netip.Addr, port uint16) string { return netip.AddrPortFrom(a, port).String() }
	for _, a := range []netip.Addr{ext4, ext4b, ext6} {
		for _, port := range []uint16{53, 443, 9999} {
			e.Echo.AddUDP(e.TB.External.ListenPacket(t, "udp", hp(a, port)))
		}
	}
	e.WriteWorkloads(t, harness.Workload{Pod: pod, Namespace: "shop", Name: "checkout", Mode: "enforce",
		Allow: fmt.Sprintf("%s:%d, [%s]:%d, allowed.example, rebind.example, meta.example, node.example, nxdomain.example, broken.example, mixed.example",
			ext4b, harness.ServerPort, ext6b, harness.ServerPort),
		Annotations: map[string]string{"example.com/api-token": secretCanary}},
		harness.Workload{Pod: audited, Namespace: "shop", Name: "audited", Mode: "audit"})
	// Where the allowed names really are: allowed.example is the server at
	// ext4b (an allowed address too, so that CIDR and name agree); the
	// others resolve to node-local addresses (DNS rebinding) or not at all.
	e.DNS.Set("allowed.example", ext4b)
	e.DNS.Set("rebind.example", netip.MustParseAddr("127.0.0.1"))
	e.DNS.Set("meta.example", netip.MustParseAddr("169.254.169.254"))
	e.DNS.Set("node.example", testbed.NodeV4)
	e.DNS.Fail("broken.example")
	// A node-local answer beside a real one: only the real one is dialled.
	e.DNS.Set("mixed.example", netip.MustParseAddr("127.0.0.1"), ext4b)
	// The testbed's DNS server first: the served DNS cache asks the
	// resolvers in order (c-ares), and the others are UDP echo servers.
	e.StartAgent(t, "--workloads-file", e.WorkloadsFile, "--dns-resolvers", fmt.Sprintf("%s,%s,[%s]:53", harness.DNSResolver, ext4, ext6))
	harness.WaitFor(t, "the pod selected and the proxy ready", 10*time.Second, func() bool {
		st := readStatus(t, e)
		return st.Proxy.Ready && len(st.Workloads) == 2
	})
	for _, p := range e.TB.Pods {
		p.Netns.Sysctl(t, "net.ipv4.ping_group_range", "0 2147483647")
	}

	node4, node6 := "peer="+testbed.NodeV4.String(), "peer="+testbed.NodeV6.String()
	const eperm = "operation not permitted"
	const httpOK = "HTTP/1.1 200 OK | "
	get := func(host string) string { return "GET / HTTP/1.1\r\nHost: " + host + "\r\n" }
	proxy4 := hp(datapath.DefaultProxyIPv4, datapath.DefaultProxyPort)
	// The agent's /metrics listens on the node's loopback (127.0.0.1:9464),
	// as Envoy's admin and the kubelet's healthz do on a real node.
	metricsPort := uint16(9464)
	getMetrics := "GET /metrics HTTP/1.1\r\nHost: allowed.example\r\n"
	cases := []bypassCase{
		{name: "IPv4, allowed address", spec: "tcp4:" + hp(ext4b, harness.ServerPort), reply: node4, server: true, counter: "redirected_ipv4", proxy: "forwarded"},
		{name: "IPv4, address not allowed", spec: "tcp4:" + hp(ext4, harness.ServerPort), err: "EOF", counter: "redirected_ipv4", proxy: "denied-closed"},
		{name: "IPv6, allowed address", spec: "tcp6:" + hp(ext6b, harness.ServerPort), reply: node6, server: true, counter: "redirected_ipv6", proxy: "forwarded"},
		{name: "IPv6, address not allowed", spec: "tcp6:" + hp(ext6, harness.ServerPort), err: "EOF", counter: "redirected_ipv6", proxy: "denied-closed"},
		{name: "v4-mapped IPv6, allowed address", spec: "mapped:" + hp(ext4b, harness.ServerPort), reply: node4, server: true, counter: "redirected_ipv4", proxy: "forwarded"},
		{name: "v4-mapped IPv6, address not allowed", spec: "mapped:" + hp(ext4, harness.ServerPort), err: "EOF", counter: "redirected_ipv4", proxy: "denied-closed"},
		{name: "non-blocking connect, not allowed", spec: "nb4:" + hp(ext4, harness.ServerPort), err: "EOF", counter: "redirected_ipv4", proxy: "denied-closed"},
		{name: "TCP Fast Open, allowed address", spec: "tfo4:" + hp(ext4b, harness.ServerPort), reply: node4, server: true, counter: "redirected_ipv4", proxy: "forwarded"},
		// The data sent in the SYN is unread when the deny chain closes:
		// the kernel answers with a reset.
		{name: "TCP Fast Open, address not allowed", spec: "tfo4:" + hp(ext4, harness.ServerPort), err: "read: ", counter: "redirected_ipv4", proxy: "denied-closed"},
		{name: "HTTP, allowed host, dialled at another address", spec: "tcp4:" + hp(ext4, harness.HTTPPort), send: get("allowed.example"), reply: httpOK + node4, server: true, at: hp(ext4b, harness.HTTPPort), counter: "redirected_ipv4", proxy: "forwarded"},
		{name: "HTTP, allowed host, dialled at an IPv6 address", spec: "tcp6:" + hp(ext6, harness.HTTPPort), send: get("allowed.example"), reply: httpOK + node4, server: true, at: hp(ext4b, harness.HTTPPort), counter: "redirected_ipv6", proxy: "forwarded"},
		{name: "WebSocket upgrade on an allowed host, dialled at another address", spec: "tcp4:" + hp(ext4, harness.HTTPPort), send: get("allowed.example") + "Upgrade: websocket\r\nConnection: Upgrade\r\n", reply: "HTTP/1.1 101 Switching Protocols | " + node4, server: true, at: hp(ext4b, harness.HTTPPort), counter: "redirected_ipv4", proxy: "forwarded"},
		{name: "HTTP/1.0, allowed host", spec: "tcp4:" + hp(ext4, harness.HTTPPort), send: "GET / HTTP/1.0\r\nHost: allowed.example\r\n", reply: httpOK + node4, server: true, at: hp(ext4b, harness.HTTPPort), counter: "redirected_ipv4", proxy: "forwarded"},
		{name: "HTTP/1.0 without Host", spec: "tcp4:" + hp(ext4, harness.HTTPPort), send: "GET / HTTP/1.0\r\n", reply: "HTTP/1.1 403", counter: "redirected_ipv4", proxy: "denied-403"},
		{name: "HTTP, allowed host with a trailing dot; the server's own Server header", spec: "tcp4:" + hp(ext4, harness.HTTPPort), send: get("allowed.example."), reply: httpOK + node4, server: true, at: hp(ext4b, harness.HTTPPort), counter: "redirected_ipv4", proxy: "forwarded", serverHeader: "testbed-echo"},
		{name: "HTTP CONNECT naming an allowed host", spec: "tcp4:" + hp(ext4, harness.HTTPPort), send: "CONNECT allowed.example:8080 HTTP/1.1\r\nHost: allowed.example:8080\r\n", reply: "HTTP/1.1 403", counter: "redirected_ipv4", proxy: "denied-403"},
		{name: "TLS, allowed server name, dialled at another address", spec: "tcp4:" + hp(ext4, harness.ServerPort), send: "tls-client-hello:allowed.example", reply: node4, server: true, at: hp(ext4b, harness.ServerPort), counter: "redirected_ipv4", proxy: "forwarded"},
		{name: "TLS, allowed name resolving to 127.0.0.1", spec: "tcp4:" + hp(ext4, harness.ServerPort), send: "tls-client-hello:rebind.example", err: "EOF", counter: "redirected_ipv4", proxy: "dns-failed"},
		{name: "TLS, allowed name resolving to the metadata service", spec: "tcp4:" + hp(ext4, harness.ServerPort), send: "tls-client-hello:meta.example", err: "EOF", counter: "redirected_ipv4", proxy: "dns-failed"},
		{name: "HTTP, allowed name resolving to the node's address", spec: "tcp4:" + hp(ext4, harness.HTTPPort), send: get("node.example"), reply: "HTTP/1.1 503", counter: "redirected_ipv4", proxy: "dns-failed"},
		{name: "TLS, allowed name resolving to 127.0.0.1 and a real address", spec: "tcp4:" + hp(ext4, harness.ServerPort), send: "tls-client-hello:mixed.example", reply: node4, server: true, at: hp(ext4b, harness.ServerPort), counter: "redirected_ipv4", proxy: "forwarded"},
		{name: "TLS, allowed name with no address", spec: "tcp4:" + hp(ext4, harness.ServerPort), send: "tls-client-hello:nxdomain.example", err: "EOF", counter: "redirected_ipv4", proxy: "dns-failed"},
		{name: "TLS, allowed name whose lookup fails", spec: "tcp4:" + hp(ext4, harness.ServerPort), send: "tls-client-hello:broken.example", err: "EOF", counter: "redirected_ipv4", proxy: "dns-failed",
			// SERVFAIL passes the question to the next resolvers (c-ares
			// does), which here are echo servers that never answer: the
			// lookup ends at the DNS cache's 5 s query timeout.
			timeout: 10 * time.Second},
		{name: "TLS, server name not allowed", spec: "tcp4:" + hp(ext4, harness.ServerPort), send: "tls-client-hello:blocked.example", err: "EOF", counter: "redirected_ipv4", proxy: "denied-closed"},
		{name: "TLS, allowed name as a subdomain prefix", spec: "tcp4:" + hp(ext4, harness.ServerPort), send: "tls-client-hello:allowed.example.evil.test", err: "EOF", counter: "redirected_ipv4", proxy: "denied-closed"},
		{name: "HTTP, host not allowed", spec: "tcp4:" + hp(ext4, harness.HTTPPort), send: get("blocked.example"), reply: "HTTP/1.1 403", counter: "redirected_ipv4", proxy: "denied-403"},
		{name: "TCP sendto without connect", spec: "tcpsendto4:" + hp(ext4, harness.ServerPort), err: "broken pipe"},
		{name: "UDP sendto without connect", spec: "sendto4:" + hp(ext4, 9999), err: eperm, counter: "denied_non_tcp"},
		{name: "UDP sendto v4-mapped", spec: "sendtomapped:" + hp(ext4, 443), err: eperm, counter: "denied_non_tcp"},
		{name: "UDP to a non-DNS port", spec: "udp4:" + hp(ext4, 9999), err: eperm, counter: "denied_non_tcp"},
		{name: "UDP 443 (QUIC), IPv4", spec: "udp4:" + hp(ext4, 443), err: eperm, counter: "denied_non_tcp"},
		{name: "UDP 443 (QUIC), IPv6", spec: "udp6:" + hp(ext6, 443), err: eperm, counter: "denied_non_tcp"},
		{name: "UDP 53 to a host that is not a resolver", spec: "udp4:" + hp(ext4b, 53), err: eperm, counter: "denied_non_tcp"},
		{name: "ICMP echo (ping socket)", spec: "ping4:" + hp(ext4, 0), err: eperm, counter: "denied_non_tcp"},
		{name: "DNS to a configured resolver, IPv4", spec: "udp4:" + hp(ext4, 53), reply: "peer=" + pod.IPv4.String(), datagram: hp(ext4, 53), counter: "dns_allowed"},
		{name: "DNS to a configured resolver, IPv6", spec: "sendto6:" + hp(ext6, 53), reply: "peer=" + pod.IPv6.String(), datagram: hp(ext6, 53), counter: "dns_allowed"},
		// No original destination: original_dst leaves the listener's own
		// address, which the loop chain closes.
		{name: "direct connection to the proxy address", spec: "tcp4:" + proxy4, err: "EOF", counter: "proxy_direct", proxy: "loop-closed"},
		{name: "unselected pod, straight to the proxy", pod: 1, spec: "tcp4:" + proxy4, err: "EOF", proxy: "loop-closed"},
		{name: "0.0.0.0 to a node-loopback port (the agent's metrics), allowed Host", spec: "tcp4:" + hp(netip.IPv4Unspecified(), metricsPort), send: getMetrics, err: eperm, counter: "node_local_refused"},
		{name: "[::] to a node-loopback port", spec: "tcp6:" + hp(netip.IPv6Unspecified(), metricsPort), send: getMetrics, err: eperm, counter: "node_local_refused"},
		{name: "[::ffff:0.0.0.0] to a node-loopback port", spec: "mapped:" + hp(netip.IPv4Unspecified(), metricsPort), send: getMetrics, err: eperm, counter: "node_local_refused"},
		{name: "127.0.0.1 stays in the pod's own loopback", spec: "tcp4:" + hp(netip.MustParseAddr("127.0.0.1"), metricsPort), err: "connection refused", counter: "excluded"},
		{name: "the proxy address on another port", spec: "tcp4:" + hp(datapath.DefaultProxyIPv4, metricsPort), err: eperm, counter: "proxy_port_refused"},
		{name: "the proxy IPv6 address on another port", spec: "tcp6:" + hp(datapath.DefaultProxyIPv6, metricsPort), err: eperm, counter: "proxy_port_refused"},
		{name: "the node's own address", spec: "tcp4:" + hp(testbed.NodeV4, metricsPort), err: "connection refused", counter: "excluded"},
		{name: "the metadata service, IPv4", spec: "tcp4:169.254.169.254:80", err: eperm, counter: "metadata_refused"},
		{name: "the metadata service, IPv6", spec: "tcp6:[fd00:ec2::254]:80", err: eperm, counter: "metadata_refused"},
		{name: "audit pod: 0.0.0.0 to a node-loopback port (the agent's metrics)", pod: 2, spec: "tcp4:" + hp(netip.IPv4Unspecified(), metricsPort), send: getMetrics, err: eperm, counter: "node_local_refused"},
		{name: "audit pod: the proxy address on another port", pod: 2, spec: "tcp4:" + hp(datapath.DefaultProxyIPv4, metricsPort), err: eperm, counter: "proxy_port_refused"},
	}
	// Counters that must move only in the case that names them.
	watched := []string{"denied_non_tcp", "dns_allowed", "redirected_ipv4", "redirected_ipv6", "proxy_direct", "excluded",
		"node_local_refused", "proxy_port_refused", "metadata_refused", "metadata_direct"}
	t.Run("owner-only files, no secrets in metrics", func(t *testing.T) { checkExposure(t, e) })
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p := []*testbed.Pod{pod, other, audited}[c.pod]
			peers, grams, recs := len(e.Echo.Peers()), len(e.Echo.Datagrams()), len(conformance.ReadFinal(e.Records))
			before := counters(t, e)
			args := []string{}
			if c.send != "" {
				args = append(args, "-send", c.send)
			}
			if c.timeout != 0 {
				args = append(args, "-timeout", c.timeout.String())
			}
			res := testbed.Dial(t, testbed.Run(t, 30*time.Second, p.Cgroup, p.Netns, "client", append(args, c.spec)...))[0]
			switch {
			case c.reply != "" && !strings.HasPrefix(res.Reply, c.reply):
				t.Errorf("application read %q (err %q), want %q...", res.Reply, res.Err, c.reply)
			case c.reply == "" && res.Reply != "":
				t.Errorf("application read %q, want nothing", res.Reply)
			}
			if c.serverHeader != "" && res.Header.Get("Server") != c.serverHeader {
				t.Errorf("Server header %q, want the upstream's %q", res.Header.Get("Server"), c.serverHeader)
			}
			if c.err != "" && !strings.Contains(res.Err, c.err) {
				t.Errorf("application error %q, want %q", res.Err, c.err)
			}
			// The proxy records before it dials; give it a moment.
			time.Sleep(50 * time.Millisecond)
			if got := len(e.Echo.Peers()) - peers; got != map[bool]int{true: 1}[c.server] {
				t.Errorf("external TCP servers accepted %d connections, want %d", got, map[bool]int{true: 1}[c.server])
			} else if c.at != "" {
				if got := e.Echo.Conns()[peers].To; got != c.at {
					t.Errorf("the server at %s accepted the connection, want the one at %s (where DNS says the name is), never the address dialled", got, c.at)
				}
			}
			// The proxy's own DNS queries (from the node) are not the pod's.
			newGrams := slices.DeleteFunc(e.Echo.Datagrams()[grams:], func(d testbed.Datagram) bool {
				from := netip.MustParseAddrPort(d.From).Addr()
				return from == testbed.NodeV4 || from == testbed.NodeV6
			})
			if c.datagram == "" && len(newGrams) != 0 || c.datagram != "" && (len(newGrams) != 1 || newGrams[0].To != c.datagram) {
				t.Errorf("UDP servers received %+v, want %q", newGrams, c.datagram)
			}
			after := counters(t, e)
			for _, name := range datapath.CounterNames() {
				d := after[name] - before[name]
				switch {
				case name == c.counter && d != 1:
					t.Errorf("counter %s moved by %d, want 1", name, d)
				case name != c.counter && slices.Contains(watched, name) && d != 0:
					t.Errorf("counter %s moved by %d, want 0", name, d)
				}
			}
			newRecs := conformance.ReadFinal(e.Records)[recs:]
			var results []string
			for _, r := range newRecs {
				results = append(results, r.Outcome())
			}
			if want := []string{c.proxy}; c.proxy == "" && len(results) != 0 || c.proxy != "" && !slices.Equal(results, want) {
				t.Errorf("proxy recorded %v, want %q", results, c.proxy)
			}
		})
	}
}
