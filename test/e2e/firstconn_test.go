package e2e

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/sluice-io/sluice/test/harness"
	"github.com/sluice-io/sluice/test/testbed"
)

// TestPrivilegedNewPodFirstConnections: pods that connect in a tight loop
// from before they are selected see, once selected, only their fail mode's
// outcome (fail-open: direct; fail-closed: refused) until the proxy has
// accepted a listener with their addresses, then only redirected
// connections: never a connection accepted and then closed by the
// listener's unknown-source chain, and an enforce pod never a direct one
// once selected.
func TestPrivilegedNewPodFirstConnections(t *testing.T) {
	e := harness.NewEnforcing(t, 2)
	audited, enforced := e.TB.Pods[0], e.TB.Pods[1]
	dst := fmt.Sprintf("%s:%d", testbed.ExternalV4[1], harness.ServerPort)
	e.WriteWorkloads(t)
	e.StartAgent(t)
	harness.WaitFor(t, "the proxy ready", 10*time.Second, func() bool { return readStatus(t, e).Proxy.Ready })

	streams := []*stream{startStream(t, audited, 4*time.Second, "tcp4:"+dst), startStream(t, enforced, 4*time.Second, "tcp4:"+dst)}
	time.Sleep(500 * time.Millisecond)
	selected := time.Now()
	e.WriteWorkloads(t,
		harness.Workload{Pod: audited, Namespace: "shop", Name: "audited", Mode: "audit"},
		harness.Workload{Pod: enforced, Namespace: "shop", Name: "enforced", Mode: "enforce", Allow: dst})
	for i, s := range streams {
		tl := s.wait(t)
		name := []string{"fail-open audit pod", "fail-closed enforce pod"}[i]
		if f := tl.failures(s.start); len(f) > 0 {
			t.Errorf("%s: %d connections failed (accepted, then closed): %s", name, len(f), strings.Join(f, "; "))
		}
		first, ok := tl.first("redirected", selected)
		if !ok {
			t.Fatalf("%s: never redirected after selection: %v", name, tl.count)
		}
		// After the first redirected connection, only redirected ones.
		var after, waiting []string
		for j, at := range tl.at {
			switch {
			case at.After(first) && tl.outcome[j] != "redirected":
				after = append(after, tl.outcome[j])
			case at.After(selected) && at.Before(first):
				waiting = append(waiting, tl.outcome[j])
			}
		}
		if len(after) > 0 {
			t.Errorf("%s: after the first redirected connection: %v", name, after)
		}
		if i == 1 {
			// Direct until the agent selects it (it is not selected yet);
			// once selected (its first refused connection), never again.
			selectedAt := -1
			for j, o := range waiting {
				if o != "direct" && selectedAt < 0 {
					selectedAt = j
				}
				if o == "direct" && selectedAt >= 0 {
					t.Errorf("enforce pod went direct after it was selected (outcomes while awaiting: %v)", waiting)
					break
				}
			}
		}
		t.Logf("%s: %v; first redirected %v after the workloads file changed", name, tl.count, first.Sub(selected).Round(time.Millisecond))
	}
}
