package datapath

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"os"
	"strings"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"
	"github.com/cilium/ebpf/ringbuf"
	"golang.org/x/sys/unix"
)

// Flow is one decision the datapath made about a selected workload's
// connection, socket or datagram that did not reach the proxy (a
// struct flow_event from the flows ring buffer). Redirected connections
// are the proxy's to log.
type Flow struct {
	Time       time.Time
	Cookie     uint64 // the socket's cookie (SO_COOKIE)
	CgroupID   uint64 // the calling task's cgroup
	WorkloadID uint32
	// Dst is the destination; invalid for a socket refused at socket().
	Dst      netip.AddrPort
	Protocol uint8 // IPPROTO_*
	Decision FlowDecision
}

// FlowDecision is a value of the BPF enum flow_decision.
type FlowDecision uint8

// String is the decision's name, derived from the compiled enum
// (FLOW_DIRECT_NOT_READY: "direct_not_ready"), so C and Go cannot drift.
func (d FlowDecision) String() string {
	if n, ok := tables().flowNames[d]; ok {
		return n
	}
	return fmt.Sprintf("decision_%d", uint8(d))
}

// FlowDecisionNames maps every flow decision to its name, from the BTF of
// the embedded object.
func FlowDecisionNames() map[FlowDecision]string { return maps.Clone(tables().flowNames) }

// flowNamesOf reads spec's enum flow_decision.
func flowNamesOf(spec *ebpf.CollectionSpec) map[FlowDecision]string {
	out := map[FlowDecision]string{}
	var e *btf.Enum
	if err := spec.Types.TypeByName("flow_decision", &e); err != nil {
		panic(fmt.Sprintf("datapath: embedded object has no enum flow_decision: %v", err))
	}
	for _, v := range e.Values {
		out[FlowDecision(v.Value)] = strings.ToLower(strings.TrimPrefix(v.Name, "FLOW_"))
	}
	return out
}

// Direct says whether the decision let the connection go out directly
// (else it was refused).
func (d FlowDecision) Direct() bool { return strings.HasPrefix(d.String(), "direct_") }

// ProtocolName is "tcp", "udp" or the IP protocol number.
func (f Flow) ProtocolName() string {
	switch f.Protocol {
	case unix.IPPROTO_TCP:
		return "tcp"
	case unix.IPPROTO_UDP:
		return "udp"
	case unix.IPPROTO_UDPLITE:
		return "udplite"
	case unix.IPPROTO_ICMP:
		return "icmp"
	case unix.IPPROTO_ICMPV6:
		return "icmpv6"
	case unix.IPPROTO_SCTP:
		return "sctp"
	}
	return fmt.Sprint(f.Protocol)
}

// FlowReader reads the flows ring buffer. One reader per datapath: the
// agent's.
type FlowReader struct {
	rd *ringbuf.Reader
	// monoToWall turns bpf_ktime_get_ns (CLOCK_MONOTONIC) into wall time.
	monoToWall time.Duration
	rec        ringbuf.Record
	deadline   time.Time
}

// Flows opens the flows ring buffer for reading. Pins of a layout without
// it (a downgrade kept older maps) have none: an error.
func (d *Datapath) Flows() (*FlowReader, error) {
	if d.maps.Flows == nil {
		return nil, errors.New("the pinned datapath has no flows ring buffer")
	}
	rd, err := ringbuf.NewReader(d.maps.Flows)
	if err != nil {
		return nil, fmt.Errorf("flows ring buffer: %w", err)
	}
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		rd.Close()
		return nil, err
	}
	return &FlowReader{rd: rd, monoToWall: time.Duration(time.Now().UnixNano() - ts.Nano())}, nil
}

// FlowPollInterval is how often a FlowReader looks for events: the
// programs submit them without waking the reader (a wakeup per event cost
// a connection about 18 µs in connect4, measured by make bench), so it
// polls. The ring holds 16384 events: up to ~160,000 events/s are read
// without a drop.
const FlowPollInterval = 100 * time.Millisecond

// Read blocks until the next flow event (or Close: ringbuf.ErrClosed; or
// the deadline: os.ErrDeadlineExceeded).
func (r *FlowReader) Read() (Flow, error) {
	for {
		d := time.Now().Add(FlowPollInterval)
		if !r.deadline.IsZero() && r.deadline.Before(d) {
			d = r.deadline
		}
		r.rd.SetDeadline(d)
		err := r.rd.ReadInto(&r.rec)
		if errors.Is(err, os.ErrDeadlineExceeded) && (r.deadline.IsZero() || time.Now().Before(r.deadline)) {
			continue
		}
		if err != nil {
			return Flow{}, err
		}
		return decodeFlow(r.rec.RawSample, r.monoToWall)
	}
}

// SetDeadline makes Read return os.ErrDeadlineExceeded after t (zero: no
// deadline).
func (r *FlowReader) SetDeadline(t time.Time) { r.deadline = t }

// Close stops the reader; a blocked Read returns.
func (r *FlowReader) Close() error { return r.rd.Close() }

// decodeFlow decodes a struct flow_event into bpf2go's mirror of it.
func decodeFlow(b []byte, monoToWall time.Duration) (Flow, error) {
	var ev sluiceFlowEvent
	if err := binary.Read(bytes.NewReader(b), binary.LittleEndian, &ev); err != nil {
		return Flow{}, fmt.Errorf("flow event of %d bytes: %w", len(b), err)
	}
	f := Flow{
		Time:       time.Unix(0, int64(ev.TimeNs)+int64(monoToWall)),
		Cookie:     ev.Cookie,
		CgroupID:   ev.CgroupId,
		Protocol:   ev.Protocol,
		Decision:   FlowDecision(ev.Decision),
		WorkloadID: ev.WorkloadId,
	}
	port := fromBE16(ev.Port)
	if ev.Addr != [4]uint32{} || port != 0 {
		a := wordsAddr6(ev.Addr)
		if ev.V4 != 0 {
			a = a.Unmap()
		}
		f.Dst = netip.AddrPortFrom(a, port)
	}
	return f, nil
}
