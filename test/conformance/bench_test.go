package conformance

import (
	"fmt"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/sluice-io/sluice/test/testbed"
	"github.com/sluice-io/sluice/xds"
)

// BenchmarkConnection measures one connection through the conformance
// proxy, on loopback, by the kind of rule that allows it, side by side in
// one run: an address (CIDR) entry; a TCP-hostname entry (resolved by the
// agent, so an address rule by the time it reaches the proxy); a hostname
// entry by TLS SNI whose name the DNS cache holds; and one whose name is
// looked up first (a new name per connection, through a DNS server on
// loopback). Each connection sends a ClientHello (or 517 bytes) and reads
// it back from the upstream echo server. This is the conformance proxy's
// cost, not Envoy's: the ratios say what the served configuration asks
// for (a lookup on a cache miss, nothing more on a hit), not what Envoy
// spends.
func BenchmarkConnection(b *testing.B) {
	dns := testbed.ServeDNS(b, mustListenUDP(b), 300)
	dns.Set("sni.bench.example", netip.MustParseAddr("203.0.113.30"))
	w := workload("bench", "client", "enforce", "203.0.113.5:443, tcp://pg.bench.example:443, sni.bench.example:443, *.first.bench.example:443", "127.0.0.1")
	w.Policy = w.Policy.Expand(func(string) []netip.Addr { return []netip.Addr{netip.MustParseAddr("203.0.113.6")} })
	st := xds.State{Proxy: testProxy, NeverDial: testLocal.All(), DNSResolvers: []netip.AddrPort{dnsAddr}, Workloads: []xds.Workload{w}}
	d := newDataplane(b, st)
	echoAt := func(addr string) { d.serve(addr, echo) }
	for _, a := range []string{"203.0.113.5:443", "203.0.113.6:443", "203.0.113.30:443", "203.0.113.31:443"} {
		echoAt(a)
	}
	hello := func(sni string) []byte {
		h, err := testbed.ClientHello(sni)
		if err != nil {
			b.Fatal(err)
		}
		return h
	}
	raw := make([]byte, len(hello("sni.bench.example")))
	for i := range raw {
		raw[i] = 'x'
	}
	one := func(dst string, payload []byte) {
		d.mu.Lock()
		d.dst = netip.MustParseAddrPort(dst)
		d.mu.Unlock()
		c, err := net.Dial("tcp", d.addr)
		if err != nil {
			b.Fatal(err)
		}
		c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Write(payload); err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(c, make([]byte, len(payload))); err != nil {
			b.Fatalf("%s: %v", dst, err)
		}
		c.Close()
	}
	b.Run("address-entry", func(b *testing.B) {
		for i := 0; i < b.N; i++ {
			one("203.0.113.5:443", raw)
		}
	})
	b.Run("tcp-hostname-entry", func(b *testing.B) {
		for i := 0; i < b.N; i++ {
			one("203.0.113.6:443", raw)
		}
	})
	h := hello("sni.bench.example")
	b.Run("sni-hostname-cached", func(b *testing.B) {
		one("198.51.100.1:443", h) // fill the cache
		b.ResetTimer()
		for i := 0; i < b.N; i++ {
			one("198.51.100.1:443", h)
		}
	})
	b.Run("sni-hostname-first-lookup", func(b *testing.B) {
		hs := make([][]byte, b.N)
		for i := range hs {
			name := fmt.Sprintf("n%d-%d.first.bench.example", b.N, i)
			dns.Set(name, netip.MustParseAddr("203.0.113.31"))
			hs[i] = hello(name)
		}
		b.ResetTimer()
		for i := 0; i < b.N; i++ {
			one("198.51.100.1:443", hs[i])
		}
	})
}
