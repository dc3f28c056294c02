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

// The original-destination and 4-tuple maps driven to exhaustion: junk
// entries (whose answer would be a wrong destination) are written as fast
// as the machine allows while a pod makes a thousand redirected
// connections. The LRU maps stay full and evict; a connection whose entry
// was evicted reaches the proxy with no known original destination, which
// is counted (orig_dst_unknown) and closed; no connection is ever answered
// a wrong destination.
func TestPrivilegedInFlightMapsExhausted(t *testing.T) {
	f := setup(t, 1, "-verify")
	pod := f.tb.Pods[0]
	f.selectPod(t, pod, 1, datapath.FailClosed)
	var maps []*ebpf.Map
	for _, name := range []string{"orig_dsts", "pending_tuples"} {
		m, err := ebpf.LoadPinnedMap(filepath.Join(f.cfg.PinPath, name), nil)
		if err != nil {
			t.Fatal(err)
		}
		defer m.Close()
		maps = append(maps, m)
	}
	ctx, cancel := context.WithCancel(context.Background())
	inserted := make([]int, len(maps))
	var wg sync.WaitGroup
	for i, m := range maps {
		wg.Add(1)
		go func() { defer wg.Done(); flood(ctx, t, m, &inserted[i]) }()
	}
	// Full before the first connection: twice the capacity in distinct keys
	// fills an LRU map whatever it evicted. (The maps cannot be iterated
	// while they change; inserted is read racily, as a progress hint.)
	for i, m := range maps {
		for deadline := time.Now().Add(60 * time.Second); inserted[i] < 2*int(m.MaxEntries()); {
			if time.Now().After(deadline) {
				t.Fatalf("map %d: only %d junk entries inserted in 60s", i, inserted[i])
			}
			time.Sleep(100 * time.Millisecond)
		}
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
	full := []int{orig, pending}
	after := f.counters(t)

	var st testbed.ReuseStats
	if err := json.Unmarshal(b, &st); err != nil {
		t.Fatalf("reuse output %q: %v", b, err)
	}
	unknown := after.OrigDstUnknown - before.OrigDstUnknown
	t.Logf("junk inserted: %d original destinations, %d tuples (maps at %v of %d after the run)", inserted[0], inserted[1], full, maps[0].MaxEntries())
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
	for i, m := range maps {
		// Full but for the entries of the run's own sockets, deleted as
		// they closed after the flood stopped.
		if full[i] < int(m.MaxEntries())*99/100 {
			t.Errorf("map %d held %d entries after the run, want it full (%d)", i, full[i], m.MaxEntries())
		}
	}
}

// origDstsTo counts the entries of orig_dsts whose original destination is
// dst (IPv4); the map must not change meanwhile.
func origDstsTo(t *testing.T, m *ebpf.Map, dst netip.AddrPort) int {
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

// Live connections' original destinations evicted before their handshakes
// complete: the documented outcome of a full orig_dsts map, forced. The
// in-flight maps are made small (1,024 entries). The pod's gateway
// neighbour points at a MAC nobody has, so k connects have run connect4 (an
// entry each) while their SYNs are dropped and retransmitted. Then:
//
//   - junk written from user space, four times the capacity, evicts none of
//     them: the kernel's LRU keeps entries a program has looked up (every
//     redirected connect is) over entries never used;
//   - real redirected connects, also held in SYN-SENT, evict them (eight
//     times the capacity has evicted all of them in one round on every run
//     so far; three times, about half);
//   - the neighbour is restored and the handshakes complete. Each reaches
//     the proxy with no original destination: claim_missed and
//     orig_dst_unknown count it, the proxy closes it, and nothing is ever
//     answered a wrong destination.
func TestPrivilegedInFlightEntryEvicted(t *testing.T) {
	const capacity = datapath.MinInFlightEntries
	f := setupWith(t, 1, datapath.Config{InFlightEntries: capacity}, "-verify")
	pod := f.tb.Pods[0]
	f.selectPod(t, pod, 1, datapath.FailClosed)
	m, err := ebpf.LoadPinnedMap(filepath.Join(f.cfg.PinPath, "orig_dsts"), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if m.MaxEntries() != capacity {
		t.Fatalf("orig_dsts holds %d entries, want the configured %d", m.MaxEntries(), capacity)
	}
	gw4 := pod.IPv4.As4()
	gw4[3] = 1 // the testbed's pod gateway, x.y.z.1
	gw := netip.AddrFrom4(gw4).String()
	pod.Netns.IP(t, "neigh", "replace", gw, "lladdr", "02:00:00:00:00:01", "dev", "eth0", "nud", "permanent")
	restored := false
	restore := func() {
		if !restored {
			restored = true
			pod.Netns.IP(t, "neigh", "del", gw, "dev", "eth0")
		}
	}

	before := f.counters(t)
	const k = 8
	victim := netip.AddrPortFrom(ext4, serverPort)
	outs := make([][]byte, k)
	errs := make([]error, k)
	var wg sync.WaitGroup
	defer wg.Wait()
	defer restore() // before waiting for the clients
	for i := range k {
		cmd := testbed.Command(t, pod.Cgroup, pod.Netns, "reuse", "-n", "1", "-port-base", strconv.Itoa(43000+i), "-ports", "1",
			"-dst", victim.Addr().String(), "-dst-port-base", strconv.Itoa(int(victim.Port())), "-dst-ports", "1")
		wg.Add(1)
		go func() { defer wg.Done(); outs[i], errs[i] = cmd.Output() }()
	}
	for deadline := time.Now().Add(20 * time.Second); origDstsTo(t, m, victim) < k; time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("only %d of %d connects stored an original destination in 20s", origDstsTo(t, m, victim), k)
		}
	}
	if c := f.counters(t); c.Published != before.Published {
		t.Fatalf("a connection was established while its SYNs were to be dropped")
	}

	// Junk never looked up by a program does not push them out.
	ctx, cancel := context.WithCancel(context.Background())
	inserted := 0
	done := make(chan struct{})
	go func() { defer close(done); flood(ctx, t, m, &inserted) }()
	for deadline := time.Now().Add(60 * time.Second); inserted < 4*capacity && time.Now().Before(deadline); {
		time.Sleep(10 * time.Millisecond)
	}
	cancel()
	<-done
	if inserted < 4*capacity {
		t.Fatalf("only %d junk entries inserted in 60s, want %d", inserted, 4*capacity)
	}
	if n := origDstsTo(t, m, victim); n != k {
		t.Errorf("%d junk entries (never looked up) evicted %d of the %d live ones; the LRU should keep used entries", inserted, k-n, k)
	}

	// Real redirected connects do: rounds of 8 × capacity held in
	// SYN-SENT (then closed) until every live entry is gone. Each round
	// runs on the next CPU: the kernel's LRU keeps a CPU's newest entries
	// on that CPU's pending list until that CPU inserts again, and only
	// then can another CPU's inserts evict them (kernel/bpf/bpf_lru_list.c),
	// so connects all on one CPU leave live entries made on another in
	// place (seen here: 4 of 8, round after round).
	started := 0
	for round := 1; origDstsTo(t, m, victim) > 0; round++ {
		if round > 4*runtime.NumCPU() {
			t.Fatalf("%d redirected connects in %d rounds over %d CPUs left %d of the %d live entries", started, round-1, runtime.NumCPU(), origDstsTo(t, m, victim), k)
		}
		cmd := testbed.Command(t, pod.Cgroup, pod.Netns, "pending", "-n", strconv.Itoa(8*capacity), "-dst", ext4.String(),
			"-cpu", strconv.Itoa((round-1)%runtime.NumCPU()))
		stdin, stdout := testbed.StartPiped(t, cmd)
		line, _ := bufio.NewReader(stdout).ReadString('\n')
		left := origDstsTo(t, m, victim)
		stdin.Close()
		if err := cmd.Wait(); err != nil {
			t.Fatalf("pending connects: %v", err)
		}
		if !strings.HasPrefix(line, fmt.Sprintf("READY %d 0", 8*capacity)) {
			t.Fatalf("pending connects reported %q, want all %d started", line, 8*capacity)
		}
		started += 8 * capacity
		t.Logf("round %d: %d redirected connects held, %d of %d live entries left", round, 8*capacity, left, k)
	}

	restore()
	wg.Wait()
	after := f.counters(t)
	var total testbed.ReuseStats
	for i := range k {
		if errs[i] != nil {
			t.Fatalf("client %d: %v", i, errs[i])
		}
		var st testbed.ReuseStats
		if err := json.Unmarshal(outs[i], &st); err != nil {
			t.Fatalf("client %d output %q: %v", i, outs[i], err)
		}
		total.Connected += st.Connected
		total.Match += st.Match
		total.Mismatch += st.Mismatch
		total.Unknown += st.Unknown
		total.NoAnswer += st.NoAnswer
		total.Errors += st.Errors
	}
	d := func(a, b uint64) uint64 { return a - b }
	t.Logf("victims %+v; redirected +%d, published +%d, claim_missed +%d, orig_dst_unknown +%d",
		total, d(after.RedirectedV4, before.RedirectedV4), d(after.Published, before.Published),
		d(after.ClaimMissed, before.ClaimMissed), d(after.OrigDstUnknown, before.OrigDstUnknown))
	if total.Mismatch != 0 {
		t.Errorf("%d connections were answered a wrong original destination", total.Mismatch)
	}
	if total.Connected != k || total.Unknown != k {
		t.Errorf("victims %+v: want all %d connected and unknown to the proxy", total, k)
	}
	if got := d(after.RedirectedV4, before.RedirectedV4); got != uint64(k+started) {
		t.Errorf("redirected counted %d, want %d", got, k+started)
	}
	if got := d(after.OrigDstUnknown, before.OrigDstUnknown); got != k {
		t.Errorf("orig_dst_unknown counted %d, want %d", got, k)
	}
	if got := d(after.ClaimMissed, before.ClaimMissed); got != k {
		t.Errorf("claim_missed counted %d, want %d: the proxy side found no published entry", got, k)
	}
	if got := d(after.Published, before.Published); got != 0 {
		t.Errorf("published counted %d, want 0: nothing was left to publish", got)
	}
}
