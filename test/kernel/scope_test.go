package kernel

import (
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/sluice-io/sluice/agent/datapath"
	"github.com/sluice-io/sluice/test/harness"
	"github.com/sluice-io/sluice/test/standin"
	"github.com/sluice-io/sluice/test/testbed"
)

// effective returns, per attach type, how many of the datapath's programs
// (those of its pinned links) a socket of cgroup cg runs.
func (f *fixture) effective(t *testing.T, cg string) map[ebpf.AttachType]int {
	t.Helper()
	return harness.Effective(t, cg, f.ourPrograms(t))
}

func (f *fixture) ourPrograms(t *testing.T) map[ebpf.ProgramID]bool {
	t.Helper()
	return harness.OurPrograms(t, f.cfg.PinPath)
}

// In the workloads attach scope nothing of sluice runs for a cgroup no
// workload selects: the kernel's effective program arrays of an unselected
// pod are empty, while a selected pod, and a cgroup a process of it makes
// below its own (a container, or an attempt to step out of the pod's
// cgroup), run every client program once, and the proxy's cgroup the two
// it needs. Through that, the datapath does what it does in the node
// scope: the selected pod's connections reach the proxy with their
// original destination (IPv4, IPv6, v4-mapped), getpeername names it, and
// an enforce-mode pod's side doors stay closed.
func TestPrivilegedWorkloadsScope(t *testing.T) {
	f := setupWith(t, 3, datapath.Config{Scope: datapath.ScopeWorkloads})
	f.sideDoors(t)
	sel, enforced, unsel := f.tb.Pods[0], f.tb.Pods[1], f.tb.Pods[2]
	f.selectPod(t, sel, 1, datapath.FailClosed)
	f.selectWorkload(t, enforced, datapath.Workload{ID: 2, FailMode: datapath.FailClosed, Enforce: true})
	inner := sel.Cgroup.Child(t, "container")

	client := len(harness.HookTypes) - 1 // all but getsockopt
	for _, c := range []struct {
		name string
		cg   string
		want int
	}{
		{"unselected pod", unsel.Cgroup.Path, 0},
		{"the testbed's root", f.tb.Root.Path, 0},
		{"selected pod", sel.Cgroup.Path, client},
		{"a cgroup below the selected pod", inner.Path, client},
		{"the proxy", f.tb.ProxyCgroup.Path, 2},
	} {
		eff := f.effective(t, c.cg)
		if harness.Total(eff) != c.want {
			t.Errorf("%s runs %d of the datapath's programs (%v), want %d", c.name, harness.Total(eff), eff, c.want)
		}
		for typ, n := range eff {
			if n > 1 {
				t.Errorf("%s runs %d %s programs, want one", c.name, n, typ)
			}
		}
	}

	before := f.counters(t)
	for _, c := range []struct {
		name     string
		cg       *testbed.Cgroup
		spec     string
		wantOrig string
	}{
		{"IPv4", sel.Cgroup, "tcp4:" + hostport(ext4, serverPort), hostport(ext4, serverPort)},
		{"IPv6", sel.Cgroup, "tcp6:" + hostport(ext6, serverPort), hostport(ext6, serverPort)},
		{"v4-mapped", sel.Cgroup, "mapped:" + hostport(ext4b, serverPort), hostport(ext4b, serverPort)},
		{"from a cgroup below the pod's", inner, "tcp4:" + hostport(ext4, serverPort), hostport(ext4, serverPort)},
	} {
		t.Run(c.name, func(t *testing.T) {
			r := f.dial(t, c.cg, sel, c.spec)[0]
			if r.Err != "" {
				t.Fatalf("dial %s: %s", c.spec, r.Err)
			}
			if r.Reply != "peer="+testbed.NodeV4.String() && r.Reply != "peer="+testbed.NodeV6.String() {
				t.Errorf("server saw %q, want the node's address (the proxy forwarded it)", r.Reply)
			}
			rec := f.recordFor(t, r.Local)
			if rec.OrigDst != c.wantOrig || rec.Result != "forwarded" {
				t.Errorf("proxy recovered %q (%s, err %q), want %s", rec.OrigDst, rec.Result, rec.Err, c.wantOrig)
			}
			if r.Peer != c.wantOrig && r.Peer != hostport(netip.AddrFrom16(ext4b.As16()), serverPort) {
				t.Errorf("getpeername = %s, want the original destination %s", r.Peer, c.wantOrig)
			}
		})
	}
	t.Run("unselected pod", func(t *testing.T) {
		r := f.dial(t, unsel.Cgroup, unsel, "tcp4:"+hostport(ext4, serverPort))[0]
		if r.Err != "" || r.Reply != "peer="+unsel.IPv4.String() {
			t.Errorf("unselected pod: %+v, want the server to see the pod itself", r)
		}
	})
	t.Run("enforce side doors", func(t *testing.T) {
		seen := len(f.echo.Datagrams())
		for _, spec := range []string{"udp4:" + hostport(ext4, 443), "sendto6:" + hostport(ext6, 443), "ping4:" + hostport(ext4, 0), "raw4:" + hostport(ext4, 0)} {
			if r := f.dial(t, enforced.Cgroup, enforced, spec)[0]; r.Err == "" || r.Reply != "" {
				t.Errorf("%s from the enforce-mode pod: %+v, want it refused", spec, r)
			}
		}
		if got := f.echo.Datagrams()[seen:]; len(got) != 0 {
			t.Errorf("UDP servers received %+v from the enforce-mode pod, want nothing", got)
		}
		if r := f.dial(t, enforced.Cgroup, enforced, "udp4:"+hostport(ext4b, 53))[0]; r.Err != "" {
			t.Errorf("DNS to the resolver: %+v, want it through", r)
		}
	})
	wantCounted(t, before, f.counters(t), map[string]uint64{"redirected_ipv4": 3, "redirected_ipv6": 1, "orig_dst_answered": 4})

	// Deselected, the pod runs nothing again and goes direct.
	cgid, err := datapath.CgroupID(sel.Cgroup.Path)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.dp.DeleteWorkload(cgid); err != nil {
		t.Fatal(err)
	}
	if eff := f.effective(t, inner.Path); harness.Total(eff) != 0 {
		t.Errorf("deselected pod still runs %v", eff)
	}
	if _, err := os.Stat(filepath.Join(f.cfg.PinPath, "cgroups", fmtID(cgid))); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("deselected pod's pin directory: %v, want it gone", err)
	}
	if r := f.dial(t, sel.Cgroup, sel, "tcp4:"+hostport(ext4, serverPort))[0]; r.Reply != "peer="+sel.IPv4.String() {
		t.Errorf("deselected pod: %+v, want direct", r)
	}
}

func fmtID(id uint64) string { return strconv.FormatUint(id, 10) }

// A restart reopens the pins in the workloads scope: every selected
// cgroup's links are switched to the new programs in place (the program
// ids change, the links do not), a cgroup removed while no agent ran loses
// its pins, and connections are redirected throughout. The pins refuse the
// other scope, and the proxy's cgroup and the workloads' must not overlap
// or nest, which would run programs twice.
func TestPrivilegedWorkloadsScopeRestart(t *testing.T) {
	f := setupWith(t, 2, datapath.Config{Scope: datapath.ScopeWorkloads})
	pod, gone := f.tb.Pods[0], f.tb.Pods[1]
	f.selectPod(t, pod, 1, datapath.FailClosed)
	goneCg := gone.Cgroup.Child(t, "short-lived")
	goneID, err := datapath.CgroupID(goneCg.Path)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.dp.SetWorkload(goneID, datapath.Workload{ID: 2, CgroupPath: goneCg.Path}); err != nil {
		t.Fatal(err)
	}
	progsOf := func() map[string]ebpf.ProgramID {
		out := map[string]ebpf.ProgramID{}
		for _, p := range datapath.Programs(f.cfg.PinPath) {
			if p.Err != nil {
				t.Errorf("%s: %v", p.Name, p.Err)
			}
			out[p.Name+"@"+fmtID(p.CgroupID)] = p.ProgramID
		}
		return out
	}
	old := progsOf()
	if len(old) != 2+2*(len(harness.HookTypes)-1) {
		t.Fatalf("pinned links: %v, want the proxy's 2 and %d for each of the two workloads", old, len(harness.HookTypes)-1)
	}

	f.dp.Close()
	if err := os.Remove(goneCg.Path); err != nil {
		t.Fatal(err)
	}
	// The kernel releases a removed cgroup's links shortly after the rmdir
	// (they turn defunct: no cgroup); an agent restart takes longer.
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		n := 0
		for _, p := range datapath.Programs(f.cfg.PinPath) {
			if p.Err == nil && p.CgroupID == goneID {
				n++
			}
		}
		if n == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the removed cgroup's %d links still name it after 5 s", n)
		}
	}
	// Another scope refuses the pins, and changes nothing.
	node := f.cfg
	node.Scope = datapath.ScopeNode
	if d, err := datapath.Open(node); !errors.Is(err, datapath.ErrOtherScope) {
		if d != nil {
			d.Close()
		}
		t.Fatalf("open in the node scope: %v, want ErrOtherScope", err)
	}
	dp, err := datapath.Open(f.cfg)
	if err != nil {
		t.Fatalf("reopen: %v", err)
	}
	f.dp = dp
	now := progsOf()
	if _, err := os.Stat(filepath.Join(f.cfg.PinPath, "cgroups", fmtID(goneID))); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("removed cgroup's pins: %v, want them removed by the reopen", err)
	}
	switched := 0
	for k, id := range now {
		was, ok := old[k]
		if !ok {
			t.Errorf("link %s appeared at the reopen", k)
		} else if was != id {
			switched++
		}
	}
	if want := 2 + len(harness.HookTypes) - 1; switched != want || len(now) != want {
		t.Errorf("reopen switched %d of %d links (%v -> %v), want all %d of the live cgroups'", switched, len(now), old, now, want)
	}
	r := f.dial(t, pod.Cgroup, pod, "tcp4:"+hostport(ext4, serverPort))[0]
	if rec := f.recordFor(t, r.Local); rec.OrigDst != hostport(ext4, serverPort) {
		t.Errorf("after the reopen the proxy recovered %q, want %s", rec.OrigDst, hostport(ext4, serverPort))
	}

	// Nesting and overlap are refused, and attach nothing.
	podID, _ := datapath.CgroupID(pod.Cgroup.Path)
	below := pod.Cgroup.Child(t, "below")
	belowID, _ := datapath.CgroupID(below.Path)
	proxyChild := f.tb.ProxyCgroup.Child(t, "beside-envoy")
	proxyChildID, _ := datapath.CgroupID(proxyChild.Path)
	inner := gone.Cgroup.Child(t, "inner")
	innerID, _ := datapath.CgroupID(inner.Path)
	if err := f.dp.SetWorkload(innerID, datapath.Workload{ID: 3, CgroupPath: inner.Path}); err != nil {
		t.Fatal(err)
	}
	outerID, _ := datapath.CgroupID(gone.Cgroup.Path)
	for _, c := range []struct {
		name string
		id   uint64
		path string
	}{
		{"below a selected cgroup", belowID, below.Path},
		{"above a selected cgroup", outerID, gone.Cgroup.Path},
		{"in the proxy's cgroup", proxyChildID, proxyChild.Path},
		{"the wrong id for the path", podID + 1, pod.Cgroup.Path},
		{"no path", belowID, ""},
	} {
		before := 0
		if c.path != "" {
			before = harness.Total(f.effective(t, c.path))
		}
		err := f.dp.SetWorkload(c.id, datapath.Workload{ID: 9, CgroupPath: c.path})
		if err == nil {
			t.Errorf("%s: selected, want an error", c.name)
		} else {
			t.Logf("%s: %v", c.name, err)
		}
		if c.path != "" && harness.Total(f.effective(t, c.path)) != before {
			t.Errorf("%s: the refused selection attached programs", c.name)
		}
		ws, _ := f.dp.Workloads()
		if _, ok := ws[c.id]; ok {
			t.Errorf("%s: the refused selection wrote a workload entry", c.name)
		}
	}
	ours := f.ourPrograms(t)
	f.dp.Close()
	if err := datapath.Uninstall(f.cfg.PinPath); err != nil {
		t.Fatal(err)
	}
	for _, cg := range []string{pod.Cgroup.Path, f.tb.ProxyCgroup.Path} {
		if eff := harness.Effective(t, cg, ours); harness.Total(eff) != 0 {
			t.Errorf("after uninstall %s runs %v", cg, eff)
		}
	}
	if _, err := os.Stat(f.cfg.PinPath); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("pins after uninstall: %v", err)
	}
}

// An update moves the proxy to another cgroup (on Kubernetes, the new
// DaemonSet pod's): the agent opening the pins with the new proxy cgroup
// keeps the previous one's two programs attached (retired under
// proxies/<id>/, switched to the new agent's programs) while its proxy
// drains and still takes every connection sent to its port, and attaches
// them to the new cgroup too. Once the datapath sends connections to the
// new proxy's port, they reach it with their original destination. A
// workload in a retired proxy's cgroup is refused (the proxy's programs
// would run twice). When the previous cgroup goes, the next start removes
// its pins; a cgroup that is the proxy's again takes its retired links
// back instead of attaching a second set.
func TestPrivilegedWorkloadsScopeProxyMoves(t *testing.T) {
	f := setupWith(t, 1, datapath.Config{Scope: datapath.ScopeWorkloads})
	pod := f.tb.Pods[0]
	f.selectPod(t, pod, 1, datapath.FailClosed)
	prev, next, third := f.tb.ProxyCgroup, f.tb.Root.Child(t, "proxy-next"), f.tb.Root.Child(t, "proxy-third")
	id := func(cg *testbed.Cgroup) uint64 {
		n, err := datapath.CgroupID(cg.Path)
		if err != nil {
			t.Fatal(err)
		}
		return n
	}
	prevID, nextID, thirdID := id(prev), id(next), id(third)
	reopen := func(proxy *testbed.Cgroup) {
		t.Helper()
		f.dp.Close()
		f.cfg.ProxyCgroupPath = proxy.Path
		dp, err := datapath.Open(f.cfg)
		if err != nil {
			t.Fatalf("reopen with proxy cgroup %s: %v", proxy.Path, err)
		}
		f.dp = dp
	}
	proxyRuns := harness.ProxyRuns
	checkProxy := func(cg *testbed.Cgroup, ours map[ebpf.ProgramID]bool) {
		t.Helper()
		if eff := harness.Effective(t, cg.Path, ours); !maps.Equal(eff, proxyRuns) {
			t.Errorf("proxy cgroup %s runs %v, want %v", cg.Path, eff, proxyRuns)
		}
	}
	retired := func(cgid uint64) string { return filepath.Join(f.cfg.PinPath, "proxies", fmtID(cgid)) }

	// Below the proxy's cgroup, the proxy's sockets would run both sets.
	f.dp.Close()
	inner := prev.Child(t, "inner-proxy")
	f.cfg.ProxyCgroupPath = inner.Path
	if d, err := datapath.Open(f.cfg); err == nil {
		d.Close()
		t.Error("a proxy cgroup below the previous proxy's was accepted")
	} else {
		t.Logf("below the previous proxy's cgroup: %v", err)
	}
	f.cfg.ProxyCgroupPath = prev.Path
	dp, err := datapath.Open(f.cfg)
	if err != nil {
		t.Fatal(err)
	}
	f.dp = dp
	if eff := harness.Effective(t, inner.Path, f.ourPrograms(t)); !maps.Equal(eff, proxyRuns) {
		t.Errorf("the refused proxy cgroup runs %v, want the previous proxy's %v", eff, proxyRuns)
	}
	if err := os.Remove(inner.Path); err != nil {
		t.Fatal(err)
	}

	reopen(next)
	ours := f.ourPrograms(t)
	checkProxy(prev, ours)
	checkProxy(next, ours)
	if _, err := os.Stat(retired(prevID)); err != nil {
		t.Errorf("the previous proxy's links are not retired: %v", err)
	}
	byName := map[string]map[ebpf.ProgramID]bool{}
	for _, p := range datapath.Programs(f.cfg.PinPath) {
		if p.CgroupID == prevID || p.CgroupID == nextID {
			if byName[p.Name] == nil {
				byName[p.Name] = map[ebpf.ProgramID]bool{}
			}
			byName[p.Name][p.ProgramID] = true
		}
	}
	for name, ids := range byName {
		if len(ids) != 1 {
			t.Errorf("%s runs programs %v on the two proxy cgroups, want the new agent's one", name, ids)
		}
	}
	if len(byName) != 2 {
		t.Errorf("proxy programs pinned: %v, want sockops and getsockopt", byName)
	}

	// The previous proxy, draining, still takes what is sent to its port.
	dst := hostport(ext4, serverPort)
	for _, spec := range []string{"tcp4:" + dst, "tcp6:" + hostport(ext6, serverPort)} {
		r := f.dial(t, pod.Cgroup, pod, spec)[0]
		if rec := f.recordFor(t, r.Local); rec.OrigDst != spec[5:] {
			t.Errorf("%s through the previous proxy: it recovered %q", spec, rec.OrigDst)
		}
	}
	// The new proxy, once the datapath sends connections to its port.
	const takeover = datapath.DefaultProxyPort + 1
	records := filepath.Join(t.TempDir(), "next.jsonl")
	testbed.StartDaemon(t, next, f.tb.Node, "proxy", "-listen", fmt.Sprintf("%s:%d,[%s]:%d", proxyV4, takeover, proxyV6, takeover), "-records", records)
	if err := f.dp.SetProxy(datapath.Proxy{IPv4: proxyV4, IPv6: proxyV6, Port: takeover}); err != nil {
		t.Fatal(err)
	}
	for _, spec := range []string{"tcp4:" + dst, "tcp6:" + hostport(ext6, serverPort)} {
		r := f.dial(t, pod.Cgroup, pod, spec)[0]
		rec, ok := standin.FindRecord(records, r.Local, 3*time.Second)
		if !ok || rec.OrigDst != spec[5:] {
			t.Errorf("%s through the new proxy: recorded %v, recovered %q", spec, ok, rec.OrigDst)
		}
	}
	// A workload in the retired proxy's cgroup would run its programs twice.
	beside := prev.Child(t, "beside-old-envoy")
	if err := f.dp.SetWorkload(id(beside), datapath.Workload{ID: 7, CgroupPath: beside.Path}); err == nil {
		t.Error("a workload in the retired proxy's cgroup was selected")
	} else {
		t.Logf("in the retired proxy's cgroup: %v", err)
	}

	// The previous proxy's pod goes; the next start drops its pins.
	f.proxy.Signal(syscall.SIGKILL, 5*time.Second)
	for _, cg := range []string{beside.Path, prev.Path} {
		if err := os.Remove(cg); err != nil {
			t.Fatal(err)
		}
	}
	harness.WaitFor(t, "the removed proxy cgroup's links defunct", 5*time.Second, func() bool {
		for _, p := range datapath.Programs(f.cfg.PinPath) {
			if p.CgroupID == prevID {
				return false
			}
		}
		return true
	})
	reopen(next)
	if _, err := os.Stat(retired(prevID)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the removed proxy cgroup's pins: %v, want them removed", err)
	}
	// next -> third -> next: next's retired links come back, once, as the
	// same links (never detached in between).
	linksOf := func(cgid uint64) map[string]link.ID {
		out := map[string]link.ID{}
		for _, p := range datapath.Programs(f.cfg.PinPath) {
			if p.CgroupID == cgid {
				out[p.Name] = p.LinkID
			}
		}
		return out
	}
	before := linksOf(nextID)
	reopen(third)
	reopen(next)
	if after := linksOf(nextID); !maps.Equal(before, after) || len(after) != 2 {
		t.Errorf("proxy cgroup %d's links %v after next -> third -> next, want the same two links %v", nextID, after, before)
	}
	ours = f.ourPrograms(t)
	checkProxy(next, ours)
	checkProxy(third, ours)
	if _, err := os.Stat(retired(nextID)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("proxy cgroup %d is the proxy's again, yet its retired pins stay: %v", nextID, err)
	}
	if _, err := os.Stat(retired(thirdID)); err != nil {
		t.Errorf("the proxy cgroup before it is not retired: %v", err)
	}
	// Nesting in either direction is refused, before anything moves: a
	// proxy cgroup above a retired one or in a selected workload, and a
	// workload above a retired proxy's cgroup.
	wrap := f.tb.Root.Child(t, "wrap")
	wrapped := wrap.Child(t, "proxy")
	reopen(wrapped) // next retired, wrapped the proxy's
	reopen(next)    // wrapped retired, next's links taken back
	for _, c := range []struct{ name, path string }{
		{"above a retired proxy's cgroup", wrap.Path},
		{"in a selected workload", pod.Cgroup.Child(t, "proxy-in-pod").Path},
	} {
		f.dp.Close()
		cfg := f.cfg
		cfg.ProxyCgroupPath = c.path
		if d, err := datapath.Open(cfg); err == nil {
			d.Close()
			t.Errorf("a proxy cgroup %s was accepted", c.name)
		} else {
			t.Logf("proxy cgroup %s: %v", c.name, err)
		}
		reopen(next)
	}
	if after := linksOf(nextID); !maps.Equal(before, after) {
		t.Errorf("the refused proxy cgroups changed the proxy's links: %v, want %v", after, before)
	}
	if err := f.dp.SetWorkload(id(wrap), datapath.Workload{ID: 8, CgroupPath: wrap.Path}); err == nil {
		t.Error("a workload above a retired proxy's cgroup was selected")
	} else {
		t.Logf("above a retired proxy's cgroup: %v", err)
	}
	// A retired proxy's directory with no link (a crash between its mkdir
	// and its first pin) would only refuse its cgroup: the next start
	// removes it.
	empty := retired(id(wrap))
	if err := os.Mkdir(empty, 0o700); err != nil {
		t.Fatal(err)
	}
	reopen(next)
	if _, err := os.Stat(empty); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("an empty retired proxy directory: %v, want it removed", err)
	}

	r := f.dial(t, pod.Cgroup, pod, "tcp4:"+dst)[0]
	if rec, ok := standin.FindRecord(records, r.Local, 3*time.Second); !ok || rec.OrigDst != dst {
		t.Errorf("after next -> third -> next: recorded %v, recovered %q", ok, rec.OrigDst)
	}
	ours = f.ourPrograms(t)
	f.dp.Close()
	if err := datapath.Uninstall(f.cfg.PinPath); err != nil {
		t.Fatal(err)
	}
	for _, cg := range []*testbed.Cgroup{next, third, wrapped, pod.Cgroup} {
		if eff := harness.Effective(t, cg.Path, ours); harness.Total(eff) != 0 {
			t.Errorf("after uninstall %s runs %v", cg.Path, eff)
		}
	}
	f.dp, _ = datapath.Open(f.cfg) // the fixture's cleanup closes and uninstalls
}
