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

// ReuseStats is what the reuse client role reports.
type ReuseStats struct {
	Attempts  int `json:"attempts"`
	Connected int `json:"connected"`
	Aborted   int `json:"aborted"`
	Match     int `json:"match"`
	Mismatch  int `json:"mismatch"`
	Unknown   int `json:"unknown"`   // the proxy found no original destination
	NoAnswer  int `json:"no_answer"` // the proxy closed without a verdict (skipped asking)
	BindBusy  int `json:"bind_busy"` // the 4-tuple was in use by the other client
	Errors    int `json:"errors"`
}

// reuseMain makes many short connections from a small pool of source ports,
// so 4-tuples to the proxy repeat constantly. Each connection tells a proxy in
// -verify mode what it dialed ("WANT <addr>", or "WANT none" with -direct,
// dialing the proxy itself), and counts the proxy's verdicts. Every
// -abort-every'th connection is reset right after connect, before it says
// anything. Sockets close with RST (SO_LINGER 0) so ports are reusable at once.
func reuseMain(args []string) int {
	fs := flag.NewFlagSet("reuse", flag.ContinueOnError)
	n := fs.Int("n", 1000, "connections to make")
	portBase := fs.Int("port-base", 40000, "first source port of the pool")
	ports := fs.Int("ports", 16, "source ports in the pool")
	dst := fs.String("dst", "", "destination address (IPv4); its port varies per connection")
	dstPortBase := fs.Int("dst-port-base", 20000, "first destination port")
	dstPorts := fs.Int("dst-ports", 500, "destination ports to cycle through")
	direct := fs.String("direct", "", "dial this proxy address:port directly instead, saying WANT none")
	abortEvery := fs.Int("abort-every", 0, "reset every Nth connection right after connect")
	budget := fs.Duration("budget", 60*time.Second, "stop after this long whatever remains")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	var st ReuseStats
	deadline := time.Now().Add(*budget)
	for i := 0; i < *n && time.Now().Before(deadline); i++ {
		st.Attempts++
		var target netip.AddrPort
		var err error
		want := "none"
		if *direct != "" {
			target, err = netip.ParseAddrPort(*direct)
		} else {
			target, err = netip.ParseAddrPort(fmt.Sprintf("%s:%d", *dst, *dstPortBase+i%*dstPorts))
			want = target.String()
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "reuse:", err)
			return 2
		}
		abort := *abortEvery > 0 && i%*abortEvery == *abortEvery-1
		reuseOne(&st, *portBase+i%*ports, target, want, abort)
	}
	json.NewEncoder(os.Stdout).Encode(st)
	return 0
}

func reuseOne(st *ReuseStats, sport int, target netip.AddrPort, want string, abort bool) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		st.Errors++
		return
	}
	f := os.NewFile(uintptr(fd), "reuse")
	defer f.Close()
	unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1)
	unix.SetsockoptLinger(fd, unix.SOL_SOCKET, unix.SO_LINGER, &unix.Linger{Onoff: 1, Linger: 0})
	if err := unix.Bind(fd, &unix.SockaddrInet4{Port: sport}); err != nil {
		st.BindBusy++
		return
	}
	if err := unix.Connect(fd, &unix.SockaddrInet4{Addr: target.Addr().As4(), Port: int(target.Port())}); err != nil {
		if err == unix.EADDRNOTAVAIL || err == unix.EADDRINUSE {
			st.BindBusy++
		} else {
			st.Errors++
		}
		return
	}
	st.Connected++
	if abort {
		st.Aborted++
		return // the deferred close resets the connection
	}
	c, err := net.FileConn(f)
	if err != nil {
		st.Errors++
		return
	}
	defer c.Close()
	c.(*net.TCPConn).SetLinger(0)
	st.ask(c, want, 5*time.Second)
}

// ask tells a -verify proxy what c dialed and counts its verdict.
func (st *ReuseStats) ask(c net.Conn, want string, timeout time.Duration) {
	switch verdict(c, want, timeout) {
	case "match":
		st.Match++
	case "mismatch":
		st.Mismatch++
	case "unknown":
		st.Unknown++
	default:
		st.NoAnswer++
	}
}

// verdict tells a -verify proxy what c dialed ("WANT <want>", "none" for
// the proxy itself) and returns the proxy's answer line, "" if none came.
func verdict(c net.Conn, want string, timeout time.Duration) string {
	c.SetDeadline(time.Now().Add(timeout))
	fmt.Fprintf(c, "WANT %s\n", want)
	line, _ := bufio.NewReader(c).ReadString('\n')
	return strings.TrimSpace(line)
}
