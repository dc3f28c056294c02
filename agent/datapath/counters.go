package datapath

import (
	"cmp"
	"fmt"
	"reflect"
	"slices"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"
)

// Counters are the datapath's global counters, summed over CPUs. Each field
// counts events since the maps were created (they survive agent restarts).
//
// This struct is the one Go table of counters: each field's tag is the name
// derived from its member of the BPF enum counter (COUNTER_CLAIM_MISSED:
// "claim_missed"), which is also the metric's kind label; the slot each
// field reads is looked up by that name in the compiled object's BTF, so a
// counter renumbered in C needs nothing here, and one added in C without a
// field here fails TestCountersMatchTheBPFEnum.
type Counters struct {
	RedirectedV4     uint64 `counter:"redirected_ipv4"`     // connects rewritten to the IPv4 proxy (v4-mapped included)
	RedirectedV6     uint64 `counter:"redirected_ipv6"`     // connects rewritten to the IPv6 proxy
	Excluded         uint64 `counter:"excluded"`            // selected, destination excluded
	ProxyDirect      uint64 `counter:"proxy_direct"`        // selected, destination is the proxy itself
	FailedClosed     uint64 `counter:"failed_closed"`       // proxy not ready, fail-closed: connect refused
	BypassNotReady   uint64 `counter:"bypass_not_ready"`    // proxy not ready, fail-open: went direct
	OrigStoreFailed  uint64 `counter:"orig_store_failed"`   // original destination could not be stored
	Published        uint64 `counter:"published"`           // client 4-tuple published at ESTABLISHED
	PublishFailed    uint64 `counter:"publish_failed"`      // 4-tuple or claim storage could not be written
	Claimed          uint64 `counter:"claimed"`             // proxy socket claimed its original destination
	ClaimMissed      uint64 `counter:"claim_missed"`        // a socket accepted on the proxy address (any port) with no entry: a direct connection
	StaleCleared     uint64 `counter:"stale_cleared"`       // an unredirected connection cleared a stale entry
	OrigDstAnswered  uint64 `counter:"orig_dst_answered"`   // SO_ORIGINAL_DST answered
	OrigDstUnknown   uint64 `counter:"orig_dst_unknown"`    // SO_ORIGINAL_DST asked on a socket with no entry
	PeernameRewrites uint64 `counter:"peername_rewrites"`   // getpeername answered with the original destination
	DNSAllowed       uint64 `counter:"dns_allowed"`         // selected, DNS to a configured resolver: went direct
	DeniedNonTCP     uint64 `counter:"denied_non_tcp"`      // enforce mode: a non-TCP connect or sendmsg refused
	LeaseExpired     uint64 `counter:"lease_expired"`       // ready flag set but its lease ran out: fail mode applied
	NodeLocalRefused uint64 `counter:"node_local_refused"`  // a never-dial destination, not excluded: connect refused
	ProxyPortRefused uint64 `counter:"proxy_port_refused"`  // the proxy address on a port other than the listener's: refused
	MetadataDirect   uint64 `counter:"metadata_direct"`     // a metadata address, audit mode or granted: went direct
	MetadataRefused  uint64 `counter:"metadata_refused"`    // a metadata address, enforce mode, not granted: refused
	FlowDropped      uint64 `counter:"flow_events_dropped"` // a flow event lost: the flows ring buffer was full
}

// counterSlot is one counter of the BPF enum: its name and its slot in the
// counters array.
type counterSlot struct {
	name  string
	slot  uint32
	field int // index of its Counters field; -1 if Counters has none
}

// counterSlotsOf reads spec's enum counter (COUNTER_MAX aside) in slot
// order, each member matched with its Counters field by name.
func counterSlotsOf(spec *ebpf.CollectionSpec) []counterSlot {
	var e *btf.Enum
	if err := spec.Types.TypeByName("counter", &e); err != nil {
		panic(fmt.Sprintf("datapath: embedded object has no enum counter: %v", err))
	}
	fields := map[string]int{}
	t := reflect.TypeFor[Counters]()
	for i := range t.NumField() {
		fields[t.Field(i).Tag.Get("counter")] = i
	}
	var out []counterSlot
	for _, v := range e.Values {
		if v.Name == "COUNTER_MAX" {
			continue
		}
		name := strings.ToLower(strings.TrimPrefix(v.Name, "COUNTER_"))
		f, ok := fields[name]
		if !ok {
			f = -1
		}
		out = append(out, counterSlot{name: name, slot: uint32(v.Value), field: f})
	}
	slices.SortFunc(out, func(a, b counterSlot) int { return cmp.Compare(a.slot, b.slot) })
	return out
}

// counterSlots are the BPF enum counter's members, from the embedded
// object (objectTables).
func counterSlots() []counterSlot { return tables().counters }

// CounterNames are the stable snake_case names of the datapath's counters,
// in Counters.Values order: the metrics' kind label and `sluice status`.
func CounterNames() []string {
	var out []string
	for _, c := range counterSlots() {
		if c.field >= 0 {
			out = append(out, c.name)
		}
	}
	return out
}

// fields lists the Counters fields in CounterNames order, each with the
// slot it reads.
func (c *Counters) fields() (slots []uint32, ptrs []*uint64) {
	v := reflect.ValueOf(c).Elem()
	for _, s := range counterSlots() {
		if s.field >= 0 {
			slots = append(slots, s.slot)
			ptrs = append(ptrs, v.Field(s.field).Addr().Interface().(*uint64))
		}
	}
	return slots, ptrs
}

// Values returns the counters in CounterNames order.
func (c Counters) Values() []uint64 {
	_, ptrs := c.fields()
	out := make([]uint64, len(ptrs))
	for i, p := range ptrs {
		out[i] = *p
	}
	return out
}

// ByName returns the counters keyed by their CounterNames.
func (c Counters) ByName() map[string]uint64 {
	out := map[string]uint64{}
	names := CounterNames()
	for i, v := range c.Values() {
		out[names[i]] = v
	}
	return out
}

// Counters reads and sums the per-CPU counters.
func (d *Datapath) Counters() (Counters, error) {
	var c Counters
	var perCPU []uint64
	slots, ptrs := c.fields()
	names := CounterNames()
	for i, p := range ptrs {
		if err := d.maps.Counters.Lookup(slots[i], &perCPU); err != nil {
			return c, fmt.Errorf("read counter %s: %w", names[i], err)
		}
		for _, v := range perCPU {
			*p += v
		}
	}
	return c, nil
}

// WorkloadStats are one workload's counters, summed over CPUs.
type WorkloadStats struct {
	Redirected   uint64
	FailedClosed uint64
	Denied       uint64 // enforce mode: non-TCP sockets refused
	NodeLocal    uint64 // never-dial destinations refused (any mode)
	Metadata     uint64 // connects to a metadata address, direct or refused
}

// WorkloadStats reads the per-workload counters, keyed by workload id.
func (d *Datapath) WorkloadStats() (map[uint32]WorkloadStats, error) {
	out := map[uint32]WorkloadStats{}
	var (
		k      uint32
		perCPU []sluiceWorkloadStats
	)
	it := d.maps.WlStats.Iterate()
	for it.Next(&k, &perCPU) {
		var s WorkloadStats
		for _, v := range perCPU {
			s.Redirected += v.Redirected
			s.FailedClosed += v.FailedClosed
			s.Denied += v.Denied
			s.NodeLocal += v.NodeLocal
			s.Metadata += v.Metadata
		}
		out[k] = s
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("read workload counters: %w", err)
	}
	return out, nil
}

// InFlightCapacity is the capacity of the in-flight map (pending_tuples)
// in effect: the one the pinned datapath was created with.
func (d *Datapath) InFlightCapacity() int { return int(d.maps.PendingTuples.MaxEntries()) }

// InFlight reports how many entries the connection-tracking maps hold:
// original destinations kept by cookie in orig_dsts (since layout 5 only
// those of sockets the previous release redirected; 0 on a fresh install:
// a redirected socket keeps its own in its storage), and 4-tuples published
// but not yet claimed by the proxy. Tests and status use it to show that no
// entry outlives its handshake.
func (d *Datapath) InFlight() (origDsts, pendingTuples int, err error) {
	count := func(m *ebpf.Map) (int, error) {
		n := 0
		var k, v []byte
		it := m.Iterate()
		for it.Next(&k, &v) {
			n++
		}
		return n, it.Err()
	}
	if origDsts, err = count(d.maps.OrigDsts); err != nil {
		return 0, 0, fmt.Errorf("count original destinations: %w", err)
	}
	if pendingTuples, err = count(d.maps.PendingTuples); err != nil {
		return 0, 0, fmt.Errorf("count pending tuples: %w", err)
	}
	return origDsts, pendingTuples, nil
}
