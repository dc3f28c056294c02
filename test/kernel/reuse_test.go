package kernel

import (
	"encoding/binary"
	"encoding/json"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/sluice-io/sluice/agent/datapath"
	"github.com/sluice-io/sluice/test/layouts"
	"github.com/sluice-io/sluice/test/testbed"
)

// Thousands of short connections from a small pool of source ports, so that
// 4-tuples to the proxy repeat constantly: a selected client (redirected) and
// an unselected one in the same pod connecting to the proxy directly, some
// connections reset before the proxy reads them, and some whose original
// destination the proxy never asks for. The proxy checks every answer against
// what the client says it dialed: no answer may ever be wrong, and when all
// sockets are gone no entry may remain.
func TestPrivilegedTupleReuse(t *testing.T) {
	f := setup(t, 1, "-verify", "-skip-ask-every", "7")
	pod := f.tb.Pods[0]
	f.selectPod(t, pod, 1, datapath.FailClosed)
	other := f.tb.Root.Child(t, "unselected")

	const n = 3000
	proxy := hostport(proxyV4, datapath.DefaultProxyPort)
	common := []string{"-n", fmt.Sprint(n), "-port-base", "41000", "-ports", "12", "-abort-every", "5"}
	var (
		wg                 sync.WaitGroup
		redirected, direct testbed.ReuseStats
	)
	run := func(cg *testbed.Cgroup, out *testbed.ReuseStats, extra ...string) {
		defer wg.Done()
		b := testbed.Run(t, 120*time.Second, cg, pod.Netns, "reuse", append(append([]string{}, common...), extra...)...)
		if err := json.Unmarshal(b, out); err != nil {
			t.Errorf("reuse output %q: %v", b, err)
		}
	}
	wg.Add(2)
	go run(pod.Cgroup, &redirected, "-dst", ext4.String())
	go run(other, &direct, "-direct", proxy)
	wg.Wait()
	t.Logf("redirected client: %+v", redirected)
	t.Logf("direct client:     %+v", direct)

	for name, st := range map[string]testbed.ReuseStats{"redirected": redirected, "direct": direct} {
		if st.Mismatch != 0 {
			t.Errorf("%s client: %d wrong original destinations", name, st.Mismatch)
		}
		if name == "redirected" && st.Unknown != 0 {
			t.Errorf("%s client: %d connections lost their original destination", name, st.Unknown)
		}
		// The clients stop at a time budget, so how many of the n they
		// make depends on the machine (under qemu's emulation with the
		// other core busy, about half). Reuse is exercised once each of
		// the 12 source ports has carried 50 verified connections.
		if st.Match < 12*50 {
			t.Errorf("%s client: only %d verified connections of %d; the test did not exercise reuse", name, st.Match, n)
		}
	}
	recs := f.proxyRecords(t)
	results := map[string]int{}
	for _, r := range recs {
		results[r.Result]++
	}
	t.Logf("proxy verdicts: %v", results)
	if results["mismatch"] != 0 {
		t.Errorf("proxy recorded %d wrong answers", results["mismatch"])
	}
	if results["skipped"] == 0 || results["client-aborted"] == 0 {
		t.Errorf("expected both never-asked and aborted connections, got %v", results)
	}

	// Every socket is closed: nothing may be left in the in-flight maps.
	deadline := time.Now().Add(5 * time.Second)
	for {
		orig, pending, err := f.dp.InFlight()
		if err != nil {
			t.Fatal(err)
		}
		if orig == 0 && pending == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Errorf("entries outlived their sockets: %d original destinations, %d pending tuples", orig, pending)
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// An entry that nobody claimed (the DESIGN's stale-entry hazard: listen
// backlog overflow, a proxy that never asked) must not answer a later,
// unredirected connection that reuses its 4-tuple. The entry is planted in
// the port-keyed form of layouts 1-3, the only one a 4-tuple can reuse.
// On pins upgraded from layout 3 the claim still falls back to that form,
// and the direct connection's own sockops clears it; on a fresh install no
// program consults the form at all (legacy_port_keys), which is what holds
// in the workloads attach scope, where the unselected socket runs nothing.
func TestPrivilegedStaleTupleNeverAnswers(t *testing.T) {
	t.Run("fresh", func(t *testing.T) {
		f := setup(t, 1, "-verify")
		testStaleTuple(t, f, f.cfg.Scope == datapath.ScopeNode)
	})
	t.Run("upgraded-from-layout-3", func(t *testing.T) {
		f := setupOpen(t, 1, datapath.Config{}, func(cfg datapath.Config) (*datapath.Datapath, error) {
			if err := layouts.Install(3, cfg.CgroupPath, cfg.PinPath); err != nil {
				return nil, err
			}
			return datapath.Open(cfg)
		}, "-verify")
		testStaleTuple(t, f, true)
	})
}

// testStaleTuple plants the entry and connects straight to the proxy on
// its port from an unselected cgroup; cleared says whether that
// connection's sockops (node scope) removes the entry.
func testStaleTuple(t *testing.T, f *fixture, cleared bool) {
	pod := f.tb.Pods[0]
	other := f.tb.Root.Child(t, "unselected")

	// Plant an unclaimed entry for pod:42042 -> proxy, as a redirected
	// connection whose proxy side never completed would leave it.
	m := f.pinnedMap(t, "pending_tuples")
	key := make([]byte, 36)
	mapped := func(b []byte, v4 [4]byte) {
		b[10], b[11] = 0xff, 0xff
		copy(b[12:16], v4[:])
	}
	mapped(key[0:16], pod.IPv4.As4())
	mapped(key[16:32], proxyV4.As4())
	binary.NativeEndian.PutUint16(key[32:], 42042)
	binary.NativeEndian.PutUint16(key[34:], datapath.DefaultProxyPort)
	val := make([]byte, 24) // orig_dst: 203.0.113.99:1, AF_INET
	copy(val[0:4], []byte{203, 0, 113, 99})
	binary.BigEndian.PutUint16(val[16:], 1)
	binary.NativeEndian.PutUint16(val[18:], 2)
	if err := m.Put(key, val); err != nil {
		t.Fatal(err)
	}
	before := f.counters(t)

	out := testbed.Run(t, 30*time.Second, other, pod.Netns, "reuse",
		"-n", "1", "-port-base", "42042", "-ports", "1", "-direct", hostport(proxyV4, datapath.DefaultProxyPort))
	var st testbed.ReuseStats
	if err := json.Unmarshal(out, &st); err != nil {
		t.Fatal(err)
	}
	if st.Match != 1 || st.Mismatch != 0 {
		t.Fatalf("direct connection reusing a stale 4-tuple: %+v; want the proxy to get no original destination", st)
	}
	want := uint64(0)
	if cleared {
		want = 1
	}
	if d := f.counters(t).StaleCleared - before.StaleCleared; d != want {
		t.Errorf("stale_cleared counted %d, want %d", d, want)
	}
	var v []byte
	if err := m.Lookup(key, &v); cleared && err == nil {
		t.Errorf("stale entry still present")
	}
}
