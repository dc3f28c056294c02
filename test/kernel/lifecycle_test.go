package kernel

import (
	"bufio"
	"encoding/binary"
	"encoding/json"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/sluice-io/sluice/agent/datapath"
	"github.com/sluice-io/sluice/test/harness"
	"github.com/sluice-io/sluice/test/testbed"
)

// An agent restart closes its datapath handle and reopens the pins (which
// also swaps in this binary's programs with link.Update). A redirected
// connection opened before keeps working across it, and new connections are
// still redirected; the maps keep their entries.
func TestPrivilegedRestartKeepsConnections(t *testing.T) {
	f := setup(t, 1)
	pod := f.tb.Pods[0]
	f.selectPod(t, pod, 7, datapath.FailClosed)

	cmd := testbed.Command(t, pod.Cgroup, pod.Netns, "hold", "tcp4:"+hostport(ext4, serverPort))
	stdin, stdout := testbed.StartPiped(t, cmd)
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	readLine := testbed.LineReader(stdout, 5*time.Second)
	next := func() string { t.Helper(); return readLine(t) }
	if l := next(); l != "READY peer="+testbed.NodeV4.String() {
		t.Fatalf("long-lived connection: %q, want it redirected through the proxy", l)
	}

	// Restart: drop every fd we hold, then open again from the pins.
	if err := f.dp.Close(); err != nil {
		t.Fatal(err)
	}
	dp, err := datapath.Open(f.cfg)
	if err != nil {
		t.Fatalf("reopen: %v", err)
	}
	f.dp = dp

	stdin.Write([]byte("still-there\n"))
	if l := next(); l != "echo: still-there" {
		t.Fatalf("open connection after restart: %q", l)
	}
	ws, err := dp.Workloads()
	if err != nil {
		t.Fatal(err)
	}
	if len(ws) != 1 {
		t.Fatalf("workloads after restart: %v, want the one selected before", ws)
	}
	r := f.dial(t, pod.Cgroup, pod, "tcp4:"+hostport(ext4b, serverPort))[0]
	if r.Reply != "peer="+testbed.NodeV4.String() {
		t.Fatalf("new connection after restart: %+v, want it redirected", r)
	}
	if rec := f.recordFor(t, r.Local); rec.OrigDst != hostport(ext4b, serverPort) {
		t.Errorf("proxy recovered %q after restart", rec.OrigDst)
	}
	for _, p := range datapath.Programs(f.cfg.PinPath) {
		if p.Err != nil {
			t.Errorf("program %s: %v", p.Name, p.Err)
		}
	}
}

// While the proxy is not ready, fail-open workloads go direct and fail-closed
// workloads get their connect refused; when it is ready again both are
// redirected.
func TestPrivilegedProxyNotReady(t *testing.T) {
	f := setup(t, 2)
	open, closed := f.tb.Pods[0], f.tb.Pods[1]
	f.selectPod(t, open, 1, datapath.FailOpen)
	f.selectPod(t, closed, 2, datapath.FailClosed)
	if err := f.dp.SetReady(false); err != nil {
		t.Fatal(err)
	}
	before := f.counters(t)

	for _, spec := range []string{"tcp4:" + hostport(ext4, serverPort), "tcp6:" + hostport(ext6, serverPort)} {
		r := f.dial(t, open.Cgroup, open, spec)[0]
		want := "peer=" + open.IPv4.String()
		if strings.HasPrefix(spec, "tcp6") {
			want = "peer=" + open.IPv6.String()
		}
		if r.Reply != want {
			t.Errorf("fail-open %s while not ready: %+v, want direct (%s)", spec, r, want)
		}
		r = f.dial(t, closed.Cgroup, closed, spec)[0]
		if !strings.Contains(r.Err, "operation not permitted") {
			t.Errorf("fail-closed %s while not ready: %+v, want connect refused (EPERM)", spec, r)
		}
	}
	after := f.counters(t)
	if d := after.BypassNotReady - before.BypassNotReady; d != 2 {
		t.Errorf("bypass_not_ready counted %d, want 2", d)
	}
	if d := after.FailedClosed - before.FailedClosed; d != 2 {
		t.Errorf("failed_closed counted %d, want 2", d)
	}
	ws, err := f.dp.WorkloadStats()
	if err != nil {
		t.Fatal(err)
	}
	if ws[2].FailedClosed != 2 || ws[1].FailedClosed != 0 {
		t.Errorf("per-workload failed_closed: %+v", ws)
	}

	if err := f.dp.SetReady(true); err != nil {
		t.Fatal(err)
	}
	for _, p := range []*testbed.Pod{open, closed} {
		r := f.dial(t, p.Cgroup, p, "tcp4:"+hostport(ext4, serverPort))[0]
		if r.Reply != "peer="+testbed.NodeV4.String() {
			t.Errorf("%s once ready: %+v, want redirected", p.Name, r)
		}
	}
}

// The counters account for every connection made: N redirected connections
// give N redirects, publishes, claims and answers, and the per-workload
// counter of the pod says N.
func TestPrivilegedCountersMatchConnections(t *testing.T) {
	f := setup(t, 1)
	pod := f.tb.Pods[0]
	f.selectPod(t, pod, 3, datapath.FailClosed)
	before := f.counters(t)

	const n = 40
	var specs []string
	for i := range n {
		if i%2 == 0 {
			specs = append(specs, "tcp4:"+hostport(ext4, serverPort))
		} else {
			specs = append(specs, "tcp6:"+hostport(ext6, serverPort))
		}
	}
	for _, r := range f.dial(t, pod.Cgroup, pod, specs...) {
		if r.Err != "" || !strings.HasPrefix(r.Reply, "peer=") {
			t.Fatalf("connection failed: %+v", r)
		}
	}
	after := f.counters(t)
	for name, d := range map[string]uint64{
		"redirected_ipv4":   after.RedirectedV4 - before.RedirectedV4,
		"redirected_ipv6":   after.RedirectedV6 - before.RedirectedV6,
		"published/2":       (after.Published - before.Published) / 2,
		"claimed/2":         (after.Claimed - before.Claimed) / 2,
		"orig_dst_answered": (after.OrigDstAnswered - before.OrigDstAnswered) / 2,
	} {
		if d != n/2 {
			t.Errorf("%s = %d, want %d", name, d, n/2)
		}
	}
	// The client calls getpeername once itself and once more through
	// net.FileConn: every call on a redirected socket is answered.
	if d := after.PeernameRewrites - before.PeernameRewrites; d != 2*n {
		t.Errorf("peername_rewrites = %d, want %d (two calls per connection)", d, 2*n)
	}
	ws, err := f.dp.WorkloadStats()
	if err != nil {
		t.Fatal(err)
	}
	if ws[3].Redirected != n {
		t.Errorf("workload 3 redirected = %d, want %d", ws[3].Redirected, n)
	}
}

// A workload awaiting the proxy (Envoy has not accepted a listener with its
// addresses yet) gets its fail mode although the proxy is ready: fail-open
// goes direct, fail-closed is refused; once the flag is cleared both are
// redirected. Nothing reaches the proxy before.
func TestPrivilegedAwaitingProxy(t *testing.T) {
	f := setup(t, 2)
	open, closed := f.tb.Pods[0], f.tb.Pods[1]
	f.selectWorkload(t, open, datapath.Workload{ID: 1, FailMode: datapath.FailOpen, AwaitingProxy: true})
	f.selectWorkload(t, closed, datapath.Workload{ID: 2, FailMode: datapath.FailClosed, AwaitingProxy: true})
	before := f.counters(t)
	recs := len(f.proxyRecords(t))
	spec := "tcp4:" + hostport(ext4, serverPort)
	if r := f.dial(t, open.Cgroup, open, spec)[0]; r.Reply != "peer="+open.IPv4.String() {
		t.Errorf("fail-open, awaiting the proxy: %+v, want direct", r)
	}
	if r := f.dial(t, closed.Cgroup, closed, spec)[0]; !strings.Contains(r.Err, "operation not permitted") {
		t.Errorf("fail-closed, awaiting the proxy: %+v, want EPERM", r)
	}
	if n := len(f.proxyRecords(t)) - recs; n != 0 {
		t.Errorf("the proxy got %d connections from workloads awaiting it", n)
	}
	after := f.counters(t)
	wantCounted(t, before, after, map[string]uint64{"bypass_not_ready": 1, "failed_closed": 1})
	f.selectWorkload(t, open, datapath.Workload{ID: 1, FailMode: datapath.FailOpen})
	f.selectWorkload(t, closed, datapath.Workload{ID: 2, FailMode: datapath.FailClosed})
	for _, p := range []*testbed.Pod{open, closed} {
		if r := f.dial(t, p.Cgroup, p, spec)[0]; r.Reply != "peer="+testbed.NodeV4.String() {
			t.Errorf("%s after the proxy accepted it: %+v, want redirected", p.Name, r)
		}
	}
	ws, err := f.dp.Workloads()
	if err != nil {
		t.Fatal(err)
	}
	for cg, w := range ws {
		if w.AwaitingProxy {
			t.Errorf("cgroup %d still reads as awaiting", cg)
		}
	}
}

// A redirected connect that fails leaves its original destination in the
// socket's storage, which lives as long as the socket: a later connect of
// that socket straight to the proxy must not publish it. The failed connect
// is refused with EADDRNOTAVAIL (another socket of the pod holds the
// redirected 4-tuple, bound to the same port); that socket closes, and the
// failed one connects to the proxy itself and says so ("WANT none"). Were
// the leftover published, the proxy would recover the first destination
// for it, a mismatch. Nothing is written to orig_dsts, the previous
// layouts' map.
func TestPrivilegedFailedConnectLeavesNothingToPublish(t *testing.T) {
	f := setup(t, 1, "-verify")
	pod := f.tb.Pods[0]
	f.selectPod(t, pod, 1, datapath.FailOpen)
	before := f.counters(t)
	out := testbed.Run(t, 30*time.Second, pod.Cgroup, pod.Netns, "stale",
		"-dst", hostport(ext4, serverPort), "-proxy", hostport(proxyV4, int(datapath.DefaultProxyPort)))
	var r testbed.StaleResult
	if err := json.Unmarshal(out, &r); err != nil {
		t.Fatalf("stale output %q: %v", out, err)
	}
	if r.Err != "" {
		t.Fatalf("stale: %+v", r)
	}
	if !strings.Contains(r.Redirected, "cannot assign requested address") {
		t.Fatalf("redirected connect onto a taken 4-tuple: %q, want EADDRNOTAVAIL", r.Redirected)
	}
	if r.Holder != "match" || r.Reconnected != "match" {
		t.Errorf("proxy verdicts: holder %q, the failed socket reconnected %q; want both match (no original destination)", r.Holder, r.Reconnected)
	}
	wantCounted(t, before, f.counters(t), map[string]uint64{
		"redirected_ipv4": 1, "proxy_direct": 2, "published": 0, "orig_dst_unknown": 2, "orig_dst_answered": 0})
	harness.WaitFor(t, "the in-flight maps empty", 5*time.Second, func() bool {
		orig, pending, err := f.dp.InFlight()
		return err == nil && orig == 0 && pending == 0
	})
}

// The same for what a layout 1-4 connect4 left in orig_dsts for a socket
// whose redirected connect failed before an upgrade: layout 5's programs
// still read it (by cookie) for such sockets, so a direct connect to the
// proxy must delete it. The test plants the entry (192.0.2.1:9) for a
// socket's cookie before that socket connects straight to the proxy.
func TestPrivilegedDirectConnectDropsLegacyEntry(t *testing.T) {
	f := setup(t, 1, "-verify")
	pod := f.tb.Pods[0]
	f.selectPod(t, pod, 1, datapath.FailOpen)
	m := f.pinnedMap(t, "orig_dsts")
	before := f.counters(t)
	cmd := testbed.Command(t, pod.Cgroup, pod.Netns, "stale", "-planted", "-proxy", hostport(proxyV4, int(datapath.DefaultProxyPort)))
	stdin, stdout := testbed.StartPiped(t, cmd)
	lines := bufio.NewReader(stdout)
	line, _ := lines.ReadString('\n')
	cookie, err := strconv.ParseUint(strings.TrimPrefix(strings.TrimSpace(line), "COOKIE "), 10, 64)
	if err != nil {
		stdin.Close()
		cmd.Wait()
		t.Fatalf("stale -planted: %q, want its cookie", line)
	}
	junk := junkOrigDst(int(m.ValueSize()))
	binary.NativeEndian.PutUint32(junk[20:], 1) // the pod's workload id
	if err := m.Put(cookie, junk); err != nil {
		t.Fatal(err)
	}
	stdin.Write([]byte("go\n"))
	out, _ := lines.ReadString('\n')
	stdin.Close()
	if err := cmd.Wait(); err != nil {
		t.Fatalf("stale -planted: %v", err)
	}
	var r testbed.StaleResult
	if err := json.Unmarshal([]byte(out), &r); err != nil || r.Err != "" {
		t.Fatalf("stale -planted output %q: %v", out, err)
	}
	if r.Reconnected != "match" {
		t.Errorf("direct connect of a socket with a leftover orig_dsts entry: proxy said %q, want match (no original destination)", r.Reconnected)
	}
	var v []byte
	if err := m.Lookup(cookie, &v); err == nil {
		t.Errorf("the leftover entry for cookie %d outlived the socket's direct connect", cookie)
	}
	wantCounted(t, before, f.counters(t), map[string]uint64{"proxy_direct": 1, "published": 0, "orig_dst_answered": 0})
}
