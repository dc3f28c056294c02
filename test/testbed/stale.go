package testbed

import (
	"bufio"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"net/netip"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// StaleResult is what the stale role reports.
type StaleResult struct {
	// Redirected is the error of the connect that the datapath redirected
	// and that failed: EADDRNOTAVAIL, its 4-tuple taken.
	Redirected string `json:"redirected"`
	// Holder and Reconnected are the proxy's verdicts ("match": it found
	// no original destination, as "WANT none" says) for the connection
	// that held the 4-tuple and for the failed socket's second connect,
	// straight to the proxy.
	Holder      string `json:"holder"`
	Reconnected string `json:"reconnected"`
	Err         string `json:"err,omitempty"`
}

// staleMain leaves a socket holding an original destination from a failed
// redirected connect, then connects it straight to the proxy. A first
// socket, bound to -sport, connects to the proxy (-proxy) directly and
// holds the connection; a second, bound to the same port (SO_REUSEADDR),
// connects to -dst: the datapath redirects it to the proxy, and the
// kernel refuses it, the 4-tuple being taken. The first closes (reset);
// the second connects to the proxy again, directly, and says "WANT none".
// A proxy in -verify mode answers each connection; the role prints a
// StaleResult.
func staleMain(args []string) int {
	fs := flag.NewFlagSet("stale", flag.ContinueOnError)
	dst := fs.String("dst", "", "a destination the datapath redirects (IPv4 address:port)")
	proxy := fs.String("proxy", "", "the proxy's listener (IPv4 address:port)")
	sport := fs.Int("sport", 41999, "the source port both sockets bind")
	planted := fs.Bool("planted", false, "instead: open one socket, print \"COOKIE <SO_COOKIE>\", wait for a line on stdin (the test plants an orig_dsts entry for that cookie meanwhile), then connect it straight to -proxy and ask")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if *planted {
		p, err := netip.ParseAddrPort(*proxy)
		if err != nil || !p.Addr().Is4() {
			fmt.Fprintln(os.Stderr, "stale: -proxy must be an IPv4 address:port")
			return 2
		}
		var r StaleResult
		r.Err = plantedConnect(&r, p)
		json.NewEncoder(os.Stdout).Encode(r)
		return 0
	}
	d, err1 := netip.ParseAddrPort(*dst)
	p, err2 := netip.ParseAddrPort(*proxy)
	if err1 != nil || err2 != nil || !d.Addr().Is4() || !p.Addr().Is4() {
		fmt.Fprintln(os.Stderr, "stale: -dst and -proxy must be IPv4 address:port")
		return 2
	}
	var r StaleResult
	r.Err = stale(&r, d, p, *sport)
	json.NewEncoder(os.Stdout).Encode(r)
	return 0
}

func stale(r *StaleResult, dst, proxy netip.AddrPort, sport int) string {
	bound := func() (int, error) {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return -1, err
		}
		unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1)
		unix.SetsockoptLinger(fd, unix.SOL_SOCKET, unix.SO_LINGER, &unix.Linger{Onoff: 1, Linger: 0})
		if err := unix.Bind(fd, &unix.SockaddrInet4{Port: sport}); err != nil {
			unix.Close(fd)
			return -1, err
		}
		return fd, nil
	}
	holder, err := bound()
	if err != nil {
		return "holder: " + err.Error()
	}
	hf := os.NewFile(uintptr(holder), "holder")
	if err := unix.Connect(holder, sockaddr(proxy, unix.AF_INET)); err != nil {
		hf.Close()
		return "holder connect: " + err.Error()
	}
	failed, err := bound()
	if err != nil {
		hf.Close()
		return "second socket: " + err.Error()
	}
	ff := os.NewFile(uintptr(failed), "failed")
	defer ff.Close()
	if err := unix.Connect(failed, sockaddr(dst, unix.AF_INET)); err != nil {
		r.Redirected = err.Error()
	}
	r.Holder = askNone(hf) // closes the holder with a reset
	if err := unix.Connect(failed, sockaddr(proxy, unix.AF_INET)); err != nil {
		return "reconnect: " + err.Error()
	}
	r.Reconnected = askNone(ff)
	return ""
}

// plantedConnect is -planted: the socket's connect straight to the proxy
// must not publish what a layout 1-4 connect4 would have left for its
// cookie.
func plantedConnect(r *StaleResult, proxy netip.AddrPort) string {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return "socket: " + err.Error()
	}
	f := os.NewFile(uintptr(fd), "planted")
	cookie, err := unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_COOKIE)
	if err != nil {
		f.Close()
		return "SO_COOKIE: " + err.Error()
	}
	fmt.Printf("COOKIE %d\n", cookie)
	bufio.NewReader(os.Stdin).ReadString('\n')
	if err := unix.Connect(fd, sockaddr(proxy, unix.AF_INET)); err != nil {
		f.Close()
		return "connect: " + err.Error()
	}
	r.Reconnected = askNone(f)
	return ""
}

// askNone tells a -verify proxy that the connection was dialed to the proxy
// itself and returns its verdict; it closes f.
func askNone(f *os.File) string {
	defer f.Close()
	c, err := net.FileConn(f)
	if err != nil {
		return "error: " + err.Error()
	}
	defer c.Close()
	return verdict(c, "none", 5*time.Second)
}
