package agent

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net/netip"
	"runtime/debug"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/sluice-io/sluice/agent/datapath"
	"github.com/sluice-io/sluice/policy"
	"github.com/sluice-io/sluice/xds"
)

// Datapath is what the reconciler needs of the pinned datapath
// (*datapath.Datapath); an interface so its decisions are testable
// without a kernel.
type Datapath interface {
	SetWorkload(cgroupID uint64, w datapath.Workload) error
	DeleteWorkload(cgroupID uint64) error
	Workloads() (map[uint64]datapath.Workload, error)
}

// XDS is what the reconciler needs of the xDS server (*xds.Server).
type XDS interface {
	Update(ctx context.Context, st xds.State) (string, []xds.Issue, error)
	// AckedAtLeast: an Envoy accepted this listener version or a later one.
	AckedAtLeast(typeURL, version string) bool
	// Connected: an Envoy holds an ADS stream.
	Connected() bool
}

// Reporter tells people about a workload: a Kubernetes Event on the pod, a
// log line, a metric. reason is a CamelCase word (PolicyError,
// CgroupNotFound, SharedAddress).
type Reporter interface {
	Warn(key, reason, message string)
}

// selected is what the agent has programmed for one workload.
type selected struct {
	w        Workload
	cgroupID uint64
	id       uint32
	policy   policy.Policy
	perr     error
	sources  []string // what the policy was merged from
	removed  int      // entries guardrails removed or narrowed
	// awaiting: the proxy has not accepted a listener with this workload's
	// addresses; version is the first pushed that has them ("" not yet).
	awaiting bool
	version  string
}

// Reconciler programs the datapath and the xDS server from workloads. Its
// methods are safe for concurrent use; sources call Upsert and Remove per
// workload (or Replace with a whole set) and Sync once they have delivered
// their first full view.
type Reconciler struct {
	dp       Datapath
	xds      XDS
	proxy    xds.Proxy
	local    policy.NodeLocal
	dns      []netip.AddrPort
	names    *Names
	timeouts Timeouts
	report   Reporter
	log      *slog.Logger
	cgroupID func(string) (uint64, error)
	metrics  *Metrics

	mu      sync.Mutex
	byKey   map[string]*selected
	byID    map[uint32]string // per-workload counter id -> key
	adopt   map[uint64]uint32 // pinned at start, not yet claimed: cgroup id -> counter id
	pending chan struct{}     // an xDS update is wanted
	synced  bool              // Sync ran: the state is a full view, fit for xDS
	hold    bool              // ProxyAccepted waits for Release
	pushed  string            // the last version pushed
	changed chan struct{}     // the selection changed (for the state file)
	issues  map[string]string // last reported xDS issue per key
	// releaseMemory returns freed memory to the kernel (RunXDS).
	releaseMemory func()
}

// ReconcilerConfig wires a Reconciler.
type ReconcilerConfig struct {
	Datapath Datapath
	XDS      XDS
	Proxy    xds.Proxy
	// NodeLocal is the node's never-dial set: the proxy's listener
	// refuses it, and its metadata addresses are what allow entries grant.
	NodeLocal policy.NodeLocal
	// DNSResolvers are what the proxy resolves hostname entries with.
	DNSResolvers []netip.AddrPort
	// Names resolves TCP-hostname rules; nil: they allow nothing.
	Names *Names
	// Timeouts are the proxy's, as served.
	Timeouts Timeouts
	Reporter Reporter
	Logger   *slog.Logger
	// CgroupID resolves a cgroup directory to its id; nil: datapath.CgroupID.
	CgroupID func(string) (uint64, error)
	// Metrics, if set, get each workload change's duration and each
	// missing cgroup, whichever source asked.
	Metrics *Metrics
	// Hold keeps new workloads waiting for the proxy even once it accepts
	// them, until Release: during a takeover the datapath still sends
	// connections to the previous agent's proxy, which does not know them.
	Hold bool
}

// Timeouts are the proxy timeouts the agent serves; zero: none (a
// connection lives as long as it would without the proxy).
type Timeouts struct {
	TCPIdle        time.Duration
	HTTPStreamIdle time.Duration
	// MaxConnectionsPerChain caps each of a workload's Envoy filter
	// chains' open connections; zero: no cap.
	MaxConnectionsPerChain uint64
}

// NewReconciler adopts the workloads already in the pinned datapath (their
// counter ids stay theirs) without touching them; Sync removes the ones no
// source claims.
func NewReconciler(cfg ReconcilerConfig) (*Reconciler, error) {
	r := &Reconciler{
		dp: cfg.Datapath, xds: cfg.XDS, proxy: cfg.Proxy, local: cfg.NodeLocal, dns: slices.Clone(cfg.DNSResolvers), names: cfg.Names, timeouts: cfg.Timeouts, report: cfg.Reporter, log: cfg.Logger, cgroupID: cfg.CgroupID, metrics: cfg.Metrics,
		hold:  cfg.Hold,
		byKey: map[string]*selected{}, byID: map[uint32]string{}, adopt: map[uint64]uint32{}, pending: make(chan struct{}, 1), changed: make(chan struct{}, 1), issues: map[string]string{},
		releaseMemory: debug.FreeOSMemory,
	}
	if r.log == nil {
		r.log = slog.Default()
	}
	if r.cgroupID == nil {
		r.cgroupID = datapath.CgroupID
	}
	pinned, err := r.dp.Workloads()
	if err != nil {
		return nil, err
	}
	for cg, w := range pinned {
		r.byID[w.ID] = "" // taken, owner not known until a source claims it
		r.adopt[cg] = w.ID
	}
	return r, nil
}

// Upsert selects a workload or updates it. An error (its cgroup does not
// exist yet, say) leaves the workload as it was; the caller retries.
func (r *Reconciler) Upsert(w Workload) error {
	start := time.Now()
	cg, err := r.cgroupID(w.CgroupPath)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			r.metrics.cgroupMissing()
		}
		return fmt.Errorf("%s: %w", w.Key(), err)
	}
	eff := w.Effective()
	pol, perr := eff.Policy, eff.Err
	r.mu.Lock()
	defer r.mu.Unlock()
	cur := r.byKey[w.Key()]
	if cur != nil && cur.cgroupID == cg && cur.w.Equal(w) {
		return nil
	}
	_, adopted := r.adopt[cg]
	id := r.idFor(w.Key(), cg, cur)
	// A new workload, or one with new addresses, waits for the proxy: until
	// Envoy has accepted a listener with its addresses, its connections
	// would reach the unknown-source chain and be closed. One adopted from
	// the pins after an agent restart is in the listener Envoy kept. With
	// no Envoy on ADS there is no listener to wait for (readiness decides).
	awaiting := false
	switch {
	case cur != nil && slices.Equal(cur.w.IPs, w.IPs):
		awaiting = cur.awaiting
	case cur == nil && adopted:
	default:
		awaiting = r.xds.Connected()
	}
	dw := r.datapathWorkload(w, id, pol, awaiting)
	defer func() { r.metrics.observeReconcile(time.Since(start)) }()
	if err := r.dp.SetWorkload(cg, dw); err != nil {
		r.metrics.datapathFailed(err)
		return fmt.Errorf("%s: %w", w.Key(), err)
	}
	if cur != nil && cur.cgroupID != cg {
		// The workload moved to a new cgroup (a restarted service gets a
		// new one): the old one is no longer it.
		if err := r.dp.DeleteWorkload(cur.cgroupID); err != nil {
			r.log.Warn("deselect old cgroup", "workload", w.Key(), "cgroup_id", cur.cgroupID, "error", err)
		}
	}
	sel := &selected{w: w, cgroupID: cg, id: id, policy: pol, perr: perr, sources: eff.Sources, removed: len(eff.Removed), awaiting: awaiting}
	if cur != nil && awaiting == cur.awaiting {
		sel.version = cur.version
	}
	r.byKey[w.Key()] = sel
	r.byID[id] = w.Key()
	if perr != nil && (cur == nil || cur.perr == nil || cur.perr.Error() != perr.Error()) {
		r.warn(w.Key(), "PolicyError", fmt.Sprintf("%v; serving it under the safest policy (%s)", perr, describe(pol)))
	}
	r.log.Info("workload selected", "workload", w.Key(), "cgroup", w.CgroupPath, "cgroup_id", cg, "mode", pol.Mode.String(), "fail", dw.FailMode.String(), "ips", w.IPs,
		"policy_sources", eff.Sources, "allow_entries", len(pol.Allow), "removed_by_guardrails", len(eff.Removed))
	r.want()
	return nil
}

func describe(p policy.Policy) string {
	if p.Mode == policy.Enforce && len(p.Allow) == 0 {
		return "enforce, deny all"
	}
	return p.Mode.String()
}

// idFor keeps a workload's counter id: its own, or the one the pinned
// datapath already has for its cgroup (an agent restart), or the smallest
// free one.
func (r *Reconciler) idFor(key string, cg uint64, cur *selected) uint32 {
	if cur != nil {
		return cur.id
	}
	if id, ok := r.adopt[cg]; ok && r.byID[id] == "" {
		delete(r.adopt, cg)
		return id
	}
	for id := uint32(1); ; id++ {
		if _, taken := r.byID[id]; !taken {
			return id
		}
	}
}

// Remove deselects a workload.
func (r *Reconciler) Remove(key string) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	cur := r.byKey[key]
	if cur == nil {
		return nil
	}
	defer func(start time.Time) { r.metrics.observeReconcile(time.Since(start)) }(time.Now())
	if err := r.dp.DeleteWorkload(cur.cgroupID); err != nil {
		return fmt.Errorf("%s: %w", key, err)
	}
	delete(r.byKey, key)
	delete(r.byID, cur.id)
	delete(r.issues, key)
	r.log.Info("workload deselected", "workload", key, "cgroup_id", cur.cgroupID)
	r.want()
	return nil
}

// Replace makes ws the whole set: upserts each, removes the others. It
// returns every error; workloads that failed keep their previous state.
func (r *Reconciler) Replace(ws []Workload) error {
	var errs []error
	keep := map[string]bool{}
	for _, w := range ws {
		keep[w.Key()] = true
		if err := r.Upsert(w); err != nil {
			errs = append(errs, err)
		}
	}
	for _, key := range r.Keys() {
		if !keep[key] {
			if err := r.Remove(key); err != nil {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}

// Keys lists the selected workloads.
func (r *Reconciler) Keys() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	keys := make([]string, 0, len(r.byKey))
	for k := range r.byKey {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

// Sync removes from the pinned datapath every cgroup no source claims.
// Call it once the sources have delivered their first full view: before,
// an entry may belong to a workload not yet seen, and removing it would
// interrupt that workload's redirection.
func (r *Reconciler) Sync() error {
	pinned, err := r.dp.Workloads()
	r.mu.Lock()
	defer r.mu.Unlock()
	if err != nil {
		// Stale entries stay; the view is full all the same.
		r.synced = true
		r.want()
		return err
	}
	claimed := map[uint64]bool{}
	for _, s := range r.byKey {
		claimed[s.cgroupID] = true
	}
	var errs []error
	for cg, w := range pinned {
		if claimed[cg] {
			continue
		}
		if err := r.dp.DeleteWorkload(cg); err != nil {
			errs = append(errs, err)
			continue
		}
		if r.byID[w.ID] == "" {
			delete(r.byID, w.ID)
		}
		delete(r.adopt, cg)
		r.log.Info("stale workload removed", "cgroup_id", cg, "id", w.ID)
	}
	r.synced = true
	r.want()
	return errors.Join(errs...)
}

// WorkloadPolicy is what `sluice status` shows of a workload's policy.
type WorkloadPolicy struct {
	Mode       string   `json:"mode"`
	FailClosed bool     `json:"fail_closed"`
	Sources    []string `json:"sources,omitempty"`
	Allow      int      `json:"allow_entries"`
	Removed    int      `json:"removed_by_guardrails,omitempty"`
	Error      string   `json:"error,omitempty"`
}

// Policies maps per-workload counter ids to their effective policies.
func (r *Reconciler) Policies() map[uint32]WorkloadPolicy {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make(map[uint32]WorkloadPolicy, len(r.byKey))
	for _, s := range r.byKey {
		wp := WorkloadPolicy{Mode: s.policy.Mode.String(), FailClosed: s.policy.FailClosed, Sources: slices.Clone(s.sources), Allow: len(s.policy.Allow), Removed: s.removed}
		if s.perr != nil {
			wp.Error = strings.ReplaceAll(s.perr.Error(), "\n", "; ")
		}
		out[s.id] = wp
	}
	return out
}

// Names maps per-workload counter ids to workload keys (for metrics).
func (r *Reconciler) Names() map[uint32]string {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make(map[uint32]string, len(r.byID))
	for id, k := range r.byID {
		if k != "" {
			out[id] = k
		}
	}
	return out
}

func (r *Reconciler) want() {
	if r.names != nil {
		r.names.Want(r.wantedNames())
	}
	for _, c := range []chan struct{}{r.pending, r.changed} {
		select {
		case c <- struct{}{}:
		default:
		}
	}
}

// wantedNames are the names of the TCP-hostname rules of the enforce-mode
// workloads (audit mode allows everything: nothing to resolve). r.mu held.
func (r *Reconciler) wantedNames() []string {
	var out []string
	for _, s := range r.byKey {
		if s.policy.Mode == policy.Enforce {
			out = append(out, s.policy.ResolvedNames()...)
		}
	}
	return out
}

// NameChanged is Names' OnChange: a TCP-hostname's addresses changed, the
// listener must follow.
func (r *Reconciler) NameChanged() {
	for _, c := range []chan struct{}{r.pending, r.changed} {
		select {
		case c <- struct{}{}:
		default:
		}
	}
}

// Refuse reports whether a is in the node's never-dial set: no
// TCP-hostname answer may allow it (Names' Refuse).
func (r *Reconciler) Refuse(a netip.Addr) bool {
	r.mu.Lock()
	nd := r.local.All()
	r.mu.Unlock()
	return inAny(nd, a)
}

// datapathWorkload is what the datapath is told of a workload with this
// policy. r.mu held.
func (r *Reconciler) datapathWorkload(w Workload, id uint32, pol policy.Policy, awaiting bool) datapath.Workload {
	fail := datapath.FailOpen
	if pol.FailClosed {
		fail = datapath.FailClosed
	}
	return datapath.Workload{ID: id, FailMode: fail, Enforce: pol.Mode == policy.Enforce, AwaitingProxy: awaiting,
		MetadataGrants: pol.MetadataGrants(r.local.MetadataAddrs()), CgroupPath: w.CgroupPath}
}

// inAny reports whether a (unmapped) is in one of ps.
func inAny(ps []netip.Prefix, a netip.Addr) bool {
	return slices.ContainsFunc(ps, func(p netip.Prefix) bool { return p.Contains(a.Unmap()) })
}

// ProxyAccepted is called when Envoy ACKs a configuration: the workloads
// whose addresses are in the accepted listener stop waiting, and are
// redirected from now on.
func (r *Reconciler) ProxyAccepted() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.hold {
		return
	}
	for key, s := range r.byKey {
		if !s.awaiting || s.version == "" || !r.xds.AckedAtLeast(resource.ListenerType, s.version) {
			continue
		}
		if err := r.dp.SetWorkload(s.cgroupID, r.datapathWorkload(s.w, s.id, s.policy, false)); err != nil {
			r.log.Warn("redirect after the proxy accepted the workload", "workload", key, "error", err)
			continue
		}
		s.awaiting = false
		r.log.Info("proxy accepted the workload; redirecting", "workload", key, "version", s.version)
	}
}

// Release ends Hold: the datapath now sends connections to the proxy this
// reconciler configures, so the workloads it accepted stop waiting.
func (r *Reconciler) Release() {
	r.mu.Lock()
	r.hold = false
	r.mu.Unlock()
	r.ProxyAccepted()
}

// NameOf is the "namespace/name" of the workload with counter id id, ""
// when none has it.
func (r *Reconciler) NameOf(id uint32) string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.byID[id]
}

// Pushed is the last xDS version pushed ("" none yet).
func (r *Reconciler) Pushed() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.pushed
}

// SetNodeLocal replaces the node's never-dial set (its addresses changed)
// and schedules an xDS update.
func (r *Reconciler) SetNodeLocal(nl policy.NodeLocal) {
	r.mu.Lock()
	r.local = nl
	r.mu.Unlock()
	r.want()
}

// Changed is signalled (coalesced) whenever the selection changes.
func (r *Reconciler) Changed() <-chan struct{} { return r.changed }

// State is the xDS desired state of the selected workloads.
func (r *Reconciler) State() xds.State {
	r.mu.Lock()
	defer r.mu.Unlock()
	st := xds.State{Proxy: r.proxy, NeverDial: r.local.All(), DNSResolvers: slices.Clone(r.dns),
		TCPIdleTimeout: r.timeouts.TCPIdle, HTTPStreamIdleTimeout: r.timeouts.HTTPStreamIdle, MaxConnectionsPerChain: r.timeouts.MaxConnectionsPerChain}
	refuse := func(a netip.Addr) bool { return inAny(st.NeverDial, a) }
	for _, s := range r.byKey {
		pol := s.policy
		if pol.Mode == policy.Enforce && r.names != nil {
			pol = pol.Expand(func(name string) []netip.Addr {
				// Filtered again: the node's addresses may have changed
				// since the lookup.
				return slices.DeleteFunc(r.names.Addrs(name), refuse)
			})
		}
		w := xds.Workload{Namespace: s.w.Namespace, Name: s.w.Name, IPs: slices.Clone(s.w.IPs), Policy: pol}
		if s.perr != nil {
			w.PolicyError = s.perr.Error()
		}
		st.Workloads = append(st.Workloads, w)
	}
	return st
}

// RunXDS pushes the desired state to the xDS server whenever it changes,
// batching changes that arrive within debounce of each other (one
// snapshot costs the same for one change as for a hundred), from the first
// Sync on: before it the state is a partial view.
//
// Once no change has come for quietAfterPush since a push, the memory the
// push's build and validation left behind is handed back to the kernel
// (releaseMemory, debug.FreeOSMemory): a configuration is rebuilt in
// bursts, and Go would otherwise keep a heap of twice the live one mapped
// (GOGC=100) on every node while nothing happens. It costs one collection
// per quiet period (a few milliseconds with 250 pods), not the builds' own
// collections.
func (r *Reconciler) RunXDS(ctx context.Context, debounce time.Duration) {
	var quiet <-chan time.Time
	for {
		select {
		case <-ctx.Done():
			return
		case <-quiet:
			quiet = nil
			r.releaseMemory()
			continue
		case <-r.pending:
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(debounce):
		}
		r.mu.Lock()
		synced := r.synced
		r.mu.Unlock()
		if synced {
			r.PushXDS(ctx)
			quiet = time.After(quietAfterPush)
		}
	}
}

// quietAfterPush is how long RunXDS waits after a push, with no change
// coming, before it releases memory.
const quietAfterPush = time.Second

// PushXDS builds, validates and publishes the current state once.
func (r *Reconciler) PushXDS(ctx context.Context) {
	version, issues, err := r.xds.Update(ctx, r.State())
	if err != nil {
		r.log.Error("xds update failed; Envoy keeps the last good configuration", "error", err)
		return
	}
	r.mu.Lock()
	r.pushed = version
	for _, s := range r.byKey {
		if s.awaiting && s.version == "" {
			s.version = version
		}
	}
	r.mu.Unlock()
	r.ProxyAccepted()
	seen := map[string]bool{}
	for _, is := range issues {
		seen[is.Workload] = true
		r.mu.Lock()
		known := r.issues[is.Workload] == is.Reason
		r.issues[is.Workload] = is.Reason
		r.mu.Unlock()
		if !known {
			r.warn(is.Workload, "ProxyConfig", is.Reason)
		}
	}
	r.mu.Lock()
	for k := range r.issues {
		if !seen[k] {
			delete(r.issues, k)
		}
	}
	r.mu.Unlock()
	r.log.Debug("xds state pushed", "version", version)
}

func (r *Reconciler) warn(key, reason, msg string) {
	r.log.Warn(msg, "workload", key, "reason", reason)
	if r.report != nil {
		r.report.Warn(key, reason, msg)
	}
}
