package testbed

import (
	"bufio"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/netip"
	"os"
	"runtime"
	"time"

	"golang.org/x/sys/unix"
)

// pendingMain starts -n non-blocking connects to -dst (IPv4 or IPv6), its
// port cycling from -dst-port-base over -dst-ports, and holds the sockets
// without waiting for them: with the pod's packets dropped, they stay in
// SYN-SENT, each a redirected socket whose original destination is stored
// in the datapath. It prints "READY <started> <errors>", holds the sockets
// until stdin closes, then closes them all, with a reset (SO_LINGER 0), so
// rounds of them leave no TIME_WAIT behind to run out of source ports.
//
// With -verify the connections are established, to a proxy in -verify mode
// that defers accepting them (TCP_DEFER_ACCEPT) until they send: when stdin
// closes, each says what it dialed ("WANT <addr>") and reads the proxy's
// verdict; the role prints the tally as a ReuseStats line.
func pendingMain(args []string) int {
	fs := flag.NewFlagSet("pending", flag.ContinueOnError)
	n := fs.Int("n", 1000, "connects to start")
	dst := fs.String("dst", "", "destination address")
	dstPortBase := fs.Int("dst-port-base", 20000, "first destination port")
	dstPorts := fs.Int("dst-ports", 1000, "destination ports to cycle through")
	cpu := fs.Int("cpu", -1, "connect from this CPU only (the connecting thread is pinned to it); -1: any")
	verify := fs.Bool("verify", false, "when stdin closes, ask a -verify proxy about each connection and print the verdicts (ReuseStats)")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if *cpu >= 0 {
		// The connects run on this goroutine, so on this thread.
		runtime.LockOSThread()
		var set unix.CPUSet
		set.Set(*cpu)
		if err := unix.SchedSetaffinity(0, &set); err != nil {
			fmt.Fprintln(os.Stderr, "pending: pin to CPU:", err)
			return 1
		}
	}
	addr, err := netip.ParseAddr(*dst)
	if err != nil {
		fmt.Fprintln(os.Stderr, "pending: -dst:", err)
		return 2
	}
	family := unix.AF_INET
	if addr.Is6() {
		family = unix.AF_INET6
	}
	// One descriptor per socket: raise the limit (root may).
	lim := unix.Rlimit{Cur: uint64(*n) + 64, Max: uint64(*n) + 64}
	var cur unix.Rlimit
	if unix.Getrlimit(unix.RLIMIT_NOFILE, &cur) == nil && cur.Cur < lim.Cur {
		if err := unix.Setrlimit(unix.RLIMIT_NOFILE, &lim); err != nil {
			fmt.Fprintln(os.Stderr, "pending: raise RLIMIT_NOFILE:", err)
			return 1
		}
	}
	fds := make([]int, 0, *n)
	dsts := make([]netip.AddrPort, 0, *n)
	errs := 0
	for i := range *n {
		fd, err := unix.Socket(family, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			errs++
			continue
		}
		unix.SetsockoptLinger(fd, unix.SOL_SOCKET, unix.SO_LINGER, &unix.Linger{Onoff: 1, Linger: 0})
		fds = append(fds, fd)
		dst := netip.AddrPortFrom(addr, uint16(*dstPortBase+i%*dstPorts))
		dsts = append(dsts, dst)
		if err := unix.Connect(fd, sockaddr(dst, family)); err != nil && !errors.Is(err, unix.EINPROGRESS) {
			errs++
		}
	}
	fmt.Printf("READY %d %d\n", len(fds)-errs, errs)
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
	}
	if *verify {
		var st ReuseStats
		for i, fd := range fds {
			st.Attempts++
			verifyHeld(&st, fd, dsts[i])
		}
		json.NewEncoder(os.Stdout).Encode(st)
		return 0
	}
	for _, fd := range fds {
		unix.Close(fd)
	}
	return 0
}

// verifyHeld asks a -verify proxy about one held connection: it says what
// it dialed and counts the verdict, as reuseOne does, then closes.
func verifyHeld(st *ReuseStats, fd int, dst netip.AddrPort) {
	f := os.NewFile(uintptr(fd), "pending")
	defer f.Close()
	if _, err := unix.Getpeername(fd); err != nil {
		st.Errors++ // never established
		return
	}
	st.Connected++
	c, err := net.FileConn(f)
	if err != nil {
		st.Errors++
		return
	}
	defer c.Close()
	st.ask(c, dst.String(), 10*time.Second)
}
