package testbed

import (
	"encoding/json"
	"flag"
	"fmt"
	"os"
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
		out = append(out, Attempt{At: at, DialResult: dialOne(fs.Arg(0), *send, *timeout)})
		time.Sleep(*interval)
	}
	json.NewEncoder(os.Stdout).Encode(out)
	return 0
}
