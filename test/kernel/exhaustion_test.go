package kernel

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"net/netip"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/sluice-io/sluice/agent/datapath"
	"github.com/sluice-io/sluice/test/harness"
	"github.com/sluice-io/sluice/test/testbed"
)

// junkOrigDst is the original destination of every junk entry: were one
// ever answered, the proxy would report 192.0.2.1:9, a mismatch.
func junkOrigDst(size int) []byte {
	v := make([]byte, size)
	copy(v[0:4], []byte{192, 0, 2, 1})
	binary.BigEndian.PutUint16(v[16:], 9)
	binary.NativeEndian.PutUint16(v[18:], 2) // AF_INET
	return v
}

// flood writes random keys with junk values into m until ctx ends: the
// in-flight maps are kept at capacity, evicting the least recently used.
func flood(ctx context.Context, t *testing.T, m *ebpf.Map, inserted *int) {
	const batch = 1024
	ks, vs := int(m.KeySize()), int(m.ValueSize())
	keys, vals := make([]byte, batch*ks), make([]byte, 0, batch*vs)
	for range batch {
		vals = append(vals, junkOrigDst(vs)...)
	}
	for ctx.Err() == nil {
		rand.Read(keys)
		n, err := m.BatchUpdate(keys, vals, nil)
		if err != nil {
			// Kernels without batch ops: one at a time.
			for i := range batch {
				if m.Put(keys[i*ks:(i+1)*ks], vals[i*vs:(i+1)*vs]) == nil {
					n++
				}
			}
		}
		*inserted += n
	}
}

// The 4-tuple map (pending_tuples, the one in-flight map that can fill:
// original destinations live in each socket's storage) driven to
// exhaustion: junk entries (whose answer would be a wrong destination) are
// written as fast as the machine allows while a pod makes a thousand
// redirected connections. The LRU map stays full and evicts; a connection
// whose entry was evicted reaches the proxy with no known original
// destination, which is counted (orig_dst_unknown) and closed; no
// connection is ever answered a wrong destination.
func TestPrivilegedInFlightMapsExhausted(t *testing.T) {
	f := setup(t, 1, "-verify")
	pod := f.tb.Pods[0]
	f.selectPod(t, pod, 1, datapath.FailClosed)
	m := f.pinnedMap(t, "pending_tuples")
	ctx, cancel := context.WithCancel(context.Background())
	inserted := 0
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); flood(ctx, t, m, &inserted) }()
	// Full before the first connection: twice the capacity in distinct keys
	// fills an LRU map whatever it evicted. (The map cannot be iterated
	// while it changes; inserted is read racily, as a progress hint.)
	for deadline := time.Now().Add(60 * time.Second); inserted < 2*int(m.MaxEntries()); {
		if time.Now().After(deadline) {
			t.Fatalf("only %d junk entries inserted in 60s", inserted)
		}
		time.Sleep(100 * time.Millisecond)
	}
	before := f.counters(t)
	// A count, not a rate: under qemu's emulation with the flood beside it
	// a connection takes about 40 ms, so the budget is generous.
	const n = 1000
	b := testbed.Run(t, 180*time.Second, pod.Cgroup, pod.Netns, "reuse", "-n", strconv.Itoa(n), "-budget", "170s",
		"-port-base", "42000", "-ports", "2000", "-dst", ext4.String())
	cancel()
	wg.Wait()
	orig, pending, err := f.dp.InFlight()
	if err != nil {
		t.Fatal(err)
	}
	if orig != 0 {
		t.Errorf("orig_dsts holds %d entries: layout %d's programs must not write it", orig, datapath.LayoutVersion)
	}
	after := f.counters(t)

	var st testbed.ReuseStats
	if err := json.Unmarshal(b, &st); err != nil {
		t.Fatalf("reuse output %q: %v", b, err)
	}
	unknown := after.OrigDstUnknown - before.OrigDstUnknown
	t.Logf("junk inserted: %d tuples (map at %d of %d after the run)", inserted, pending, m.MaxEntries())
	t.Logf("connections: %+v; orig_dst_unknown +%d, claim_missed +%d, claimed +%d", st, unknown, after.ClaimMissed-before.ClaimMissed, after.Claimed-before.Claimed)
	if st.Mismatch != 0 {
		t.Errorf("%d connections were answered a wrong original destination", st.Mismatch)
	}
	if st.Match+st.Unknown != st.Connected || st.Connected != n {
		t.Errorf("%+v: all %d connections must be made, and each verified or unknown", st, n)
	}
	if unknown != uint64(st.Unknown) {
		t.Errorf("orig_dst_unknown counted %d, the proxy saw %d unknown connections", unknown, st.Unknown)
	}
	// Full but for the entries of the run's own sockets, deleted as they
	// closed after the flood stopped.
	if pending < int(m.MaxEntries())*99/100 {
		t.Errorf("pending_tuples held %d entries after the run, want it full (%d)", pending, m.MaxEntries())
	}
}

// entriesTo counts the entries of m (pending_tuples: struct orig_dst
// values) whose original destination is dst (IPv4); the map must not
// change meanwhile.
func entriesTo(t *testing.T, m *ebpf.Map, dst netip.AddrPort) int {
	t.Helper()
	var k, v []byte
	n := 0
	it := m.Iterate()
	for it.Next(&k, &v) {
		if netip.AddrFrom4([4]byte(v[0:4])) == dst.Addr() && binary.BigEndian.Uint16(v[16:]) == dst.Port() {
			n++
		}
	}
	if err := it.Err(); err != nil {
		t.Fatal(err)
	}
	return n
}

// Live connections' published 4-tuples evicted before the proxy claims
// them: the documented outcome of a full pending_tuples map, forced. (The
// original destinations themselves live in each socket's storage, which
// nothing evicts.) The map is made small (1,024 entries), and the proxy
// defers accepting (TCP_DEFER_ACCEPT): the final ACK of a handshake without
// data is dropped, so a client is established and its entry published
// while the proxy's side, whose creation claims the entry, waits for the
// client's first bytes. Then:
//
//   - k victims connect, are established, and hold, sending nothing;
//   - rounds of 8 × capacity more redirected connections, held the same
//     way, evict their entries (each round runs on the next CPU: the
//     kernel's LRU keeps a CPU's newest entries on that CPU's pending list
//     until that CPU inserts again, and only then can another CPU's inserts
//     evict them, kernel/bpf/bpf_lru_list.c);
//   - the victims send what they dialed. Each reaches the proxy with no
//     entry: claim_missed and orig_dst_unknown count it, the proxy answers
//     "unknown" and would close it; nothing is answered a wrong
//     destination.
func TestPrivilegedInFlightEntryEvicted(t *testing.T) {
	const capacity = datapath.MinInFlightEntries
	f := setupWith(t, 1, datapath.Config{InFlightEntries: capacity})
	pod := f.tb.Pods[0]
	f.selectPod(t, pod, 1, datapath.FailClosed)
	m := f.pinnedMap(t, "pending_tuples")
	if m.MaxEntries() != capacity {
		t.Fatalf("pending_tuples holds %d entries, want the configured %d", m.MaxEntries(), capacity)
	}
	// Every held handshake waits in the deferred listener's queue, whose
	// length the node namespace's somaxconn bounds (Go listens with it).
	f.tb.Node.Sysctl(t, "net.core.somaxconn", "65535")
	const deferred = datapath.DefaultProxyPort + 4
	testbed.StartDaemon(t, f.tb.ProxyCgroup, f.tb.Node, "proxy", "-verify", "-defer-accept", "120",
		"-listen", fmt.Sprintf("%s:%d", proxyV4, deferred), "-records", filepath.Join(t.TempDir(), "deferred.jsonl"))
	if err := f.dp.SetProxy(datapath.Proxy{IPv4: proxyV4, IPv6: proxyV6, Port: deferred}); err != nil {
		t.Fatal(err)
	}

	before := f.counters(t)
	const k = 8
	victim := netip.AddrPortFrom(ext4, serverPort)
	vcmd := testbed.Command(t, pod.Cgroup, pod.Netns, "pending", "-verify", "-n", strconv.Itoa(k), "-dst", victim.Addr().String(),
		"-dst-port-base", strconv.Itoa(int(victim.Port())), "-dst-ports", "1")
	vin, vout := testbed.StartPiped(t, vcmd)
	vlines := bufio.NewReader(vout)
	defer func() { vin.Close(); vcmd.Wait() }()
	if l, _ := vlines.ReadString('\n'); !strings.HasPrefix(l, fmt.Sprintf("READY %d 0", k)) {
		t.Fatalf("victims: %q, want %d connects started", l, k)
	}
	harness.WaitFor(t, "the victims established, their entries published", 10*time.Second, func() bool {
		return f.counters(t).Published-before.Published == k
	})
	if n := entriesTo(t, m, victim); n != k {
		t.Fatalf("%d of the %d victims' entries pending, want all", n, k)
	}
	if c := f.counters(t); c.Claimed != before.Claimed || c.ClaimMissed != before.ClaimMissed {
		t.Fatalf("the deferred proxy's side was created before the victims sent (claimed +%d, claim_missed +%d)",
			c.Claimed-before.Claimed, c.ClaimMissed-before.ClaimMissed)
	}

	// Rounds of 8 × capacity redirected connections, established and
	// held, until every victim's entry is gone.
	const per = 8 * capacity
	started := 0
	for round := 1; entriesTo(t, m, victim) > 0; round++ {
		if round > 4*runtime.NumCPU() {
			t.Fatalf("%d held connections in %d rounds over %d CPUs left %d of the %d victims' entries", started, round-1, runtime.NumCPU(), entriesTo(t, m, victim), k)
		}
		published := f.counters(t).Published
		cmd := testbed.Command(t, pod.Cgroup, pod.Netns, "pending", "-n", strconv.Itoa(per), "-dst", ext4.String(),
			"-cpu", strconv.Itoa((round-1)%runtime.NumCPU()))
		stdin, stdout := testbed.StartPiped(t, cmd)
		line, _ := bufio.NewReader(stdout).ReadString('\n')
		if !strings.HasPrefix(line, fmt.Sprintf("READY %d 0", per)) {
			stdin.Close()
			cmd.Wait()
			t.Fatalf("held connects reported %q, want all %d started", line, per)
		}
		harness.WaitFor(t, "a round's connections established", 60*time.Second, func() bool {
			return f.counters(t).Published-published == per
		})
		left := entriesTo(t, m, victim)
		stdin.Close() // resets them all; their CLOSE callbacks delete their entries
		if err := cmd.Wait(); err != nil {
			t.Fatalf("held connects: %v", err)
		}
		started += per
		t.Logf("round %d: %d redirected connections held, %d of %d victims' entries left", round, per, left, k)
	}

	vin.Close()
	vres, _ := vlines.ReadString('\n')
	if err := vcmd.Wait(); err != nil {
		t.Fatalf("victims: %v", err)
	}
	var st testbed.ReuseStats
	if err := json.Unmarshal([]byte(vres), &st); err != nil {
		t.Fatalf("victims' output %q: %v", vres, err)
	}
	after := f.counters(t)
	d := func(a, b uint64) uint64 { return a - b }
	t.Logf("victims %+v; redirected +%d, published +%d, claimed +%d, claim_missed +%d, orig_dst_unknown +%d",
		st, d(after.RedirectedV4, before.RedirectedV4), d(after.Published, before.Published),
		d(after.Claimed, before.Claimed), d(after.ClaimMissed, before.ClaimMissed), d(after.OrigDstUnknown, before.OrigDstUnknown))
	if st.Mismatch != 0 {
		t.Errorf("%d connections were answered a wrong original destination", st.Mismatch)
	}
	if st.Connected != k || st.Unknown != k {
		t.Errorf("victims %+v: want all %d connected and unknown to the proxy", st, k)
	}
	wantCounted(t, before, after, map[string]uint64{
		"redirected_ipv4": uint64(k + started), "published": uint64(k + started),
		"claimed": 0, "claim_missed": k, "orig_dst_unknown": k, "orig_dst_answered": 0})
}

// From the attacker's side: the original destination is kept in the
// connecting socket's storage, which the kernel charges to the socket's
// option memory (net.core.optmem_max), and a pod can fill that memory
// itself, here with TCP MD5 keys. Such a socket's connect is refused,
// whatever the pod's fail mode: letting it go direct would be a way around
// the proxy. Counted orig_store_failed, logged refused_store_failed, and
// nothing arrives at the destination or the proxy. The same filled socket
// in an unselected cgroup connects, so the refusal is the datapath's.
func TestPrivilegedOptionMemoryFullIsRefused(t *testing.T) {
	f := setup(t, 2)
	open, closed := f.tb.Pods[0], f.tb.Pods[1]
	f.selectPod(t, open, 1, datapath.FailOpen)
	f.selectPod(t, closed, 2, datapath.FailClosed)
	rd, err := f.dp.Flows()
	if err != nil {
		t.Fatal(err)
	}
	defer rd.Close()
	dst := netip.AddrPortFrom(ext4, serverPort)
	spec := "tcp4:" + dst.String()
	before := f.counters(t)
	arrived, proxied := len(f.echo.Peers()), len(f.proxyRecords(t))
	cookies := map[uint64]*testbed.Pod{}
	for _, p := range []*testbed.Pod{open, closed} {
		r := testbed.Dial(t, testbed.Run(t, 30*time.Second, p.Cgroup, p.Netns, "client", "-fill-optmem", spec))[0]
		if r.MD5Keys == 0 {
			t.Fatalf("%s: no MD5 key added before the option memory was full: %+v", p.Name, r)
		}
		if !strings.Contains(r.Err, "operation not permitted") {
			t.Errorf("%s (%d MD5 keys filling its option memory): %+v, want EPERM", p.Name, r.MD5Keys, r)
		}
		cookies[r.Cookie] = p
	}
	wantCounted(t, before, f.counters(t), map[string]uint64{
		"orig_store_failed": 2, "redirected_ipv4": 0, "bypass_not_ready": 0, "failed_closed": 0})
	if n := len(f.echo.Peers()) - arrived; n != 0 {
		t.Errorf("%d connections arrived at the destination from sockets whose original destination could not be stored", n)
	}
	if n := len(f.proxyRecords(t)) - proxied; n != 0 {
		t.Errorf("the proxy got %d connections", n)
	}
	for len(cookies) > 0 {
		rd.SetDeadline(time.Now().Add(2 * time.Second))
		fl, err := rd.Read()
		if err != nil {
			t.Fatalf("flow events: %v; no event for %d refused sockets", err, len(cookies))
		}
		p, ok := cookies[fl.Cookie]
		if !ok {
			continue
		}
		delete(cookies, fl.Cookie)
		if fl.Decision.String() != "refused_store_failed" || fl.Dst != dst {
			t.Errorf("%s: flow event %s to %v, want refused_store_failed to %v", p.Name, fl.Decision, fl.Dst, dst)
		}
	}

	// What the storage costs a redirected socket, and that it is what the
	// kernel charges: an unselected socket has none.
	other := f.tb.Root.Child(t, "unselected")
	redirected := f.dial(t, open.Cgroup, open, spec)[0]
	direct := f.dial(t, other, open, spec)[0]
	t.Logf("option memory in use: redirected socket %d bytes, unselected %d", redirected.OptMem, direct.OptMem)
	if redirected.Reply != "peer="+testbed.NodeV4.String() || redirected.OptMem == 0 || direct.OptMem != 0 {
		t.Errorf("redirected %+v, unselected %+v: want the redirected socket's storage charged to its option memory, none on the other", redirected, direct)
	}

	// Control: the same filled socket, unselected, connects directly.
	r := testbed.Dial(t, testbed.Run(t, 30*time.Second, other, open.Netns, "client", "-fill-optmem", spec))[0]
	if r.MD5Keys == 0 || r.Reply != "peer="+open.IPv4.String() {
		t.Errorf("unselected, option memory full: %+v, want it direct", r)
	}
}
