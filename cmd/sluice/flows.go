package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"sort"
	"strings"
	"syscall"
	"time"

	"github.com/sluice-io/sluice/agent"
)

// flowEntry is one line of `sluice flows`: a datapath decision (the agent's
// flow log) or a connection the proxy logged (its access log).
type flowEntry struct {
	Time        time.Time `json:"time"`
	Source      string    `json:"source"` // "datapath" or "proxy"
	Namespace   string    `json:"namespace,omitempty"`
	Pod         string    `json:"pod,omitempty"`
	Destination string    `json:"destination,omitempty"`
	Protocol    string    `json:"protocol"`
	// Decision: the datapath's (direct_not_ready, refused_non_tcp, ...) or
	// the proxy's verdict (proxy_allow, proxy_deny, ...).
	Decision string `json:"decision"`
	Reason   string `json:"reason,omitempty"`
	Cookie   uint64 `json:"cookie,omitempty"`
	// Connection is the proxy's connection id.
	Connection uint64 `json:"connection,omitempty"`
}

// accessLine is what `sluice flows` reads of an access log line (the
// format xds serves Envoy, docs/xds.md).
type accessLine struct {
	Time         string          `json:"time"`
	Namespace    string          `json:"namespace"`
	Pod          string          `json:"pod"`
	Verdict      string          `json:"verdict"`
	Reason       string          `json:"reason"`
	LogType      string          `json:"log_type"`
	ConnectionID json.RawMessage `json:"connection_id"`
	OrigDst      string          `json:"original_destination"`
	Authority    string          `json:"authority"`
}

func runFlows(args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("flows", `Show the connections of selected pods: the datapath's decisions that never
reach the proxy (the agent's flow log: fail-open pods going direct and
fail-closed pods refused while the proxy is not ready, refused UDP and other
non-TCP sockets, node-local and metadata destinations) together with the
connections the proxy logged (its access log), in time order, one line each.

Either input may be a file, "-" (stdin) or a pipe; lines that are neither flow
log nor access log lines (the agent's own log, say) are skipped. On a node:
  sluice flows --flow-log /var/log/sluice/flows.jsonl --access-log envoy.log
On Kubernetes (the agent writes its flow log to stdout, Envoy its access log):
  sluice flows --follow \
    --flow-log <(kubectl -n sluice-system logs -f ds/sluice -c agent) \
    --access-log <(kubectl -n sluice-system logs -f ds/sluice -c envoy)`, stderr)
	flowLog := fs.String("flow-log", "", `the agent's flow log (its --flow-log), "-" for stdin`)
	accessLog := fs.String("access-log", "", `the proxy's JSON access log, "-" for stdin`)
	pod := fs.String("pod", "", "only this pod: NAMESPACE/NAME")
	follow := fs.Bool("follow", false, "keep reading as the inputs grow, printing each line as it comes")
	output := fs.String("output", "text", "text or json (one JSON object per line)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() != 0 {
		fs.Usage()
		return errUsage
	}
	if *flowLog == "" && *accessLog == "" {
		return errors.New("nothing to read: pass --flow-log and/or --access-log")
	}
	if *flowLog == "-" && *accessLog == "-" {
		return errors.New("--flow-log and --access-log cannot both be stdin")
	}
	if *output != "text" && *output != "json" {
		return fmt.Errorf("--output %q: want text or json", *output)
	}
	var ns, name string
	if *pod != "" {
		var ok bool
		if ns, name, ok = strings.Cut(*pod, "/"); !ok || ns == "" || name == "" {
			return fmt.Errorf("--pod %q: want NAMESPACE/NAME", *pod)
		}
	}
	keep := func(e flowEntry) bool { return *pod == "" || e.Namespace == ns && e.Pod == name }
	print := func(e flowEntry) {
		if *output == "json" {
			b, _ := json.Marshal(e)
			fmt.Fprintln(stdout, string(b))
			return
		}
		who := e.Namespace + "/" + e.Pod
		if e.Namespace == "" && e.Pod == "" {
			who = "?"
		}
		dst := e.Destination
		if dst == "" {
			dst = "(socket)"
		}
		fmt.Fprintf(stdout, "%s  %-8s  %s -> %s %s %s\n", e.Time.UTC().Format("2006-01-02T15:04:05.000Z"), e.Source, who, dst, e.Protocol, e.Decision)
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	entries := make(chan flowEntry, 256)
	errc := make(chan error, 2)
	n := 0
	for _, in := range []struct {
		path  string
		parse func([]byte, *dedup) (flowEntry, bool)
	}{{*flowLog, parseFlowLine}, {*accessLog, parseAccessLine}} {
		if in.path == "" {
			continue
		}
		r, closeIn, err := openInput(in.path)
		if err != nil {
			return err
		}
		defer closeIn()
		n++
		go func() { errc <- readEntries(ctx, r, *follow, in.parse, entries) }()
	}
	var all []flowEntry
	for done := 0; done < n; {
		select {
		case e := <-entries:
			if !keep(e) {
				continue
			}
			if *follow {
				print(e)
			} else {
				all = append(all, e)
			}
		case err := <-errc:
			if err != nil {
				return err
			}
			done++
		}
	}
	for len(entries) > 0 {
		if e := <-entries; keep(e) {
			all = append(all, e)
		}
	}
	sort.SliceStable(all, func(i, j int) bool { return all[i].Time.Before(all[j].Time) })
	for _, e := range all {
		print(e)
	}
	return nil
}

func openInput(path string) (io.Reader, func() error, error) {
	if path == "-" {
		return os.Stdin, func() error { return nil }, nil
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, nil, err
	}
	return f, f.Close, nil
}

// dedup remembers the proxy connections already shown: Envoy logs a long
// tcp_proxy connection at its upstream connect, periodically and at its
// end; `sluice flows` shows it once.
type dedup map[string]bool

// readEntries sends each parsed line of r; with follow it waits for more
// at EOF until ctx ends.
func readEntries(ctx context.Context, r io.Reader, follow bool, parse func([]byte, *dedup) (flowEntry, bool), out chan<- flowEntry) error {
	br := bufio.NewReaderSize(r, 64<<10)
	seen := dedup{}
	var partial []byte
	for {
		line, err := br.ReadBytes('\n')
		if len(line) > 0 && line[len(line)-1] == '\n' {
			line = append(partial, line...)
			partial = nil
			if e, ok := parse(line, &seen); ok {
				select {
				case out <- e:
				case <-ctx.Done():
					return nil
				}
			}
		} else if len(line) > 0 {
			partial = append(partial, line...)
		}
		if err == io.EOF {
			if !follow {
				if e, ok := parse(partial, &seen); ok && len(partial) > 0 {
					out <- e
				}
				return nil
			}
			select {
			case <-ctx.Done():
				return nil
			case <-time.After(200 * time.Millisecond):
			}
			continue
		}
		if err != nil {
			return err
		}
	}
}

// parseFlowLine takes an agent flow log line (agent.FlowLine). Lines of
// other kinds, also JSON ones, are skipped; a CRI log prefix
// ("<time> stdout F ") is stripped.
func parseFlowLine(b []byte, _ *dedup) (flowEntry, bool) {
	b = jsonPart(b)
	if b == nil {
		return flowEntry{}, false
	}
	var l agent.FlowLine
	if json.Unmarshal(b, &l) != nil || l.Type != "flow" {
		return flowEntry{}, false
	}
	return flowEntry{Time: l.Time, Source: "datapath", Namespace: l.Namespace, Pod: l.Pod, Destination: l.Destination,
		Protocol: l.Protocol, Decision: l.Decision, Cookie: l.Cookie}, true
}

// parseAccessLine takes an access log line of a connection the first time
// its connection id is seen.
func parseAccessLine(b []byte, seen *dedup) (flowEntry, bool) {
	b = jsonPart(b)
	if b == nil {
		return flowEntry{}, false
	}
	var l accessLine
	if json.Unmarshal(b, &l) != nil || l.Verdict == "" || l.OrigDst == "" {
		return flowEntry{}, false
	}
	id := strings.Trim(string(l.ConnectionID), `"`)
	if id != "" {
		if (*seen)[id] {
			return flowEntry{}, false
		}
		(*seen)[id] = true
	}
	t, err := time.Parse(time.RFC3339Nano, l.Time)
	if err != nil {
		return flowEntry{}, false
	}
	var conn uint64
	fmt.Sscan(id, &conn)
	dst := l.OrigDst
	if l.Authority != "" && l.Authority != "-" {
		dst += " (" + l.Authority + ")"
	}
	return flowEntry{Time: t, Source: "proxy", Namespace: l.Namespace, Pod: l.Pod, Destination: dst, Protocol: "tcp",
		Decision: "proxy_" + l.Verdict, Reason: l.Reason, Connection: conn}, true
}

// jsonPart is the JSON object of a log line, past a CRI log prefix if any.
func jsonPart(b []byte) []byte {
	i := strings.IndexByte(string(b), '{')
	if i < 0 {
		return nil
	}
	return b[i:]
}
