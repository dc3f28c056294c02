package kernel

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/sluice-io/sluice/agent/datapath"
	"github.com/sluice-io/sluice/test/testbed"
)

// sideDoors serves UDP on the external addresses (QUIC's 443, an ad-hoc port
// and DNS's 53) and TCP on 53, and makes ext4b:53 and [ext6]:53 the
// resolvers.
func (f *fixture) sideDoors(t *testing.T) {
	t.Helper()
	for _, a := range []netip.Addr{ext4, ext4b, ext6} {
		for _, port := range []uint16{53, 443, 9999} {
			f.echo.AddUDP(f.tb.External.ListenPacket(t, "udp", netip.AddrPortFrom(a, port).String()))
		}
	}
	f.echo.Add(f.tb.External.Listen(t, "tcp", netip.AddrPortFrom(ext4b, 53).String()))
	if err := f.dp.SetResolvers([]netip.AddrPort{netip.AddrPortFrom(ext4b, 53), netip.AddrPortFrom(ext6, 53)}); err != nil {
		t.Fatal(err)
	}
}

// An enforce-mode workload can only leave through the proxy: TCP however it
// is opened (blocking, non-blocking, TCP Fast Open, v4-mapped) is
// redirected; UDP and other protocols are refused at connect() and
// sendmsg() except DNS to the resolvers; the external server receives
// nothing of what was refused. An audit-mode workload's UDP is untouched.
func TestPrivilegedEnforceSideDoors(t *testing.T) {
	f := setup(t, 2)
	f.sideDoors(t)
	enforced, audited := f.tb.Pods[0], f.tb.Pods[1]
	// Container runtimes let pods open ping sockets (containerd's
	// enable_unprivileged_icmp); so does this testbed.
	for _, p := range f.tb.Pods {
		p.Netns.Sysctl(t, "net.ipv4.ping_group_range", "0 2147483647")
	}
	f.selectWorkload(t, enforced, datapath.Workload{ID: 1, FailMode: datapath.FailClosed, Enforce: true})
	f.selectWorkload(t, audited, datapath.Workload{ID: 2, FailMode: datapath.FailOpen})
	before := f.counters(t)

	node4, node6 := "peer="+testbed.NodeV4.String(), "peer="+testbed.NodeV6.String()
	const eperm = "operation not permitted"
	cases := []struct {
		name, spec string
		// reply: what the far end answered ("" when nothing may arrive);
		// err: the error the application gets.
		reply, err string
		// datagram: the UDP server that must have received the datagram.
		datagram string
	}{
		{"TCP IPv4", "tcp4:" + hostport(ext4, serverPort), node4, "", ""},
		{"TCP IPv6", "tcp6:" + hostport(ext6, serverPort), node6, "", ""},
		{"TCP v4-mapped", "mapped:" + hostport(ext4, serverPort), node4, "", ""},
		{"TCP non-blocking IPv4", "nb4:" + hostport(ext4, serverPort), node4, "", ""},
		{"TCP non-blocking IPv6", "nb6:" + hostport(ext6, serverPort), node6, "", ""},
		{"TCP Fast Open IPv4", "tfo4:" + hostport(ext4, serverPort), node4, "", ""},
		{"TCP Fast Open IPv6", "tfo6:" + hostport(ext6, serverPort), node6, "", ""},
		{"TCP sendto without connect", "tcpsendto4:" + hostport(ext4, serverPort), "", "broken pipe", ""},
		// MPTCP's first subflow is a TCP socket whose connect() runs the
		// connect4 hook: redirected like TCP (the proxy answers plain TCP,
		// so it falls back).
		{"MPTCP IPv4", "mptcp4:" + hostport(ext4, serverPort), node4, "", ""},
		{"UDP 443 (QUIC) IPv4", "udp4:" + hostport(ext4, 443), "", eperm, ""},
		{"UDP 443 (QUIC) IPv6", "udp6:" + hostport(ext6, 443), "", eperm, ""},
		{"UDP 443 v4-mapped", "udpmapped:" + hostport(ext4, 443), "", eperm, ""},
		{"UDP non-DNS port", "udp4:" + hostport(ext4, 9999), "", eperm, ""},
		{"UDP 53 to a non-resolver", "udp4:" + hostport(ext4, 53), "", eperm, ""},
		{"UDP sendto without connect IPv4", "sendto4:" + hostport(ext4, 9999), "", eperm, ""},
		{"UDP sendto without connect IPv6", "sendto6:" + hostport(ext6, 443), "", eperm, ""},
		{"UDP sendto v4-mapped", "sendtomapped:" + hostport(ext4, 443), "", eperm, ""},
		{"DNS to resolver IPv4", "udp4:" + hostport(ext4b, 53), "peer=" + enforced.IPv4.String(), "", hostport(ext4b, 53)},
		{"DNS to resolver IPv6", "udp6:" + hostport(ext6, 53), "peer=" + enforced.IPv6.String(), "", hostport(ext6, 53)},
		{"DNS to resolver v4-mapped sendto", "sendtomapped:" + hostport(ext4b, 53), "peer=" + enforced.IPv4.String(), "", hostport(ext4b, 53)},
		{"ICMP echo (ping socket) IPv4", "ping4:" + hostport(ext4, 0), "", eperm, ""},
		{"ICMP echo (ping socket) IPv6", "ping6:" + hostport(ext6, 0), "", eperm, ""},
		{"ICMP echo, connected ping socket", "pingconnect4:" + hostport(ext4, 0), "", eperm, ""},
		// The test runs as root: even with CAP_NET_RAW the socket is refused.
		{"raw IPv4 socket", "raw4:" + hostport(ext4, 0), "", eperm, ""},
		{"DNS over TCP to resolver", "tcp4:" + hostport(ext4b, 53), "peer=" + enforced.IPv4.String(), "", ""},
	}
	redirects := 0
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			seen := len(f.echo.Datagrams())
			r := f.dial(t, enforced.Cgroup, enforced, c.spec)[0]
			if strings.HasPrefix(c.spec, "mptcp") && strings.Contains(r.Err, "protocol not supported") {
				t.Logf("this kernel has no MPTCP (%s): nothing to redirect", r.Err)
				return
			}
			if c.reply == node4 || c.reply == node6 {
				redirects++
			}
			if c.err != "" || c.reply == "" {
				if c.err != "" && !strings.Contains(r.Err, c.err) {
					t.Errorf("%s: %+v, want the socket refused (%s)", c.spec, r, c.err)
				}
				if c.reply == "" && r.Reply != "" {
					t.Errorf("%s: server answered %q, want nothing to get out", c.spec, r.Reply)
				}
			} else if r.Err != "" || r.Reply != c.reply {
				t.Errorf("%s: %+v, want reply %q", c.spec, r, c.reply)
			}
			got := f.echo.Datagrams()[seen:]
			switch {
			case c.datagram == "" && len(got) > 0:
				t.Errorf("%s: UDP servers received %+v, want nothing", c.spec, got)
			case c.datagram != "" && (len(got) != 1 || got[0].To != c.datagram):
				t.Errorf("%s: UDP servers received %+v, want one datagram at %s", c.spec, got, c.datagram)
			}
		})
	}
	// Nothing that was refused reached the proxy either: every proxy
	// record is a redirected TCP connection with its original destination.
	for _, rec := range f.proxyRecords(t) {
		if rec.OrigDst == "" {
			t.Errorf("proxy got a connection with no original destination: %+v", rec)
		}
	}

	after := f.counters(t)
	ws, err := f.dp.WorkloadStats()
	if err != nil {
		t.Fatal(err)
	}
	// Four UDP connects, three sendtos, UDP 53 to a non-resolver, three
	// ping sockets and a raw socket.
	if d := after.DeniedNonTCP - before.DeniedNonTCP; d != 12 || ws[1].Denied != 12 {
		t.Errorf("denied_non_tcp counted %d, workload denied %d; want 12", d, ws[1].Denied)
	}
	// Three UDP datagrams and one TCP connection to the resolvers.
	if d := after.DNSAllowed - before.DNSAllowed; d != 4 {
		t.Errorf("dns_allowed counted %d, want 4", d)
	}
	if d := (after.RedirectedV4 - before.RedirectedV4) + (after.RedirectedV6 - before.RedirectedV6); d != uint64(redirects) {
		t.Errorf("redirected %d TCP connections, want %d (MPTCP included where the kernel has it)", d, redirects)
	}

	// Audit mode refuses nothing: UDP goes out as the pod sent it.
	for _, spec := range []string{"udp4:" + hostport(ext4, 443), "sendto6:" + hostport(ext6, 9999)} {
		r := f.dial(t, audited.Cgroup, audited, spec)[0]
		if r.Err != "" || !strings.HasPrefix(r.Reply, "peer=fd00:200:2::2") && !strings.HasPrefix(r.Reply, "peer=10.200.2.2") {
			t.Errorf("audit pod %s: %+v, want it to go out directly", spec, r)
		}
	}
}
