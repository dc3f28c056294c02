package policy

import (
	"errors"
	"fmt"
	"slices"
	"strings"
)

// Tier is where a source of policy sits.
type Tier int

const (
	// Grant: a namespace EgressPolicy, or the pod's own labels and allow
	// annotation. Grants add destinations.
	Grant Tier = iota
	// Baseline: a cluster policy granting destinations to every pod it
	// selects that is selected at all (it selects no pod by itself).
	Baseline
	// Guardrail: a cluster policy bounding what selected pods may reach.
	// An entry from a grant or a baseline survives only where a
	// guardrail entry contains it.
	Guardrail
)

func (t Tier) String() string {
	switch t {
	case Baseline:
		return "baseline"
	case Guardrail:
		return "guardrail"
	}
	return "grant"
}

// FailMode is a source's say on what happens while the proxy is not ready.
type FailMode int

const (
	// FailUnset: the source's mode decides (enforce: closed).
	FailUnset FailMode = iota
	FailOpen
	FailClosed
)

// Source is one origin of a pod's policy: a policy object that selects
// the pod, or the pod's labels and annotation.
type Source struct {
	Tier Tier
	// Name identifies the source to people: "EgressPolicy team-a/api",
	// "ClusterEgressPolicy egress-guardrail", "pod labels/annotation".
	Name string
	// Mode is the source's mode; ModeSet false: it has no say (a baseline,
	// a guardrail that does not require enforcement, a pod without the
	// mode label).
	Mode    Mode
	ModeSet bool
	Fail    FailMode
	Allow   []Rule
	// Err: the source did not validate. A grant or baseline with an error
	// grants nothing; a guardrail with an error allows nothing and
	// requires enforcement, fail closed. Nothing that fails to validate
	// widens what a pod may reach.
	Err error
}

// Removal says what a guardrail did to one entry from below.
type Removal struct {
	Guardrail string
	Entry     Rule
	// Kept is what survived of the entry: empty when the guardrail
	// removed it whole, narrower entries when it contains only part of it
	// (a guardrail "api.example.com" keeps that much of "*.example.com").
	Kept []Rule
}

// Effective is a pod's merged policy and how it came about.
type Effective struct {
	Policy Policy
	// Sources are the names of the sources that apply, in merge order.
	Sources []string
	Removed []Removal
	// Err joins the errors of the sources that did not validate; Policy
	// is then what the safest reading of each gives.
	Err error
}

// Equal reports whether two merges came out the same.
func (e Effective) Equal(o Effective) bool {
	return e.Policy.Mode == o.Policy.Mode && e.Policy.FailClosed == o.Policy.FailClosed &&
		slices.Equal(e.Policy.Allow, o.Policy.Allow) && slices.Equal(e.Sources, o.Sources) &&
		slices.EqualFunc(e.Removed, o.Removed, func(a, b Removal) bool {
			return a.Guardrail == b.Guardrail && a.Entry == b.Entry && slices.Equal(a.Kept, b.Kept)
		}) && errString(e.Err) == errString(o.Err)
}

func errString(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

// Merge computes a pod's effective policy from every source that applies:
//
//   - mode: the strictest any source sets (enforce over audit);
//   - fail mode: closed if any source says closed, or sets enforce
//     without saying open, or (when enforced) did not validate; otherwise
//     open;
//   - allowed: (grants ∪ baselines) ∩ each guardrail.
//
// Hostname patterns (exact or "*.suffix") and CIDR prefixes are each
// nested or disjoint, so the intersection is exact: an entry a and a
// guardrail entry g meet in a when g contains a, in g's scope when a
// contains g, and nowhere otherwise; ports meet likewise (an entry without
// a port is every port). Names and addresses are different dimensions: a
// CIDR guardrail bounds CIDR entries, a name guardrail bounds hostname and
// TCP-hostname entries, and a TCP hostname survives as one only under a
// TCP-hostname guardrail entry (under a hostname entry it becomes the
// hostname, matched by SNI or Host). A metadata address is granted only
// where the grant and every guardrail name it exactly (MetadataGrants).
//
// Merge is pure: same sources, same result, in a stable order.
func Merge(sources []Source) Effective {
	var e Effective
	var errs []error
	failOpen, failClosed := false, false
	var grants ruleSet
	var guards []Source
	for _, s := range sources {
		e.Sources = append(e.Sources, s.Name)
		if s.Err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", s.Name, s.Err))
		}
		mode, set, fail := s.Mode, s.ModeSet, s.Fail
		if s.Err != nil && s.Tier == Guardrail {
			mode, set, fail = Enforce, true, FailClosed
		}
		if set && mode == Enforce {
			e.Policy.Mode = Enforce
			if fail == FailUnset {
				fail = FailClosed
			}
		}
		switch fail {
		case FailOpen:
			failOpen = true
		case FailClosed:
			failClosed = true
		}
		switch {
		case s.Tier == Guardrail:
			g := s
			if s.Err != nil {
				g.Allow = nil
			}
			guards = append(guards, g)
		case s.Err == nil:
			grants.add(s.Allow...)
		}
	}
	if len(grants.list) > MaxEffectiveEntries {
		// Too much to intersect and serve: the safe reading, nothing granted.
		errs = append(errs, fmt.Errorf("the grants total %d entries, more than %d: granting none of them", len(grants.list), MaxEffectiveEntries))
		grants = ruleSet{}
	}
	// A source that did not validate never leaves an enforced pod failing
	// open: its deny-all must hold while the proxy is down too.
	e.Policy.FailClosed = failClosed || (e.Policy.Mode == Enforce && (!failOpen || len(errs) > 0))
	for _, g := range guards {
		var kept ruleSet
		for _, a := range grants.list {
			in := intersect(a, g.Allow, g.Name)
			if !slices.ContainsFunc(in, func(r Rule) bool { return sameScope(r, a) }) {
				e.Removed = append(e.Removed, Removal{Guardrail: g.Name, Entry: a, Kept: in})
			}
			kept.add(in...)
		}
		grants = kept
	}
	e.Policy.Allow = grants.list
	e.Err = errors.Join(errs...)
	return e
}

// MaxEffectiveEntries caps a pod's grants (their union, before the
// guardrails): what the agent intersects and serves for one pod stays
// bounded whatever the objects selecting it hold.
const MaxEffectiveEntries = 1024

// ruleSet is a list without repeats, in first-seen order.
type ruleSet struct {
	list []Rule
	seen map[Rule]bool
}

func (s *ruleSet) add(rs ...Rule) {
	if s.seen == nil {
		s.seen = map[Rule]bool{}
	}
	for _, r := range rs {
		if !s.seen[r] {
			s.seen[r] = true
			s.list = append(s.list, r)
		}
	}
}

// sameScope: the same rule, but for the marks guardrails leave.
func sameScope(a, b Rule) bool {
	a.Narrowed, b.Narrowed = "", ""
	return a == b
}

// intersect is a ∩ (g1 ∪ g2 ∪ ...): the parts of a that guardrail entries
// gs contain, without repeats. guard names the guardrail on address rules
// whose scope it did not name exactly.
func intersect(a Rule, gs []Rule, guard string) []Rule {
	var out ruleSet
	for _, g := range gs {
		port, ok := meetPorts(a.Port, g.Port)
		if !ok {
			continue
		}
		r := a
		r.Port = port
		switch {
		case isName(a) != isName(g):
			continue
		case contains(g, a):
		case contains(a, g):
			r.Host, r.Prefix = g.Host, g.Prefix
		default:
			continue
		}
		if isName(a) {
			// A TCP hostname allows any protocol to the name's
			// addresses; a hostname, the name as the client sends it
			// (SNI, Host). Both meet in the narrower: the hostname.
			r.Resolve = a.Resolve && g.Resolve
		} else if r.Prefix != a.Prefix || g.Prefix != a.Prefix {
			// Metadata access needs an entry naming the address, and a
			// guardrail naming it too: a wider guardrail (0.0.0.0/0)
			// does not let a namespace grant the instance's
			// credentials, and a wider grant narrowed to the address
			// never named it (MetadataGrants skips Narrowed).
			r.Narrowed = guard
		}
		out.add(r)
	}
	return out.list
}

func isName(r Rule) bool { return r.Host != "" }

func meetPorts(a, b uint16) (uint16, bool) {
	switch {
	case a == b, b == 0:
		return a, true
	case a == 0:
		return b, true
	}
	return 0, false
}

// contains reports whether outer's scope (its name pattern or prefix,
// ports aside) covers all of inner's.
func contains(outer, inner Rule) bool {
	if isName(outer) {
		return nameContains(outer.Host, inner.Host)
	}
	return outer.Prefix.Bits() <= inner.Prefix.Bits() && outer.Prefix.Addr().Is4() == inner.Prefix.Addr().Is4() &&
		outer.Prefix.Contains(inner.Prefix.Addr())
}

// nameContains: pattern outer ("name" or "*.suffix") matches every name
// inner matches. "*.example.com" contains "a.example.com" and
// "*.a.example.com", not "example.com".
func nameContains(outer, inner string) bool {
	suffix, wild := strings.CutPrefix(outer, "*")
	if !wild {
		return outer == inner
	}
	// An exact name never starts with '.', so only the same wildcard
	// equals the suffix once its '*' is gone.
	return strings.HasSuffix(strings.TrimPrefix(inner, "*"), suffix)
}
