// Package standin is a stand-in for Envoy's original_dst listener, for tests
// and the demo on machines where Envoy cannot be installed. Per connection it
// does what Envoy does: getsockopt(SO_ORIGINAL_DST) at SOL_IP on IPv4 sockets
// and SOL_IPV6 (IP6T_SO_ORIGINAL_DST) on IPv6 sockets into a sockaddr_storage
// buffer, closes the connection when no original destination is known (Envoy
// would route it to itself, which sluice's config closes), else dials the
// original destination and splices bytes both ways. It records what it
// recovered, one JSON line per connection.
package standin

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/signal"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/sluice-io/sluice/agent"
	"github.com/sluice-io/sluice/test/conformance"
	"github.com/sluice-io/sluice/xds"
	"sigs.k8s.io/yaml"
)

// Record is what the proxy saw of one connection.
type Record struct {
	Client   string `json:"client"`
	Listener string `json:"listener"`
	// OrigDst is the recovered original destination; empty when unknown.
	OrigDst string `json:"orig_dst,omitempty"`
	// Want is, in verify mode, the destination the client says it dialed
	// ("none" when it connected to the proxy directly).
	Want   string `json:"want,omitempty"`
	Asked  bool   `json:"asked"`
	Result string `json:"result"` // forwarded, unknown-closed, loop-closed, dial-failed, dns-failed, never-dial-closed, match, mismatch, unknown, skipped
	Err    string `json:"err,omitempty"`
	// Host is the allowed hostname whose DNS answer was dialled, and
	// Upstream the address dialled (the original destination, or that
	// answer).
	Host     string `json:"host,omitempty"`
	Upstream string `json:"upstream,omitempty"`
}

// SOOriginalDst is SO_ORIGINAL_DST / IP6T_SO_ORIGINAL_DST.
const SOOriginalDst = conformance.SOOriginalDst

// OriginalDst asks the kernel (answered by sluice's getsockopt program) for
// the original destination of an accepted connection, as Envoy does.
func OriginalDst(c *net.TCPConn) (netip.AddrPort, error) { return conformance.OriginalDst(c) }

// Proxy is a running stand-in proxy.
type Proxy struct {
	Verify    bool // read "WANT <addr>|none" from the client and compare; never dial
	Sink      bool // ask for the original destination, then close: no dial, no record (benchmarks)
	Drain     bool // ask for the original destination, then read and discard until EOF (bulk benchmarks)
	SkipEvery int  // in verify mode, do not ask for every Nth connection's original dst
	// Workloads, if set, is the agent's workloads file: the proxy then
	// decides like sluice's generated listener, with the same policy
	// parser and xds.Policy.Verdict: a source that is no workload's is
	// closed; an enforce-mode workload's connection is forwarded only if
	// its destination, the server name of its TLS ClientHello or the Host
	// of its plaintext HTTP request is allowed; a denied HTTP request gets
	// 403, anything else denied is closed.
	Workloads string
	// DNS is the resolver for hostname entries (the agent's configured
	// resolvers, as in the served DNS cache). A connection a hostname entry
	// allows is forwarded to the address DNS gives for the name, at the
	// original destination's port, as Envoy's dynamic forward proxy does,
	// never to the address the client dialled; an answer in NeverDial is
	// refused (DNS rebinding), and a failed lookup closes the connection.
	DNS       netip.AddrPort
	NeverDial []netip.Prefix
	// State, if set, is the agent's state file: a TCP-hostname rule
	// (tcp://name:port) allows the addresses the agent resolved the name
	// to, as the agent's listener does (xds.Policy.Expand).
	State string
	Log   io.Writer

	mu    sync.Mutex
	n     int
	enc   *json.Encoder
	addrs map[netip.AddrPort]bool
	// The workloads file as last parsed, and the size and modification
	// time it had then: a 1,000-workload file parsed per connection would
	// make the proxy, not the datapath, the bottleneck of churn tests.
	file     agent.WorkloadFile
	fileKey  string
	state    agent.State
	stateKey string
}

func (p *Proxy) record(r Record) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.enc == nil {
		p.enc = json.NewEncoder(p.Log)
	}
	p.enc.Encode(r)
}

// Serve accepts on l until it is closed.
func (p *Proxy) Serve(l net.Listener) error {
	for {
		c, err := l.Accept()
		if err != nil {
			return err
		}
		go p.handle(c.(*net.TCPConn))
	}
}

func (p *Proxy) handle(c *net.TCPConn) {
	defer c.Close()
	r := Record{Client: c.RemoteAddr().String(), Listener: c.LocalAddr().String()}
	p.mu.Lock()
	p.n++
	skip := p.Verify && p.SkipEvery > 0 && p.n%p.SkipEvery == 0
	p.mu.Unlock()

	var br *bufio.Reader
	if p.Verify {
		c.SetDeadline(time.Now().Add(5 * time.Second))
		br = bufio.NewReader(c)
		line, _ := br.ReadString('\n')
		r.Want = strings.TrimSpace(strings.TrimPrefix(line, "WANT "))
	}
	if skip {
		r.Result = "skipped"
		p.record(r)
		return
	}
	r.Asked = true
	dst, err := OriginalDst(c)
	if p.Sink {
		return
	}
	if p.Drain {
		io.Copy(io.Discard, c)
		return
	}
	if err == nil {
		r.OrigDst = netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port()).String()
	} else {
		r.Err = err.Error()
	}
	if p.Verify {
		got := r.OrigDst
		if got == "" {
			got = "none"
		}
		switch {
		case r.Want == "":
			r.Result = "client-aborted" // reset before saying what it dialed
		case got == r.Want:
			r.Result = "match"
		case got == "none":
			r.Result = "unknown" // no answer: the proxy would close, never misroute
		default:
			r.Result = "mismatch"
		}
		p.record(r)
		fmt.Fprintln(c, r.Result)
		return
	}
	if err != nil {
		r.Result = "unknown-closed"
		p.record(r)
		return
	}
	if p.addrs[dst] || p.addrs[netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port())] {
		r.Result = "loop-closed"
		p.record(r)
		return
	}
	var early []byte
	upstream := netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port())
	if p.Workloads != "" {
		var ok, http bool
		if early, http, ok = p.enforce(c, dst, &r); !ok {
			p.record(r)
			return
		}
		if r.Host != "" {
			if upstream, ok = p.resolve(r.Host, dst.Port(), &r); !ok {
				if http {
					// The HTTP dynamic forward proxy filter answers a failed
					// (or wholly filtered) lookup with 503, flag DF.
					fmt.Fprintf(c, "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
				}
				p.record(r)
				return
			}
		}
	}
	r.Upstream = upstream.String()
	d := net.Dialer{Timeout: 3 * time.Second}
	d.SetMultipathTCP(false)
	up, err := d.Dial("tcp", r.Upstream)
	if err != nil {
		r.Result, r.Err = "dial-failed", err.Error()
		p.record(r)
		return
	}
	defer up.Close()
	r.Result = "forwarded"
	p.record(r)
	if len(early) > 0 {
		if _, err := up.Write(early); err != nil {
			return
		}
	}
	splice(c, up.(*net.TCPConn))
}

// enforce applies the workloads file's policy to one connection, as the
// generated listener does. It returns the bytes it read to find an HTTP
// Host (to forward first), whether it was HTTP, and whether to forward;
// r.Result says why not.
func (p *Proxy) enforce(c *net.TCPConn, dst netip.AddrPort, r *Record) (early []byte, http, ok bool) {
	src := c.RemoteAddr().(*net.TCPAddr).AddrPort().Addr().Unmap()
	pol, ok := p.policyOf(src)
	if !ok {
		r.Result = "unknown-source-closed"
		return nil, false, false
	}
	dst = netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port())
	d := pol.Decide(dst, "", "")
	if !d.Allowed && hasHostRules(pol) {
		var sni, host, method string
		early, sni, host, method = sniff(c)
		d = pol.Decide(dst, sni, host)
		if host != "" && method == "CONNECT" {
			// The HTTP chains route no CONNECT: it falls to the deny
			// virtual host's 403 whatever the Host.
			d = xds.Decision{Reason: "HTTP 403: CONNECT is not forwarded"}
		}
		http = host != ""
		if !d.Allowed && http {
			fmt.Fprintf(c, "HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
			r.Result, r.Err = "denied-403", d.Reason
			return nil, true, false
		}
	}
	if !d.Allowed {
		r.Result, r.Err = "denied-closed", d.Reason
		return nil, http, false
	}
	r.Host = d.Host
	return early, http, true
}

// resolve looks name up as the DNS cache of the served configuration does
// (V4_PREFERRED: A records first, then AAAA), drops the answers in the
// never-dial set as its resolved_address_filter does, and returns the
// first that remains, at port; r.Result says why not when the lookup fails
// or no answer remains.
func (p *Proxy) resolve(name string, port uint16, r *Record) (netip.AddrPort, bool) {
	if !p.DNS.IsValid() {
		r.Result, r.Err = "dns-failed", "no DNS resolver configured"
		return netip.AddrPort{}, false
	}
	res := &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "udp", p.DNS.String())
	}}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	var answers []netip.Addr
	for _, network := range []string{"ip4", "ip6"} {
		as, err := res.LookupNetIP(ctx, network, name)
		if err == nil {
			answers = append(answers, as...)
		}
	}
	if len(answers) == 0 {
		r.Result, r.Err = "dns-failed", "no address for "+name
		return netip.AddrPort{}, false
	}
	for _, a := range answers {
		a = a.Unmap()
		if !slices.ContainsFunc(p.NeverDial, func(nd netip.Prefix) bool { return nd.Contains(a) }) {
			return netip.AddrPortFrom(a, port), true
		}
	}
	r.Result, r.Err = "never-dial-closed", fmt.Sprintf("%s resolves only to node-local addresses %v", name, answers)
	return netip.AddrPort{}, false
}

// policyOf returns the policy of the workload with address a in the
// workloads file as it is now.
func (p *Proxy) policyOf(a netip.Addr) (xds.Policy, bool) {
	f, ok := p.workloads()
	if !ok {
		return xds.Policy{}, false
	}
	for _, w := range f.Workloads {
		for _, ip := range w.IPs {
			if wa, err := netip.ParseAddr(ip); err == nil && wa.Unmap() == a {
				pol, _ := xds.ParsePolicy(w.Labels, w.Annotations) // the safest policy on error
				if pol.Mode == xds.Enforce {
					names := p.names()
					pol = pol.Expand(func(name string) []netip.Addr {
						var out []netip.Addr
						for _, a := range names[name].Addrs {
							if time.Now().Before(a.Until) {
								out = append(out, a.Addr)
							}
						}
						return out
					})
				}
				return pol, true
			}
		}
	}
	return xds.Policy{}, false
}

// workloads returns the workloads file, parsed again only when its size or
// modification time changed (the agent's writers replace it by rename).
func (p *Proxy) workloads() (agent.WorkloadFile, bool) {
	fi, err := os.Stat(p.Workloads)
	if err != nil {
		return agent.WorkloadFile{}, false
	}
	key := fmt.Sprintf("%d/%d", fi.Size(), fi.ModTime().UnixNano())
	p.mu.Lock()
	if key == p.fileKey {
		defer p.mu.Unlock()
		return p.file, true
	}
	p.mu.Unlock()
	b, err := os.ReadFile(p.Workloads)
	if err != nil {
		return agent.WorkloadFile{}, false
	}
	var f agent.WorkloadFile
	if err := yaml.Unmarshal(b, &f); err != nil {
		return agent.WorkloadFile{}, false
	}
	p.mu.Lock()
	p.file, p.fileKey = f, key
	p.mu.Unlock()
	return f, true
}

// names returns the agent's TCP-hostname resolutions from its state file,
// read again only when the file changed.
func (p *Proxy) names() map[string]agent.NameStatus {
	if p.State == "" {
		return nil
	}
	fi, err := os.Stat(p.State)
	if err != nil {
		return nil
	}
	key := fmt.Sprintf("%d/%d", fi.Size(), fi.ModTime().UnixNano())
	p.mu.Lock()
	if key == p.stateKey {
		defer p.mu.Unlock()
		return p.state.Names
	}
	p.mu.Unlock()
	st, err := agent.ReadState(p.State)
	if err != nil {
		return nil
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.state, p.stateKey = st, key
	return st.Names
}

func hasHostRules(p xds.Policy) bool {
	for _, r := range p.Allow {
		if r.IsHost() {
			return true
		}
	}
	return false
}

// sniff reads the start of the client's stream (2 s at most) as Envoy's
// listener filters do: a TLS ClientHello gives its server name
// (tls_inspector), a plaintext HTTP/1 request head its Host (http_inspector,
// then the HTTP connection manager). It returns what it read, to forward
// first, and the HTTP method.
func sniff(c *net.TCPConn) (early []byte, sni, host, method string) {
	c.SetReadDeadline(time.Now().Add(2 * time.Second))
	defer c.SetReadDeadline(time.Time{})
	first := make([]byte, 1)
	if n, _ := c.Read(first); n == 0 {
		return nil, "", "", ""
	}
	if first[0] == 0x16 { // TLS handshake record
		early, sni = sniffSNI(c, first)
		return early, sni, "", ""
	}
	early, host = sniffHTTPHost(c, first)
	if host != "" {
		method, _, _ = strings.Cut(string(early), " ")
	}
	return early, "", host, method
}

// errSniffed stops a TLS handshake once the ClientHello is read.
var errSniffed = errors.New("ClientHello read")

// sniffSNI parses the ClientHello that starts with first with crypto/tls,
// stopping the handshake as soon as it is parsed. It returns every byte it
// read and the server name ("" if none).
func sniffSNI(c *net.TCPConn, first []byte) ([]byte, string) {
	var read bytes.Buffer
	read.Write(first)
	var sni string
	conn := &sniffConn{Conn: c, r: io.MultiReader(bytes.NewReader(first), io.TeeReader(c, &read))}
	tls.Server(conn, &tls.Config{GetConfigForClient: func(h *tls.ClientHelloInfo) (*tls.Config, error) {
		sni = h.ServerName
		return nil, errSniffed
	}}).Handshake()
	return read.Bytes(), sni
}

// sniffConn reads from r and swallows writes: the client never sees the
// alert of the abandoned handshake.
type sniffConn struct {
	net.Conn
	r io.Reader
}

func (c *sniffConn) Read(p []byte) (int, error)  { return c.r.Read(p) }
func (c *sniffConn) Write(p []byte) (int, error) { return len(p), nil }

// sniffHTTPHost reads a plaintext HTTP/1 request head (up to 4 KiB) that
// starts with first and returns what it read and the Host without its
// port ("" when it is not HTTP), as Envoy's http_inspector and HCM would
// see it.
func sniffHTTPHost(c *net.TCPConn, first []byte) ([]byte, string) {
	buf := append([]byte{}, first...)
	tmp := make([]byte, 4096)
	for len(buf) < 4096 && !strings.Contains(string(buf), "\r\n\r\n") {
		n, err := c.Read(tmp[:4096-len(buf)])
		buf = append(buf, tmp[:n]...)
		if err != nil {
			break
		}
	}
	head, _, _ := strings.Cut(string(buf), "\r\n\r\n")
	lines := strings.Split(head, "\r\n")
	if len(lines) == 0 || !strings.Contains(lines[0], " HTTP/1.") {
		return buf, ""
	}
	for _, l := range lines[1:] {
		k, v, ok := strings.Cut(l, ":")
		if ok && strings.EqualFold(strings.TrimSpace(k), "host") {
			h := strings.TrimSpace(v)
			if hp, err := netip.ParseAddrPort(h); err == nil {
				return buf, hp.Addr().String()
			}
			if i := strings.LastIndex(h, ":"); i > 0 && !strings.Contains(h[i:], "]") {
				h = h[:i]
			}
			return buf, strings.ToLower(h)
		}
	}
	return buf, ""
}

// splice copies both ways until both directions are done, half-closing as
// each ends, as tcp_proxy does.
func splice(a, b *net.TCPConn) {
	var wg sync.WaitGroup
	wg.Add(2)
	cp := func(dst, src *net.TCPConn) {
		defer wg.Done()
		io.Copy(dst, src)
		dst.CloseWrite()
	}
	go cp(a, b)
	go cp(b, a)
	wg.Wait()
}

// Main runs the stand-in proxy as a program: it listens on every -listen
// address, prints READY on stdout, and serves until SIGTERM/SIGINT.
func Main(args []string) int {
	fs := flag.NewFlagSet("standin-proxy", flag.ContinueOnError)
	listen := fs.String("listen", "169.254.77.1:15001,[fd73:6c75:6963:65::1]:15001", "comma-separated addresses to listen on")
	records := fs.String("records", "", "append one JSON record per connection to this file (default stderr)")
	verify := fs.Bool("verify", false, "test mode: read 'WANT <addr>|none' from each client, compare with the recovered original destination, answer match/mismatch, never dial")
	skip := fs.Int("skip-ask-every", 0, "in -verify mode, never ask for the original destination of every Nth connection")
	sink := fs.Bool("sink", false, "benchmark mode: ask for each original destination, then close; no dial, no record")
	drain := fs.Bool("drain", false, "bulk benchmark mode: ask for each original destination, then read and discard everything")
	admin := fs.String("admin", "", "serve GET /ready (LIVE) here, as Envoy's admin does, for the agent's health probe")
	workloads := fs.String("workloads", "", "the agent's workloads file: enforce each workload's policy as the generated listener does (unknown sources closed, denied destinations closed or 403)")
	dns := fs.String("dns", "", "with -workloads: the DNS resolver (addr:port) for hostname entries; an allowed name is dialled where DNS says, never where the client dialled")
	neverDial := fs.String("never-dial", "", "with -dns: comma-separated CIDRs a resolved address may not be in (DNS rebinding)")
	state := fs.String("state", "", "with -workloads: the agent's state file, for the addresses of TCP-hostname rules (tcp://name:port)")
	xdsSocket := fs.String("xds", "", "conformance mode: take the listener and clusters from this ADS socket and execute them as Envoy would (test/conformance); the access log goes to -records. The other modes' flags do not apply")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if *xdsSocket != "" {
		return conformanceMain(*xdsSocket, *admin, *records)
	}
	p := &Proxy{Verify: *verify, Sink: *sink, Drain: *drain, SkipEvery: *skip, Workloads: *workloads, State: *state, Log: os.Stderr, addrs: map[netip.AddrPort]bool{}}
	if *dns != "" {
		ap, err := netip.ParseAddrPort(*dns)
		if err != nil {
			fmt.Fprintf(os.Stderr, "standin-proxy: -dns %q: %v\n", *dns, err)
			return 2
		}
		p.DNS = ap
	}
	for _, s := range strings.Split(*neverDial, ",") {
		if s = strings.TrimSpace(s); s == "" {
			continue
		}
		pfx, err := netip.ParsePrefix(s)
		if err != nil {
			fmt.Fprintf(os.Stderr, "standin-proxy: -never-dial %q: %v\n", s, err)
			return 2
		}
		p.NeverDial = append(p.NeverDial, pfx)
	}
	if *records != "" {
		f, err := os.OpenFile(*records, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
		if err != nil {
			fmt.Fprintln(os.Stderr, "standin-proxy:", err)
			return 1
		}
		defer f.Close()
		p.Log = f
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	lc := net.ListenConfig{}
	// Go listeners are MPTCP by default since 1.24; Envoy's are plain TCP.
	lc.SetMultipathTCP(false)
	for _, a := range strings.Split(*listen, ",") {
		ap, err := netip.ParseAddrPort(strings.TrimSpace(a))
		if err != nil {
			fmt.Fprintf(os.Stderr, "standin-proxy: -listen %q: %v\n", a, err)
			return 2
		}
		network := "tcp4"
		if ap.Addr().Is6() {
			network = "tcp6"
		}
		l, err := lc.Listen(ctx, network, ap.String())
		if err != nil {
			fmt.Fprintln(os.Stderr, "standin-proxy:", err)
			return 1
		}
		defer l.Close()
		p.addrs[ap] = true
		go p.Serve(l)
	}
	if *admin != "" {
		l, err := lc.Listen(ctx, "tcp", *admin)
		if err != nil {
			fmt.Fprintln(os.Stderr, "standin-proxy:", err)
			return 1
		}
		mux := http.NewServeMux()
		mux.HandleFunc("/ready", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "LIVE") })
		srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
		defer srv.Close()
		go srv.Serve(l)
	}
	fmt.Println("READY")
	<-ctx.Done()
	return 0
}

// ReadRecords reads the records a proxy wrote with -records; lines that do
// not parse (a record being written) are skipped.
func ReadRecords(path string) []Record {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil
	}
	var out []Record
	for _, line := range strings.Split(string(b), "\n") {
		var r Record
		if json.Unmarshal([]byte(line), &r) == nil {
			out = append(out, r)
		}
	}
	return out
}

// FindRecord returns the record of the connection from client (the address
// the client saw as its local one; v4-mapped or not), waiting up to wait for
// the proxy to write it.
func FindRecord(path, client string, wait time.Duration) (Record, bool) {
	want, err := netip.ParseAddrPort(client)
	if err != nil {
		return Record{}, false
	}
	deadline := time.Now().Add(wait)
	for {
		for _, r := range ReadRecords(path) {
			got, err := netip.ParseAddrPort(r.Client)
			if err == nil && got.Addr().Unmap() == want.Addr().Unmap() && got.Port() == want.Port() {
				return r, true
			}
		}
		if time.Now().After(deadline) {
			return Record{}, false
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// conformanceMain runs the conformance proxy (test/conformance) until
// SIGTERM/SIGINT.
func conformanceMain(socket, admin, records string) int {
	out := os.Stdout
	if records != "" {
		f, err := os.OpenFile(records, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
		if err != nil {
			fmt.Fprintln(os.Stderr, "standin-proxy:", err)
			return 1
		}
		defer f.Close()
		out = f
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	log := slog.New(slog.NewJSONHandler(os.Stderr, nil))
	if err := conformance.Server(ctx, socket, admin, out, log, func() { fmt.Println("READY") }); err != nil {
		fmt.Fprintln(os.Stderr, "standin-proxy:", err)
		return 1
	}
	return 0
}
