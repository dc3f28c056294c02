package bench

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"runtime"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// HTTPResult is what one client pod's httpload measured.
type HTTPResult struct {
	// Latencies are whole requests in nanoseconds: socket to the last byte
	// of the response, one new connection each.
	Latencies []int64 `json:"latencies_ns"`
	Errors    int     `json:"errors"`
	FirstErr  string  `json:"first_error,omitempty"`
}

// httpRequest is the request every client sends: HTTP/1.1, a new
// connection, closed by the server after the response.
var httpRequest = []byte("GET /bench HTTP/1.1\r\nHost: bench.example\r\nUser-Agent: sluice-bench\r\nConnection: close\r\n\r\n")

// httploadMain prints READY, reads the start time (Unix nanoseconds) from
// stdin, so that every client pod runs in the same window, waits for it,
// then for -duration makes one HTTP/1.1 request after another to -target,
// each on a new connection, and prints an HTTPResult as JSON.
func httploadMain(args []string) int {
	fs := flag.NewFlagSet("httpload", flag.ContinueOnError)
	target := fs.String("target", "", "addr:port of the HTTP server")
	duration := fs.Duration("duration", 2*time.Second, "how long to make requests")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if *target == "" {
		fmt.Fprintln(os.Stderr, "httpload: -target is required")
		return 2
	}
	fmt.Println("READY")
	var start int64
	if _, err := fmt.Fscanln(os.Stdin, &start); err != nil {
		fmt.Fprintln(os.Stderr, "httpload: read the start time:", err)
		return 2
	}
	time.Sleep(time.Until(time.Unix(0, start)))
	d := net.Dialer{Timeout: 5 * time.Second}
	d.SetMultipathTCP(false)
	var res HTTPResult
	buf := make([]byte, 4096)
	end := time.Now().Add(*duration)
	for time.Now().Before(end) {
		begin := time.Now()
		err := httpOnce(&d, *target, buf)
		if err != nil {
			if res.Errors == 0 {
				res.FirstErr = err.Error()
			}
			res.Errors++
			continue
		}
		res.Latencies = append(res.Latencies, time.Since(begin).Nanoseconds())
	}
	json.NewEncoder(os.Stdout).Encode(res)
	return 0
}

func httpOnce(d *net.Dialer, target string, buf []byte) error {
	c, err := d.Dial("tcp4", target)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write(httpRequest); err != nil {
		return err
	}
	var resp []byte
	for {
		n, err := c.Read(buf)
		resp = append(resp, buf[:n]...)
		if err == io.EOF {
			break
		}
		if err != nil {
			return err
		}
	}
	if !bytes.HasPrefix(resp, []byte("HTTP/1.1 200 ")) || !bytes.HasSuffix(resp, []byte("ok\n")) {
		line, _, _ := bufio.NewReader(bytes.NewReader(resp)).ReadLine()
		return fmt.Errorf("unexpected response %q", line)
	}
	return nil
}

// httpserverMain serves "ok\n" over HTTP/1.1 on -listen (net/http, so a
// client's Connection: close closes the connection after the response).
func httpserverMain(args []string) int {
	fs := flag.NewFlagSet("httpserver", flag.ContinueOnError)
	listen := fs.String("listen", "0.0.0.0:80", "address to listen on")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	lc := net.ListenConfig{}
	lc.SetMultipathTCP(false)
	l, err := lc.Listen(context.Background(), "tcp4", *listen)
	if err != nil {
		fmt.Fprintln(os.Stderr, "httpserver:", err)
		return 1
	}
	srv := &http.Server{
		Handler:           http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "ok\n") }),
		ReadHeaderTimeout: 5 * time.Second,
	}
	go srv.Serve(l)
	fmt.Println("READY")
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	<-ctx.Done()
	srv.Close()
	return 0
}

// delaylineMain is the emulated network between the node and the server
// namespace, for kernels without netem: a TUN device -name in this
// process's network namespace and one of the same name in the namespace at
// -peer, every packet read from one written to the other -delay later
// (one way; the round trip is twice it), in order, nothing dropped or
// reordered. Each direction runs on its own OS thread (delayPass), so a
// packet is late by the scheduler's wake-up latency, not by Go's timer
// granularity.
func delaylineMain(args []string) int {
	fs := flag.NewFlagSet("delayline", flag.ContinueOnError)
	name := fs.String("name", "wan0", "TUN device name (in both namespaces)")
	peer := fs.String("peer", "", "path of the other network namespace (/run/netns/NAME)")
	delay := fs.Duration("delay", 5*time.Millisecond, "one-way delay")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	a, err := openTUN(*name)
	if err != nil {
		fmt.Fprintln(os.Stderr, "delayline:", err)
		return 1
	}
	b, err := openTUNIn(*peer, *name)
	if err != nil {
		fmt.Fprintln(os.Stderr, "delayline:", err)
		return 1
	}
	go delayPass(a, b, *delay)
	go delayPass(b, a, *delay)
	fmt.Println("READY")
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	<-ctx.Done()
	return 0
}

// openTUN creates (or attaches to) the TUN device name in the calling
// thread's network namespace; it goes when the process exits.
func openTUN(name string) (int, error) {
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("open /dev/net/tun: %w", err)
	}
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		unix.Close(fd)
		return -1, err
	}
	ifr.SetUint16(unix.IFF_TUN | unix.IFF_NO_PI)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("TUNSETIFF %s: %w", name, err)
	}
	return fd, nil
}

// openTUNIn is openTUN in the network namespace at path: the device stays
// in that namespace, the descriptor works from any thread.
func openTUNIn(path, name string) (int, error) {
	runtime.LockOSThread()
	self, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		runtime.UnlockOSThread()
		return -1, err
	}
	defer unix.Close(self)
	ns, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		runtime.UnlockOSThread()
		return -1, err
	}
	defer unix.Close(ns)
	if err := unix.Setns(ns, unix.CLONE_NEWNET); err != nil {
		runtime.UnlockOSThread()
		return -1, fmt.Errorf("setns %s: %w", path, err)
	}
	fd, err := openTUN(name)
	if err := unix.Setns(self, unix.CLONE_NEWNET); err != nil {
		// The thread stays locked and is thrown away with this goroutine.
		return -1, fmt.Errorf("setns back: %w", err)
	}
	runtime.UnlockOSThread()
	return fd, err
}

type delayed struct {
	due int64 // CLOCK_MONOTONIC nanoseconds
	pkt []byte
}

// delayPass moves packets from src to dst, each delay after it was read,
// on one OS thread of its own: an epoll loop over src and a timerfd armed
// for the oldest packet's due time (an absolute hrtimer: no timer slack).
// No goroutine hand-offs per packet: the link's own CPU, which the
// benchmark reports, stays small.
func delayPass(src, dst int, delay time.Duration) {
	runtime.LockOSThread()
	fail := func(what string, err error) {
		fmt.Fprintf(os.Stderr, "delayline %s: %v\n", what, err)
		os.Exit(1)
	}
	if err := unix.SetNonblock(src, true); err != nil {
		fail("nonblock", err)
	}
	tfd, err := unix.TimerfdCreate(unix.CLOCK_MONOTONIC, unix.TFD_NONBLOCK|unix.TFD_CLOEXEC)
	if err != nil {
		fail("timerfd", err)
	}
	ep, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		fail("epoll", err)
	}
	for _, fd := range []int{src, tfd} {
		if err := unix.EpollCtl(ep, unix.EPOLL_CTL_ADD, fd, &unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(fd)}); err != nil {
			fail("epoll add", err)
		}
	}
	now := func() int64 {
		var ts unix.Timespec
		unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
		return ts.Nano()
	}
	var q []delayed
	buf := make([]byte, 1<<16)
	events := make([]unix.EpollEvent, 2)
	var tick [8]byte
	for {
		if _, err := unix.EpollWait(ep, events, -1); err != nil && err != unix.EINTR {
			fail("epoll wait", err)
		}
		unix.Read(tfd, tick[:]) // clear the expiry, if that is what woke us
		for {
			n, err := unix.Read(src, buf)
			if err == unix.EAGAIN || err == unix.EINTR {
				break
			}
			if err != nil {
				fail("read", err)
			}
			q = append(q, delayed{now() + delay.Nanoseconds(), append([]byte(nil), buf[:n]...)})
		}
		t := now()
		i := 0
		for ; i < len(q) && q[i].due <= t; i++ {
			unix.Write(dst, q[i].pkt)
		}
		q = append(q[:0], q[i:]...)
		if len(q) > 0 {
			due := unix.NsecToTimespec(q[0].due)
			if err := unix.TimerfdSettime(tfd, unix.TFD_TIMER_ABSTIME, &unix.ItimerSpec{Value: due}, nil); err != nil {
				fail("timerfd arm", err)
			}
		}
	}
}
