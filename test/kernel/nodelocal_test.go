package kernel

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/sluice-io/sluice/agent/datapath"
	"github.com/sluice-io/sluice/policy"
	"github.com/sluice-io/sluice/test/testbed"
)

// Ports of the node's own services in the never-dial tests: a listener on
// the node's loopback only (Envoy's admin, the kubelet's healthz), one on
// its wildcard address (whatever binds 0.0.0.0), and the metadata service.
const (
	nodeLoopbackPort = 9464
	nodeWildcardPort = 9465
	metadataPort     = 80
)

var (
	metadataV4 = policy.DefaultMetadata[0]
	metadataV6 = policy.DefaultMetadata[1]
	// A link-local node service (a VPC resolver's TCP, a pod-identity
	// agent, node-local-dns beyond port 53).
	linkLocalSvc  = netip.MustParseAddr("169.254.20.10")
	linkLocalPort = uint16(8053)
)

// nodeServices starts the node's loopback and wildcard listeners and a
// metadata service at 169.254.169.254 and fd00:ec2::254 inside the test's
// node namespace, fills the never-dial set as the agent does, and returns
// the servers: node sees the node's own listeners, meta the metadata one.
func (f *fixture) nodeServices(t *testing.T) (node, meta *testbed.EchoServer) {
	t.Helper()
	f.tb.Node.IP(t, "addr", "add", metadataV4.String()+"/32", "dev", "lo")
	f.tb.Node.IP(t, "addr", "add", metadataV6.String()+"/128", "dev", "lo", "nodad")
	f.tb.Node.IP(t, "addr", "add", linkLocalSvc.String()+"/32", "dev", "lo")
	node, meta = testbed.ServeEcho(t), testbed.ServeEcho(t)
	node.Add(f.tb.Node.Listen(t, "tcp", hostport(netip.MustParseAddr("127.0.0.1"), nodeLoopbackPort)))
	node.Add(f.tb.Node.Listen(t, "tcp", hostport(netip.IPv6Loopback(), nodeLoopbackPort)))
	node.Add(f.tb.Node.Listen(t, "tcp", hostport(netip.IPv6Unspecified(), nodeWildcardPort))) // dual-stack
	node.Add(f.tb.Node.Listen(t, "tcp", hostport(linkLocalSvc, int(linkLocalPort))))
	meta.Add(f.tb.Node.Listen(t, "tcp", hostport(metadataV4, metadataPort)))
	meta.Add(f.tb.Node.Listen(t, "tcp", hostport(metadataV6, metadataPort)))

	nl := policy.NodeLocal{
		Proxy:    []netip.Addr{proxyV4, proxyV6},
		Node:     []netip.Addr{testbed.NodeV4, testbed.NodeV6},
		Metadata: policy.DefaultMetadata,
	}
	if err := f.dp.SetNeverDial(nl.Prefixes(), nl.MetadataAddrs()); err != nil {
		t.Fatal(err)
	}
	return node, meta
}

// From the attacker's side: a selected pod, in any mode, never reaches the
// node's own services through the proxy (which dials from the node's
// network namespace, where 0.0.0.0 and :: are the node's loopback), never
// reaches what listens on the node's wildcard address through the proxy
// address, and reaches a metadata service only directly from its own
// address: audit mode always (counted), enforce mode only where granted.
// Every row checks what each server saw.
func TestPrivilegedNeverDial(t *testing.T) {
	f := setup(t, 3)
	nodeSrv, metaSrv := f.nodeServices(t)
	enforced, audited, granted := f.tb.Pods[0], f.tb.Pods[1], f.tb.Pods[2]
	f.selectWorkload(t, enforced, datapath.Workload{ID: 1, FailMode: datapath.FailClosed, Enforce: true})
	f.selectWorkload(t, audited, datapath.Workload{ID: 2, FailMode: datapath.FailOpen})
	f.selectWorkload(t, granted, datapath.Workload{ID: 3, FailMode: datapath.FailClosed, Enforce: true,
		MetadataGrants: []netip.AddrPort{netip.AddrPortFrom(metadataV4, metadataPort), netip.AddrPortFrom(linkLocalSvc, linkLocalPort)}})
	before := f.counters(t)

	const (
		eperm   = "operation not permitted"
		refused = "connection refused" // the pod's own loopback: nothing listens there
	)
	type want struct {
		err   string // the application's error; "" for a reply
		reply string // what the server answered ("peer=<address it saw>")
		meta  bool   // the metadata service must have seen exactly this connection
		node  bool   // a node listener must have seen exactly this connection, from the pod
	}
	type row struct {
		name string
		pod  *testbed.Pod
		spec string
		want want
	}
	var rows []row
	for _, p := range []*testbed.Pod{enforced, audited} {
		mode := map[*testbed.Pod]string{enforced: "enforce", audited: "audit"}[p]
		rows = append(rows,
			row{mode + ": 0.0.0.0 to a node-loopback port", p, "tcp4:" + hostport(netip.IPv4Unspecified(), nodeLoopbackPort), want{err: eperm}},
			row{mode + ": [::] to a node-loopback port", p, "tcp6:" + hostport(netip.IPv6Unspecified(), nodeLoopbackPort), want{err: eperm}},
			row{mode + ": [::ffff:0.0.0.0] to a node-loopback port", p, "mapped:" + hostport(netip.IPv4Unspecified(), nodeLoopbackPort), want{err: eperm}},
			row{mode + ": 0.0.0.1 (rest of 0/8)", p, "tcp4:0.0.0.1:9464", want{err: eperm}},
			// Loopback is excluded: it goes direct, to the pod's own loopback.
			row{mode + ": 127.0.0.1 stays in the pod", p, "tcp4:" + hostport(netip.MustParseAddr("127.0.0.1"), nodeLoopbackPort), want{err: refused}},
			row{mode + ": [::ffff:127.0.0.1] stays in the pod", p, "mapped:" + hostport(netip.MustParseAddr("127.0.0.1"), nodeLoopbackPort), want{err: refused}},
			row{mode + ": [::1] stays in the pod", p, "tcp6:" + hostport(netip.IPv6Loopback(), nodeLoopbackPort), want{err: refused}},
			row{mode + ": proxy IPv4 address, another port", p, "tcp4:" + hostport(proxyV4, nodeWildcardPort), want{err: eperm}},
			row{mode + ": proxy IPv6 address, another port", p, "tcp6:" + hostport(proxyV6, nodeWildcardPort), want{err: eperm}},
			row{mode + ": proxy address v4-mapped, another port", p, "mapped:" + hostport(proxyV4, nodeWildcardPort), want{err: eperm}},
			row{mode + ": node address, not excluded", p, "tcp4:" + hostport(testbed.NodeV4, nodeWildcardPort), want{err: eperm}},
			row{mode + ": node IPv6 address, not excluded", p, "tcp6:" + hostport(testbed.NodeV6, nodeWildcardPort), want{err: eperm}},
		)
	}
	rows = append(rows,
		row{"enforce: metadata IPv4", enforced, "tcp4:" + hostport(metadataV4, metadataPort), want{err: eperm}},
		row{"enforce: metadata IPv6", enforced, "tcp6:" + hostport(metadataV6, metadataPort), want{err: eperm}},
		row{"enforce: metadata v4-mapped", enforced, "mapped:" + hostport(metadataV4, metadataPort), want{err: eperm}},
		row{"audit: metadata IPv4 goes direct", audited, "tcp4:" + hostport(metadataV4, metadataPort), want{reply: "peer=" + audited.IPv4.String(), meta: true}},
		row{"audit: metadata IPv6 goes direct", audited, "tcp6:" + hostport(metadataV6, metadataPort), want{reply: "peer=" + audited.IPv6.String(), meta: true}},
		row{"granted: metadata IPv4 goes direct", granted, "tcp4:" + hostport(metadataV4, metadataPort), want{reply: "peer=" + granted.IPv4.String(), meta: true}},
		row{"granted: metadata v4-mapped goes direct", granted, "mapped:" + hostport(metadataV4, metadataPort), want{reply: "peer=" + granted.IPv4.String(), meta: true}},
		row{"granted: metadata on another port", granted, "tcp4:" + hostport(metadataV4, metadataPort+1), want{err: eperm}},
		row{"granted: the other metadata address", granted, "tcp6:" + hostport(metadataV6, metadataPort), want{err: eperm}},
		// Link-local goes direct for audit pods (excluded by default) and
		// for enforce pods only where granted.
		row{"enforce: a link-local node service", enforced, "tcp4:" + hostport(linkLocalSvc, int(linkLocalPort)), want{err: eperm}},
		row{"enforce: a link-local node service, v4-mapped", enforced, "mapped:" + hostport(linkLocalSvc, int(linkLocalPort)), want{err: eperm}},
		row{"audit: a link-local node service goes direct", audited, "tcp4:" + hostport(linkLocalSvc, int(linkLocalPort)), want{reply: "peer=" + audited.IPv4.String(), node: true}},
		row{"granted: a link-local node service goes direct", granted, "tcp4:" + hostport(linkLocalSvc, int(linkLocalPort)), want{reply: "peer=" + granted.IPv4.String(), node: true}},
	)
	for _, r := range rows {
		t.Run(r.name, func(t *testing.T) {
			nodeSeen, metaSeen := len(nodeSrv.Peers()), len(metaSrv.Peers())
			got := f.dial(t, r.pod.Cgroup, r.pod, r.spec)[0]
			if r.want.err != "" {
				if !strings.Contains(got.Err, r.want.err) || got.Reply != "" {
					t.Errorf("%s: %+v, want %q and no reply", r.spec, got, r.want.err)
				}
			} else if got.Err != "" || got.Reply != r.want.reply {
				t.Errorf("%s: %+v, want reply %q", r.spec, got, r.want.reply)
			}
			if p := nodeSrv.Peers()[nodeSeen:]; r.want.node && len(p) != 1 || !r.want.node && len(p) != 0 {
				t.Errorf("%s: the node's own listeners saw %v, want %v", r.spec, p, map[bool]string{true: "one connection from the pod itself", false: "nothing"}[r.want.node])
			}
			p := metaSrv.Peers()[metaSeen:]
			if r.want.meta && len(p) != 1 || !r.want.meta && len(p) != 0 {
				t.Errorf("%s: the metadata service saw %v, want %v", r.spec, p, map[bool]string{true: "one connection from the pod itself", false: "nothing"}[r.want.meta])
			}
		})
	}
	for _, rec := range f.proxyRecords(t) {
		t.Errorf("the proxy got a connection; none of these may be redirected: %+v", rec)
	}

	after := f.counters(t)
	ws, err := f.dp.WorkloadStats()
	if err != nil {
		t.Fatal(err)
	}
	// Per mode: four unspecified, two node addresses; three proxy ports.
	// Metadata: three refused for the enforce pod and two for the granted
	// one; two direct each for the audit and the granted pod.
	wantCounted(t, before, after, map[string]uint64{
		"node_local_refused": 14, "proxy_port_refused": 6, "metadata_refused": 5, "metadata_direct": 4,
		"redirected_ipv4": 0, "redirected_ipv6": 0,
	})
	for id, w := range map[uint32]datapath.WorkloadStats{1: {NodeLocal: 11, Metadata: 3}, 2: {NodeLocal: 9, Metadata: 2}, 3: {Metadata: 4}} {
		if ws[id].NodeLocal != w.NodeLocal || ws[id].Metadata != w.Metadata || ws[id].Redirected != 0 {
			t.Errorf("workload %d counters %+v, want node_local %d, metadata %d, nothing redirected", id, ws[id], w.NodeLocal, w.Metadata)
		}
	}

	// Excluded by the operator, a node address goes direct from the pod
	// (its own source address), never through the proxy.
	if err := f.dp.SetExclusions(append(datapath.DefaultExclusions, netip.PrefixFrom(testbed.NodeV4, 32))); err != nil {
		t.Fatal(err)
	}
	got := f.dial(t, enforced.Cgroup, enforced, "tcp4:"+hostport(testbed.NodeV4, nodeWildcardPort))[0]
	if got.Err != "" || got.Reply != "peer="+enforced.IPv4.String() {
		t.Errorf("excluded node address: %+v, want it direct from %s", got, enforced.IPv4)
	}
	// And an ordinary destination is still redirected.
	got = f.dial(t, enforced.Cgroup, enforced, "tcp4:"+hostport(ext4, serverPort))[0]
	if got.Err != "" || got.Reply != "peer="+testbed.NodeV4.String() {
		t.Errorf("external destination: %+v, want it through the proxy", got)
	}
}

// A metadata grant follows the workload: SetWorkload replaces it and
// DeleteWorkload removes it, so a deselected and reselected pod does not
// keep an old grant.
func TestPrivilegedMetadataGrantsFollowWorkload(t *testing.T) {
	f := setup(t, 1)
	_, metaSrv := f.nodeServices(t)
	pod := f.tb.Pods[0]
	grant := []netip.AddrPort{netip.AddrPortFrom(metadataV4, 0)}
	f.selectWorkload(t, pod, datapath.Workload{ID: 7, FailMode: datapath.FailClosed, Enforce: true, MetadataGrants: grant})
	spec := "tcp4:" + hostport(metadataV4, metadataPort)
	if got := f.dial(t, pod.Cgroup, pod, spec)[0]; got.Reply != "peer="+pod.IPv4.String() {
		t.Fatalf("granted for any port: %+v, want it direct", got)
	}
	f.selectWorkload(t, pod, datapath.Workload{ID: 7, FailMode: datapath.FailClosed, Enforce: true})
	if got := f.dial(t, pod.Cgroup, pod, spec)[0]; !strings.Contains(got.Err, "operation not permitted") {
		t.Errorf("grant withdrawn: %+v, want EPERM", got)
	}
	f.selectWorkload(t, pod, datapath.Workload{ID: 7, FailMode: datapath.FailClosed, Enforce: true, MetadataGrants: grant})
	cg, err := datapath.CgroupID(pod.Cgroup.Path)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.dp.DeleteWorkload(cg); err != nil {
		t.Fatal(err)
	}
	if gs, err := f.dp.MetadataGrants(); err != nil || len(gs) != 0 {
		t.Errorf("grants after the workload was deleted: %v, %v; want none", gs, err)
	}
	if n := len(metaSrv.Peers()); n != 1 {
		t.Errorf("the metadata service saw %d connections, want 1 (the granted one)", n)
	}

	// Another workload fills the grants map (4,096 entries). The pod's
	// update with a grant then fails, but errs closed: the pod is selected
	// and enforced, without the grant.
	var flood []netip.AddrPort
	for port := range uint16(4096) {
		flood = append(flood, netip.AddrPortFrom(metadataV4, port+1))
	}
	other := f.tb.Root.Child(t, "grant-flood")
	ocg, err := datapath.CgroupID(other.Path)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.dp.SetWorkload(ocg, datapath.Workload{ID: 8, Enforce: true, MetadataGrants: flood, CgroupPath: other.Path}); err != nil {
		t.Fatalf("fill the grants map: %v", err)
	}
	if err := f.dp.SetWorkload(cg, datapath.Workload{ID: 7, FailMode: datapath.FailClosed, Enforce: true, MetadataGrants: grant, CgroupPath: pod.Cgroup.Path}); err == nil {
		t.Fatal("a grant into a full map was accepted")
	}
	if got := f.dial(t, pod.Cgroup, pod, spec)[0]; !strings.Contains(got.Err, "operation not permitted") {
		t.Errorf("metadata with the grant refused for want of room: %+v, want EPERM", got)
	}
	if got := f.dial(t, pod.Cgroup, pod, "tcp4:"+hostport(ext4, serverPort))[0]; got.Reply != "peer="+testbed.NodeV4.String() {
		t.Errorf("after the failed update the pod's connection %+v was not redirected: the pod must stay selected", got)
	}
}
