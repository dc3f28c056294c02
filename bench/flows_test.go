package bench

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/ringbuf"
	"github.com/sluice-io/sluice/agent/datapath"
	"github.com/sluice-io/sluice/test/testbed"
	"golang.org/x/sys/unix"
)

// TestPrivilegedBenchFlowLog measures what a flow event costs a connection:
// a fail-open pod with the proxy not ready goes direct to two servers in
// the external namespace, interleaved: one excluded (direct, no event) and
// one not (direct because the proxy is not ready: one flow event, read by
// a consumer as the agent reads them). Reported: connect latency, and the
// connect4 program's kernel run time per connection.
func TestPrivilegedBenchFlowLog(t *testing.T) {
	outDir := benchOut(t)
	e := setupBench(t, "-sink")
	excludedDst := netip.AddrPortFrom(testbed.ExternalV4[0], 9000)
	eventDst := netip.AddrPortFrom(testbed.ExternalV4[1], 9000)
	testbed.ServeEcho(t, e.tb.External.Listen(t, "tcp", excludedDst.String()), e.tb.External.Listen(t, "tcp", eventDst.String()))
	must(t, e.dp.SetExclusions(append(datapath.DefaultExclusions, netip.PrefixFrom(excludedDst.Addr(), 32))))
	must(t, e.dp.SetReady(false))

	rd, err := e.dp.Flows()
	must(t, err)
	events := make(chan int, 1)
	go func() {
		n := 0
		for {
			_, err := rd.Read()
			if errors.Is(err, ringbuf.ErrClosed) {
				events <- n
				return
			}
			if err == nil {
				n++
			}
		}
	}()

	c0 := mustCounters(t, e.dp)
	const perRound, rounds = 1000, 4
	samples := Latencies{}
	for range rounds {
		for k, v := range connlat(t, e.pod.Cgroup, e.pod.Netns, perRound, "event="+eventDst.String(), "no-event="+excludedDst.String()) {
			samples[k] = append(samples[k], v...)
		}
	}
	// Kernel time per connection, one variant at a time.
	stats, err := ebpf.EnableStats(uint32(unix.BPF_STATS_RUN_TIME))
	must(t, err)
	kernelNs := map[string]float64{}
	const statN = 2000
	for _, v := range []string{"event=" + eventDst.String(), "no-event=" + excludedDst.String()} {
		before := programStats(t, e.pinPath)
		connlat(t, e.pod.Cgroup, e.pod.Netns, statN, v)
		after := programStats(t, e.pinPath)
		name, _, _ := strings.Cut(v, "=")
		kernelNs[name] = float64(after["sl_connect4"].Runtime-before["sl_connect4"].Runtime) / statN
	}
	stats.Close()
	c1 := mustCounters(t, e.dp)
	rd.Close()
	read := <-events
	n := perRound * rounds
	if got := c1.BypassNotReady - c0.BypassNotReady; got != uint64(n+statN) {
		t.Fatalf("%d connections went direct for the proxy not being ready, want %d", got, n)
	}
	if got := c1.Excluded - c0.Excluded; got != uint64(n+statN) {
		t.Fatalf("%d connections excluded, want %d", got, n)
	}
	dropped := c1.FlowDropped - c0.FlowDropped
	if uint64(read)+dropped != uint64(n+statN) {
		t.Errorf("%d events read and %d dropped for %d connections that went direct", read, dropped, n+statN)
	}

	var md strings.Builder
	fmt.Fprintf(&md, "\n## What a flow event costs a connection\n\n")
	fmt.Fprintf(&md, "A fail-open pod with the proxy not ready, %d connections to each of two servers, interleaved: one destination excluded (direct, no event), one not (direct for the proxy not being ready: one flow event each, %d read by a consumer as the agent's, %d dropped).\n\n", n, read, dropped)
	fmt.Fprintf(&md, "| variant | connect p50 | connect p99 | p50 / no event | p99 / no event |\n|---|---|---|---|---|\n")
	for _, v := range []string{"no-event", "event"} {
		fmt.Fprintf(&md, "| %s | %v | %v | %.3f | %.3f |\n", v, pct(samples[v], 0.5), pct(samples[v], 0.99),
			ratio(samples[v], samples["no-event"], 0.5), ratio(samples[v], samples["no-event"], 0.99))
	}
	fmt.Fprintf(&md, "\nconnect4's kernel run time per connection (%d connections each, one variant at a time): %.0f ns with the event, %.0f ns without, %+.0f ns; the event path also checks readiness, the excluded one stops at the exclusion lookup. Redirected connections emit no event and pay nothing.\n",
		statN, kernelNs["event"], kernelNs["no-event"], kernelNs["event"]-kernelNs["no-event"])
	t.Log("\n" + md.String())
	must(t, os.WriteFile(filepath.Join(outDir, "flows.md"), []byte(md.String()), 0o644))
}

func mustCounters(t *testing.T, dp *datapath.Datapath) datapath.Counters {
	t.Helper()
	c, err := dp.Counters()
	must(t, err)
	return c
}
