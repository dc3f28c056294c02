package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/cilium/ebpf/ringbuf"
	"github.com/sluice-io/sluice/agent/datapath"
)

// FlowLine is one line of the flow log: a decision the datapath made about
// a selected workload's connection, socket or datagram that did not reach
// the proxy (the proxy's access log has the rest). `sluice flows` reads
// these lines (Type "flow") out of any stream.
type FlowLine struct {
	Time       time.Time `json:"time"`
	Type       string    `json:"type"` // "flow"
	Namespace  string    `json:"namespace,omitempty"`
	Pod        string    `json:"pod,omitempty"`
	WorkloadID uint32    `json:"workload_id"`
	// Destination is ip:port; empty for a socket refused at socket().
	Destination string `json:"destination,omitempty"`
	Protocol    string `json:"protocol"`
	Decision    string `json:"decision"`
	// Direct: the connection went out directly (else it was refused).
	Direct   bool   `json:"direct"`
	Cookie   uint64 `json:"cookie"`
	CgroupID uint64 `json:"cgroup_id"`
}

// FlowLineOf turns a datapath flow into a line; name is the workload's
// "namespace/name" ("" when the agent no longer knows the id).
func FlowLineOf(f datapath.Flow, name string) FlowLine {
	l := FlowLine{Time: f.Time.UTC(), Type: "flow", WorkloadID: f.WorkloadID, Protocol: f.ProtocolName(),
		Decision: f.Decision.String(), Direct: f.Decision.Direct(), Cookie: f.Cookie, CgroupID: f.CgroupID}
	l.Namespace, l.Pod, _ = strings.Cut(name, "/")
	if f.Dst.IsValid() {
		l.Destination = f.Dst.String()
	}
	return l
}

// runFlowLog writes every flow event of dp to w, one JSON line each, until
// ctx ends. Events the ring buffer could not hold are counted by the
// datapath (flow_events_dropped); a write error is logged and the reader
// goes on.
func runFlowLog(ctx context.Context, dp *datapath.Datapath, nameOf func(uint32) string, w io.Writer, log *slog.Logger) {
	rd, err := dp.Flows()
	if err != nil {
		log.Error("no flow log", "error", err)
		return
	}
	go func() { <-ctx.Done(); rd.Close() }()
	enc := json.NewEncoder(w)
	failing := false
	for {
		f, err := rd.Read()
		if errors.Is(err, ringbuf.ErrClosed) {
			return
		}
		if err != nil {
			log.Warn("flow event", "error", err)
			continue
		}
		if err := enc.Encode(FlowLineOf(f, nameOf(f.WorkloadID))); err != nil {
			if !failing {
				log.Error("write flow log", "error", err)
			}
			failing = true
			continue
		}
		failing = false
	}
}

// openFlowLog opens --flow-log: "-" is stdout, "" none, else a file that
// is rotated (one previous file kept, as PATH.1) when it exceeds max bytes.
func openFlowLog(path string, max int64) (io.Writer, func() error, error) {
	switch path {
	case "":
		return nil, func() error { return nil }, nil
	case "-":
		return os.Stdout, func() error { return nil }, nil
	}
	r := &rotatingFile{path: path, max: max}
	if err := r.open(); err != nil {
		return nil, nil, fmt.Errorf("flow log: %w", err)
	}
	return r, r.Close, nil
}

// rotatingFile appends to path, moving it to path.1 when it reaches max
// bytes: the flow log never holds more than about twice max.
type rotatingFile struct {
	path string
	max  int64
	mu   sync.Mutex
	f    *os.File
	size int64
}

func (r *rotatingFile) open() error {
	f, err := os.OpenFile(r.path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return err
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return err
	}
	r.f, r.size = f, st.Size()
	return nil
}

func (r *rotatingFile) Write(b []byte) (int, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.max > 0 && r.size+int64(len(b)) > r.max && r.size > 0 {
		r.f.Close()
		if err := os.Rename(r.path, r.path+".1"); err != nil {
			return 0, err
		}
		if err := r.open(); err != nil {
			return 0, err
		}
	}
	n, err := r.f.Write(b)
	r.size += int64(n)
	return n, err
}

func (r *rotatingFile) Close() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.f.Close()
}
