package kernel

import (
	"errors"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/sluice-io/sluice/agent/datapath"
	"github.com/sluice-io/sluice/test/testbed"
)

// Every decision that does not reach the proxy is one flow event, naming
// the socket (its cookie), the workload, the destination, the protocol and
// the decision; a redirected connection is none (the proxy logs it). Each
// row dials once and finds its socket's event exactly once.
func TestPrivilegedFlowEvents(t *testing.T) {
	f := setup(t, 2)
	f.nodeServices(t)
	enforced, audited := f.tb.Pods[0], f.tb.Pods[1]
	f.selectWorkload(t, enforced, datapath.Workload{ID: 1, FailMode: datapath.FailClosed, Enforce: true})
	f.selectWorkload(t, audited, datapath.Workload{ID: 2, FailMode: datapath.FailOpen})
	rd, err := f.dp.Flows()
	if err != nil {
		t.Fatal(err)
	}
	defer rd.Close()

	type row struct {
		name     string
		pod      *testbed.Pod
		spec     string
		notReady bool
		decision string // "": no event
		dst      netip.AddrPort
		protocol string
	}
	ext := netip.AddrPortFrom(ext4, serverPort)
	rows := []row{
		{"redirected: no event", audited, "tcp4:" + ext.String(), false, "", ext, ""},
		{"enforce: UDP refused", enforced, "udp4:" + hostport(ext4, 443), false, "refused_non_tcp", netip.AddrPortFrom(ext4, 443), "udp"},
		{"enforce: UDP v4-mapped refused", enforced, "udpmapped:" + hostport(ext4, 443), false, "refused_non_tcp", netip.AddrPortFrom(ext4, 443), "udp"},
		{"enforce: metadata refused", enforced, "tcp4:" + hostport(metadataV4, metadataPort), false, "refused_metadata", netip.AddrPortFrom(metadataV4, metadataPort), "tcp"},
		{"audit: metadata direct", audited, "tcp4:" + hostport(metadataV4, metadataPort), false, "direct_metadata", netip.AddrPortFrom(metadataV4, metadataPort), "tcp"},
		{"enforce: node address refused", enforced, "tcp4:" + hostport(testbed.NodeV4, nodeWildcardPort), false, "refused_node_local", netip.AddrPortFrom(testbed.NodeV4, nodeWildcardPort), "tcp"},
		{"audit: proxy address, another port", audited, "tcp6:" + hostport(proxyV6, nodeWildcardPort), false, "refused_proxy_port", netip.AddrPortFrom(proxyV6, nodeWildcardPort), "tcp"},
		{"proxy not ready: fail-open direct", audited, "tcp4:" + ext.String(), true, "direct_not_ready", ext, "tcp"},
		{"proxy not ready: fail-open direct, IPv6", audited, "tcp6:" + hostport(ext6, serverPort), true, "direct_not_ready", netip.AddrPortFrom(ext6, serverPort), "tcp"},
		{"proxy not ready: fail-closed refused", enforced, "tcp4:" + ext.String(), true, "refused_not_ready", ext, "tcp"},
	}
	cookies := map[uint64]row{}
	for _, r := range rows {
		if err := f.dp.SetReady(!r.notReady); err != nil {
			t.Fatal(err)
		}
		res := f.dial(t, r.pod.Cgroup, r.pod, r.spec)[0]
		if res.Cookie == 0 {
			t.Fatalf("%s: no socket cookie: %+v", r.name, res)
		}
		cookies[res.Cookie] = r
	}
	before := f.counters(t)

	seen := map[uint64]int{}
	for {
		rd.SetDeadline(time.Now().Add(500 * time.Millisecond))
		fl, err := rd.Read()
		if errors.Is(err, os.ErrDeadlineExceeded) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		r, ok := cookies[fl.Cookie]
		if !ok {
			t.Errorf("an event for a socket no row made: %+v (%s)", fl, fl.Decision)
			continue
		}
		seen[fl.Cookie]++
		wantID := map[*testbed.Pod]uint32{enforced: 1, audited: 2}[r.pod]
		if fl.Decision.String() != r.decision || fl.Dst != r.dst || fl.ProtocolName() != r.protocol || fl.WorkloadID != wantID {
			t.Errorf("%s: event %s to %v %s workload %d, want %s to %v %s workload %d",
				r.name, fl.Decision, fl.Dst, fl.ProtocolName(), fl.WorkloadID, r.decision, r.dst, r.protocol, wantID)
		}
		if d := time.Since(fl.Time); d < 0 || d > time.Minute {
			t.Errorf("%s: event time %v is %v from now", r.name, fl.Time, d)
		}
		if cg, err := datapath.CgroupID(r.pod.Cgroup.Path); err != nil || fl.CgroupID != cg {
			t.Errorf("%s: event cgroup %d, want the pod's %d (%v)", r.name, fl.CgroupID, cg, err)
		}
		if strings.HasPrefix(r.decision, "direct_") != fl.Decision.Direct() {
			t.Errorf("%s: Direct() = %v for %s", r.name, fl.Decision.Direct(), fl.Decision)
		}
	}
	for c, r := range cookies {
		want := 1
		if r.decision == "" {
			want = 0
		}
		if seen[c] != want {
			t.Errorf("%s: %d events, want %d", r.name, seen[c], want)
		}
	}
	if after := f.counters(t); after.FlowDropped != before.FlowDropped || before.FlowDropped != 0 {
		t.Errorf("flow events dropped: %d", after.FlowDropped)
	}
}

// The ring buffer is bounded: with nobody reading, the events beyond its
// capacity are dropped and counted, and the decisions stand.
func TestPrivilegedFlowEventsDroppedWhenFull(t *testing.T) {
	f := setup(t, 1)
	pod := f.tb.Pods[0]
	f.selectWorkload(t, pod, datapath.Workload{ID: 1, FailMode: datapath.FailClosed, Enforce: true})
	before := f.counters(t)
	// 16384 events fit (64 bytes each with the header, in 1 MiB); refuse
	// more UDP datagrams than that, unread.
	specs := make([]string, 0, 600)
	for range 600 {
		specs = append(specs, "udp4:"+hostport(ext4, 443))
	}
	for range 30 {
		for _, r := range f.dial(t, pod.Cgroup, pod, specs...) {
			if !strings.Contains(r.Err, "operation not permitted") {
				t.Fatalf("UDP from an enforced pod: %+v, want it refused", r)
			}
		}
	}
	after := f.counters(t)
	refused, dropped := after.DeniedNonTCP-before.DeniedNonTCP, after.FlowDropped-before.FlowDropped
	t.Logf("%d refused, %d flow events dropped", refused, dropped)
	if refused != 18000 || dropped == 0 || dropped > refused-16000 {
		t.Errorf("%d refused, %d events dropped: want 18000 refused and the ones beyond the ring's ~16384 dropped", refused, dropped)
	}
}
