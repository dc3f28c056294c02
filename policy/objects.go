package policy

import (
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"

	"github.com/sluice-io/sluice/policy/apis/policy/v1alpha1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"
)

// PodSourceName names the pod's own labels and annotation as a source.
const PodSourceName = "pod labels/annotation"

// Pod is what selection and merging read of a pod and its namespace.
type Pod struct {
	Namespace       string
	Labels          map[string]string
	Annotations     map[string]string
	NamespaceLabels map[string]string
}

// Objects are the policy objects a node's agent (or `sluice explain`)
// sees. EgressPolicies of every namespace may be given; only the pod's
// own namespace's apply.
type Objects struct {
	EgressPolicies  []*v1alpha1.EgressPolicy
	ClusterPolicies []*v1alpha1.ClusterEgressPolicy
	// Cache, if set, keeps each object's validated Source per
	// resourceVersion across calls; nil: each call validates again.
	Cache *SourceCache
}

// SourceCache keeps each policy object's Source for its resourceVersion:
// the agent selects every pod of its node against every object, and an
// object's rules (up to 1,024 entries) need parsing once per version, not
// once per pod and change.
type SourceCache struct {
	mu sync.Mutex
	m  map[types.UID]cachedSource
}

type cachedSource struct {
	version string
	source  Source
}

// source returns the cached Source of an object at this version, or makes
// it. A nil cache, or an object without a resourceVersion, caches nothing.
func (c *SourceCache) source(uid types.UID, version string, build func() Source) Source {
	if c == nil || version == "" {
		return build()
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if e, ok := c.m[uid]; ok && e.version == version {
		return e.source
	}
	s := build()
	if c.m == nil {
		c.m = map[types.UID]cachedSource{}
	}
	c.m[uid] = cachedSource{version, s}
	return s
}

// Forget drops a deleted object's entry.
func (c *SourceCache) Forget(uid types.UID) {
	c.mu.Lock()
	delete(c.m, uid)
	c.mu.Unlock()
}

// Options are the cluster's settings for selection and merging.
type Options struct {
	// OptIn selects pods by their own labels (sluice.io/redirect=true);
	// nil: only policy objects select.
	OptIn labels.Selector
	// IgnoreAnnotations drops the pod's allow annotation: only policy
	// objects grant destinations. The pod's labels may still select it
	// and make it stricter (mode, fail mode), never wider.
	IgnoreAnnotations bool
	// ExemptNamespaces are never selected: the agent's own (its pod holds
	// the agent and Envoy, which a guardrail over every namespace must not
	// redirect to themselves or cut off from the API server).
	ExemptNamespaces []string
}

// Selection is the outcome of Select for one pod.
type Selection struct {
	// Selected: the pod is redirected through its node's proxy.
	Selected bool
	// SelectedBy says what selected it: the opt-in selector, EgressPolicy
	// and guardrail names.
	SelectedBy []string
	// Sources apply to it, in merge order: the pod's labels and
	// annotation, EgressPolicies, baselines, guardrails (by name within
	// each).
	Sources []Source
	// AnnotationIgnored: the pod has an allow annotation the cluster
	// setting ignores.
	AnnotationIgnored bool
	// Exempt: the pod's namespace is exempt (Options.ExemptNamespaces).
	Exempt bool
}

// FromLabels is the effective policy of a workload that its own labels
// and annotation alone govern: a pod when no policy object applies, a host
// service of the workloads file.
func FromLabels(podLabels, annotations map[string]string) Effective {
	return Merge(Select(Pod{Labels: podLabels, Annotations: annotations}, Objects{}, Options{OptIn: labels.Everything()}).Sources)
}

// Select says whether a pod is selected and which sources apply to it:
// the opt-in label or any EgressPolicy or guardrail selecting it selects
// it; baselines apply to pods selected otherwise. A policy whose selector
// does not parse selects every pod of its scope (a broken guardrail must
// not stop binding); a baseline's selects nothing (a broken grant grants
// nothing).
func Select(pod Pod, objs Objects, opt Options) Selection {
	var sel Selection
	if slices.Contains(opt.ExemptNamespaces, pod.Namespace) {
		sel.Exempt = true
		return sel
	}
	podLabels := labels.Set(pod.Labels)
	if opt.OptIn != nil && opt.OptIn.Matches(podLabels) {
		sel.Selected = true
		sel.SelectedBy = append(sel.SelectedBy, "the opt-in selector "+opt.OptIn.String())
	}
	if ps := podSource(pod, opt); ps != nil {
		sel.Sources = append(sel.Sources, *ps)
	}
	_, sel.AnnotationIgnored = pod.Annotations[AnnotationAllow]
	sel.AnnotationIgnored = sel.AnnotationIgnored && opt.IgnoreAnnotations
	var egress []*v1alpha1.EgressPolicy
	for _, p := range objs.EgressPolicies {
		if p.Namespace == pod.Namespace && matches(&p.Spec.PodSelector, podLabels, true) {
			egress = append(egress, p)
		}
	}
	slices.SortFunc(egress, func(a, b *v1alpha1.EgressPolicy) int { return strings.Compare(a.Name, b.Name) })
	for _, p := range egress {
		sel.Selected = true
		s := objs.Cache.source(p.UID, p.ResourceVersion, func() Source { return EgressPolicySource(p) })
		sel.SelectedBy = append(sel.SelectedBy, s.Name)
		sel.Sources = append(sel.Sources, s)
	}
	var baselines, guards []*v1alpha1.ClusterEgressPolicy
	for _, p := range objs.ClusterPolicies {
		broken := p.Spec.Tier != v1alpha1.TierBaseline // a guardrail, or a tier not understood: one
		if !matches(&p.Spec.NamespaceSelector, labels.Set(pod.NamespaceLabels), broken) || !matches(&p.Spec.PodSelector, podLabels, broken) {
			continue
		}
		if p.Spec.Tier == v1alpha1.TierBaseline {
			baselines = append(baselines, p)
		} else {
			guards = append(guards, p)
		}
	}
	byName := func(a, b *v1alpha1.ClusterEgressPolicy) int { return strings.Compare(a.Name, b.Name) }
	slices.SortFunc(baselines, byName)
	slices.SortFunc(guards, byName)
	for _, p := range guards {
		sel.Selected = true
		sel.SelectedBy = append(sel.SelectedBy, "ClusterEgressPolicy "+p.Name)
	}
	if sel.Selected {
		for _, p := range baselines {
			sel.Sources = append(sel.Sources, objs.Cache.source(p.UID, p.ResourceVersion, func() Source { return ClusterPolicySource(p) }))
		}
	}
	for _, p := range guards {
		sel.Sources = append(sel.Sources, objs.Cache.source(p.UID, p.ResourceVersion, func() Source { return ClusterPolicySource(p) }))
	}
	if !sel.Selected {
		sel.Sources, sel.SelectedBy = nil, nil
	}
	return sel
}

// matches reports whether a label selector selects set; a selector that
// does not parse selects everything when broken is true, nothing
// otherwise.
func matches(ls *metav1.LabelSelector, set labels.Set, broken bool) bool {
	s, err := metav1.LabelSelectorAsSelector(ls)
	if err != nil {
		return broken
	}
	return s.Matches(set)
}

// podSource is the pod's labels and annotation as a source; nil when the
// pod sets none of them.
func podSource(pod Pod, opt Options) *Source {
	m, hasMode := pod.Labels[LabelMode]
	f, hasFail := pod.Labels[LabelFailMode]
	a, hasAllow := pod.Annotations[AnnotationAllow]
	if opt.IgnoreAnnotations {
		hasAllow, a = false, ""
	}
	if !hasMode && !hasFail && !hasAllow {
		return nil
	}
	s := Source{Tier: Grant, Name: PodSourceName}
	var errs []error
	switch m {
	case "":
	case "audit":
		s.Mode, s.ModeSet = Audit, true
	case "enforce":
		s.Mode, s.ModeSet = Enforce, true
	default:
		s.Mode, s.ModeSet = Enforce, true
		errs = append(errs, fmt.Errorf("label %s=%q: want audit or enforce; enforcing", LabelMode, m))
	}
	switch f {
	case "":
	case "open":
		s.Fail = FailOpen
	case "closed":
		s.Fail = FailClosed
	default:
		errs = append(errs, fmt.Errorf("label %s=%q: want open or closed", LabelFailMode, f))
	}
	rules, err := ParseAllowList(a)
	if err != nil {
		errs = append(errs, err)
	}
	s.Allow, s.Err = rules, errors.Join(errs...)
	return &s
}

// EgressPolicySource reads an EgressPolicy as a source.
func EgressPolicySource(p *v1alpha1.EgressPolicy) Source {
	s := Source{Tier: Grant, Name: "EgressPolicy " + p.Namespace + "/" + p.Name}
	s.Mode, s.ModeSet = objectMode(p.Spec.Mode)
	s.Fail = objectFail(p.Spec.FailMode)
	s.Allow, s.Err = ValidateEgressPolicy(p)
	return s
}

// ClusterPolicySource reads a ClusterEgressPolicy as a source.
func ClusterPolicySource(p *v1alpha1.ClusterEgressPolicy) Source {
	s := Source{Tier: Guardrail, Name: "ClusterEgressPolicy " + p.Name}
	if p.Spec.Tier == v1alpha1.TierBaseline {
		s.Tier = Baseline
	} else {
		s.Mode, s.ModeSet = objectMode(p.Spec.Mode)
		s.Fail = objectFail(p.Spec.FailMode)
	}
	s.Allow, s.Err = ValidateClusterPolicy(p)
	return s
}

// objectMode: an unknown mode (the schema's enum keeps it out) enforces.
func objectMode(m v1alpha1.Mode) (Mode, bool) {
	switch m {
	case "":
		return Audit, false
	case v1alpha1.ModeAudit:
		return Audit, true
	}
	return Enforce, true
}

func objectFail(f v1alpha1.FailMode) FailMode {
	switch f {
	case "":
		return FailUnset
	case v1alpha1.FailOpen:
		return FailOpen
	}
	return FailClosed
}

// ValidateEgressPolicy checks an EgressPolicy as the CRD schema does, and
// returns its rules.
func ValidateEgressPolicy(p *v1alpha1.EgressPolicy) ([]Rule, error) {
	var errs []error
	errs = append(errs, checkSelector("spec.podSelector", &p.Spec.PodSelector))
	return validated(errs, p.Spec.Mode, p.Spec.FailMode, p.Spec.Egress)
}

// ValidateClusterPolicy checks a ClusterEgressPolicy as the CRD schema
// does, and returns its rules.
func ValidateClusterPolicy(p *v1alpha1.ClusterEgressPolicy) ([]Rule, error) {
	var errs []error
	switch p.Spec.Tier {
	case v1alpha1.TierGuardrail:
	case v1alpha1.TierBaseline:
		if p.Spec.Mode != "" || p.Spec.FailMode != "" {
			errs = append(errs, errors.New("a Baseline grants destinations and sets no mode or failMode"))
		}
	default:
		errs = append(errs, fmt.Errorf("spec.tier %q: want Guardrail or Baseline", p.Spec.Tier))
	}
	errs = append(errs, checkSelector("spec.namespaceSelector", &p.Spec.NamespaceSelector))
	errs = append(errs, checkSelector("spec.podSelector", &p.Spec.PodSelector))
	return validated(errs, p.Spec.Mode, p.Spec.FailMode, p.Spec.Egress)
}

// validated adds the checks both kinds share to errs and returns the rules,
// or every error.
func validated(errs []error, m v1alpha1.Mode, f v1alpha1.FailMode, egress []v1alpha1.EgressRule) ([]Rule, error) {
	errs = append(errs, checkMode(m, f)...)
	rules, err := RulesFromEgress(egress)
	errs = append(errs, err)
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return rules, nil
}

func checkSelector(field string, ls *metav1.LabelSelector) error {
	if _, err := metav1.LabelSelectorAsSelector(ls); err != nil {
		return fmt.Errorf("%s: %w", field, err)
	}
	return nil
}

func checkMode(m v1alpha1.Mode, f v1alpha1.FailMode) []error {
	var errs []error
	if m != "" && m != v1alpha1.ModeAudit && m != v1alpha1.ModeEnforce {
		errs = append(errs, fmt.Errorf("spec.mode %q: want Audit or Enforce", m))
	}
	if f != "" && f != v1alpha1.FailOpen && f != v1alpha1.FailClosed {
		errs = append(errs, fmt.Errorf("spec.failMode %q: want Open or Closed", f))
	}
	return errs
}

// Limits of a policy object, as the CRD schema sets them: 256 rules of 32
// ports, and 1,024 entries once each rule is counted once per port (the
// annotation's limit).
const (
	MaxEgressRules   = 256
	MaxRulePorts     = 32
	MaxObjectEntries = MaxAllowEntries
)

// RuleError says which egress rule of an object is wrong and why.
type RuleError struct {
	Index  int // 0-based, as in spec.egress[i]
	Reason string
}

func (e *RuleError) Error() string { return fmt.Sprintf("spec.egress[%d]: %s", e.Index, e.Reason) }

// RulesFromEgress checks egress rules with the annotation's grammar, in
// its canonical form (lowercase names, no trailing dot, as the schema
// requires), and returns one Rule per rule and port.
func RulesFromEgress(egress []v1alpha1.EgressRule) ([]Rule, error) {
	if len(egress) > MaxEgressRules {
		return nil, fmt.Errorf("spec.egress has %d rules, more than %d", len(egress), MaxEgressRules)
	}
	var out ruleSet
	var errs []error
	for i, e := range egress {
		rs, reason := rulesFrom(e)
		if reason != "" {
			errs = append(errs, &RuleError{Index: i, Reason: reason})
			continue
		}
		out.add(rs...)
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	if len(out.list) > MaxObjectEntries {
		return nil, fmt.Errorf("spec.egress expands to %d entries (one per rule and port), more than %d", len(out.list), MaxObjectEntries)
	}
	return out.list, nil
}

func rulesFrom(e v1alpha1.EgressRule) ([]Rule, string) {
	set := 0
	for _, s := range []string{e.Hostname, e.CIDR, e.TCPHostname} {
		if s != "" {
			set++
		}
	}
	if set != 1 {
		return nil, "set exactly one of hostname, cidr and tcpHostname"
	}
	if len(e.Ports) > MaxRulePorts {
		return nil, fmt.Sprintf("more than %d ports", MaxRulePorts)
	}
	ports := []uint16{0}
	if len(e.Ports) > 0 {
		ports = ports[:0]
	}
	for _, p := range e.Ports {
		if p < 1 || p > 65535 {
			return nil, fmt.Sprintf("port %d is not in 1-65535", p)
		}
		if slices.Contains(ports, uint16(p)) {
			return nil, fmt.Sprintf("port %d is listed twice", p)
		}
		ports = append(ports, uint16(p))
	}
	var base Rule
	switch {
	case e.Hostname != "":
		h, reason := parseHost(e.Hostname)
		if reason == "" && h != e.Hostname {
			reason = "write the hostname in lowercase without a trailing dot: " + strconv.Quote(h)
		}
		if reason != "" {
			return nil, "hostname: " + reason
		}
		base = Rule{Host: h}
	case e.CIDR != "":
		p, reason := parsePrefix(e.CIDR)
		if reason == "" && p.Addr().Is4() && strings.Contains(e.CIDR, ":") {
			reason = "write IPv4-mapped addresses as IPv4"
		}
		if reason != "" {
			return nil, "cidr: " + reason
		}
		base = Rule{Prefix: p}
	default:
		if len(e.Ports) == 0 {
			return nil, "a tcpHostname needs ports: the addresses it resolves to may serve other things at other ports"
		}
		r, reason := parseTCPHost(e.TCPHostname + ":" + strconv.Itoa(int(ports[0])))
		if reason == "" && r.Host != e.TCPHostname {
			reason = "write the hostname in lowercase without a trailing dot: " + strconv.Quote(r.Host)
		}
		if reason != "" {
			return nil, "tcpHostname: " + reason
		}
		base = r
	}
	out := make([]Rule, 0, len(ports))
	for _, p := range ports {
		r := base
		r.Port = p
		out = append(out, r)
	}
	return out, ""
}
