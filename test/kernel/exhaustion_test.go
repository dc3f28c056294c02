package kernel

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/json"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/egressd/egressd/agent/datapath"
	"github.com/egressd/egressd/test/testbed"
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
// as the machine allows while a pod makes thousands of redirected
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
	const n = 3000
	b := testbed.Run(t, 180*time.Second, pod.Cgroup, pod.Netns, "reuse", "-n", "3000", "-port-base", "42000", "-ports", "2000", "-dst", ext4.String())
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
	if st.Match+st.Unknown != st.Connected || st.Connected < n/2 {
		t.Errorf("%+v: every connection must be verified or unknown", st)
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
