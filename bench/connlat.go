// Package bench measures what sluice's redirect costs, side by side in one
// run, and reports ratios. It runs under `make bench` (root), never as part of
// `make test`.
package bench

import (
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

// Latencies are durations in nanoseconds per variant: "<name>" the
// connect(2) call alone, "<name>/cycle" socket to close (for connections
// per second, one client, one at a time).
type Latencies map[string][]int64

// connlatMain alternates connects between variants, "name=addr:port" each,
// timing the connect(2) call alone, and prints the durations as JSON. Every
// connection is reset on close so nothing piles up in TIME_WAIT.
func connlatMain(args []string) int {
	fs := flag.NewFlagSet("connlat", flag.ContinueOnError)
	n := fs.Int("n", 5000, "connections per variant")
	budget := fs.Duration("budget", 60*time.Second, "stop after this long")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	type variant struct {
		name string
		ap   netip.AddrPort
	}
	var vs []variant
	for _, a := range fs.Args() {
		name, addr, ok := strings.Cut(a, "=")
		if !ok {
			fmt.Fprintf(os.Stderr, "connlat: variant %q is not name=addr:port\n", a)
			return 2
		}
		ap, err := netip.ParseAddrPort(addr)
		if err != nil {
			fmt.Fprintln(os.Stderr, "connlat:", err)
			return 2
		}
		vs = append(vs, variant{name, ap})
	}
	out := Latencies{}
	deadline := time.Now().Add(*budget)
	for i := 0; i < *n && time.Now().Before(deadline); i++ {
		for j := range vs {
			v := vs[(i+j)%len(vs)] // rotate the order so no variant always goes first
			d, cycle, err := connectOnce(v.ap)
			if err != nil {
				fmt.Fprintf(os.Stderr, "connlat %s: %v\n", v.name, err)
				return 1
			}
			out[v.name] = append(out[v.name], d.Nanoseconds())
			out[v.name+"/cycle"] = append(out[v.name+"/cycle"], cycle.Nanoseconds())
		}
	}
	json.NewEncoder(os.Stdout).Encode(out)
	return 0
}

func connectOnce(ap netip.AddrPort) (conn, cycle time.Duration, err error) {
	begin := time.Now()
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return 0, 0, err
	}
	unix.SetsockoptLinger(fd, unix.SOL_SOCKET, unix.SO_LINGER, &unix.Linger{Onoff: 1, Linger: 0})
	sa := &unix.SockaddrInet4{Addr: ap.Addr().As4(), Port: int(ap.Port())}
	start := time.Now()
	err = unix.Connect(fd, sa)
	conn = time.Since(start)
	unix.Close(fd)
	return conn, time.Since(begin), err
}

// bulkMain sends -mib MiB to each variant ("name=addr:port"), -rounds
// times, alternating, and prints the throughputs in MiB/s as JSON.
func bulkMain(args []string) int {
	fs := flag.NewFlagSet("bulk", flag.ContinueOnError)
	mib := fs.Int("mib", 256, "MiB per transfer")
	rounds := fs.Int("rounds", 5, "transfers per variant")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	buf := make([]byte, 1<<20)
	out := map[string][]float64{}
	for i := 0; i < *rounds; i++ {
		for j := range fs.Args() {
			a := fs.Args()[(i+j)%fs.NArg()]
			name, addr, _ := strings.Cut(a, "=")
			c, err := net.DialTimeout("tcp4", addr, 5*time.Second)
			if err != nil {
				fmt.Fprintf(os.Stderr, "bulk %s: %v\n", name, err)
				return 1
			}
			start := time.Now()
			for k := 0; k < *mib; k++ {
				if _, err := c.Write(buf); err != nil {
					fmt.Fprintf(os.Stderr, "bulk %s: %v\n", name, err)
					return 1
				}
			}
			c.(*net.TCPConn).CloseWrite()
			c.Read(make([]byte, 1)) // the proxy closes once it has read everything
			out[name] = append(out[name], float64(*mib)/time.Since(start).Seconds())
			c.Close()
		}
	}
	json.NewEncoder(os.Stdout).Encode(out)
	return 0
}
