package datapath

import (
	"fmt"

	"github.com/cilium/ebpf"
)

// Counters are the datapath's global counters, summed over CPUs. Each field
// counts events since the maps were created (they survive agent restarts).
type Counters struct {
	RedirectedV4     uint64 // connects rewritten to the IPv4 proxy (v4-mapped included)
	RedirectedV6     uint64 // connects rewritten to the IPv6 proxy
	Excluded         uint64 // selected, destination excluded
	ProxyDirect      uint64 // selected, destination is the proxy itself
	FailedClosed     uint64 // proxy not ready, fail-closed: connect refused
	BypassNotReady   uint64 // proxy not ready, fail-open: went direct
	OrigStoreFailed  uint64 // original destination could not be stored
	Published        uint64 // client 4-tuple published at ESTABLISHED
	PublishFailed    uint64 // 4-tuple or claim storage could not be written
	Claimed          uint64 // proxy socket claimed its original destination
	ClaimMissed      uint64 // a socket accepted on the proxy address (any port) with no entry: a direct connection
	StaleCleared     uint64 // an unredirected connection cleared a stale entry
	OrigDstAnswered  uint64 // SO_ORIGINAL_DST answered
	OrigDstUnknown   uint64 // SO_ORIGINAL_DST asked on a socket with no entry
	PeernameRewrites uint64 // getpeername answered with the original destination
	DNSAllowed       uint64 // selected, DNS to a configured resolver: went direct
	DeniedNonTCP     uint64 // enforce mode: a non-TCP connect or sendmsg refused
	LeaseExpired     uint64 // ready flag set but its lease ran out: fail mode applied
	NodeLocalRefused uint64 // a never-dial destination, not excluded: connect refused
	ProxyPortRefused uint64 // the proxy address on a port other than the listener's: refused
	MetadataDirect   uint64 // a metadata address, audit mode or granted: went direct
	MetadataRefused  uint64 // a metadata address, enforce mode, not granted: refused
	FlowDropped      uint64 // a flow event lost: the flows ring buffer was full
}

// fields lists the counters in the order of the BPF enum counter.
func (c *Counters) fields() []*uint64 {
	return []*uint64{
		sluiceCounterCOUNTER_REDIRECTED_V4:      &c.RedirectedV4,
		sluiceCounterCOUNTER_REDIRECTED_V6:      &c.RedirectedV6,
		sluiceCounterCOUNTER_EXCLUDED:           &c.Excluded,
		sluiceCounterCOUNTER_PROXY_DIRECT:       &c.ProxyDirect,
		sluiceCounterCOUNTER_FAILED_CLOSED:      &c.FailedClosed,
		sluiceCounterCOUNTER_BYPASS_NOT_READY:   &c.BypassNotReady,
		sluiceCounterCOUNTER_ORIG_STORE_FAILED:  &c.OrigStoreFailed,
		sluiceCounterCOUNTER_PUBLISHED:          &c.Published,
		sluiceCounterCOUNTER_PUBLISH_FAILED:     &c.PublishFailed,
		sluiceCounterCOUNTER_CLAIMED:            &c.Claimed,
		sluiceCounterCOUNTER_CLAIM_MISSED:       &c.ClaimMissed,
		sluiceCounterCOUNTER_STALE_CLEARED:      &c.StaleCleared,
		sluiceCounterCOUNTER_ORIG_ANSWERED:      &c.OrigDstAnswered,
		sluiceCounterCOUNTER_ORIG_UNKNOWN:       &c.OrigDstUnknown,
		sluiceCounterCOUNTER_PEER_REWRITTEN:     &c.PeernameRewrites,
		sluiceCounterCOUNTER_DNS_ALLOWED:        &c.DNSAllowed,
		sluiceCounterCOUNTER_DENIED_NON_TCP:     &c.DeniedNonTCP,
		sluiceCounterCOUNTER_LEASE_EXPIRED:      &c.LeaseExpired,
		sluiceCounterCOUNTER_NODE_LOCAL_REFUSED: &c.NodeLocalRefused,
		sluiceCounterCOUNTER_PROXY_PORT_REFUSED: &c.ProxyPortRefused,
		sluiceCounterCOUNTER_METADATA_DIRECT:    &c.MetadataDirect,
		sluiceCounterCOUNTER_METADATA_REFUSED:   &c.MetadataRefused,
		sluiceCounterCOUNTER_FLOW_DROPPED:       &c.FlowDropped,
	}
}

// CounterNames are stable snake_case names of the Counters fields, in the
// same order as Counters.Values; metrics and `sluice status` use them.
var CounterNames = []string{
	"redirected_ipv4", "redirected_ipv6", "excluded", "proxy_direct",
	"failed_closed", "bypass_not_ready", "orig_store_failed", "published",
	"publish_failed", "claimed", "claim_missed", "stale_cleared",
	"orig_dst_answered", "orig_dst_unknown", "peername_rewrites",
	"dns_allowed", "denied_non_tcp", "lease_expired",
	"node_local_refused", "proxy_port_refused", "metadata_direct", "metadata_refused",
	"flow_events_dropped",
}

// Values returns the counters in CounterNames order.
func (c Counters) Values() []uint64 {
	var out []uint64
	for _, p := range c.fields() {
		out = append(out, *p)
	}
	return out
}

// Counters reads and sums the per-CPU counters.
func (d *Datapath) Counters() (Counters, error) {
	var c Counters
	var perCPU []uint64
	for i, p := range c.fields() {
		if err := d.maps.Counters.Lookup(uint32(i), &perCPU); err != nil {
			return c, fmt.Errorf("read counter %s: %w", CounterNames[i], err)
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

// InFlightCapacity is the capacity of each in-flight map in effect: the
// one the pinned datapath was created with.
func (d *Datapath) InFlightCapacity() int { return int(d.maps.OrigDsts.MaxEntries()) }

// InFlight reports how many entries the connection-tracking maps hold: the
// original destinations of open redirected sockets, and 4-tuples published
// but not yet claimed by the proxy. Tests and status use it to show that no
// entry outlives its socket.
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
