// Package xds turns the policy of the selected workloads into Envoy
// configuration (one listener, a few clusters), validates it as Envoy would
// load it, and serves it over ADS.
package xds

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"
	"sync"

	"github.com/sluice-io/sluice/policy"

	matcher "github.com/cncf/xds/go/xds/type/matcher/v3"
	accesslog "github.com/envoyproxy/go-control-plane/envoy/config/accesslog/v3"
	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	dnscache "github.com/envoyproxy/go-control-plane/envoy/extensions/common/dynamic_forward_proxy/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
)

// Resource names that Envoy sees and operators grep for.
const (
	ListenerName           = "sluice"
	OriginalDstClusterName = "sluice_original_dst"
	DenyClusterName        = "sluice_deny"
)

// Resources is one complete configuration for the node's Envoy.
type Resources struct {
	Listeners []*listener.Listener
	Clusters  []*cluster.Cluster
	// packed and parts, set by Build, let a Validator skip what it has
	// validated before (see Validator).
	packed packedAnys
	parts  []*groupParts
	// digests, set by Validate, are the SHA-256 of the deterministic
	// encoding of each chain it encoded, which hash reuses.
	digests map[*listener.FilterChain][sha256.Size]byte
}

// Issue is something about one workload the agent should report (as a
// Kubernetes Event, metric and log line): the configuration was built, but
// the workload is served more strictly than it asked, or not at all.
type Issue struct {
	Workload string // namespace/name
	Reason   string
}

// group is the unit the proxy tells apart: the workloads that share a set
// of source addresses. Nearly always one workload; several when workloads
// share an address (hostNetwork pods share the node's), in which case the
// proxy cannot tell them apart and they get one merged policy.
type group struct {
	key       string // workload IDs joined with "+"
	namespace string
	name      string
	ips       []netip.Addr
	policy    policy.Policy
	// policyError is shown in the logs of denied connections.
	policyError string
}

// Build turns the desired state into Envoy resources. It is a pure
// function: the same state gives byte-for-byte the same resources, whatever
// the order of workloads in it. Issues list workloads served more strictly
// than they asked (or not at all); they do not make Build fail.
func Build(s State) (*Resources, []Issue, error) { return new(Builder).Build(s) }

// Builder is Build with a memory: each workload group's filter chains and
// matcher branch, keyed by a digest of everything they are built from (the
// group, and the state but its workloads), so a state in which one
// workload changed rebuilds that workload's parts only. The parts it hands
// out are shared with later builds and must not be modified. A Builder is
// safe for concurrent use.
type Builder struct {
	mu    sync.Mutex
	parts map[[sha256.Size]byte]*groupParts
}

// groupParts is what one group contributes to the listener: its chains,
// and its branch of the source-address trie (rangeMatcher, whose on_match
// is onMatch) with that branch's encoding as the trie's one element
// (rangeBytes), so a build concatenates the branches instead of encoding
// every group's again.
type groupParts struct {
	chains       []*listener.FilterChain
	onMatch      *matcher.Matcher_OnMatch
	rangeMatcher *matcher.IPMatcher_IPRangeMatcher
	rangeBytes   []byte
}

// packedAnys maps each Any a build packed to the message it packed, so the
// validator reads that message instead of unmarshalling the Any again.
type packedAnys map[*anypb.Any]proto.Message

// Build builds s's resources as the package's Build does.
func (bl *Builder) Build(s State) (*Resources, []Issue, error) {
	if err := s.check(); err != nil {
		return nil, nil, fmt.Errorf("invalid state: %w", err)
	}
	groups, issues := groupWorkloads(s)
	b := &builder{state: s, shared: &sharedAnys{}}
	gk := globalKey(s)
	bl.mu.Lock()
	defer bl.mu.Unlock()
	next := make(map[[sha256.Size]byte]*groupParts, len(groups))
	b.parts = make([]*groupParts, len(groups))
	keys := make([][sha256.Size]byte, len(groups))
	var todo []int // the groups not built before
	for i, g := range groups {
		keys[i] = g.digest(gk)
		if p := bl.parts[keys[i]]; p != nil {
			b.parts[i] = p
		} else {
			todo = append(todo, i)
		}
	}
	// Each group's parts depend on nothing but the group and the state:
	// they are built on every CPU the process may use, each worker with a
	// builder of its own (its own once-per-build Anys and access logs),
	// whose records are merged after.
	errs := make([]error, len(groups))
	workers := parallel(len(todo), func() *builder { return &builder{state: s, shared: b.shared} }, func(wb *builder, j int) {
		i := todo[j]
		b.parts[i], errs[i] = wb.groupParts(groups[i])
	})
	if err := errors.Join(errs...); err != nil {
		return nil, nil, err
	}
	b.packed = packedAnys{}
	for _, wb := range workers {
		maps.Copy(b.packed, wb.packed)
	}
	for i, p := range b.parts {
		next[keys[i]] = p
	}
	lis := b.listener(groups)
	clusters := []*cluster.Cluster{b.originalDstCluster(), b.denyCluster(), b.dynamicForwardProxyCluster()}
	if b.err != nil {
		return nil, nil, b.err
	}
	bl.parts = next
	return &Resources{Listeners: []*listener.Listener{lis}, Clusters: clusters, packed: b.packed, parts: b.parts}, issues, nil
}

// groupParts builds g's chains and its branch of the listener's matcher.
func (b *builder) groupParts(g *group) (*groupParts, error) {
	p := &groupParts{chains: b.groupChains(g), onMatch: b.groupOnMatch(g)}
	p.rangeMatcher = &matcher.IPMatcher_IPRangeMatcher{
		Ranges:    cidrRanges(hostPrefixes(g.ips)),
		OnMatch:   p.onMatch,
		Exclusive: true,
	}
	var err error
	p.rangeBytes, err = proto.MarshalOptions{Deterministic: true}.Marshal(&matcher.IPMatcher{RangeMatchers: []*matcher.IPMatcher_IPRangeMatcher{p.rangeMatcher}})
	if err != nil {
		return nil, fmt.Errorf("encode the source matcher of %s: %w", g.key, err)
	}
	if b.err != nil {
		err, b.err = b.err, nil
		return nil, err
	}
	return p, nil
}

func groupWorkloads(s State) ([]*group, []Issue) {
	ws := slices.Clone(s.Workloads)
	for i := range ws {
		ws[i].Namespace = sanitize(ws[i].Namespace, 253)
		ws[i].Name = sanitize(ws[i].Name, 253)
	}
	slices.SortFunc(ws, func(a, b Workload) int { return strings.Compare(a.ID(), b.ID()) })

	var issues []Issue
	owners := map[netip.Addr][]int{}
	for i, w := range ws {
		if len(w.IPs) == 0 {
			issues = append(issues, Issue{w.ID(), "no IP address: the proxy cannot tell its connections apart and closes them"})
		}
		seen := map[netip.Addr]bool{}
		for _, ip := range w.IPs {
			ip = ip.Unmap().WithZone("")
			if !ip.IsValid() || seen[ip] {
				continue
			}
			seen[ip] = true
			owners[ip] = append(owners[ip], i)
		}
	}

	byKey := map[string]*group{}
	var groups []*group
	ips := slices.SortedFunc(maps.Keys(owners), func(a, b netip.Addr) int { return a.Compare(b) })
	for _, ip := range ips {
		idx := owners[ip]
		var ids []string
		for _, i := range idx {
			ids = append(ids, ws[i].ID())
		}
		key := strings.Join(ids, "+")
		g := byKey[key]
		if g == nil {
			g = newGroup(key, ws, idx)
			if len(idx) > 1 {
				for _, i := range idx {
					issues = append(issues, Issue{ws[i].ID(), fmt.Sprintf("shares source address %s with %s; %s", ip, key, g.sharedNote())})
				}
			}
			byKey[key] = g
			groups = append(groups, g)
		}
		g.ips = append(g.ips, ip)
	}
	slices.SortFunc(groups, func(a, b *group) int { return strings.Compare(a.key, b.key) })
	slices.SortFunc(issues, func(a, b Issue) int {
		if c := strings.Compare(a.Workload, b.Workload); c != 0 {
			return c
		}
		return strings.Compare(a.Reason, b.Reason)
	})
	return groups, slices.Compact(issues)
}

func newGroup(key string, ws []Workload, idx []int) *group {
	first := ws[idx[0]]
	g := &group{key: key, namespace: first.Namespace, name: first.Name, policy: first.Policy, policyError: first.PolicyError}
	if len(idx) == 1 {
		return g
	}
	g.name = key
	g.namespace = ""
	g.policyError = ""
	for _, i := range idx[1:] {
		if !samePolicy(first.Policy, ws[i].Policy) {
			// The proxy cannot tell these workloads apart, and their
			// policies differ: the only policy that widens none of them
			// is deny-all.
			g.policy = policy.Policy{Mode: policy.Enforce, FailClosed: true}
			g.policyError = "workloads sharing this address declare different policies; denying all"
			return g
		}
	}
	return g
}

func (g *group) sharedNote() string {
	if g.policy.Mode == policy.Enforce && len(g.policy.Allow) == 0 && g.policyError != "" {
		return "their policies differ, so the address is denied everything"
	}
	return "their policies are the same, so they share it"
}

func samePolicy(a, b policy.Policy) bool {
	return a.Mode == b.Mode && slices.Equal(a.Allow, b.Allow)
}

// builder collects the first error of a build, so the builders read as
// straight-line code.
type builder struct {
	state State
	err   error
	// parts are the groups' chains and matcher branches, in group order
	// (Builder.Build fills it, from its memory or fresh).
	parts []*groupParts
	// packed records what any packed.
	packed packedAnys
	// dns is the DNS cache configuration, built once: every hostname
	// chain of every pod carries it.
	dns *dnscache.DnsCacheConfig
	// shared holds the Anys whose contents depend on nothing but the
	// state's settings (the router, the DNS filters, matching inputs),
	// packed once per build and shared by every chain that has one:
	// encoded once, and validated once (Validator remembers an Any by
	// identity within a validation). A build's workers share it.
	shared *sharedAnys
	// logs are the access logs built so far (accessLog), and the
	// templates they are packed with, by kind.
	logs         map[logKey][]*accesslog.AccessLog
	logTemplates map[string]*logTemplate
}

// sharedAnys are a build's shared Anys by key, for all its workers.
type sharedAnys struct {
	mu sync.Mutex
	m  map[string]*anypb.Any
}

// sharedAny is b.any(build()) packed once per build under key, which must
// name everything the message is built from. build runs under the shared
// lock: it must not call sharedAny itself.
func (b *builder) sharedAny(key string, build func() proto.Message) *anypb.Any {
	if b.shared == nil {
		b.shared = &sharedAnys{}
	}
	b.shared.mu.Lock()
	defer b.shared.mu.Unlock()
	if a, ok := b.shared.m[key]; ok {
		return a
	}
	if b.shared.m == nil {
		b.shared.m = map[string]*anypb.Any{}
	}
	a := b.any(build())
	b.shared.m[key] = a
	return a
}

// any packs m deterministically: map fields (access log formats are
// protobuf Structs) are ordered, so the same input gives the same bytes.
func (b *builder) any(m proto.Message) *anypb.Any {
	a := &anypb.Any{TypeUrl: typeURL(m), Value: b.marshal(m)}
	b.remember(a, m)
	return a
}

// remember records that a holds m, for the validator (packedAnys).
func (b *builder) remember(a *anypb.Any, m proto.Message) {
	if b.packed == nil {
		b.packed = packedAnys{}
	}
	b.packed[a] = m
}

// sanitize makes outside text safe to put in a protobuf string (which must
// be valid UTF-8) and short enough for a log line.
func sanitize(s string, max int) string {
	s = strings.ToValidUTF8(s, "?")
	if len(s) > max {
		s = strings.ToValidUTF8(s[:max], "") + "..."
	}
	return s
}
