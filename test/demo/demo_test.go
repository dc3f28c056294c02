// Package demo is `make demo`: a throwaway node with two pods on this kernel,
// the real `sluice agent` (file source), and a proxy, showing each
// connection's fate in a table, then `sluice status` and a few metrics.
// It is a Go test only to reuse the testbed's cleanup guarantees; it runs when
// SLUICE_DEMO=1 (make demo) and skips otherwise.
package demo

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"strings"
	"testing"
	"text/tabwriter"
	"time"

	"github.com/sluice-io/sluice/test/harness"
	"github.com/sluice-io/sluice/test/testbed"
)

func TestMain(m *testing.M) { testbed.Main(m, harness.Roles) }

func TestDemo(t *testing.T) {
	if os.Getenv("SLUICE_DEMO") == "" {
		t.Skip("the demo runs with `make demo`")
	}
	start := time.Now()
	say := func(format string, args ...any) { fmt.Printf(format+"\n", args...) }

	say("sluice demo: a throwaway node with two pods, on kernel %s", kernel())
	say("  building sluice and the testbed (network namespaces, cgroups; nothing leaves this machine)...")
	envoyBin := os.Getenv("ENVOY_BIN")
	var e *harness.Env
	var accessLog string
	if envoyBin != "" {
		e = harness.NewWithoutProxy(t, 2)
		accessLog = e.StartEnvoy(t, envoyBin)
	} else {
		e = harness.NewEnforcing(t, 2)
		accessLog = e.Records
	}
	web, plain := e.TB.Pods[0], e.TB.Pods[1]
	say("  node netns %s; pods %s (%s) and %s (%s); external servers %s, %s, %s",
		e.TB.Node.Name, web.Name, web.IPv4, plain.Name, plain.IPv4, testbed.ExternalV4[0], testbed.ExternalV4[1], testbed.ExternalV6[0])

	allow := fmt.Sprintf("%s:%d, [%s]:%d, api.example.com:443", testbed.ExternalV4[0], harness.ServerPort, testbed.ExternalV6[0], harness.ServerPort)
	wl := harness.Workload{Pod: web, Namespace: "demo", Name: "web", Mode: "enforce", Allow: allow}
	e.WriteWorkloads(t, wl)
	say("  workloads file: demo/web (%s) selected, mode enforce, sluice.io/allow: %q; %s not listed", web.Name, allow, plain.Name)

	if envoyBin != "" {
		say("  proxy: Envoy from ENVOY_BIN (%s), configured by the agent over ADS; the POLICY column is Envoy's access log", envoyBin)
	} else {
		say("  proxy: the conformance proxy (test/conformance): it takes the listener and clusters from the agent over ADS")
		say("         and executes them as Envoy would; the POLICY column is its access log, in the served format.")
		say("         Set ENVOY_BIN=/path/to/envoy to run a real Envoy instead.")
	}
	agent := e.StartAgent(t)
	harness.WaitFor(t, "proxy ready", 10*time.Second, func() bool { return strings.Contains(e.Status(t), "ready=true") })
	say("  sluice agent running (pid %d), attached to %s, pins at %s; proxy ready", agent.Cmd.Process.Pid, e.TB.Root.Path, e.PinPath)

	specs := []string{
		fmt.Sprintf("tcp4:%s:%d", testbed.ExternalV4[0], harness.ServerPort),
		fmt.Sprintf("tcp6:[%s]:%d", testbed.ExternalV6[0], harness.ServerPort),
		fmt.Sprintf("mapped:%s:%d", testbed.ExternalV4[0], harness.ServerPort),
		fmt.Sprintf("tcp4:%s:%d", testbed.ExternalV4[1], harness.ServerPort),
		// The agent's /metrics on the node's loopback: never through the
		// proxy (which would dial 0.0.0.0 as the node's loopback).
		"tcp4:0.0.0.0:9464",
	}
	say("")
	w := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(w, "POD\tDESTINATION\tREDIRECTED\tORIGINAL DST (proxy)\tPOLICY (proxy's access log)\tAPP'S GETPEERNAME\tSERVER SAW")
	accepted := len(e.Echo.Conns())
	replied := 0
	for _, p := range []*testbed.Pod{web, plain} {
		// The client speaks first, as most do: the proxy's TLS and HTTP
		// inspectors decide at once (a silent client waits 1 s for them).
		out := testbed.Run(t, 30*time.Second, p.Cgroup, p.Netns, "client", append([]string{"-send", "hello"}, specs...)...)
		for _, r := range testbed.Dial(t, out) {
			kind, dst, _ := strings.Cut(r.Spec, ":")
			orig, redirected, verdict := "-", "no", "- (direct)"
			if l, ok := envoyLogFor(accessLog, r.Local, 2*time.Second); ok {
				redirected, orig, verdict = "yes", l.OrigDst, l.Verdict+": "+l.Reason
			}
			if strings.Contains(r.Err, "operation not permitted") {
				verdict = "refused at connect() by the datapath"
			}
			if strings.HasPrefix(r.Reply, "peer=") {
				replied++
			}
			seen := strings.TrimPrefix(r.Reply, "peer=")
			if r.Err != "" {
				seen = "nothing (app: " + r.Err + ")"
			}
			fmt.Fprintf(w, "%s\t%s (%s)\t%s\t%s\t%s\t%s\t%s\n", p.Name, dst, kind, redirected, orig, verdict, r.Peer, seen)
		}
	}
	w.Flush()
	if envoyBin == "" {
		say("\nthe external servers accepted %d connections: the %d rows with a reply, nothing for the denied and refused rows.", len(e.Echo.Conns())-accepted, replied)
	}
	say("\n%s is selected: its connections reach the proxy, which recovered each original destination; the server", web.Name)
	say("sees the node's address and the application still sees the original peer. %s goes direct.", plain.Name)
	say("0.0.0.0:9464 is the node's loopback as the proxy would dial it: for %s it is refused (EPERM), never", web.Name)
	say("redirected; for %s it is its own loopback, where nothing listens.", plain.Name)

	say("\n$ sluice status")
	fmt.Print(indent(e.Status(t)))
	say("\n$ curl http://127.0.0.1:9464/metrics  (a few lines)")
	m := e.Metrics(t)
	for _, prefix := range []string{"sluice_workload_connections_total", "sluice_datapath_events_total{event=\"redirected", "sluice_datapath_events_total{event=\"orig_dst_answered", "sluice_datapath_events_total{event=\"node_local_refused", "sluice_proxy_ready", "sluice_selected_workloads", "sluice_xds_versions_total"} {
		for _, l := range harness.MetricLines(m, prefix) {
			say("  %s", l)
		}
	}
	harness.StopAgent(t, agent)
	say("\nagent stopped (SIGTERM); the datapath stays pinned until `sluice uninstall`, which the teardown runs.")
	t.Cleanup(func() {
		say("torn down: programs detached, pins, proxy addresses, namespaces and cgroups removed; demo took %.1fs", time.Since(start).Seconds())
	})
}

// envoyLine is the part of sluice's Envoy access log the demo shows.
type envoyLine struct {
	Source  string `json:"source"`
	OrigDst string `json:"original_destination"`
	Verdict string `json:"verdict"`
	Reason  string `json:"reason"`
}

// envoyLogFor finds Envoy's access-log line for the connection from client
// (written when the connection closes).
func envoyLogFor(path, client string, wait time.Duration) (envoyLine, bool) {
	want, err := netip.ParseAddrPort(client)
	if err != nil {
		return envoyLine{}, false
	}
	want = netip.AddrPortFrom(want.Addr().Unmap(), want.Port())
	deadline := time.Now().Add(wait)
	for {
		b, _ := os.ReadFile(path)
		for _, line := range strings.Split(string(b), "\n") {
			var l envoyLine
			if json.Unmarshal([]byte(line), &l) != nil {
				continue
			}
			if ap, err := netip.ParseAddrPort(l.Source); err == nil && netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()) == want {
				return l, true
			}
		}
		if time.Now().After(deadline) {
			return envoyLine{}, false
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func indent(s string) string {
	var b strings.Builder
	for _, l := range strings.Split(strings.TrimRight(s, "\n"), "\n") {
		b.WriteString("  " + l + "\n")
	}
	return b.String()
}

func kernel() string {
	b, _ := os.ReadFile("/proc/sys/kernel/osrelease")
	return strings.TrimSpace(string(b))
}
