package testbed

import (
	"bufio"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"testing"
	"time"
)

// Attempt is one connection of a stream: when it started (since the
// stream's start) and how it went.
type Attempt struct {
	At time.Duration `json:"at"`
	DialResult
}

// streamMain is the "stream" role: it dials one spec again and again, every
// -interval, for -duration, as a steady stream of connections from a pod,
// and prints the attempts as a JSON array on exit. A test starts it, breaks
// something, and then reads what each connection saw.
func streamMain(args []string) int {
	fs := flag.NewFlagSet("stream", flag.ContinueOnError)
	duration := fs.Duration("duration", 5*time.Second, "how long to keep connecting")
	interval := fs.Duration("interval", 10*time.Millisecond, "pause between connections")
	timeout := fs.Duration("timeout", time.Second, "per-connection timeout")
	send := fs.String("send", "", "line each connection sends first (a client-first protocol: the proxy's listener filters then decide at once instead of waiting out their timeout)")
	if err := fs.Parse(args); err != nil || fs.NArg() != 1 {
		fmt.Fprintln(os.Stderr, "usage: stream [-duration d] [-interval d] [-timeout d] [-send line] SPEC")
		return 2
	}
	var out []Attempt
	start := time.Now()
	fmt.Println("READY")
	for time.Since(start) < *duration {
		at := time.Since(start)
		out = append(out, Attempt{At: at, DialResult: dialOne(fs.Arg(0), *send, *timeout, false)})
		time.Sleep(*interval)
	}
	json.NewEncoder(os.Stdout).Encode(out)
	return 0
}

// StartStream runs the stream role (with args, e.g. -duration, -interval,
// and the spec last) in cgroup cg and namespace ns, and returns once it
// connects: when it started, and a function that waits for its attempts
// (failing the test if they do not come within timeout).
func StartStream(t testing.TB, cg *Cgroup, ns *Netns, timeout time.Duration, args ...string) (time.Time, func() []Attempt) {
	t.Helper()
	cmd := Command(t, cg, ns, "stream", args...)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	r := bufio.NewReader(out)
	if l, err := r.ReadString('\n'); err != nil || strings.TrimSpace(l) != "READY" {
		t.Fatalf("stream: %q, %v", l, err)
	}
	start := time.Now()
	done := make(chan []Attempt, 1)
	go func() {
		var as []Attempt
		b, _ := io.ReadAll(r)
		json.Unmarshal(b, &as)
		cmd.Wait()
		done <- as
	}()
	return start, func() []Attempt {
		t.Helper()
		select {
		case as := <-done:
			return as
		case <-time.After(timeout):
			t.Fatal("stream did not finish")
			return nil
		}
	}
}
