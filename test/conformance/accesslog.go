package conformance

import (
	"bufio"
	"bytes"
	"encoding/json"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"time"
)

// LogEntry is one access log line, decoded.
type LogEntry map[string]any

// ReadAccessLog reads an access log file written by the proxy (or by a real
// Envoy with the served format); lines that are not JSON objects (Envoy's
// own log lines) are skipped.
func ReadAccessLog(path string) []LogEntry {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil
	}
	var out []LogEntry
	s := bufio.NewScanner(bytes.NewReader(b))
	s.Buffer(make([]byte, 1<<20), 1<<20)
	for s.Scan() {
		if e := parseEntry(s.Text()); e != nil {
			out = append(out, e)
		}
	}
	return out
}

func parseEntry(line string) LogEntry {
	var e LogEntry
	if json.Unmarshal([]byte(line), &e) != nil {
		return nil
	}
	return e
}

// Final reports whether the entry is a connection's (or request's) last:
// not the one written when the upstream connected, nor a periodic one.
func (e LogEntry) Final() bool {
	switch e.Str("log_type") {
	case "TcpUpstreamConnected", "TcpPeriodic", "DownstreamPeriodic", "DownstreamStart":
		return false
	}
	return true
}

// ReadFinal is ReadAccessLog's final entries only: one per connection
// (per request on HTTP chains).
func ReadFinal(path string) []LogEntry {
	var out []LogEntry
	for _, e := range ReadAccessLog(path) {
		if e.Final() {
			out = append(out, e)
		}
	}
	return out
}

// Str returns a field as a string ("" when missing or null).
func (e LogEntry) Str(k string) string {
	switch v := e[k].(type) {
	case string:
		return v
	case float64:
		return strconv.FormatFloat(v, 'f', -1, 64)
	}
	return ""
}

// Outcome summarises what the configuration did with the connection (or
// request), in the words of the bypass matrix:
//
//	loop-closed            the loop chain: a never-dial destination, or no original destination
//	unknown-source-closed  the source is no workload's
//	denied-closed          a deny chain closed it
//	denied-403             an HTTP chain answered 403
//	dns-failed             a hostname's lookup failed, or every answer was filtered
//	dial-failed            the upstream did not accept
//	forwarded              forwarded to upstream
func (e LogEntry) Outcome() string {
	flags := e.Str("response_flags")
	switch {
	case e.Str("chain") == "loop":
		return "loop-closed"
	case e.Str("chain") == "unknown-source":
		return "unknown-source-closed"
	case e.Str("response_code") == "403":
		return "denied-403"
	case strings.Contains(flags, "DF"):
		return "dns-failed"
	case e.Str("verdict") == "deny":
		return "denied-closed"
	case strings.HasPrefix(e.Str("chain"), "tls|") && strings.Contains(flags, "UH"):
		// The SNI forward proxy found no address: the cluster has no host.
		return "dns-failed"
	case strings.Contains(flags, "UF"):
		return "dial-failed"
	case e.Str("upstream") != "":
		return "forwarded"
	}
	return "closed(" + flags + ")"
}

// FindFinal returns the final entry of the connection from client (the
// address the client saw as its local one, v4-mapped or not), waiting up
// to wait for the proxy to write it.
func FindFinal(path, client string, wait time.Duration) (LogEntry, bool) {
	want, err := netip.ParseAddrPort(client)
	if err != nil {
		return nil, false
	}
	want = netip.AddrPortFrom(want.Addr().Unmap(), want.Port())
	deadline := time.Now().Add(wait)
	for {
		for _, e := range ReadFinal(path) {
			got, err := netip.ParseAddrPort(e.Str("source"))
			if err == nil && netip.AddrPortFrom(got.Addr().Unmap(), got.Port()) == want {
				return e, true
			}
		}
		if time.Now().After(deadline) {
			return nil, false
		}
		time.Sleep(20 * time.Millisecond)
	}
}
