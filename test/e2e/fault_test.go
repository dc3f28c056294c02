package e2e

import (
	"encoding/json"
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/sluice-io/sluice/test/harness"
	"github.com/sluice-io/sluice/test/testbed"
)

// stream is a steady stream of connections from a pod (the "stream" role).
type stream struct {
	pod      *testbed.Pod
	start    time.Time
	attempts func() []testbed.Attempt
}

func startStream(t *testing.T, p *testbed.Pod, d time.Duration, spec string, flags ...string) *stream {
	t.Helper()
	// The connections speak first, as most clients do: the proxy's TLS and
	// HTTP inspectors then decide at once; a silent client would wait out
	// the listener filter timeout (1 s) on every connection.
	args := append(append([]string{"-duration", d.String(), "-send", "hello"}, flags...), spec)
	start, attempts := testbed.StartStream(t, p.Cgroup, p.Netns, 60*time.Second, args...)
	return &stream{pod: p, start: start, attempts: attempts}
}

// outcome classifies one attempt: redirected (the server saw the node),
// direct (it saw the pod), refused (EPERM from the datapath) or failed.
func outcome(a testbed.Attempt, p *testbed.Pod) string {
	switch {
	case a.Reply == "peer="+testbed.NodeV4.String():
		return "redirected"
	case a.Reply == "peer="+p.IPv4.String():
		return "direct"
	case strings.Contains(a.Err, "operation not permitted"):
		return "refused"
	}
	return "failed"
}

// timeline is a stream's attempts with absolute times and outcomes.
type timeline struct {
	at      []time.Time
	outcome []string
	errs    []string
	cookies []uint64
	count   map[string]int
}

func (s *stream) wait(t *testing.T) timeline {
	t.Helper()
	as := s.attempts()
	if len(as) == 0 {
		t.Fatal("stream made no connections")
	}
	tl := timeline{count: map[string]int{}}
	for _, a := range as {
		o := outcome(a, s.pod)
		tl.at = append(tl.at, s.start.Add(a.At))
		tl.outcome = append(tl.outcome, o)
		tl.errs = append(tl.errs, a.Err+a.Reply)
		tl.cookies = append(tl.cookies, a.Cookie)
		tl.count[o]++
	}
	return tl
}

// first returns when the first attempt with outcome o started at or after
// from, and whether there was one.
func (tl timeline) first(o string, from time.Time) (time.Time, bool) {
	for i, at := range tl.at {
		if !at.Before(from) && tl.outcome[i] == o {
			return at, true
		}
	}
	return time.Time{}, false
}

// failures lists the errors of failed attempts from from on.
func (tl timeline) failures(from time.Time) []string {
	var out []string
	for i, at := range tl.at {
		if !at.Before(from) && tl.outcome[i] == "failed" {
			out = append(out, fmt.Sprintf("+%v %s", at.Sub(from).Round(time.Millisecond), tl.errs[i]))
		}
	}
	return out
}

// between counts outcomes of attempts started in [from, to).
func (tl timeline) between(from, to time.Time) map[string]int {
	out := map[string]int{}
	for i, at := range tl.at {
		if !at.Before(from) && at.Before(to) {
			out[tl.outcome[i]]++
		}
	}
	return out
}

func faultEnv(t *testing.T, agentArgs ...string) (*harness.Env, *testbed.Daemon, string) {
	t.Helper()
	e := harness.NewEnforcing(t, 2)
	dst := fmt.Sprintf("%s:%d", testbed.ExternalV4[1], harness.ServerPort)
	e.WriteWorkloads(t,
		harness.Workload{Pod: e.TB.Pods[0], Namespace: "shop", Name: "audited", Mode: "audit"},
		harness.Workload{Pod: e.TB.Pods[1], Namespace: "shop", Name: "enforced", Mode: "enforce", Allow: dst})
	agent := e.StartAgent(t, append([]string{"--workloads-file", e.WorkloadsFile}, agentArgs...)...)
	harness.WaitFor(t, "both pods selected and the proxy ready", 10*time.Second, func() bool {
		st := readStatus(t, e)
		return st.Proxy.Ready && len(st.Workloads) == 2
	})
	return e, agent, dst
}

// SIGKILL the agent under a steady stream of connections from a fail-open
// and a fail-closed pod, restart it: the pinned datapath never stops, so
// every connection is redirected, none fails, none goes out direct.
func TestPrivilegedFaultAgentKilled(t *testing.T) {
	e, agent, dst := faultEnv(t)
	audited, enforced := e.TB.Pods[0], e.TB.Pods[1]
	streams := []*stream{startStream(t, audited, 6*time.Second, "tcp4:"+dst), startStream(t, enforced, 6*time.Second, "tcp4:"+dst)}

	time.Sleep(1500 * time.Millisecond)
	agent.Signal(syscall.SIGKILL, 5*time.Second) // exits with "signal: killed"
	time.Sleep(1500 * time.Millisecond)
	e.StartAgent(t)

	for _, s := range streams {
		tl := s.wait(t)
		t.Logf("%s: %d connections: %v", s.pod.Name, len(tl.at), tl.count)
		if tl.count["redirected"] != len(tl.at) {
			t.Errorf("%s: %v; want every connection redirected across the agent's SIGKILL and restart", s.pod.Name, tl.count)
		}
	}
	if st := readStatus(t, e); len(st.Workloads) != 2 {
		t.Errorf("restarted agent has %d workloads, want the 2 it adopted", len(st.Workloads))
	}
}

// The proxy dies and comes back under a steady stream: the fail-open pod
// goes direct once the agent has seen three failed probes, the fail-closed
// pod is refused and never goes direct, and both are redirected again once
// the proxy answers. The transition times are measured and bounded.
//
// The flow log misses none of it: every connection of the fail-open pod
// that went direct, and every one of the fail-closed pod that was refused,
// is in it exactly once (by its socket's cookie), with the pod's identity,
// the destination and the decision; no redirected connection is.
func TestPrivilegedFaultProxyDies(t *testing.T) {
	flowLog := filepath.Join(t.TempDir(), "flows.jsonl")
	e, _, dst := faultEnv(t, "--flow-log", flowLog)
	audited, enforced := e.TB.Pods[0], e.TB.Pods[1]
	open, closed := startStream(t, audited, 12*time.Second, "tcp4:"+dst), startStream(t, enforced, 12*time.Second, "tcp4:"+dst)

	time.Sleep(1500 * time.Millisecond)
	killed := time.Now()
	e.Proxy.Signal(syscall.SIGKILL, 5*time.Second)
	time.Sleep(6 * time.Second)
	restarted := time.Now()
	e.StartProxy(t)
	otl, ctl := open.wait(t), closed.wait(t)
	faultTimeline(t, "proxy killed", otl, ctl, killed, restarted, 6*time.Second)
	checkFlowLog(t, e, flowLog, dst, map[string]flowWant{
		"shop/audited":  {tl: otl, outcome: "direct", decision: "direct_not_ready"},
		"shop/enforced": {tl: ctl, outcome: "refused", decision: "refused_not_ready"},
	})
}

type flowWant struct {
	tl       timeline
	outcome  string // the stream outcome the flow log must have, each once
	decision string
}

// checkFlowLog reads the agent's flow log with `sluice flows` (per pod,
// as JSON) and checks that each pod's connections with the outcome are in
// it exactly once, with the decision and destination, and nothing else is.
func checkFlowLog(t *testing.T, e *harness.Env, flowLog, dst string, want map[string]flowWant) {
	t.Helper()
	// The agent writes as the events come; give it a moment.
	time.Sleep(500 * time.Millisecond)
	for pod, w := range want {
		out, err := exec.Command(e.Bin, "flows", "--flow-log", flowLog, "--pod", pod, "--output", "json").Output()
		if err != nil {
			t.Fatalf("sluice flows --pod %s: %v", pod, err)
		}
		logged := map[uint64]int{}
		lines := 0
		for _, l := range strings.Split(strings.TrimSpace(string(out)), "\n") {
			if l == "" {
				continue
			}
			var fe struct {
				Source, Namespace, Pod, Destination, Protocol, Decision string
				Cookie                                                  uint64
			}
			if err := json.Unmarshal([]byte(l), &fe); err != nil {
				t.Fatalf("sluice flows line %q: %v", l, err)
			}
			lines++
			logged[fe.Cookie]++
			if fe.Source != "datapath" || fe.Namespace+"/"+fe.Pod != pod || fe.Destination != dst || fe.Protocol != "tcp" || fe.Decision != w.decision {
				t.Errorf("flow log line for %s: %+v, want %s to %s tcp", pod, fe, w.decision, dst)
			}
		}
		expected := 0
		for i, o := range w.tl.outcome {
			c := w.tl.cookies[i]
			switch {
			case o == w.outcome:
				expected++
				if logged[c] != 1 {
					t.Errorf("%s: a %s connection (cookie %d, +%v) is in the flow log %d times, want once", pod, o, c, w.tl.at[i].Sub(w.tl.at[0]).Round(time.Millisecond), logged[c])
				}
			case logged[c] != 0:
				t.Errorf("%s: a %s connection (cookie %d) is in the flow log", pod, o, c)
			}
		}
		t.Logf("flow log: %s: %d lines for %d %s connections", pod, lines, expected, w.outcome)
		if lines != expected || expected == 0 {
			t.Errorf("%s: %d flow log lines, want one per %s connection: %d", pod, lines, w.outcome, expected)
		}
	}
}

// faultTimeline checks a fail-open and a fail-closed pod's streams around
// an outage from down to up: before it, all redirected; the fail-open pod
// goes direct within bound and stays direct until up; the fail-closed pod
// is refused and is never direct; after up both are redirected again.
func faultTimeline(t *testing.T, what string, open, closed timeline, down, up time.Time, bound time.Duration) {
	t.Helper()
	for name, tl := range map[string]timeline{"fail-open": open, "fail-closed": closed} {
		// (An attempt in flight at the moment of the fault may fail.)
		if b := tl.between(time.Time{}, down.Add(-200*time.Millisecond)); b["redirected"] == 0 || len(b) != 1 {
			t.Errorf("%s before %s: %v, want all redirected", name, what, b)
		}
	}
	direct, ok := open.first("direct", down)
	if !ok {
		t.Fatalf("fail-open pod never went direct after %s: %v", what, open.count)
	}
	refused, ok := closed.first("refused", down)
	if !ok {
		t.Fatalf("fail-closed pod never refused after %s: %v", what, closed.count)
	}
	resumedOpen, ok1 := open.first("redirected", up)
	resumedClosed, ok2 := closed.first("redirected", up)
	if !ok1 || !ok2 {
		t.Fatalf("redirection did not resume after the proxy came back: open %v, closed %v", open.between(up, time.Now()), closed.between(up, time.Now()))
	}
	t.Logf("%s: fail-open direct after %v (%d connections failed before: %v), fail-closed refused after %v; redirection resumed after %v / %v",
		what, direct.Sub(down).Round(time.Millisecond), open.between(down, direct)["failed"], open.between(down, direct),
		refused.Sub(down).Round(time.Millisecond), resumedOpen.Sub(up).Round(time.Millisecond), resumedClosed.Sub(up).Round(time.Millisecond))
	t.Logf("fail-open totals %v; fail-closed totals %v", open.count, closed.count)
	if d := direct.Sub(down); d > bound {
		t.Errorf("fail-open transition took %v, more than %v", d, bound)
	}
	if b := open.between(direct, up); b["direct"] == 0 || len(b) != 1 {
		t.Errorf("fail-open between transition and recovery: %v, want all direct; failures %v", b, open.failures(direct))
	}
	if closed.count["direct"] != 0 {
		t.Errorf("fail-closed pod went direct %d times", closed.count["direct"])
	}
	if b := closed.between(refused, up); b["refused"] == 0 || len(b) != 1 {
		t.Errorf("fail-closed between transition and recovery: %v, want all refused", b)
	}
	for name, tl := range map[string]struct {
		tl timeline
		at time.Time
	}{"fail-open": {open, resumedOpen}, "fail-closed": {closed, resumedClosed}} {
		if b := tl.tl.between(tl.at, time.Now()); len(b) != 1 {
			t.Errorf("%s after redirection resumed: %v, want all redirected; failures: %v", name, b, tl.tl.failures(tl.at))
		}
	}
}

// The agent and the proxy are both gone (deleted without uninstall): the
// readiness lease runs out and each pod falls back to its fail mode instead
// of dialing a closed port for ever; with both back, redirection resumes.
func TestPrivilegedFaultAgentAndProxyGone(t *testing.T) {
	const lease = 5 * time.Second
	e, agent, dst := faultEnv(t, "--readiness-lease", lease.String())
	audited, enforced := e.TB.Pods[0], e.TB.Pods[1]
	open, closed := startStream(t, audited, 16*time.Second, "tcp4:"+dst), startStream(t, enforced, 16*time.Second, "tcp4:"+dst)

	time.Sleep(1500 * time.Millisecond)
	agent.Signal(syscall.SIGKILL, 5*time.Second)
	gone := time.Now()
	e.Proxy.Signal(syscall.SIGKILL, 5*time.Second)
	time.Sleep(lease + 3*time.Second)
	back := time.Now()
	e.StartProxy(t)
	e.StartAgent(t, "--workloads-file", e.WorkloadsFile, "--readiness-lease", lease.String())
	// The lease was last renewed up to one probe interval before the kill.
	faultTimeline(t, "agent and proxy gone", open.wait(t), closed.wait(t), gone, back, lease+time.Second)

	dp := counters(t, e)
	if dp["lease_expired"] == 0 {
		t.Errorf("lease_expired never counted: %v", dp)
	}
}
