package kernel

import (
	"bufio"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/sluice-io/sluice/agent/datapath"
	"github.com/sluice-io/sluice/test/testbed"
	"golang.org/x/sys/unix"
)

// TestPrivilegedConntrackNATMovesPort: on a node with conntrack and NAT on
// (kube-proxy's), NAT resolves a clash between two connections' reply
// tuples by moving one's source port. Here every redirected connection is
// made to clash on purpose: before it, a connection from the same pod
// address and source port to another address is DNATed to the proxy
// endpoint and held open, so the redirected one's reply tuple is taken and
// NAT moves its port between the client and the proxy. The proxy must still
// be told each connection's own original destination: the datapath keys a
// connection by its addresses and the client's sequence number, which NAT
// does not move. The test fails if no port was moved (it would then not
// have tested the clash).
//
// Host only: the kernel VMs have no netfilter modules (test/kernels/run.sh
// skips it there).
func TestPrivilegedConntrackNATMovesPort(t *testing.T) {
	nft, err := exec.LookPath("nft")
	if err != nil {
		t.Fatal("nft (nftables) is needed: make test installs it")
	}
	f := setup(t, 1, "-verify")
	pod := f.tb.Pods[0]
	f.selectPod(t, pod, 1, datapath.FailClosed)

	// Another external address, DNATed to the proxy in the node's
	// namespace, as a Service would be.
	dnatted := netip.AddrPortFrom(testbed.ExternalV4[1], serverPort)
	proxy := netip.AddrPortFrom(proxyV4, datapath.DefaultProxyPort)
	ruleset := fmt.Sprintf(`table ip sluice_clash {
	chain pre { type nat hook prerouting priority dstnat; policy accept; ip daddr %s tcp dport %d dnat to %s; }
	chain in { type nat hook input priority 100; policy accept; }
}
`, dnatted.Addr(), dnatted.Port(), proxy)
	load := exec.Command("ip", "netns", "exec", f.tb.Node.Name, nft, "-f", "-")
	load.Stdin = strings.NewReader(ruleset)
	if out, err := load.CombinedOutput(); err != nil {
		t.Fatalf("load the NAT table: %v\n%s", err, out)
	}
	t.Cleanup(func() {
		exec.Command("ip", "netns", "exec", f.tb.Node.Name, nft, "delete", "table", "ip", "sluice_clash").Run()
	})

	const n, portBase = 40, 43000
	// The holders: outside the selected cgroup (this process), so not
	// redirected; the proxy's answer for them comes from conntrack.
	var holders []net.Conn
	defer func() {
		for _, c := range holders {
			c.Close()
		}
	}()
	for i := 0; i < n; i++ {
		c, err := holdFrom(pod.Netns, portBase+i, dnatted)
		if err != nil {
			t.Fatalf("holder from port %d to %s: %v", portBase+i, dnatted, err)
		}
		holders = append(holders, c)
	}

	// The redirected connections: one from each held port.
	out := testbed.Run(t, 60*time.Second, pod.Cgroup, pod.Netns, "reuse", "-n", fmt.Sprint(n),
		"-port-base", fmt.Sprint(portBase), "-ports", fmt.Sprint(n),
		"-dst", ext4.String(), "-dst-port-base", fmt.Sprint(serverPort), "-dst-ports", "1")
	var st testbed.ReuseStats
	if err := json.Unmarshal(out, &st); err != nil {
		t.Fatalf("reuse output %q: %v", out, err)
	}
	t.Logf("redirected client: %+v", st)

	want := netip.AddrPortFrom(ext4, serverPort).String()
	moved := 0
	for _, r := range f.proxyRecords(t) {
		if r.Want != want {
			continue
		}
		client, err := netip.ParseAddrPort(r.Client)
		if err != nil {
			t.Fatalf("proxy record %+v: %v", r, err)
		}
		if p := int(client.Port()); p < portBase || p >= portBase+n {
			moved++
		}
	}
	t.Logf("%d of %d redirected connections reached the proxy from a port NAT moved", moved, n)
	if st.Match != n || st.Mismatch != 0 || st.Unknown != 0 || st.BindBusy != 0 || st.Errors != 0 {
		t.Errorf("want all %d original destinations answered right, got %+v", n, st)
	}
	if moved == 0 {
		t.Fatal("NAT moved no source port: the clash was not produced and the test proves nothing")
	}
	// The holders are the only connections to the proxy without an
	// entry: conntrack answers them.
	if c := f.counters(t); c.Claimed != n || c.ClaimMissed != n {
		t.Errorf("claimed %d and missed %d, want %d redirected connections claimed and %[3]d holders missed", c.Claimed, c.ClaimMissed, n)
	}
}

// holdFrom connects from the pod's namespace, source port sport (reusable:
// the redirected connection binds it too), to dst, says what it dialed as
// the verifying proxy expects, and returns the open connection once the
// proxy has answered it.
func holdFrom(ns *testbed.Netns, sport int, dst netip.AddrPort) (net.Conn, error) {
	var c net.Conn
	err := ns.Do(func() error {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return err
		}
		file := os.NewFile(uintptr(fd), "holder")
		defer file.Close()
		unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1)
		if err := unix.Bind(fd, &unix.SockaddrInet4{Port: sport}); err != nil {
			return fmt.Errorf("bind: %w", err)
		}
		if err := unix.Connect(fd, &unix.SockaddrInet4{Addr: dst.Addr().As4(), Port: int(dst.Port())}); err != nil {
			return fmt.Errorf("connect: %w", err)
		}
		c, err = net.FileConn(file)
		return err
	})
	if err != nil {
		return nil, err
	}
	c.SetDeadline(time.Now().Add(5 * time.Second))
	fmt.Fprintf(c, "WANT %s\n", dst)
	if line, err := bufio.NewReader(c).ReadString('\n'); err != nil {
		c.Close()
		return nil, fmt.Errorf("no verdict from the proxy: %w", err)
	} else if strings.TrimSpace(line) != "match" {
		// conntrack, not sluice, answers an unredirected DNATed
		// connection: the DNAT destination.
		c.Close()
		return nil, fmt.Errorf("proxy's verdict %q, want match (conntrack's answer)", strings.TrimSpace(line))
	}
	return c, nil
}
