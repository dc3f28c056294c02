// Package kernel holds the privileged datapath tests: they load the real
// programs, attach them to a test cgroup, and send real connections between
// network namespaces, checking what the external server and the proxy saw.
package kernel

import (
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/sluice-io/sluice/agent/datapath"
	"github.com/sluice-io/sluice/test/harness"
	"github.com/sluice-io/sluice/test/standin"
	"github.com/sluice-io/sluice/test/testbed"
)

func TestMain(m *testing.M) {
	testbed.Main(m, map[string]testbed.Role{"proxy": standin.Main})
}

const (
	serverPort   = 8080
	excludedPort = 9090
)

var (
	proxyV4 = datapath.DefaultProxyIPv4
	proxyV6 = datapath.DefaultProxyIPv6
)

type fixture struct {
	tb      *testbed.Testbed
	dp      *datapath.Datapath
	cfg     datapath.Config
	records string
	echo    *testbed.EchoServer
	proxy   *testbed.Daemon
}

// setup builds a testbed with pods, installs the datapath on its root cgroup,
// puts the proxy address on the node's lo, starts echo servers on the
// external addresses and the stand-in proxy in its own cgroup on the node.
func setup(t *testing.T, pods int, proxyArgs ...string) *fixture {
	t.Helper()
	return setupWith(t, pods, datapath.Config{}, proxyArgs...)
}

// setupWith is setup with datapath settings beyond the paths (which it
// fills in).
func setupWith(t *testing.T, pods int, cfg datapath.Config, proxyArgs ...string) *fixture {
	t.Helper()
	return setupOpen(t, pods, cfg, nil, proxyArgs...)
}

// setupOpen is setupWith with the datapath installed by open (a frozen
// earlier layout's installer, say); nil is datapath.Open, in the scope
// cfg asks for or, when it asks for none, SLUICE_TEST_SCOPE's (node or
// workloads: `make test` runs this package a second time in the workloads
// attach scope).
func setupOpen(t *testing.T, pods int, cfg datapath.Config, open func(datapath.Config) (*datapath.Datapath, error), proxyArgs ...string) *fixture {
	t.Helper()
	tb := testbed.New(t, pods)
	f := &fixture{tb: tb}

	if err := datapath.EnsureBPFFS(datapath.DefaultBPFFS); err != nil {
		t.Fatal(err)
	}
	f.cfg = cfg
	if os.Getenv("SLUICE_TEST_SCOPE") == "workloads" && open == nil {
		f.cfg.Scope = datapath.ScopeWorkloads
	}
	if open == nil {
		open = datapath.Open
	}
	f.cfg.CgroupPath = tb.Root.Path
	f.cfg.ProxyCgroupPath = tb.ProxyCgroup.Path
	f.cfg.PinPath = filepath.Join(datapath.DefaultBPFFS, "sluice-test-"+tb.ID)
	dp, err := open(f.cfg)
	if err != nil {
		t.Fatalf("open datapath: %v", err)
	}
	f.dp = dp
	t.Cleanup(func() {
		f.dp.Close()
		if err := datapath.Uninstall(f.cfg.PinPath); err != nil {
			t.Errorf("uninstall: %v", err)
		}
	})
	if err := dp.SetProxy(datapath.Proxy{IPv4: proxyV4, IPv6: proxyV6, Port: datapath.DefaultProxyPort}); err != nil {
		t.Fatal(err)
	}
	if err := dp.SetExclusions(datapath.DefaultExclusions); err != nil {
		t.Fatal(err)
	}
	if err := dp.SetReady(true); err != nil {
		t.Fatal(err)
	}

	harness.EnsureProxyAddrs(t, tb.Node)

	f.echo = testbed.ServeEcho(t)
	for _, a := range append(append([]netip.Addr{}, testbed.ExternalV4...), testbed.ExternalV6...) {
		for _, port := range []uint16{serverPort, excludedPort} {
			f.echo.Add(tb.External.Listen(t, "tcp", netip.AddrPortFrom(a, port).String()))
		}
	}

	f.records = filepath.Join(t.TempDir(), "proxy.jsonl")
	args := append([]string{
		"-listen", fmt.Sprintf("%s:%d,[%s]:%d", proxyV4, datapath.DefaultProxyPort, proxyV6, datapath.DefaultProxyPort),
		"-records", f.records,
	}, proxyArgs...)
	f.proxy = testbed.StartDaemon(t, tb.ProxyCgroup, tb.Node, "proxy", args...)
	return f
}

func (f *fixture) selectPod(t *testing.T, p *testbed.Pod, id uint32, mode datapath.FailMode) {
	t.Helper()
	f.selectWorkload(t, p, datapath.Workload{ID: id, FailMode: mode})
}

// selectWorkload selects pod p's cgroup with the given settings.
func (f *fixture) selectWorkload(t *testing.T, p *testbed.Pod, w datapath.Workload) {
	t.Helper()
	cgid, err := datapath.CgroupID(p.Cgroup.Path)
	if err != nil {
		t.Fatal(err)
	}
	w.CgroupPath = p.Cgroup.Path
	if err := f.dp.SetWorkload(cgid, w); err != nil {
		t.Fatal(err)
	}
}

// dial runs the client role in cgroup cg and pod p's network namespace.
func (f *fixture) dial(t *testing.T, cg *testbed.Cgroup, p *testbed.Pod, specs ...string) []testbed.DialResult {
	t.Helper()
	out := testbed.Run(t, 30*time.Second, cg, p.Netns, "client", specs...)
	res := testbed.Dial(t, out)
	if len(res) != len(specs) {
		t.Fatalf("got %d results for %d specs", len(res), len(specs))
	}
	return res
}

// proxyRecords returns what the stand-in proxy recorded so far.
func (f *fixture) proxyRecords(t *testing.T) []standin.Record {
	return standin.ReadRecords(f.records)
}

// recordFor waits briefly for the proxy's record of the connection from client.
func (f *fixture) recordFor(t *testing.T, client string) standin.Record {
	t.Helper()
	r, ok := standin.FindRecord(f.records, client, 3*time.Second)
	if !ok {
		t.Fatalf("proxy recorded no connection from %s; records: %+v", client, f.proxyRecords(t))
	}
	return r
}

// pinnedMap opens the datapath's pinned map name, closed when the test ends.
func (f *fixture) pinnedMap(t *testing.T, name string) *ebpf.Map {
	t.Helper()
	m, err := ebpf.LoadPinnedMap(filepath.Join(f.cfg.PinPath, name), nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	return m
}

func (f *fixture) counters(t *testing.T) datapath.Counters {
	t.Helper()
	c, err := f.dp.Counters()
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// wantCounted checks that each named counter (datapath.CounterNames())
// moved by exactly its count from before to after.
func wantCounted(t *testing.T, before, after datapath.Counters, want map[string]uint64) {
	t.Helper()
	b, a := before.ByName(), after.ByName()
	for name, w := range want {
		if _, ok := a[name]; !ok {
			t.Errorf("no counter %s (datapath.CounterNames: %v)", name, datapath.CounterNames())
		} else if a[name]-b[name] != w {
			t.Errorf("%s counted %d, want %d", name, a[name]-b[name], w)
		}
	}
}
