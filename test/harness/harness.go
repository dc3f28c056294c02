// Package harness runs the real sluice agent on a netns testbed: the
// sluice binary built from this tree, the stand-in proxy (Envoy's
// original_dst listener, with a /ready endpoint), echo servers on the
// external addresses, and a workloads file naming the testbed's pods. The
// agent end-to-end tests and `make demo` use it.
package harness

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/sluice-io/sluice/agent"
	"github.com/sluice-io/sluice/agent/datapath"
	"github.com/sluice-io/sluice/test/standin"
	"github.com/sluice-io/sluice/test/testbed"
	"github.com/sluice-io/sluice/xds"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"sigs.k8s.io/yaml"
)

// Ports the external servers listen on.
const (
	ServerPort   = 8080
	ExcludedPort = 9090
	// HTTPPort serves HTTP/1.1 (testbed.EchoServer.AddHTTP) on every
	// external address.
	HTTPPort    = 80
	adminAddr   = "127.0.0.1:15000"
	metricsAddr = "127.0.0.1:9464"
)

// Roles are the testbed roles the harness needs; pass them to testbed.Main.
var Roles = map[string]testbed.Role{"proxy": standin.Main}

var (
	buildOnce sync.Once
	binPath   string
	buildErr  error
)

// Sluice builds cmd/sluice from this tree once per test binary.
func Sluice(t testing.TB) string {
	t.Helper()
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "sluice-bin-")
		if err != nil {
			buildErr = err
			return
		}
		testbed.AtExit(func() { os.RemoveAll(dir) })
		binPath = filepath.Join(dir, "sluice")
		cmd := exec.Command("go", "build", "-o", binPath, "github.com/sluice-io/sluice/cmd/sluice")
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			buildErr = fmt.Errorf("go build cmd/sluice: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return binPath
}

// Env is a testbed with the stand-in proxy and echo servers running, ready
// for an agent.
type Env struct {
	TB            *testbed.Testbed
	Echo          *testbed.EchoServer
	Records       string // the stand-in proxy's JSON records
	Dir           string
	PinPath       string
	StateFile     string
	WorkloadsFile string
	Bin           string
	AgentCgroup   *testbed.Cgroup
	// Proxy is the stand-in proxy NewEnforcing or StartProxy started.
	Proxy *testbed.Daemon
	// DNS answers for hostname entries at testbed.DNSV4:53; tests set its
	// records.
	DNS *testbed.DNSServer
}

// DNSResolver is the testbed's DNS server, as --dns-resolvers takes it.
var DNSResolver = netip.AddrPortFrom(testbed.DNSV4, 53)

// New builds the testbed with pods, the echo servers and the stand-in
// proxy.
func New(t testing.TB, pods int) *Env {
	t.Helper()
	e := NewWithoutProxy(t, pods)
	testbed.StartDaemon(t, e.TB.ProxyCgroup, e.TB.Node, "proxy",
		"-listen", fmt.Sprintf("%s:%d,[%s]:%d", datapath.DefaultProxyIPv4, datapath.DefaultProxyPort, datapath.DefaultProxyIPv6, datapath.DefaultProxyPort),
		"-records", e.Records, "-admin", adminAddr)
	return e
}

// NewEnforcing is New with a stand-in proxy that enforces the workloads
// file's policies as the generated Envoy listener does (see
// standin.Proxy.Workloads).
func NewEnforcing(t testing.TB, pods int) *Env {
	t.Helper()
	e := NewWithoutProxy(t, pods)
	e.StartProxy(t)
	return e
}

// StartProxy starts the conformance proxy (again, after a test killed
// it): it takes the agent's listener and clusters over ADS and executes
// them as Envoy would (test/conformance); its access log is e.Records.
func (e *Env) StartProxy(t testing.TB) *testbed.Daemon {
	t.Helper()
	e.Proxy = e.StartProxyPod(t, e.DefaultPod())
	return e.Proxy
}

// StartProxyPod starts a conformance proxy for pod's agent.
func (e *Env) StartProxyPod(t testing.TB, pod AgentPod) *testbed.Daemon {
	t.Helper()
	d := testbed.StartDaemon(t, e.TB.ProxyCgroup, e.TB.Node, "proxy",
		"-xds", pod.XDSSocket, "-records", pod.Records, "-admin", pod.Admin)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("conformance proxy (%s) log:\n%s", pod.Records, d.Stderr.String())
		}
	})
	return d
}

// NewWithoutProxy is New without a proxy: the caller starts one (Envoy).
func NewWithoutProxy(t testing.TB, pods int) *Env {
	t.Helper()
	tb := testbed.New(t, pods)
	if err := datapath.EnsureBPFFS(datapath.DefaultBPFFS); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	e := &Env{
		TB:            tb,
		Dir:           dir,
		Records:       filepath.Join(dir, "proxy.jsonl"),
		PinPath:       filepath.Join(datapath.DefaultBPFFS, "sluice-test-"+tb.ID),
		StateFile:     filepath.Join(dir, "state.json"),
		WorkloadsFile: filepath.Join(dir, "workloads.yaml"),
		Bin:           Sluice(t),
		AgentCgroup:   tb.Root.Child(t, "agent"),
	}
	e.DNS = testbed.ServeDNS(t, tb.External.ListenPacket(t, "udp", DNSResolver.String()), 2)
	e.Echo = testbed.ServeEcho(t)
	for _, a := range append(append([]netip.Addr{}, testbed.ExternalV4...), testbed.ExternalV6...) {
		for _, port := range []uint16{ServerPort, ExcludedPort} {
			e.Echo.Add(tb.External.Listen(t, "tcp", netip.AddrPortFrom(a, port).String()))
		}
		e.Echo.AddHTTP(tb.External.Listen(t, "tcp", netip.AddrPortFrom(a, HTTPPort).String()))
	}
	// The agent puts the proxy addresses on the node (idempotently); in a
	// cluster Envoy binds them only when the agent's listener arrives. Here
	// the stand-in binds at start, so they go first.
	EnsureProxyAddrs(t, tb.Node)
	t.Cleanup(func() {
		// Uninstall inside the node's netns: the proxy addresses it removes
		// are the testbed's, never the machine's.
		out, err := testbed.ExecCommand(t, e.AgentCgroup, tb.Node, e.Bin, "uninstall", "--pin-path", e.PinPath).CombinedOutput()
		if err != nil {
			t.Errorf("sluice uninstall: %v\n%s", err, out)
		}
	})
	return e
}

// StartEnvoy runs a real Envoy (bin) in the node's netns, in the proxy's
// cgroup, with the bootstrap `sluice bootstrap` prints for this agent. Its
// stdout (the JSON access log) goes to the returned file. Envoy cannot be
// installed on the machines sluice is built on; this runs where one is.
func (e *Env) StartEnvoy(t testing.TB, bin string) (accessLog string) {
	t.Helper()
	cfg := filepath.Join(e.Dir, "envoy.yaml")
	out, err := exec.Command(e.Bin, "bootstrap", "--node-id", "demo", "--xds-socket", filepath.Join(e.Dir, "xds.sock"),
		"--admin-address", adminAddr, "--output", cfg).CombinedOutput()
	if err != nil {
		t.Fatalf("sluice bootstrap: %v\n%s", err, out)
	}
	accessLog = filepath.Join(e.Dir, "envoy.log")
	f, err := os.Create(accessLog)
	if err != nil {
		t.Fatal(err)
	}
	cmd := testbed.ExecCommand(t, e.TB.ProxyCgroup, e.TB.Node, bin, "-c", cfg, "--disable-hot-restart",
		"--base-id", fmt.Sprint(os.Getpid()), "-l", "warning")
	cmd.Stdout, cmd.Stderr = f, f
	if err := cmd.Start(); err != nil {
		t.Fatalf("start envoy: %v", err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
		f.Close()
	})
	return accessLog
}

// EnsureProxyAddrs puts the default proxy addresses on the node netns's
// sluice0 (or lo), as the agent does.
func EnsureProxyAddrs(t testing.TB, node *testbed.Netns) {
	t.Helper()
	if _, _, err := (datapath.ProxyAddrs{Handle: node.NetlinkHandle(t)}).Ensure(datapath.DefaultProxyIPv4, datapath.DefaultProxyIPv6); err != nil {
		t.Fatalf("proxy address: %v", err)
	}
}

// Workload is one entry of the workloads file, for a testbed pod.
type Workload struct {
	Pod       *testbed.Pod
	Namespace string
	Name      string
	Mode      string // "", audit, enforce
	FailMode  string // "", open, closed
	Allow     string
	// Annotations are more annotations (the policy's is Allow).
	Annotations map[string]string
}

// WriteWorkloads writes the workloads file (atomically, as config
// management does).
func (e *Env) WriteWorkloads(t testing.TB, ws ...Workload) {
	t.Helper()
	doc := agent.WorkloadFile{Workloads: []agent.FileWorkload{}}
	for _, w := range ws {
		en := agent.FileWorkload{Name: w.Name, Namespace: w.Namespace, Cgroup: w.Pod.Cgroup.Path, IPs: []string{w.Pod.IPv4.String(), w.Pod.IPv6.String()},
			Labels: map[string]string{}, Annotations: map[string]string{}}
		if w.Mode != "" {
			en.Labels["sluice.io/mode"] = w.Mode
		}
		if w.FailMode != "" {
			en.Labels["sluice.io/fail-mode"] = w.FailMode
		}
		for k, v := range w.Annotations {
			en.Annotations[k] = v
		}
		if w.Allow != "" {
			en.Annotations["sluice.io/allow"] = w.Allow
		}
		doc.Workloads = append(doc.Workloads, en)
	}
	b, err := yaml.Marshal(doc)
	if err != nil {
		t.Fatal(err)
	}
	tmp := e.WorkloadsFile + ".tmp"
	if err := os.WriteFile(tmp, b, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, e.WorkloadsFile); err != nil {
		t.Fatal(err)
	}
}

// StartAgent runs `sluice agent` in the node's netns, attached to the
// testbed's root cgroup, with the file source (or the source sourceArgs
// name); it returns once the agent serves. Its JSON log is in the returned
// daemon's Stderr.
func (e *Env) StartAgent(t testing.TB, sourceArgs ...string) *testbed.Daemon {
	t.Helper()
	return e.StartAgentPod(t, e.DefaultPod(), true, sourceArgs...)
}

// AgentPod is what one DaemonSet pod has of its own: its emptyDir, with
// the ADS socket, the proxy's admin address, the agent's health socket
// and state file. Two agents (an update's old and new pod) share the rest:
// the node, its pins and its ports.
type AgentPod struct {
	XDSSocket    string
	Admin        string // the proxy's admin: host:port or unix:PATH
	HealthSocket string // "" none
	StateFile    string
	Records      string // the conformance proxy's access log
}

// DefaultPod is the pod StartAgent and StartProxy use.
func (e *Env) DefaultPod() AgentPod {
	return AgentPod{XDSSocket: filepath.Join(e.Dir, "xds.sock"), Admin: adminAddr, StateFile: e.StateFile, Records: e.Records}
}

// NewPod is a pod with a directory of its own under e.Dir.
func (e *Env) NewPod(t testing.TB, name string) AgentPod {
	t.Helper()
	dir := filepath.Join(e.Dir, name)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return AgentPod{XDSSocket: filepath.Join(dir, "xds.sock"), Admin: "unix:" + filepath.Join(dir, "admin.sock"),
		HealthSocket: filepath.Join(dir, "agent.sock"), StateFile: filepath.Join(dir, "state.json"), Records: filepath.Join(dir, "proxy.jsonl")}
}

// StartAgentPod is StartAgent for pod's files; with wait false it returns
// at once (an agent standing by for the node lock does not serve yet).
func (e *Env) StartAgentPod(t testing.TB, pod AgentPod, wait bool, sourceArgs ...string) *testbed.Daemon {
	t.Helper()
	if len(sourceArgs) == 0 {
		sourceArgs = []string{"--workloads-file", e.WorkloadsFile}
	}
	args := append([]string{"agent"}, sourceArgs...)
	args = append(args,
		"--cgroup-attach", e.TB.Root.Path,
		"--pin-path", e.PinPath,
		"--proxy-admin", pod.Admin,
		"--xds-socket", pod.XDSSocket,
		"--metrics-address", metricsAddr,
		"--state-file", pod.StateFile,
	)
	if pod.HealthSocket != "" {
		args = append(args, "--health-socket", pod.HealthSocket)
	}
	cmd := testbed.ExecCommand(t, e.AgentCgroup, e.TB.Node, e.Bin, args...)
	cmd.Env = append(cmd.Env, "SLUICE_READY_LINE=1")
	var d *testbed.Daemon
	if wait {
		d = testbed.StartCmd(t, "sluice agent", cmd)
	} else {
		d = testbed.LaunchCmd(t, "sluice agent", cmd)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("sluice agent (%s) log:\n%s", pod.StateFile, d.Stderr.String())
		}
	})
	return d
}

// Health runs `sluice health` against pod's agent (with --ready if
// ready): its output, and whether it said yes.
func (e *Env) Health(t testing.TB, pod AgentPod, ready bool) (string, bool) {
	t.Helper()
	args := []string{"health", "--socket", pod.HealthSocket}
	if ready {
		args = append(args, "--ready")
	}
	out, err := exec.Command(e.Bin, args...).CombinedOutput()
	return strings.TrimSpace(string(out)), err == nil
}

// StopAgent sends SIGTERM and waits for a clean exit.
func StopAgent(t testing.TB, d *testbed.Daemon) {
	t.Helper()
	if err := d.Signal(syscall.SIGTERM, 10*time.Second); err != nil {
		t.Fatalf("agent did not stop cleanly on SIGTERM: %v\n%s", err, d.Stderr.String())
	}
}

// Status runs `sluice status` (it reads the pins, so it runs anywhere).
func (e *Env) Status(t testing.TB, args ...string) string {
	t.Helper()
	cmd := exec.Command(e.Bin, append([]string{"status", "--pin-path", e.PinPath, "--state-file", e.StateFile}, args...)...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("sluice status: %v\n%s", err, out)
	}
	return string(out)
}

// Metrics fetches the agent's /metrics from inside the node's netns.
func (e *Env) Metrics(t testing.TB) string {
	t.Helper()
	return string(testbed.Run(t, 15*time.Second, e.AgentCgroup, e.TB.Node, "httpget", "http://"+metricsAddr+"/metrics"))
}

// MetricLines returns the lines of metrics that start with prefix.
func MetricLines(metrics, prefix string) []string {
	var out []string
	for _, l := range strings.Split(metrics, "\n") {
		if strings.HasPrefix(l, prefix) {
			out = append(out, l)
		}
	}
	return out
}

// WaitFor polls cond until it holds or timeout passes.
func WaitFor(t testing.TB, what string, timeout time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// XDSListenerYAML asks the agent's ADS server for its listener, as Envoy
// would, and returns it as YAML (empty if there is none yet).
func (e *Env) XDSListenerYAML(t testing.TB) string {
	t.Helper()
	// Envoy's xDS client (envoy_grpc) takes messages of any size; grpc-go's
	// default of 4 MiB would refuse a 1,000-pod listener.
	conn, err := grpc.NewClient("unix://"+filepath.Join(e.Dir, "xds.sock"), grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(256<<20)))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	stream, err := discovery.NewAggregatedDiscoveryServiceClient(conn).StreamAggregatedResources(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := stream.Send(&discovery.DiscoveryRequest{Node: &core.Node{Id: "harness"}, TypeUrl: resource.ListenerType}); err != nil {
		t.Fatal(err)
	}
	resp, err := stream.Recv()
	if err != nil {
		t.Fatalf("xds: %v", err)
	}
	var out strings.Builder
	for _, a := range resp.GetResources() {
		var l listener.Listener
		if err := a.UnmarshalTo(&l); err != nil {
			t.Fatal(err)
		}
		y, err := xds.MarshalYAML(&l)
		if err != nil {
			t.Fatal(err)
		}
		out.Write(y)
	}
	return out.String()
}

// PinnedProxyPort is the proxy port the datapath pinned at pinPath sends
// connections to.
func PinnedProxyPort(t testing.TB, pinPath string) uint16 {
	t.Helper()
	d, err := datapath.OpenPinned(pinPath)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	st, err := d.ProxyState()
	if err != nil {
		t.Fatal(err)
	}
	return st.Port
}
