package bench

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestPrivilegedBenchConntrackClash measures redirected connections under
// conntrack's clash resolution: with conntrack and NAT on in the node's
// namespace (as kube-proxy has it), eBPF-redirected connections are
// interleaved with connections that conntrack DNATs to the same proxy
// endpoint (here: the pod dialling an nftables DNAT destination, and
// dialling the proxy address itself); some get a source port the other kind
// already holds in conntrack, and NAT moves it, so the proxy sees a port the
// client never had. Layouts 1-3 keyed the in-flight entry by that port and
// lost those connections' original destinations (4-9% in the DNAT row);
// the sequence-number key keeps them. Reported here under load;
// TestPrivilegedConntrackNATMovesPort (test/kernel) asserts it.
func TestPrivilegedBenchConntrackClash(t *testing.T) {
	outDir := benchOut(t)
	nft := tool(t, "nft")
	e := setupBench(t, "-sink")
	applyScale(t, e.dp, e.cgid, scales[0])
	t.Cleanup(func() { nftDelete(nft, e.tb.Node) })
	const n = 4000
	var md strings.Builder
	fmt.Fprintf(&md, "\n## Redirected connections whose source port conntrack's NAT moves\n\n")
	fmt.Fprintf(&md, "%d redirected connections per row, with the nftables set table loaded (conntrack and NAT on), interleaved with the others of the row.\n\n", n)
	fmt.Fprintf(&md, "| interleaved with | redirected | original destination answered | lost |\n|---|---|---|---|\n")
	nftLoad(t, nft, e.tb.Node, nftSetRuleset(scales[0], e.pod.IPv4))
	for _, row := range []struct {
		name     string
		variants []string
	}{
		{"nothing", nil},
		{"the pod dialling the proxy address", []string{"direct-conntrack=" + e.proxy}},
		{"the pod's nftables-DNAT connections", []string{"nftables-set=203.0.113.8:8080"}},
	} {
		c0 := mustCounters(t, e.dp)
		connlat(t, e.pod.Cgroup, e.pod.Netns, n, append([]string{"ebpf-conntrack=203.0.113.7:8080"}, row.variants...)...)
		c1 := mustCounters(t, e.dp)
		red, ans := c1.RedirectedV4-c0.RedirectedV4, c1.OrigDstAnswered-c0.OrigDstAnswered
		fmt.Fprintf(&md, "| %s | %d | %d | %.1f%% |\n", row.name, red, ans, 100*float64(red-ans)/float64(max(red, 1)))
	}
	t.Log("\n" + md.String())
	must(t, os.WriteFile(filepath.Join(outDir, "clash.md"), []byte(md.String()), 0o644))
}
