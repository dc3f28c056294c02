// Package standin is a stand-in for Envoy's original_dst listener, for tests
// and benchmarks of the datapath: transparent, it decides nothing (the
// conformance proxy, test/conformance, executes the served configuration;
// -xds runs it from this binary). Per connection it
// does what Envoy does: getsockopt(SO_ORIGINAL_DST) at SOL_IP on IPv4 sockets
// and SOL_IPV6 (IP6T_SO_ORIGINAL_DST) on IPv6 sockets into a sockaddr_storage
// buffer, closes the connection when no original destination is known (Envoy
// would route it to itself, which sluice's config closes), else dials the
// original destination and splices bytes both ways. It records what it
// recovered, one JSON line per connection.
package standin

import (
	"bufio"
	"context"
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
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/sluice-io/sluice/test/conformance"
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
	Result string `json:"result"` // forwarded, unknown-closed, loop-closed, dial-failed, match, mismatch, unknown, skipped
	Err    string `json:"err,omitempty"`
	// Upstream is the address dialled (the original destination).
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
	// Quiet records nothing (forwarding benchmarks).
	Quiet bool
	// UpstreamMark is set as SO_MARK on every upstream socket when not
	// zero: how a sidecar's own connections are told from its pod's by an
	// iptables REDIRECT rule in the same namespace.
	UpstreamMark int
	Log          io.Writer

	mu    sync.Mutex
	n     int
	enc   *json.Encoder
	addrs map[netip.AddrPort]bool
}

func (p *Proxy) record(r Record) {
	if p.Quiet {
		return
	}
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
	upstream := netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port())
	r.Upstream = upstream.String()
	d := net.Dialer{Timeout: 3 * time.Second}
	d.SetMultipathTCP(false)
	if p.UpstreamMark != 0 {
		d.Control = func(_, _ string, rc syscall.RawConn) error {
			var serr error
			err := rc.Control(func(fd uintptr) {
				serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_MARK, p.UpstreamMark)
			})
			return errors.Join(err, serr)
		}
	}
	up, err := d.Dial("tcp", r.Upstream)
	if err != nil {
		r.Result, r.Err = "dial-failed", err.Error()
		p.record(r)
		return
	}
	defer up.Close()
	r.Result = "forwarded"
	p.record(r)
	splice(c, up.(*net.TCPConn))
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
	quiet := fs.Bool("quiet", false, "forwarding mode: record nothing (benchmarks)")
	mark := fs.Int("upstream-mark", 0, "forwarding mode: set this SO_MARK on upstream sockets (a sidecar's REDIRECT rule skips them)")
	admin := fs.String("admin", "", "serve GET /ready (LIVE) here, as Envoy's admin does, for the agent's health probe")
	deferAccept := fs.Int("defer-accept", 0, "set TCP_DEFER_ACCEPT (seconds) on the listeners: a handshake's final ACK without data is dropped and the connection accepted only when data or the retransmitted SYN-ACK's ACK comes, so a client stays established, its entry published and unclaimed, that long (tests)")
	xdsSocket := fs.String("xds", "", "conformance mode: take the listener and clusters from this ADS socket and execute them as Envoy would (test/conformance); the access log goes to -records. The other modes' flags do not apply")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if *xdsSocket != "" {
		return conformanceMain(*xdsSocket, *admin, *records)
	}
	p := &Proxy{Verify: *verify, Sink: *sink, Drain: *drain, SkipEvery: *skip, Quiet: *quiet, UpstreamMark: *mark, Log: os.Stderr, addrs: map[netip.AddrPort]bool{}}
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
	if *deferAccept > 0 {
		lc.Control = func(_, _ string, c syscall.RawConn) error {
			var serr error
			if err := c.Control(func(fd uintptr) {
				serr = syscall.SetsockoptInt(int(fd), syscall.IPPROTO_TCP, syscall.TCP_DEFER_ACCEPT, *deferAccept)
			}); err != nil {
				return err
			}
			return serr
		}
	}
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
	return FindRecordFrom(path, client, 0, wait)
}

// FindRecordFrom is FindRecord among the records after the first from
// (the count before a dial): a client port is reused across a long stream
// of connections, and an earlier connection's record would match it.
func FindRecordFrom(path, client string, from int, wait time.Duration) (Record, bool) {
	want, err := netip.ParseAddrPort(client)
	if err != nil {
		return Record{}, false
	}
	deadline := time.Now().Add(wait)
	for {
		recs := ReadRecords(path)
		for _, r := range recs[min(from, len(recs)):] {
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
