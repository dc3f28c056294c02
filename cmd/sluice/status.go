package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"slices"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/sluice-io/sluice/agent"
	"github.com/sluice-io/sluice/agent/datapath"
)

// statusReport is what `sluice status` shows; --format json prints it.
type statusReport struct {
	PinPath          string              `json:"pin_path"`
	AttachScope      string              `json:"attach_scope"`
	Programs         []programStatus     `json:"programs"`
	Proxy            datapath.ProxyState `json:"proxy"`
	Workloads        []workloadStatus    `json:"workloads"`
	Exclusions       []netip.Prefix      `json:"exclusions"`
	NodeLocal        []netip.Prefix      `json:"node_local"` // never redirected: refused unless excluded
	Metadata         []netip.Addr        `json:"metadata"`   // never redirected: audit direct, enforce where granted
	ExcludedPorts    []uint16            `json:"excluded_ports"`
	Resolvers        []netip.AddrPort    `json:"dns_resolvers"`
	Counters         map[string]uint64   `json:"counters"`
	InFlight         map[string]int      `json:"in_flight"`          // entries, by map
	InFlightCapacity int                 `json:"in_flight_capacity"` // of pending_tuples
	Agent            *agent.State        `json:"agent,omitempty"`
	AgentNote        string              `json:"agent_note"`
}

// printPolicies shows where each workload's effective policy comes from.
func printPolicies(w io.Writer, ws []workloadStatus) {
	var some bool
	for _, s := range ws {
		some = some || s.Policy != nil
	}
	if !some {
		return
	}
	fmt.Fprintln(w, "\neffective policies (sluice explain NAMESPACE/POD for the entries):")
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "  WORKLOAD\tMODE\tALLOW ENTRIES\tCUT BY GUARDRAILS\tSOURCES")
	for _, s := range ws {
		if s.Policy == nil {
			continue
		}
		p := s.Policy
		src := strings.Join(p.Sources, ", ")
		if src == "" {
			src = "opt-in label only"
		}
		if p.Error != "" {
			src += " (ERROR: " + p.Error + ")"
		}
		fmt.Fprintf(tw, "  %s\t%s\t%d\t%d\t%s\n", s.Name, p.Mode, p.Allow, p.Removed, src)
	}
	tw.Flush()
}

// printNames shows the TCP-hostname rules' names: what each allows, until
// when without DNS giving it again, and the last lookup's failure.
func printNames(w io.Writer, names map[string]agent.NameStatus, at time.Time) {
	if len(names) == 0 {
		return
	}
	keys := make([]string, 0, len(names))
	for k := range names {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	fmt.Fprintln(w, "\nTCP hostnames (tcp:// rules):")
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "  NAME\tALLOWED ADDRESSES (kept for)\tNEXT LOOKUP\tLAST ERROR")
	for _, k := range keys {
		n := names[k]
		var addrs []string
		for _, a := range n.Addrs {
			addrs = append(addrs, fmt.Sprintf("%s (%v)", a.Addr, a.Until.Sub(at).Round(time.Second)))
		}
		if len(addrs) == 0 {
			addrs = []string{"none: allows nothing"}
		}
		next := "-"
		if !n.Next.IsZero() {
			next = "in " + n.Next.Sub(at).Round(time.Second).String()
		}
		msg := n.Error
		if n.Dropped > 0 {
			msg = strings.TrimSpace(fmt.Sprintf("%s (%d answers not allowed: node-local or beyond the cap)", msg, n.Dropped))
		}
		fmt.Fprintf(tw, "  %s\t%s\t%s\t%s\n", k, strings.Join(addrs, ", "), next, msg)
	}
	tw.Flush()
}

type programStatus struct {
	Name       string `json:"name"`
	AttachType string `json:"attach_type"`
	LinkID     uint32 `json:"link_id,omitempty"`
	ProgramID  uint32 `json:"program_id,omitempty"`
	Tag        string `json:"tag,omitempty"`
	CgroupID   uint64 `json:"cgroup_id,omitempty"`
	Role       string `json:"role"`
	Error      string `json:"error,omitempty"`
}

type workloadStatus struct {
	CgroupID     uint64 `json:"cgroup_id"`
	ID           uint32 `json:"id"`
	Name         string `json:"name"`
	FailMode     string `json:"fail_mode"`
	Redirected   uint64 `json:"redirected"`
	FailedClosed uint64 `json:"failed_closed"`
	Enforce      bool   `json:"enforce"`
	Denied       uint64 `json:"denied_non_tcp"`
	NodeLocal    uint64 `json:"node_local_refused"`
	Metadata     uint64 `json:"metadata"`
	// Policy is the effective policy the agent last programmed, and what
	// it was merged from.
	Policy *agent.WorkloadPolicy `json:"policy,omitempty"`
}

func runStatus(args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("status", `Show the pinned datapath: attached programs, proxy address and readiness,
selected workloads with their counters, global counters, and the control
plane's last known state (xDS version, Envoy's ACKs and NACKs). Works while the
agent runs and after it stopped: it reads the pins and the agent's state file.`, stderr)
	pin := fs.String("pin-path", datapath.DefaultPinPath, "bpffs directory of sluice's pins")
	stateFile := fs.String("state-file", defaultStateFile, "the agent's state file")
	format := fs.String("format", "text", "text or json")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *format != "text" && *format != "json" {
		return fmt.Errorf("--format %q: want text or json", *format)
	}
	rep, err := collectStatus(*pin, *stateFile)
	if err != nil {
		return err
	}
	if *format == "json" {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(rep)
	}
	printStatus(stdout, rep)
	return nil
}

func collectStatus(pin, stateFile string) (*statusReport, error) {
	dp, err := datapath.OpenPinned(pin)
	if errors.Is(err, datapath.ErrNotInstalled) {
		return nil, fmt.Errorf("sluice is not installed (no pins at %s)", pin)
	}
	if err != nil {
		return nil, err
	}
	defer dp.Close()
	rep := &statusReport{PinPath: pin, AttachScope: datapath.PinnedScope(pin).String(), Counters: map[string]uint64{}, InFlight: map[string]int{}}
	for _, p := range datapath.Programs(pin) {
		ps := programStatus{Name: p.Name, AttachType: p.AttachType, LinkID: uint32(p.LinkID), ProgramID: uint32(p.ProgramID), Tag: p.Tag, CgroupID: p.CgroupID, Role: p.Role}
		if p.Err != nil {
			ps.Error = p.Err.Error()
		}
		rep.Programs = append(rep.Programs, ps)
	}
	if rep.Proxy, err = dp.ProxyState(); err != nil {
		return nil, err
	}
	if rep.Exclusions, err = dp.Exclusions(); err != nil {
		return nil, err
	}
	if rep.NodeLocal, rep.Metadata, err = dp.NeverDial(); err != nil {
		return nil, err
	}
	if rep.Resolvers, err = dp.Resolvers(); err != nil {
		return nil, err
	}
	if rep.ExcludedPorts, err = dp.ExcludedPorts(); err != nil {
		return nil, err
	}
	cs, err := dp.Counters()
	if err != nil {
		return nil, err
	}
	for n, v := range cs.ByName() {
		rep.Counters[n] = v
	}
	o, p, err := dp.InFlight()
	if err != nil {
		return nil, err
	}
	rep.InFlight["orig_dsts"], rep.InFlight["pending_tuples"] = o, p
	rep.InFlightCapacity = dp.InFlightCapacity()

	if st, err := agent.ReadState(stateFile); err == nil {
		rep.Agent = &st
		age := time.Since(st.Updated).Round(time.Second)
		if processAlive(st.PID) && age < 10*time.Second {
			rep.AgentNote = fmt.Sprintf("agent running (pid %d), state %s old", st.PID, age)
		} else {
			rep.AgentNote = fmt.Sprintf("agent not running; its last state is from %s (%s ago); the datapath keeps redirecting", st.Updated.Format(time.RFC3339), age)
		}
	} else {
		rep.AgentNote = fmt.Sprintf("no agent state (%v): workload names unknown", err)
	}
	ws, err := dp.Workloads()
	if err != nil {
		return nil, err
	}
	stats, err := dp.WorkloadStats()
	if err != nil {
		return nil, err
	}
	for cg, w := range ws {
		s := workloadStatus{CgroupID: cg, ID: w.ID, FailMode: w.FailMode.String(), Redirected: stats[w.ID].Redirected, FailedClosed: stats[w.ID].FailedClosed,
			Enforce: w.Enforce, Denied: stats[w.ID].Denied, NodeLocal: stats[w.ID].NodeLocal, Metadata: stats[w.ID].Metadata}
		if rep.Agent != nil {
			s.Name = rep.Agent.Workloads[w.ID]
			if p, ok := rep.Agent.Policies[w.ID]; ok {
				s.Policy = &p
			}
		}
		rep.Workloads = append(rep.Workloads, s)
	}
	sort.Slice(rep.Workloads, func(i, j int) bool { return rep.Workloads[i].ID < rep.Workloads[j].ID })
	return rep, nil
}

func processAlive(pid int) bool {
	if pid <= 0 {
		return false
	}
	_, err := os.Stat(fmt.Sprintf("/proc/%d", pid))
	return err == nil
}

func printStatus(w io.Writer, r *statusReport) {
	fmt.Fprintf(w, "sluice datapath at %s\n%s\n\n", r.PinPath, r.AgentNote)
	var addrs []string
	for _, a := range []netip.Addr{r.Proxy.IPv4, r.Proxy.IPv6} {
		if a.IsValid() {
			addrs = append(addrs, a.String())
		}
	}
	fmt.Fprintf(w, "proxy: %s port %d, ready=%v", strings.Join(addrs, ", "), r.Proxy.Port, r.Proxy.Effective)
	switch {
	case r.Proxy.Ready && !r.Proxy.Effective:
		fmt.Fprintf(w, " (readiness lease expired %v ago: no agent renewing it; workloads follow their fail mode)", (-r.Proxy.LeaseLeft).Round(time.Second))
	case r.Proxy.HasLease && r.Proxy.Ready:
		fmt.Fprintf(w, " (lease %v left)", r.Proxy.LeaseLeft.Round(time.Second))
	}
	fmt.Fprintln(w)
	fmt.Fprintf(w, "attach scope: %s", r.AttachScope)
	if r.AttachScope == datapath.ScopeWorkloads.String() {
		byRole := map[string][]uint64{}
		for _, p := range r.Programs {
			if ids := byRole[p.Role]; p.Error == "" && !slices.Contains(ids, p.CgroupID) {
				byRole[p.Role] = append(ids, p.CgroupID)
			}
		}
		fmt.Fprintf(w, " (the proxy's programs on cgroup %v; %d selected cgroups", byRole[datapath.RoleProxy], len(byRole[datapath.RoleWorkload]))
		if rs := byRole[datapath.RoleRetiredProxy]; len(rs) > 0 {
			fmt.Fprintf(w, "; an earlier proxy's still on cgroup %v, until it goes", rs)
		}
		fmt.Fprint(w, ")")
	}
	fmt.Fprintln(w)
	if len(r.Resolvers) > 0 {
		fmt.Fprintf(w, "DNS resolvers: %v\n", r.Resolvers)
	}
	fmt.Fprintf(w, "never redirected, direct: %v, ports %v\n", r.Exclusions, r.ExcludedPorts)
	fmt.Fprintf(w, "never redirected, refused unless direct: %v\nmetadata (audit direct, enforce where granted): %v\n\n", r.NodeLocal, r.Metadata)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "WORKLOAD\tID\tCGROUP ID\tMODE\tFAIL MODE\tREDIRECTED\tFAILED CLOSED\tDENIED NON-TCP\tNODE-LOCAL REFUSED\tMETADATA")
	for _, s := range r.Workloads {
		name := s.Name
		if name == "" {
			name = "(unknown)"
		}
		mode := "audit"
		if s.Enforce {
			mode = "enforce"
		}
		fmt.Fprintf(tw, "%s\t%d\t%d\t%s\t%s\t%d\t%d\t%d\t%d\t%d\n", name, s.ID, s.CgroupID, mode, s.FailMode, s.Redirected, s.FailedClosed, s.Denied, s.NodeLocal, s.Metadata)
	}
	tw.Flush()
	printPolicies(w, r.Workloads)
	if r.Agent != nil {
		x := r.Agent.XDS
		fmt.Fprintf(w, "\nxds: version %q, %d versions, %d pushes, %d ACKs, %d NACKs, %d Envoy(s) connected\n", x.Version, x.Versions, x.Pushes, x.ACKs, x.NACKs, x.Streams)
		if x.LastNACK != nil {
			fmt.Fprintf(w, "last NACK %s: %s rejected %s, kept %s: %s\n", x.LastNACK.Time.Format(time.RFC3339), x.LastNACK.TypeURL, x.LastNACK.Rejected, x.LastNACK.Kept, x.LastNACK.Message)
		}
		printNames(w, r.Agent.Names, r.Agent.Updated)
	}
	fmt.Fprintf(w, "\nin flight: %d pending tuples (capacity %d)", r.InFlight["pending_tuples"], r.InFlightCapacity)
	if n := r.InFlight["orig_dsts"]; n > 0 {
		fmt.Fprintf(w, ", %d original destinations kept by a release before layout 5", n)
	}
	fmt.Fprintf(w, "\ncounters:\n")
	tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	for _, n := range datapath.CounterNames() {
		fmt.Fprintf(tw, "  %s\t%d\n", n, r.Counters[n])
	}
	tw.Flush()
	fmt.Fprintln(w, "\nprograms:")
	tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	for _, p := range r.Programs {
		if p.Error != "" {
			fmt.Fprintf(tw, "  %s\t%s\tERROR %s\n", p.Name, p.AttachType, p.Error)
			continue
		}
		fmt.Fprintf(tw, "  %s\t%s\tlink %d\tprog %d\t%s\t%s, cgroup %d\n", p.Name, p.AttachType, p.LinkID, p.ProgramID, p.Tag, p.Role, p.CgroupID)
	}
	tw.Flush()
}
