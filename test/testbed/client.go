package testbed

import (
	"bufio"
	"crypto/tls"
	"encoding/binary"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strings"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// DialResult is what the client role saw for one connection.
type DialResult struct {
	Spec  string `json:"spec"`
	Local string `json:"local,omitempty"`
	// Peer is what getpeername(2) returned to the application.
	Peer string `json:"peer,omitempty"`
	// Reply is the first line the far end sent: the echo server writes
	// "peer=<address it saw>".
	Reply string `json:"reply,omitempty"`
	Err   string `json:"err,omitempty"`
	// Cookie is the socket's SO_COOKIE, read before connecting: what the
	// datapath's flow events name the socket by.
	Cookie uint64 `json:"cookie,omitempty"`
	// Header is an HTTP reply's header (Reply is then "<status line> |
	// <first body line>").
	Header http.Header `json:"header,omitempty"`
	// MD5Keys is how many TCP MD5 keys -fill-optmem added before the
	// socket's option memory ran out (ENOMEM).
	MD5Keys int `json:"md5_keys,omitempty"`
	// OptMem is the socket's option memory in use once connected
	// (SO_MEMINFO): where the kernel charges socket storage.
	OptMem uint32 `json:"optmem,omitempty"`
}

// Dial runs the client role in a pod and returns one result per spec. A spec
// is "<kind>:<address>" with kind tcp4, tcp6, mapped (an AF_INET6 socket
// connecting to ::ffff:<IPv4>), or udp4/udp6 (connect and send one datagram).
func Dial(t interface {
	Helper()
	Fatalf(string, ...any)
}, out []byte) []DialResult {
	t.Helper()
	var res []DialResult
	if err := json.Unmarshal(out, &res); err != nil {
		t.Fatalf("decode client output %q: %v", out, err)
	}
	return res
}

func clientMain(args []string) int {
	fs := flag.NewFlagSet("client", flag.ContinueOnError)
	send := fs.String("send", "", `line to send after connecting; "tls-client-hello:NAME" sends a TLS ClientHello for server name NAME instead`)
	timeout := fs.Duration("timeout", 3*time.Second, "per-connection timeout")
	fill := fs.Bool("fill-optmem", false, "before connecting a TCP socket, add TCP MD5 keys until its option memory (net.core.optmem_max) is full")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	var out []DialResult
	for _, spec := range fs.Args() {
		out = append(out, dialOne(spec, *send, *timeout, *fill))
	}
	json.NewEncoder(os.Stdout).Encode(out)
	return 0
}

func sockaddr(ap netip.AddrPort, family int) unix.Sockaddr {
	if family == unix.AF_INET {
		return &unix.SockaddrInet4{Addr: ap.Addr().As4(), Port: int(ap.Port())}
	}
	return &unix.SockaddrInet6{Addr: ap.Addr().As16(), Port: int(ap.Port())}
}

func fromSockaddr(sa unix.Sockaddr) string {
	switch sa := sa.(type) {
	case *unix.SockaddrInet4:
		return netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), uint16(sa.Port)).String()
	case *unix.SockaddrInet6:
		return netip.AddrPortFrom(netip.AddrFrom16(sa.Addr), uint16(sa.Port)).String()
	}
	return fmt.Sprint(sa)
}

// clientKinds: family, socket type, protocol and how the client opens the
// connection, per spec kind.
var clientKinds = map[string]struct {
	family, typ, proto int
	mapped             bool
	how                string // connect, nonblock, tfo, sendto
}{
	"tcp4":         {unix.AF_INET, unix.SOCK_STREAM, 0, false, "connect"},
	"tcp6":         {unix.AF_INET6, unix.SOCK_STREAM, 0, false, "connect"},
	"mapped":       {unix.AF_INET6, unix.SOCK_STREAM, 0, true, "connect"},
	"nb4":          {unix.AF_INET, unix.SOCK_STREAM, 0, false, "nonblock"},
	"nb6":          {unix.AF_INET6, unix.SOCK_STREAM, 0, false, "nonblock"},
	"tfo4":         {unix.AF_INET, unix.SOCK_STREAM, 0, false, "tfo"},
	"tfo6":         {unix.AF_INET6, unix.SOCK_STREAM, 0, false, "tfo"},
	"tcpsendto4":   {unix.AF_INET, unix.SOCK_STREAM, 0, false, "sendto"},
	"mptcp4":       {unix.AF_INET, unix.SOCK_STREAM, unix.IPPROTO_MPTCP, false, "connect"},
	"mptcp6":       {unix.AF_INET6, unix.SOCK_STREAM, unix.IPPROTO_MPTCP, false, "connect"},
	"udp4":         {unix.AF_INET, unix.SOCK_DGRAM, 0, false, "connect"},
	"udp6":         {unix.AF_INET6, unix.SOCK_DGRAM, 0, false, "connect"},
	"udpmapped":    {unix.AF_INET6, unix.SOCK_DGRAM, 0, true, "connect"},
	"sendto4":      {unix.AF_INET, unix.SOCK_DGRAM, 0, false, "sendto"},
	"sendto6":      {unix.AF_INET6, unix.SOCK_DGRAM, 0, false, "sendto"},
	"sendtomapped": {unix.AF_INET6, unix.SOCK_DGRAM, 0, true, "sendto"},
	"ping4":        {unix.AF_INET, unix.SOCK_DGRAM, unix.IPPROTO_ICMP, false, "sendto"},
	"ping6":        {unix.AF_INET6, unix.SOCK_DGRAM, unix.IPPROTO_ICMPV6, false, "sendto"},
	"pingconnect4": {unix.AF_INET, unix.SOCK_DGRAM, unix.IPPROTO_ICMP, false, "connect"},
	"raw4":         {unix.AF_INET, unix.SOCK_RAW, unix.IPPROTO_ICMP, false, "sendto"},
}

// dialOne opens one connection. Kinds (see clientKinds): tcp4/tcp6 connect;
// mapped is an AF_INET6 socket connecting to ::ffff:<IPv4>; nb4/nb6 connect
// non-blocking and wait for the handshake; tfo4/tfo6 open the connection
// with sendto(MSG_FASTOPEN) carrying "tfo"; tcpsendto4 is sendto on a TCP
// socket that never connected; mptcp4/mptcp6 use IPPROTO_MPTCP; udp4,
// udp6, udpmapped connect a UDP socket and send "ping"; sendto4, sendto6,
// sendtomapped send "ping" with sendto() on an unconnected UDP socket. UDP
// kinds wait briefly for a reply datagram.
func dialOne(spec, send string, timeout time.Duration, fill bool) (r DialResult) {
	r.Spec = spec
	kind, addr, ok := strings.Cut(spec, ":")
	if !ok {
		r.Err = "bad spec"
		return r
	}
	ap, err := netip.ParseAddrPort(addr)
	if err != nil {
		r.Err = err.Error()
		return r
	}
	k, ok := clientKinds[kind]
	if !ok {
		r.Err = "unknown kind " + kind
		return r
	}
	if k.mapped {
		ap = netip.AddrPortFrom(netip.AddrFrom16(ap.Addr().As16()), ap.Port())
	}
	typ := k.typ | unix.SOCK_CLOEXEC
	if k.how == "nonblock" {
		typ |= unix.SOCK_NONBLOCK
	}
	fd, err := unix.Socket(k.family, typ, k.proto)
	if err != nil {
		r.Err = "socket: " + err.Error()
		return r
	}
	f := os.NewFile(uintptr(fd), "client")
	defer f.Close()
	if c, err := unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_COOKIE); err == nil {
		r.Cookie = c
	}
	tv := unix.NsecToTimeval(timeout.Nanoseconds())
	unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_SNDTIMEO, &tv)
	if fill && k.typ == unix.SOCK_STREAM {
		if r.MD5Keys, err = fillOptmem(fd); err != nil {
			r.Err = "fill option memory: " + err.Error()
			return r
		}
	}
	sa := sockaddr(ap, k.family)
	switch k.how {
	case "connect":
		// A signal (the Go runtime's preemption) can interrupt a
		// blocking connect; the handshake goes on, as after EINPROGRESS.
		if err = unix.Connect(fd, sa); err == unix.EINTR {
			err = awaitConnect(fd, timeout)
		}
	case "nonblock":
		err = connectNonblocking(fd, sa, timeout)
	case "tfo":
		err = unix.Sendto(fd, []byte("tfo\n"), unix.MSG_FASTOPEN, sa)
	case "sendto":
		if k.proto == unix.IPPROTO_ICMP || k.proto == unix.IPPROTO_ICMPV6 || k.typ == unix.SOCK_RAW {
			err = unix.Sendto(fd, echoRequest(k.proto), 0, sa)
		} else if k.typ == unix.SOCK_DGRAM {
			err = unix.Sendto(fd, []byte("ping\n"), 0, sa)
		} else {
			err = unix.Sendto(fd, []byte("data\n"), unix.MSG_NOSIGNAL, sa)
		}
	}
	if err != nil {
		r.Err = err.Error()
		return r
	}
	if sa, err := unix.Getsockname(fd); err == nil {
		r.Local = fromSockaddr(sa)
	}
	if sa, err := unix.Getpeername(fd); err == nil {
		r.Peer = fromSockaddr(sa)
	}
	if k.typ == unix.SOCK_STREAM {
		r.OptMem = optmem(fd)
	}
	if k.typ == unix.SOCK_DGRAM || k.typ == unix.SOCK_RAW {
		if k.how == "connect" {
			payload := []byte("ping\n")
			if k.proto != 0 {
				payload = echoRequest(k.proto)
			}
			if _, err := unix.Write(fd, payload); err != nil {
				r.Err = err.Error()
				return r
			}
		}
		rtv := unix.NsecToTimeval(time.Second.Nanoseconds())
		unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &rtv)
		buf := make([]byte, 512)
		n, _, err := unix.Recvfrom(fd, buf, 0)
		for err == unix.EINTR {
			n, _, err = unix.Recvfrom(fd, buf, 0)
		}
		if err == nil {
			r.Reply = strings.TrimSpace(string(buf[:n]))
			if k.proto != 0 && n > 0 {
				r.Reply = fmt.Sprintf("icmp type %d", buf[0])
			}
		}
		return r
	}
	c, err := net.FileConn(f)
	if err != nil {
		r.Err = err.Error()
		return r
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(timeout))
	if name, ok := strings.CutPrefix(send, "tls-client-hello:"); ok {
		hello, err := ClientHello(name)
		if err != nil {
			r.Err = err.Error()
			return r
		}
		c.Write(hello)
	} else if send != "" {
		fmt.Fprintln(c, send)
	}
	br := bufio.NewReader(c)
	line, err := br.ReadString('\n')
	r.Reply = strings.TrimSpace(line)
	if err != nil && r.Reply == "" {
		r.Err = "read: " + err.Error()
	}
	if strings.HasPrefix(r.Reply, "HTTP/1.") {
		// An HTTP response: the status line, then " | " and the first
		// line of the body (after a 101, of the upgraded stream).
		hr := bufio.NewReader(io.MultiReader(strings.NewReader(line), br))
		resp, err := http.ReadResponse(hr, nil)
		if err == nil {
			var first string
			if resp.StatusCode == http.StatusSwitchingProtocols {
				first, _ = hr.ReadString('\n')
			} else {
				b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
				first, _, _ = strings.Cut(string(b), "\n")
			}
			r.Reply += " | " + strings.TrimSpace(first)
			r.Header = resp.Header
		}
	}
	return r
}

// fillOptmem adds TCP MD5 keys (one per peer address, 10.255.0.0/16) to
// the socket until the kernel refuses one for want of option memory, as
// an application may; it returns how many it added.
func fillOptmem(fd int) (int, error) {
	for i := 0; i < 1<<16; i++ {
		sig := unix.TCPMD5Sig{Keylen: 16}
		sin := (*unix.RawSockaddrInet4)(unsafe.Pointer(&sig.Addr))
		sin.Family = unix.AF_INET
		sin.Addr = [4]byte{10, 255, byte(i >> 8), byte(i)}
		copy(sig.Key[:], "sixteen byte key")
		err := unix.SetsockoptTCPMD5Sig(fd, unix.IPPROTO_TCP, unix.TCP_MD5SIG, &sig)
		if err == unix.ENOMEM {
			return i, nil
		}
		if err != nil {
			return i, err
		}
	}
	return 0, fmt.Errorf("65536 keys added and the option memory is not full")
}

// optmem reads the socket's option memory in use (SO_MEMINFO's
// SK_MEMINFO_OPTMEM); 0 when it cannot.
func optmem(fd int) uint32 {
	var mi [unix.SK_MEMINFO_VARS]uint32
	l := uint32(unsafe.Sizeof(mi))
	_, _, e := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(fd), unix.SOL_SOCKET, unix.SO_MEMINFO,
		uintptr(unsafe.Pointer(&mi[0])), uintptr(unsafe.Pointer(&l)), 0)
	if e != 0 {
		return 0
	}
	return mi[unix.SK_MEMINFO_OPTMEM]
}

// ClientHello returns the first flight of a Go TLS client for server name
// sni: one record holding the ClientHello, as a browser's would open a
// connection. (Its handshake is abandoned once the record is captured.)
func ClientHello(sni string) ([]byte, error) {
	a, b := net.Pipe()
	defer b.Close()
	go func() {
		defer a.Close()
		tls.Client(a, &tls.Config{ServerName: sni, InsecureSkipVerify: true}).Handshake()
	}()
	b.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 1<<16)
	n, err := io.ReadAtLeast(b, buf, 5)
	if err != nil {
		return nil, fmt.Errorf("capture ClientHello: %w", err)
	}
	if want := 5 + int(binary.BigEndian.Uint16(buf[3:5])); buf[0] == 0x16 && n < want {
		m, err := io.ReadFull(b, buf[n:want])
		if err != nil {
			return nil, fmt.Errorf("capture ClientHello: %w", err)
		}
		n += m
	}
	return buf[:n], nil
}

// echoRequest is an ICMP (or ICMPv6) echo request carrying "sluice"; a
// ping socket fills in the id and the checksum.
func echoRequest(proto int) []byte {
	typ := byte(8)
	if proto == unix.IPPROTO_ICMPV6 {
		typ = 128
	}
	return append([]byte{typ, 0, 0, 0, 0, 0, 0, 1}, "sluice"...)
}

// connectNonblocking is connect(2) on a non-blocking socket: EINPROGRESS,
// then poll for writability and read SO_ERROR, as event loops do.
func connectNonblocking(fd int, sa unix.Sockaddr, timeout time.Duration) error {
	err := unix.Connect(fd, sa)
	if err == nil {
		return nil
	}
	if err != unix.EINPROGRESS {
		return err
	}
	if err := awaitConnect(fd, timeout); err != nil {
		return err
	}
	return unix.SetNonblock(fd, false)
}

// awaitConnect waits for a connect in progress to finish and returns its
// outcome (SO_ERROR).
func awaitConnect(fd int, timeout time.Duration) error {
	pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLOUT}}
	var n int
	var err error
	for n, err = unix.Poll(pfd, int(timeout.Milliseconds())); err == unix.EINTR; {
		n, err = unix.Poll(pfd, int(timeout.Milliseconds()))
	}
	if err != nil {
		return err
	}
	if n == 0 {
		return unix.ETIMEDOUT
	}
	soerr, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ERROR)
	if err != nil {
		return err
	}
	if soerr != 0 {
		return unix.Errno(soerr)
	}
	return nil
}

// holdMain dials one spec, prints "READY <reply>" and then, for each line on
// stdin, sends it and prints what came back: a long-lived connection that a
// test can exercise across an agent restart.
func holdMain(args []string) int {
	if len(args) != 1 {
		fmt.Fprintln(os.Stderr, "hold: want one spec")
		return 2
	}
	kind, addr, _ := strings.Cut(args[0], ":")
	network := map[string]string{"tcp4": "tcp4", "tcp6": "tcp6"}[kind]
	c, err := net.DialTimeout(network, addr, 3*time.Second)
	if err != nil {
		fmt.Fprintln(os.Stderr, "hold:", err)
		return 1
	}
	defer c.Close()
	r := bufio.NewReader(c)
	greeting, err := r.ReadString('\n')
	if err != nil {
		fmt.Fprintln(os.Stderr, "hold: read greeting:", err)
		return 1
	}
	fmt.Println("READY", strings.TrimSpace(greeting))
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		c.SetDeadline(time.Now().Add(3 * time.Second))
		if _, err := fmt.Fprintln(c, in.Text()); err != nil {
			fmt.Println("error:", err)
			continue
		}
		line, err := r.ReadString('\n')
		if err != nil {
			fmt.Println("error:", err)
			continue
		}
		fmt.Println("echo:", strings.TrimSpace(line))
	}
	return 0
}
