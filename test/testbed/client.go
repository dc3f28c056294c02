package testbed

import (
	"bufio"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
	"time"

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
	send := fs.String("send", "", "line to send after connecting")
	timeout := fs.Duration("timeout", 3*time.Second, "per-connection timeout")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	var out []DialResult
	for _, spec := range fs.Args() {
		out = append(out, dialOne(spec, *send, *timeout))
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

func dialOne(spec, send string, timeout time.Duration) (r DialResult) {
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
	family, typ := unix.AF_INET, unix.SOCK_STREAM
	switch kind {
	case "tcp4":
	case "tcp6":
		family = unix.AF_INET6
	case "mapped":
		family = unix.AF_INET6
		ap = netip.AddrPortFrom(netip.AddrFrom16(ap.Addr().As16()), ap.Port())
	case "udp4":
		typ = unix.SOCK_DGRAM
	case "udp6":
		family, typ = unix.AF_INET6, unix.SOCK_DGRAM
	default:
		r.Err = "unknown kind " + kind
		return r
	}
	fd, err := unix.Socket(family, typ|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		r.Err = err.Error()
		return r
	}
	f := os.NewFile(uintptr(fd), "client")
	defer f.Close()
	tv := unix.NsecToTimeval(timeout.Nanoseconds())
	unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_SNDTIMEO, &tv)
	if err := unix.Connect(fd, sockaddr(ap, family)); err != nil {
		r.Err = err.Error()
		return r
	}
	if sa, err := unix.Getsockname(fd); err == nil {
		r.Local = fromSockaddr(sa)
	}
	if sa, err := unix.Getpeername(fd); err == nil {
		r.Peer = fromSockaddr(sa)
	}
	if typ == unix.SOCK_DGRAM {
		if _, err := unix.Write(fd, []byte("ping\n")); err != nil {
			r.Err = err.Error()
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
	if send != "" {
		fmt.Fprintln(c, send)
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	r.Reply = strings.TrimSpace(line)
	if err != nil && r.Reply == "" {
		r.Err = "read: " + err.Error()
	}
	return r
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
