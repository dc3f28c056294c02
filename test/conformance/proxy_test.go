package conformance

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sluice-io/sluice/test/testbed"
	"github.com/sluice-io/sluice/xds"
)

// syncBuffer is an access log the test reads while the proxy writes.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) entries() []LogEntry {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []LogEntry
	for _, l := range strings.Split(strings.TrimSpace(s.b.String()), "\n") {
		if e := parseEntry(l); e != nil {
			out = append(out, e)
		}
	}
	return out
}

// dataplane is the proxy on loopback with the seams set: each accepted
// connection's original destination is what the test says, and upstream
// dials go to local servers standing for those addresses.
type dataplane struct {
	t       testing.TB
	p       *Proxy
	log     *syncBuffer
	addr    string
	mu      sync.Mutex
	dst     netip.AddrPort
	source  string // the local address of the last connect
	servers map[netip.AddrPort]netip.AddrPort
	hits    map[netip.AddrPort]int
}

func newDataplane(t testing.TB, st xds.State) *dataplane {
	t.Helper()
	d := &dataplane{t: t, log: &syncBuffer{}, servers: map[netip.AddrPort]netip.AddrPort{}, hits: map[netip.AddrPort]int{}}
	d.p = &Proxy{AccessLog: d.log}
	d.p.origDst = func(*net.TCPConn) (netip.AddrPort, error) {
		d.mu.Lock()
		defer d.mu.Unlock()
		return d.dst, nil
	}
	d.p.dialAt = func(up netip.AddrPort) netip.AddrPort {
		d.mu.Lock()
		defer d.mu.Unlock()
		d.hits[up]++
		if s, ok := d.servers[up]; ok {
			return s
		}
		return netip.MustParseAddrPort("127.0.0.1:1") // nothing listens: UF
	}
	d.p.SetConfig(compileState(t, st))
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go d.p.Serve(l)
	d.addr = l.Addr().String()
	return d
}

// serve stands a local server in for addr: handle runs per connection.
func (d *dataplane) serve(addr string, handle func(net.Conn)) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		d.t.Fatal(err)
	}
	d.t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() { defer c.Close(); handle(c) }()
		}
	}()
	d.mu.Lock()
	d.servers[netip.MustParseAddrPort(addr)] = l.Addr().(*net.TCPAddr).AddrPort()
	d.mu.Unlock()
}

// connect dials the proxy as a connection to dst, sends send, and returns
// what came back until the proxy closed (or 3 s passed).
func (d *dataplane) connect(dst, send string) string {
	d.mu.Lock()
	d.dst = netip.MustParseAddrPort(dst)
	d.mu.Unlock()
	c, err := net.Dial("tcp", d.addr)
	if err != nil {
		d.t.Fatal(err)
	}
	defer c.Close()
	d.source = c.LocalAddr().String()
	c.SetDeadline(time.Now().Add(3 * time.Second))
	io.WriteString(c, send)
	if tc, ok := c.(*net.TCPConn); ok && !strings.Contains(send, "HTTP/1.1") {
		tc.CloseWrite()
	}
	b, _ := io.ReadAll(c)
	return string(b)
}

// lastLog is the final access log line of the last connect's connection.
func (d *dataplane) lastLog() LogEntry { return d.finalLog(d.source) }

// finalLog waits for the final access log line of the connection from
// source: the newest line may belong to an earlier connection whose end was
// logged late.
func (d *dataplane) finalLog(source string) LogEntry {
	deadline := time.Now().Add(2 * time.Second)
	for {
		es := d.log.entries()
		for i := len(es) - 1; i >= 0; i-- {
			if es[i].Str("source") == source && es[i].Final() {
				return es[i]
			}
		}
		if time.Now().After(deadline) {
			d.t.Fatalf("no final access log line for the connection from %s", source)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func echo(c net.Conn) { io.Copy(c, c) }

func httpUpstream(c net.Conn) {
	br := bufio.NewReader(c)
	for {
		req, err := http.ReadRequest(br)
		if err != nil {
			return
		}
		body := fmt.Sprintf("host=%s proto=%s xfp=%s\n", req.Host, req.Proto, req.Header.Get("X-Forwarded-Proto"))
		fmt.Fprintf(c, "HTTP/1.1 200 OK\r\nServer: upstream-app\r\nContent-Length: %d\r\n\r\n%s", len(body), body)
	}
}

// The data plane on loopback: what reaches which upstream, what the client
// reads, and what the access log says, for each kind of chain.
func TestProxyExecutesChains(t *testing.T) {
	dns := testbed.ServeDNS(t, mustListenUDP(t), 30)
	dns.Set("api.example.com", netip.MustParseAddr("203.0.113.9"))
	dns.Set("rebind.example.com", netip.MustParseAddr("127.0.0.1"))
	st := xds.State{Proxy: testProxy, NeverDial: testLocal.All(), DNSResolvers: []netip.AddrPort{dnsAddr},
		TCPIdleTimeout: 300 * time.Millisecond, MaxConnectionsPerChain: 2,
		Workloads: []xds.Workload{workload("shop", "app", "enforce", "203.0.113.5:5432, 203.0.113.6:7000, api.example.com, rebind.example.com", "127.0.0.1")}}
	d := newDataplane(t, st)
	d.serve("203.0.113.5:5432", echo)
	d.serve("203.0.113.9:80", httpUpstream)

	t.Run("an allowed address: forwarded to it, logged", func(t *testing.T) {
		if got := d.connect("203.0.113.5:5432", "ping\n"); got != "ping\n" {
			t.Fatalf("client read %q, want the echo", got)
		}
		e := d.lastLog()
		for k, want := range map[string]string{"verdict": "allow", "chain": "tcp|shop/app", "upstream": "203.0.113.5:5432",
			"original_destination": "203.0.113.5:5432", "bytes_from_pod": "5", "bytes_to_pod": "5", "response_flags": "-", "pod": "app", "namespace": "shop"} {
			if e.Str(k) != want {
				t.Errorf("access log %s = %q, want %q (%v)", k, e.Str(k), want, e)
			}
		}
	})
	t.Run("another address: closed, nothing dialled", func(t *testing.T) {
		if got := d.connect("198.51.100.9:22", "ping\n"); got != "" {
			t.Fatalf("client read %q", got)
		}
		if d.hits[netip.MustParseAddrPort("198.51.100.9:22")] != 0 {
			t.Fatal("the denied destination was dialled")
		}
		if e := d.lastLog(); e.Str("verdict") != "deny" || e.Str("response_flags") != "UH" || e.Str("upstream") != "" {
			t.Fatalf("access log %v", e)
		}
	})
	t.Run("an allowed address nobody listens on: UF", func(t *testing.T) {
		d.connect("203.0.113.6:7000", "ping\n")
		if e := d.lastLog(); e.Outcome() != "dial-failed" {
			t.Fatalf("access log %v: outcome %s", e, e.Outcome())
		}
	})
	t.Run("the idle timeout closes a quiet connection", func(t *testing.T) {
		d.mu.Lock()
		d.dst = netip.MustParseAddrPort("203.0.113.5:5432")
		d.mu.Unlock()
		c, err := net.Dial("tcp", d.addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		io.WriteString(c, "x") // client-first: the inspectors decide at once
		// Logged when the upstream connects, long before the end.
		deadline := time.Now().Add(time.Second)
		for {
			es := d.log.entries()
			if n := len(es); n > 0 && es[n-1].Str("log_type") == "TcpUpstreamConnected" && es[n-1].Str("upstream_local") != "" {
				break
			}
			if time.Now().After(deadline) {
				t.Fatal("no access log line at upstream connect")
			}
			time.Sleep(5 * time.Millisecond)
		}
		start := time.Now()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		b, err := io.ReadAll(c)
		if took := time.Since(start); err != nil || took > 2*time.Second || string(b) != "x" {
			t.Fatalf("read %q, %v after %v; want the echo, then the close at the 300 ms idle timeout", b, err, took)
		}
		if e := d.finalLog(c.LocalAddr().String()); e.Str("log_type") != "TcpConnectionEnd" || e.Str("termination") != "idle timeout" {
			t.Fatalf("final access log %v", e)
		}
	})
	t.Run("the per-chain connection cap: the third open connection is closed", func(t *testing.T) {
		d.mu.Lock()
		d.dst = netip.MustParseAddrPort("203.0.113.5:5432")
		d.mu.Unlock()
		open := func() net.Conn {
			c, err := net.Dial("tcp", d.addr)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { c.Close() })
			io.WriteString(c, "x\n")
			c.SetDeadline(time.Now().Add(2 * time.Second))
			return c
		}
		for i := 0; i < 2; i++ {
			if l, err := bufio.NewReader(open()).ReadString('\n'); l != "x\n" {
				t.Fatalf("connection %d: %q, %v", i+1, l, err)
			}
		}
		if b, _ := io.ReadAll(open()); len(b) != 0 {
			t.Fatalf("the third connection got %q, want it closed", b)
		}
	})
	get := func(host string) string { return "GET /p HTTP/1.1\r\nHost: " + host + "\r\nConnection: close\r\n\r\n" }
	t.Run("HTTP to an allowed host: to where DNS says, the upstream's Server header", func(t *testing.T) {
		got := d.connect("198.51.100.20:80", get("api.example.com"))
		if !strings.HasPrefix(got, "HTTP/1.1 200") || !strings.Contains(got, "Server: upstream-app") || !strings.Contains(got, "xfp=http") {
			t.Fatalf("client read %q", got)
		}
		e := d.lastLog()
		if e.Str("response_code") != "200" || e.Str("upstream") != "203.0.113.9:80" || e.Str("authority") != "api.example.com" || e.Str("verdict") != "allow" {
			t.Fatalf("access log %v", e)
		}
		if d.hits[netip.MustParseAddrPort("198.51.100.20:80")] != 0 {
			t.Fatal("the address the client dialled was dialled")
		}
	})
	t.Run("HTTP, trailing dot: the same name, sent without it", func(t *testing.T) {
		got := d.connect("198.51.100.20:80", get("api.example.com."))
		if !strings.HasPrefix(got, "HTTP/1.1 200") || !strings.Contains(got, "host=api.example.com ") {
			t.Fatalf("client read %q", got)
		}
	})
	t.Run("HTTP/1.0: accepted; without Host, the 403", func(t *testing.T) {
		if got := d.connect("198.51.100.20:80", "GET / HTTP/1.0\r\nHost: api.example.com\r\n\r\n"); !strings.HasPrefix(got, "HTTP/1.1 200") {
			t.Fatalf("HTTP/1.0 with Host: %q", got)
		}
		got := d.connect("198.51.100.20:80", "GET / HTTP/1.0\r\n\r\n")
		if !strings.HasPrefix(got, "HTTP/1.1 403") || !strings.Contains(got, "sluice: request denied") {
			t.Fatalf("HTTP/1.0 without Host: %q", got)
		}
		if e := d.lastLog(); e.Str("authority") != "http10-no-host.sluice.invalid" || e.Str("verdict") != "deny" {
			t.Fatalf("access log %v", e)
		}
	})
	t.Run("HTTP to another host, CONNECT: 403", func(t *testing.T) {
		for _, req := range []string{get("evil.example.org"), "CONNECT api.example.com:443 HTTP/1.1\r\nHost: api.example.com:443\r\n\r\n"} {
			if got := d.connect("198.51.100.20:80", req); !strings.HasPrefix(got, "HTTP/1.1 403") {
				t.Errorf("%q: client read %q", req, got)
			}
		}
	})
	t.Run("HTTP to a name that resolves to loopback: 503 DF, nothing dialled", func(t *testing.T) {
		got := d.connect("198.51.100.20:80", get("rebind.example.com"))
		if !strings.HasPrefix(got, "HTTP/1.1 503") {
			t.Fatalf("client read %q", got)
		}
		if e := d.lastLog(); e.Outcome() != "dns-failed" {
			t.Fatalf("access log %v", e)
		}
		if n := dns.Queries("api.example.com"); n != 2 {
			// A and AAAA once: later requests were answered from the cache.
			t.Errorf("api.example.com was looked up with %d queries, want 2 (cached after)", n)
		}
	})
}

var dnsAddr netip.AddrPort

func mustListenUDP(t testing.TB) net.PacketConn {
	c, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dnsAddr = c.LocalAddr().(*net.UDPAddr).AddrPort()
	return c
}
