package conformance

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Proxy executes the accepted configuration on connections.
type Proxy struct {
	// AccessLog receives the access log lines, as Envoy's stdout.
	AccessLog io.Writer

	cfg    atomic.Pointer[Config]
	logMu  sync.Mutex
	caches dnsCaches

	// Test seams (nil: the real thing): the original destination of an
	// accepted connection, and where a dial to an upstream really goes.
	origDst func(*net.TCPConn) (netip.AddrPort, error)
	dialAt  func(netip.AddrPort) netip.AddrPort

	ids atomic.Uint64 // %CONNECTION_ID%
}

// SetConfig makes cfg the configuration new connections get; connections
// already open keep the chain they were given (Envoy drains a changed
// chain's connections after the drain time; the proxy does not).
func (p *Proxy) SetConfig(cfg *Config) {
	for _, cs := range cfg.caches() {
		p.caches.get(cs[0])
	}
	p.cfg.Store(cfg)
}

// Config is the configuration in effect (nil before the first).
func (p *Proxy) Config() *Config { return p.cfg.Load() }

// DNSLookups is how many lookups the named DNS cache did.
func (p *Proxy) DNSLookups(name string) int { return p.caches.Lookups(name) }

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

func (p *Proxy) log(logs []*AccessLog, v values) {
	if p.AccessLog == nil {
		return
	}
	p.logMu.Lock()
	defer p.logMu.Unlock()
	for _, l := range logs {
		p.AccessLog.Write(l.render(v))
	}
}

// envoyTime is %START_TIME%'s default format.
const envoyTime = "2006-01-02T15:04:05.000Z"

func unmap(ap netip.AddrPort) netip.AddrPort {
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

// conn is one downstream connection as the chain's filters see it.
type conn struct {
	p       *Proxy
	c       *replayConn
	cfg     *Config
	start   time.Time
	v       values
	state   map[string]string // connection filter state
	dfpAddr netip.AddrPort    // the SNI dynamic forward proxy's answer
	dfpErr  error
}

func (p *Proxy) handle(c *net.TCPConn) {
	defer c.Close()
	cfg := p.cfg.Load()
	if cfg == nil {
		return
	}
	l := cfg.Listener
	start := time.Now()
	remote := unmap(c.RemoteAddr().(*net.TCPAddr).AddrPort())
	dst := unmap(c.LocalAddr().(*net.TCPAddr).AddrPort())
	if l.OriginalDst {
		// original_dst: the restored destination becomes the local
		// address; when the kernel knows none, it stays the listener's.
		origDst := OriginalDst
		if p.origDst != nil {
			origDst = p.origDst
		}
		if od, err := origDst(c); err == nil {
			dst = unmap(od)
		}
	}
	id := p.ids.Add(1)
	base := values{
		"START_TIME":                start.UTC().Format(envoyTime),
		"DOWNSTREAM_REMOTE_ADDRESS": remote.String(),
		"DOWNSTREAM_LOCAL_ADDRESS":  dst.String(),
		"DOWNSTREAM_LOCAL_PORT":     int(dst.Port()),
		"CONNECTION_ID":             id,
		"RESPONSE_FLAGS":            "-",
	}
	listenerLog := func(details string) {
		base["DURATION"] = time.Since(start).Milliseconds()
		base["CONNECTION_TERMINATION_DETAILS"] = details
		p.log(l.AccessLogs, base)
	}
	in, ok := inspect(c, l)
	if !ok {
		// Closed by a listener filter: only the listener's access log sees it.
		listenerLog("listener filter closed the connection (ClientHello too large, or its timeout)")
		return
	}
	if in.sni != "" {
		base["REQUESTED_SERVER_NAME"] = in.sni
	}
	md := MatchData{Source: remote, Destination: dst, TransportProtocol: in.transport, ServerName: in.sni, ALPN: in.alpn}
	if md.TransportProtocol == "" {
		md.TransportProtocol = "raw_buffer"
	}
	ch := l.ChainFor(md)
	if ch == nil {
		listenerLog("no filter chain matched")
		return
	}
	base["FILTER_CHAIN_NAME"] = ch.Name
	cn := &conn{p: p, c: newReplayConn(c, in.early), cfg: cfg, start: start, state: map[string]string{}, v: base}
	for _, f := range ch.Filters {
		switch f := f.(type) {
		case *ConnectionLimit:
			// connection_limit: beyond the cap the connection is closed
			// (delay 0) before any later filter runs; only its stats see it.
			if f.active.Add(1) > int64(f.Max) {
				f.active.Add(-1)
				return
			}
			defer f.active.Add(-1)
		case *SetFilterState:
			for _, k := range sortedKeys(f.Values) {
				cn.state[k] = formatText(f.Values[k], cn.v)
			}
		case *SNIForwardProxy:
			// sni_dynamic_forward_proxy: the host is the SNI, the port the
			// envoy.upstream.dynamic_port filter state if set, else
			// port_value. Without SNI it does nothing.
			if in.sni == "" {
				continue
			}
			port := f.Port
			if s, ok := cn.state["envoy.upstream.dynamic_port"]; ok {
				if n, err := strconv.ParseUint(s, 10, 16); err == nil {
					port = uint32(n)
				}
			}
			addrs, err := p.caches.get(f.Cache).resolve(context.Background(), strings.ToLower(in.sni))
			if err != nil {
				cn.dfpErr = err
				continue
			}
			cn.dfpAddr = netip.AddrPortFrom(addrs[0], uint16(port))
		case *TCPProxy:
			p.tcpProxy(cn, f)
		case *HTTPConnectionManager:
			p.serveHTTP(cn, f)
		}
	}
}

// upstream picks the host a cluster gives: ORIGINAL_DST the restored
// destination, the dynamic forward proxy the resolved address, the static
// cluster none. flag is the response flag when there is none: NC (no such
// cluster), UH (no healthy upstream).
func (cn *conn) upstream(name string, dfp netip.AddrPort) (netip.AddrPort, *Cluster, string) {
	cl := cn.cfg.Clusters[name]
	switch {
	case cl == nil:
		return netip.AddrPort{}, nil, "NC"
	case cl.Kind == "ORIGINAL_DST":
		return netip.MustParseAddrPort(cn.v["DOWNSTREAM_LOCAL_ADDRESS"].(string)), cl, ""
	case cl.Kind == "DYNAMIC_FORWARD_PROXY" && dfp.IsValid():
		return dfp, cl, ""
	}
	return netip.AddrPort{}, cl, "UH"
}

// dial connects to a cluster's host with its connect timeout and keepalive.
func (cn *conn) dial(up netip.AddrPort, cl *Cluster) (*net.TCPConn, error) {
	d := net.Dialer{Timeout: cl.ConnectTimeout, KeepAlive: -1}
	if cl.Keepalive != nil {
		d.KeepAliveConfig = *cl.Keepalive
	}
	d.SetMultipathTCP(false)
	if cn.p.dialAt != nil {
		up = cn.p.dialAt(up)
	}
	c, err := d.Dial("tcp", up.String())
	if err != nil {
		return nil, err
	}
	return c.(*net.TCPConn), nil
}

func (p *Proxy) tcpProxy(cn *conn, f *TCPProxy) {
	v := cn.v
	var received, sent atomic.Int64
	var mu sync.Mutex // v is shared with the periodic flush
	flush := func(kind string) {
		mu.Lock()
		defer mu.Unlock()
		v["ACCESS_LOG_TYPE"] = kind
		v["BYTES_RECEIVED"], v["BYTES_SENT"] = received.Load(), sent.Load()
		v["DURATION"] = time.Since(cn.start).Milliseconds()
		p.log(f.AccessLogs, v)
	}
	defer func() { flush("TcpConnectionEnd") }()
	up, cl, flag := cn.upstream(f.Cluster, cn.dfpAddr)
	if flag != "" {
		v["RESPONSE_FLAGS"] = flag
		return
	}
	v["UPSTREAM_HOST"] = up.String()
	uc, err := cn.dial(up, cl)
	if err != nil {
		v["RESPONSE_FLAGS"] = "UF" // upstream connection failure
		v["UPSTREAM_TRANSPORT_FAILURE_REASON"] = err.Error()
		return
	}
	defer uc.Close()
	v["UPSTREAM_LOCAL_ADDRESS"] = unmap(uc.LocalAddr().(*net.TCPAddr).AddrPort()).String()
	if f.FlushOnConnected {
		flush("TcpUpstreamConnected")
	}
	if f.FlushInterval > 0 {
		done := make(chan struct{})
		defer close(done)
		go func() {
			t := time.NewTicker(f.FlushInterval)
			defer t.Stop()
			for {
				select {
				case <-done:
					return
				case <-t.C:
					flush("TcpPeriodic")
				}
			}
		}()
	}
	if splice(cn.c, uc, f.IdleTimeout, &received, &sent) {
		// tcp_proxy's idle timeout closed both sides.
		mu.Lock()
		v["CONNECTION_TERMINATION_DETAILS"] = "idle timeout"
		mu.Unlock()
	}
}

// splice copies both ways until both directions end, half-closing each as
// it ends (tcp_proxy's half-close), and returns the bytes from and to the
// downstream. With idle > 0 it closes both sides once no byte moved either
// way for that long, and says so.
func splice(down *replayConn, up *net.TCPConn, idle time.Duration, received, sent *atomic.Int64) (idled bool) {
	var last atomic.Int64
	last.Store(time.Now().UnixNano())
	done := make(chan struct{})
	var timedOut atomic.Bool
	if idle > 0 {
		go func() {
			t := time.NewTicker(min(idle/4+time.Millisecond, time.Second))
			defer t.Stop()
			for {
				select {
				case <-done:
					return
				case <-t.C:
					if time.Since(time.Unix(0, last.Load())) >= idle {
						timedOut.Store(true)
						down.TCPConn.Close()
						up.Close()
						return
					}
				}
			}
		}()
	}
	cp := func(dst io.Writer, src io.Reader, n *atomic.Int64) {
		buf := make([]byte, 32<<10)
		for {
			k, err := src.Read(buf)
			if k > 0 {
				last.Store(time.Now().UnixNano())
				w, werr := dst.Write(buf[:k])
				n.Add(int64(w))
				if werr != nil {
					return
				}
			}
			if err != nil {
				return
			}
		}
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		cp(down.TCPConn, up, sent)
		down.CloseWrite()
	}()
	cp(up, down, received)
	up.CloseWrite()
	wg.Wait()
	close(done)
	return timedOut.Load()
}

// serveHTTP is the HTTP connection manager for HTTP/1.x: each request is
// routed, answered directly or forwarded through the dynamic forward
// proxy, and logged.
func (p *Proxy) serveHTTP(cn *conn, m *HTTPConnectionManager) {
	br := bufio.NewReader(cn.c)
	for {
		req, err := http.ReadRequest(br)
		if err != nil {
			if err != io.EOF && !strings.Contains(err.Error(), "closed") && !strings.Contains(err.Error(), "reset") {
				// A codec error: 400, flag DPE (downstream protocol error).
				p.respond(cn, m, nil, nil, 400, "Bad Request", "DPE", "")
			}
			return
		}
		if !p.serveRequest(cn, m, br, req) {
			return
		}
	}
}

func (p *Proxy) respond(cn *conn, m *HTTPConnectionManager, req *http.Request, route *Route, status int, body, flag, upstream string) {
	resp := fmt.Sprintf("HTTP/1.1 %d %s\r\ncontent-length: %d\r\ncontent-type: text/plain\r\ndate: %s\r\nserver: envoy\r\n\r\n%s",
		status, http.StatusText(status), len(body), time.Now().UTC().Format(http.TimeFormat), body)
	n, _ := io.WriteString(cn.c.TCPConn, resp)
	p.logRequest(cn, m, req, route, status, flag, upstream, 0, int64(n))
}

func (p *Proxy) logRequest(cn *conn, m *HTTPConnectionManager, req *http.Request, route *Route, status int, flag, upstream string, received, sent int64) {
	v := values{}
	for k, x := range cn.v {
		v[k] = x
	}
	if req != nil {
		v["REQ(:AUTHORITY)"], v["REQ(:METHOD)"] = req.Host, req.Method
	}
	if route != nil && route.Name != "" {
		v["ROUTE_NAME"] = route.Name
	}
	if upstream != "" {
		v["UPSTREAM_HOST"] = upstream
	}
	if flag == "" {
		flag = "-"
	}
	v["RESPONSE_CODE"], v["RESPONSE_FLAGS"] = status, flag
	v["ACCESS_LOG_TYPE"] = "DownstreamEnd"
	v["RESPONSE_CODE_DETAILS"] = responseCodeDetails(status, flag, route)
	v["BYTES_RECEIVED"], v["BYTES_SENT"] = received, sent
	v["DURATION"] = time.Since(cn.start).Milliseconds()
	p.log(m.AccessLogs, v)
}

// serveRequest handles one request; false: the connection is done.
func (p *Proxy) serveRequest(cn *conn, m *HTTPConnectionManager, br *bufio.Reader, req *http.Request) bool {
	if req.ProtoMajor == 1 && req.ProtoMinor == 0 {
		if !m.AcceptHTTP10 {
			// accept_http_10 off: Envoy answers HTTP/1.0 with 426.
			p.respond(cn, m, req, nil, 426, "Upgrade Required", "", "")
			return false
		}
		if req.Host == "" {
			req.Host = m.DefaultHost10
		}
		// HTTP/1.0 without keep-alive: one request per connection.
		if !containsToken(req.Header.Get("Connection"), "keep-alive") {
			req.Close = true
		}
	}
	req.Host = m.normalizeHost(req.Host)
	if req.Host == "" {
		p.respond(cn, m, req, nil, 400, "Bad Request", "DPE", "")
		return false
	}
	_, route := m.RouteFor(req.Host, req.Method, req.URL.RequestURI())
	if route == nil {
		p.respond(cn, m, req, nil, 404, "", "NR", "")
		return !req.Close
	}
	if route.Cluster == "" {
		p.respond(cn, m, req, route, route.Status, route.Body, "", "")
		return !req.Close && req.Method != "CONNECT"
	}
	var dfp netip.AddrPort
	if m.ForwardProxy != nil {
		// The HTTP dynamic forward proxy: host from the Host header (or
		// envoy.upstream.dynamic_host), port from envoy.upstream.dynamic_port
		// when allow_dynamic_host_from_filter_state, else the Host's port,
		// else 80. A failed lookup is a 503 with flag DF.
		host, portStr, err := net.SplitHostPort(req.Host)
		if err != nil {
			host, portStr = req.Host, "80"
		}
		if m.ForwardProxy.FromFilterState {
			if h, ok := cn.state["envoy.upstream.dynamic_host"]; ok {
				host = h
			}
			if s, ok := cn.state["envoy.upstream.dynamic_port"]; ok {
				portStr = s
			}
		}
		port, _ := strconv.ParseUint(portStr, 10, 16)
		addrs, err := p.caches.get(m.ForwardProxy.Cache).resolve(context.Background(), strings.ToLower(strings.TrimSuffix(host, ".")))
		if err != nil {
			p.respond(cn, m, req, route, 503, "DNS resolution failure", "DF", "")
			return false
		}
		dfp = netip.AddrPortFrom(addrs[0], uint16(port))
	}
	up, cl, flag := cn.upstream(route.Cluster, dfp)
	if flag != "" {
		p.respond(cn, m, req, route, 503, "no healthy upstream", flag, "")
		return false
	}
	uc, err := cn.dial(up, cl)
	if err != nil {
		p.respond(cn, m, req, route, 503, "upstream connect error or disconnect/reset before headers", "UF", up.String())
		return false
	}
	defer uc.Close()
	upgrade := strings.EqualFold(req.Header.Get("Upgrade"), "websocket") && containsToken(req.Header.Get("Connection"), "upgrade")
	if upgrade && !contains(m.Upgrades, "websocket") {
		p.respond(cn, m, req, route, 403, "Upgrade not allowed", "", "")
		return false
	}
	// As Envoy's router: x-forwarded-proto added, hop-by-hop headers
	// dropped (but the upgrade).
	req.Header.Set("X-Forwarded-Proto", "http")
	if !upgrade {
		req.Header.Del("Connection")
		req.Header.Del("Upgrade")
	}
	if err := req.Write(uc); err != nil {
		p.respond(cn, m, req, route, 503, "upstream reset", "UC", up.String())
		return false
	}
	ubr := bufio.NewReader(uc)
	if m.StreamIdle > 0 {
		uc.SetReadDeadline(time.Now().Add(m.StreamIdle))
	}
	resp, err := http.ReadResponse(ubr, req)
	uc.SetReadDeadline(time.Time{})
	if ne, ok := err.(net.Error); ok && ne.Timeout() {
		// stream_idle_timeout before the response headers: 408, flag SI.
		p.respond(cn, m, req, route, 408, "stream timeout", "SI", up.String())
		return false
	}
	if err != nil {
		// Not HTTP from upstream: 503, upstream protocol error.
		p.respond(cn, m, req, route, 503, "upstream connect error or disconnect/reset before headers. reset reason: protocol error", "UPE", up.String())
		return false
	}
	if !m.PassServer {
		// server_header_transformation OVERWRITE (the default).
		resp.Header.Set("Server", "envoy")
	}
	cw := &countWriter{w: cn.c.TCPConn}
	if upgrade && resp.StatusCode == http.StatusSwitchingProtocols {
		resp.Write(cw)
		p.logRequest(cn, m, req, route, resp.StatusCode, "", up.String(), 0, cw.n)
		// The upgraded stream is a tunnel; what the upstream sent past the
		// 101 goes first.
		if n := ubr.Buffered(); n > 0 {
			b, _ := ubr.Peek(n)
			cn.c.TCPConn.Write(b)
		}
		var in, out atomic.Int64
		splice(&replayConn{TCPConn: cn.c.TCPConn, r: br}, uc, 0, &in, &out)
		return false
	}
	resp.Write(cw)
	resp.Body.Close()
	p.logRequest(cn, m, req, route, resp.StatusCode, "", up.String(), 0, cw.n)
	return !req.Close && !resp.Close
}

// codeDetails is %RESPONSE_CODE_DETAILS% by response flag, for the cases
// the proxy produces (envoy/stream_info/stream_info.h
// ResponseCodeDetailValues).
var codeDetails = map[string]string{
	"NR":  "route_not_found",
	"DF":  "dns_resolution_failure",
	"UF":  "upstream_reset_before_response_started{connection_failure}",
	"UPE": "upstream_reset_before_response_started{protocol_error}",
	"UH":  "no_healthy_upstream",
	"NC":  "cluster_not_found",
	"SI":  "stream_idle_timeout",
	"DPE": "http1.codec_error",
}

func responseCodeDetails(status int, flag string, route *Route) string {
	switch d, ok := codeDetails[flag]; {
	case ok:
		return d
	case status == 426:
		return "low_version"
	case route != nil && route.Cluster == "":
		return "direct_response"
	}
	return "via_upstream"
}

type countWriter struct {
	w io.Writer
	n int64
}

func (c *countWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}

func containsToken(header, token string) bool {
	for _, t := range strings.Split(header, ",") {
		if strings.EqualFold(strings.TrimSpace(t), token) {
			return true
		}
	}
	return false
}

func contains(xs []string, x string) bool {
	for _, y := range xs {
		if y == x {
			return true
		}
	}
	return false
}
