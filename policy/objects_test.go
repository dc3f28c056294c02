package policy

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sluice-io/sluice/policy/apis/policy/v1alpha1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"sigs.k8s.io/yaml"
)

// egressCases are egress rules and whether they are valid. The same table
// is handed to the real API server with the shipped CRDs
// (TestPrivilegedCRDValidation): the schema's CEL rules and the agent's
// validation must agree on every row.
var egressCases = []struct {
	rule v1alpha1.EgressRule
	ok   bool
}{
	{v1alpha1.EgressRule{Hostname: "api.example.com"}, true},
	{v1alpha1.EgressRule{Hostname: "api.example.com", Ports: []v1alpha1.Port{443, 8443}}, true},
	{v1alpha1.EgressRule{Hostname: "*.example.com", Ports: []v1alpha1.Port{443}}, true},
	{v1alpha1.EgressRule{Hostname: "localhost"}, true},
	{v1alpha1.EgressRule{Hostname: "xn--bcher-kva.example"}, true},
	{v1alpha1.EgressRule{Hostname: "a-b.example.com"}, true},
	{v1alpha1.EgressRule{Hostname: "API.example.com"}, false},
	{v1alpha1.EgressRule{Hostname: "api.example.com."}, false},
	{v1alpha1.EgressRule{Hostname: "*.com"}, false},
	{v1alpha1.EgressRule{Hostname: "a.*.example.com"}, false},
	{v1alpha1.EgressRule{Hostname: "*example.com"}, false},
	{v1alpha1.EgressRule{Hostname: "-a.example.com"}, false},
	{v1alpha1.EgressRule{Hostname: "a-.example.com"}, false},
	{v1alpha1.EgressRule{Hostname: "a..example.com"}, false},
	{v1alpha1.EgressRule{Hostname: "a_b.example.com"}, false},
	{v1alpha1.EgressRule{Hostname: "bücher.example"}, false},
	{v1alpha1.EgressRule{Hostname: "api.example.com:443"}, false},
	{v1alpha1.EgressRule{Hostname: "10.0.0.1"}, false},
	{v1alpha1.EgressRule{Hostname: "*.0.0.1"}, false},
	{v1alpha1.EgressRule{Hostname: strings.Repeat("a", 64) + ".example.com"}, false},
	{v1alpha1.EgressRule{Hostname: strings.Repeat("abcdefghi.", 25) + "example"}, false}, // 257 characters
	{v1alpha1.EgressRule{CIDR: "203.0.113.0/24", Ports: []v1alpha1.Port{5432}}, true},
	{v1alpha1.EgressRule{CIDR: "203.0.113.7"}, true},
	{v1alpha1.EgressRule{CIDR: "0.0.0.0/0"}, true},
	{v1alpha1.EgressRule{CIDR: "2001:db8::/32"}, true},
	{v1alpha1.EgressRule{CIDR: "2001:db8::1", Ports: []v1alpha1.Port{443}}, true},
	{v1alpha1.EgressRule{CIDR: "203.0.113.7/24"}, false},
	{v1alpha1.EgressRule{CIDR: "2001:db8::1/32"}, false},
	{v1alpha1.EgressRule{CIDR: "203.0.113.0/33"}, false},
	{v1alpha1.EgressRule{CIDR: "::ffff:203.0.113.7"}, false},
	{v1alpha1.EgressRule{CIDR: "fe80::1%eth0"}, false},
	{v1alpha1.EgressRule{CIDR: "203.0.113.7:443"}, false},
	{v1alpha1.EgressRule{CIDR: "[2001:db8::1]"}, false},
	{v1alpha1.EgressRule{CIDR: "example.com"}, false},
	{v1alpha1.EgressRule{TCPHostname: "db.example.com", Ports: []v1alpha1.Port{5432}}, true},
	{v1alpha1.EgressRule{TCPHostname: "db.example.com"}, false},
	{v1alpha1.EgressRule{TCPHostname: "*.example.com", Ports: []v1alpha1.Port{5432}}, false},
	{v1alpha1.EgressRule{TCPHostname: "10.0.0.1", Ports: []v1alpha1.Port{5432}}, false},
	{v1alpha1.EgressRule{TCPHostname: "DB.example.com", Ports: []v1alpha1.Port{5432}}, false},
	{v1alpha1.EgressRule{}, false},
	{v1alpha1.EgressRule{Hostname: "api.example.com", CIDR: "203.0.113.7"}, false},
	{v1alpha1.EgressRule{Hostname: "api.example.com", Ports: []v1alpha1.Port{0}}, false},
	{v1alpha1.EgressRule{Hostname: "api.example.com", Ports: []v1alpha1.Port{65536}}, false},
	{v1alpha1.EgressRule{Hostname: "api.example.com", Ports: []v1alpha1.Port{443, 443}}, false},
}

func TestRulesFromEgress(t *testing.T) {
	for _, tc := range egressCases {
		rules, err := RulesFromEgress([]v1alpha1.EgressRule{tc.rule})
		if (err == nil) != tc.ok {
			t.Errorf("%+v: err %v, want ok %v", tc.rule, err, tc.ok)
			continue
		}
		if !tc.ok {
			continue
		}
		// The same destination as the annotation entry it spells.
		for _, r := range rules {
			back, err := ParseAllowList(r.String())
			if err != nil || len(back) != 1 || back[0] != r {
				t.Errorf("%+v: rule %v does not round-trip through the annotation grammar: %v %v", tc.rule, r, back, err)
			}
		}
		if want := max(1, len(tc.rule.Ports)); len(rules) != want {
			t.Errorf("%+v: %d rules, want one per port (%d)", tc.rule, len(rules), want)
		}
	}
}

func selector(t *testing.T, s string) labels.Selector {
	sel, err := labels.Parse(s)
	if err != nil {
		t.Fatal(err)
	}
	return sel
}

func egressPolicy(ns, name string, sel map[string]string, mode v1alpha1.Mode, rules ...v1alpha1.EgressRule) *v1alpha1.EgressPolicy {
	return &v1alpha1.EgressPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec: v1alpha1.EgressPolicySpec{PodSelector: metav1.LabelSelector{MatchLabels: sel}, Mode: mode, Egress: rules}}
}

func clusterPolicy(name string, tier v1alpha1.Tier, nsSel, podSel map[string]string, mode v1alpha1.Mode, rules ...v1alpha1.EgressRule) *v1alpha1.ClusterEgressPolicy {
	return &v1alpha1.ClusterEgressPolicy{ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec: v1alpha1.ClusterEgressPolicySpec{Tier: tier, NamespaceSelector: metav1.LabelSelector{MatchLabels: nsSel},
			PodSelector: metav1.LabelSelector{MatchLabels: podSel}, Mode: mode, Egress: rules}}
}

func TestSelect(t *testing.T) {
	optIn := Options{OptIn: selector(t, "sluice.io/redirect=true")}
	host := func(h string, ports ...v1alpha1.Port) v1alpha1.EgressRule {
		return v1alpha1.EgressRule{Hostname: h, Ports: ports}
	}
	objs := Objects{
		EgressPolicies: []*v1alpha1.EgressPolicy{
			egressPolicy("team-a", "web", map[string]string{"app": "web"}, v1alpha1.ModeEnforce, host("api.example.com", 443), host("evil.example.org")),
			egressPolicy("team-b", "web", map[string]string{"app": "web"}, v1alpha1.ModeEnforce, host("b.example.com")),
		},
		ClusterPolicies: []*v1alpha1.ClusterEgressPolicy{
			clusterPolicy("telemetry", v1alpha1.TierBaseline, nil, nil, "", host("otel.example.com", 4317)),
			clusterPolicy("prod", v1alpha1.TierGuardrail, map[string]string{"env": "prod"}, nil, v1alpha1.ModeEnforce, host("*.example.com")),
		},
	}
	for _, tc := range []struct {
		name     string
		pod      Pod
		opt      Options
		selected bool
		sources  string
		mode     Mode
		allow    string
	}{
		{name: "nothing selects", pod: Pod{Namespace: "team-a", Labels: map[string]string{"app": "db"}}, opt: optIn},
		{name: "a baseline alone does not select", pod: Pod{Namespace: "team-c", Labels: map[string]string{"app": "web"}}, opt: optIn},
		{name: "the opt-in label, with the baseline",
			pod: Pod{Namespace: "team-c", Labels: map[string]string{"sluice.io/redirect": "true"}}, opt: optIn, selected: true,
			sources: "ClusterEgressPolicy telemetry", mode: Audit, allow: "otel.example.com:4317"},
		{name: "an EgressPolicy selects",
			pod: Pod{Namespace: "team-a", Labels: map[string]string{"app": "web"}}, opt: optIn, selected: true,
			sources: "EgressPolicy team-a/web, ClusterEgressPolicy telemetry", mode: Enforce,
			allow: "api.example.com:443, evil.example.org, otel.example.com:4317"},
		{name: "a guardrail selects and bounds, annotation and all",
			pod: Pod{Namespace: "team-a", Labels: map[string]string{"app": "web", LabelMode: "audit"}, Annotations: map[string]string{AnnotationAllow: "x.example.net, y.example.com"},
				NamespaceLabels: map[string]string{"env": "prod"}}, opt: optIn, selected: true,
			sources: PodSourceName + ", EgressPolicy team-a/web, ClusterEgressPolicy telemetry, ClusterEgressPolicy prod", mode: Enforce,
			allow: "y.example.com, api.example.com:443, otel.example.com:4317"},
		{name: "annotations ignored by the cluster setting",
			pod: Pod{Namespace: "team-c", Labels: map[string]string{"sluice.io/redirect": "true", LabelMode: "enforce"}, Annotations: map[string]string{AnnotationAllow: "x.example.net"}},
			opt: Options{OptIn: optIn.OptIn, IgnoreAnnotations: true}, selected: true,
			sources: PodSourceName + ", ClusterEgressPolicy telemetry", mode: Enforce, allow: "otel.example.com:4317"},
		{name: "another namespace's EgressPolicy does not apply",
			pod: Pod{Namespace: "team-c", Labels: map[string]string{"app": "web"}, NamespaceLabels: map[string]string{"env": "prod"}}, opt: optIn, selected: true,
			sources: "ClusterEgressPolicy telemetry, ClusterEgressPolicy prod", mode: Enforce, allow: "otel.example.com:4317"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sel := Select(tc.pod, objs, tc.opt)
			if sel.Selected != tc.selected {
				t.Fatalf("selected %v, want %v", sel.Selected, tc.selected)
			}
			e := Merge(sel.Sources)
			if got := strings.Join(e.Sources, ", "); got != tc.sources {
				t.Errorf("sources %q, want %q", got, tc.sources)
			}
			if !tc.selected {
				return
			}
			if e.Policy.Mode != tc.mode || ruleStrings(e.Policy.Allow) != tc.allow {
				t.Errorf("%v %q, want %v %q", e.Policy.Mode, ruleStrings(e.Policy.Allow), tc.mode, tc.allow)
			}
			if sel.AnnotationIgnored != tc.opt.IgnoreAnnotations {
				t.Errorf("annotation ignored %v", sel.AnnotationIgnored)
			}
		})
	}
}

// The agent's own namespace is never selected, whatever selects it.
func TestSelectExempt(t *testing.T) {
	g := clusterPolicy("all", v1alpha1.TierGuardrail, nil, nil, v1alpha1.ModeEnforce)
	sel := Select(Pod{Namespace: "sluice-system", Labels: map[string]string{"sluice.io/redirect": "true"}},
		Objects{ClusterPolicies: []*v1alpha1.ClusterEgressPolicy{g}}, Options{OptIn: labels.Everything(), ExemptNamespaces: []string{"sluice-system"}})
	if sel.Selected || !sel.Exempt || len(sel.Sources) != 0 {
		t.Fatalf("%+v", sel)
	}
	if sel := Select(Pod{Namespace: "shop"}, Objects{ClusterPolicies: []*v1alpha1.ClusterEgressPolicy{g}}, Options{ExemptNamespaces: []string{"sluice-system"}}); !sel.Selected {
		t.Fatal("a guardrail over every namespace no longer selects other namespaces")
	}
}

// A policy whose selector does not parse: a guardrail selects every pod
// (and, broken, allows nothing); a baseline selects none.
func TestSelectBrokenSelectors(t *testing.T) {
	bad := metav1.LabelSelector{MatchExpressions: []metav1.LabelSelectorRequirement{{Key: "app", Operator: "Near"}}}
	g := clusterPolicy("g", v1alpha1.TierGuardrail, nil, nil, "")
	g.Spec.PodSelector = bad
	b := clusterPolicy("b", v1alpha1.TierBaseline, nil, nil, "", v1alpha1.EgressRule{Hostname: "a.example.com"})
	b.Spec.NamespaceSelector = bad
	ep := egressPolicy("ns", "e", nil, "", v1alpha1.EgressRule{Hostname: "b.example.com"})
	ep.Spec.PodSelector = bad
	sel := Select(Pod{Namespace: "ns", Labels: map[string]string{"app": "x"}}, Objects{EgressPolicies: []*v1alpha1.EgressPolicy{ep}, ClusterPolicies: []*v1alpha1.ClusterEgressPolicy{g, b}}, Options{})
	e := Merge(sel.Sources)
	if !sel.Selected || strings.Join(e.Sources, ", ") != "EgressPolicy ns/e, ClusterEgressPolicy g" {
		t.Fatalf("selected %v by %v", sel.Selected, e.Sources)
	}
	if e.Policy.Mode != Enforce || !e.Policy.FailClosed || len(e.Policy.Allow) != 0 || e.Err == nil {
		t.Fatalf("a broken guardrail must enforce deny-all: %+v", e)
	}
}

// legacyParsePolicy is the label and annotation parser from before the
// policy objects, kept as the oracle of TestPodSourceMatchesParsePolicy.
func legacyParsePolicy(labels, annotations map[string]string) (Policy, error) {
	var errs []error
	p := Policy{Mode: Audit}
	switch m := labels[LabelMode]; m {
	case "", "audit":
	case "enforce":
		p.Mode = Enforce
	default:
		p.Mode = Enforce
		errs = append(errs, fmt.Errorf("label %s=%q: want audit or enforce; enforcing deny-all", LabelMode, m))
	}
	p.FailClosed = p.Mode == Enforce
	switch f := labels[LabelFailMode]; f {
	case "":
	case "closed":
		p.FailClosed = true
	case "open":
		p.FailClosed = false
	default:
		errs = append(errs, fmt.Errorf("label %s=%q: want open or closed; keeping fail-%s", LabelFailMode, f, map[bool]string{true: "closed", false: "open"}[p.FailClosed]))
	}
	rules, err := ParseAllowList(annotations[AnnotationAllow])
	if err != nil {
		errs = append(errs, err)
	}
	if len(errs) > 0 {
		// No allow entries: deny-all in enforce mode, which never fails open.
		if p.Mode == Enforce {
			p.FailClosed = true
		}
		return p, errors.Join(errs...)
	}
	p.Allow = rules
	return p, nil
}

// The pod's labels and annotation, merged alone, mean what they meant
// before the policy objects (legacyParsePolicy): the file source and a
// Kubernetes pod without policy objects behave as before.
func TestPodSourceMatchesParsePolicy(t *testing.T) {
	for _, m := range []string{"", "audit", "enforce", "strict"} {
		for _, f := range []string{"", "open", "closed", "maybe"} {
			for _, a := range []string{"", "api.example.com:443, 10.0.0.0/8", "bad entry!"} {
				l, an := map[string]string{}, map[string]string{}
				if m != "" {
					l[LabelMode] = m
				}
				if f != "" {
					l[LabelFailMode] = f
				}
				if a != "" {
					an[AnnotationAllow] = a
				}
				want, werr := legacyParsePolicy(l, an)
				sel := Select(Pod{Labels: l, Annotations: an}, Objects{}, Options{OptIn: labels.Everything()})
				e := Merge(sel.Sources)
				if e.Policy.Mode != want.Mode || e.Policy.FailClosed != want.FailClosed || ruleStrings(e.Policy.Allow) != ruleStrings(want.Allow) || (e.Err == nil) != (werr == nil) {
					t.Errorf("mode=%q fail=%q allow=%q: merge %+v (err %v), ParsePolicy %+v (err %v)", m, f, a, e.Policy, e.Err, want, werr)
				}
			}
		}
	}
}

// exampleObjects reads the YAML in examples/ strictly into the API types.
func exampleObjects(t *testing.T) (eps []*v1alpha1.EgressPolicy, cps []*v1alpha1.ClusterEgressPolicy, docs [][]byte) {
	t.Helper()
	files, _ := filepath.Glob("../examples/*.yaml")
	if len(files) < 3 {
		t.Fatalf("examples: %v", files)
	}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for _, doc := range strings.Split(string(b), "\n---\n") {
			var tm metav1.TypeMeta
			if err := yaml.Unmarshal([]byte(doc), &tm); err != nil {
				t.Fatalf("%s: %v", f, err)
			}
			switch tm.Kind {
			case "EgressPolicy":
				var p v1alpha1.EgressPolicy
				if err := yaml.UnmarshalStrict([]byte(doc), &p); err != nil {
					t.Fatalf("%s: %v", f, err)
				}
				eps = append(eps, &p)
			case "ClusterEgressPolicy":
				var p v1alpha1.ClusterEgressPolicy
				if err := yaml.UnmarshalStrict([]byte(doc), &p); err != nil {
					t.Fatalf("%s: %v", f, err)
				}
				cps = append(cps, &p)
			default:
				t.Fatalf("%s: unexpected kind %q", f, tm.Kind)
			}
			docs = append(docs, []byte(doc))
		}
	}
	return eps, cps, docs
}

// The examples are valid, and mean what their comments say.
func TestExamples(t *testing.T) {
	eps, cps, _ := exampleObjects(t)
	for _, p := range eps {
		if _, err := ValidateEgressPolicy(p); err != nil {
			t.Errorf("EgressPolicy %s/%s: %v", p.Namespace, p.Name, err)
		}
	}
	for _, p := range cps {
		if _, err := ValidateClusterPolicy(p); err != nil {
			t.Errorf("ClusterEgressPolicy %s: %v", p.Name, err)
		}
	}
	optIn, _ := labels.Parse("sluice.io/redirect=true")
	sel := Select(Pod{Namespace: "shop", Labels: map[string]string{"app": "checkout"}, NamespaceLabels: map[string]string{"env": "prod"}},
		Objects{EgressPolicies: eps, ClusterPolicies: cps}, Options{OptIn: optIn})
	e := Merge(sel.Sources)
	want := "api.payments.example.com:443, tcp://db.example.com:5432, otel-collector.example.com:4317, otel-collector.example.com:4318, *.ingest.example.com:443"
	if e.Policy.Mode != Enforce || !e.Policy.FailClosed || ruleStrings(e.Policy.Allow) != want {
		t.Errorf("checkout in a prod namespace: %v closed=%v %q, want enforce, closed, %q", e.Policy.Mode, e.Policy.FailClosed, ruleStrings(e.Policy.Allow), want)
	}
	if len(e.Removed) != 1 || e.Removed[0].Entry.String() != "other.example.org:443" {
		t.Errorf("removed %+v, want other.example.org:443 only", e.Removed)
	}
}

// With a cache, an object's rules are read once per resourceVersion.
func TestSelectCachesSourcesPerVersion(t *testing.T) {
	p := egressPolicy("ns", "e", nil, v1alpha1.ModeEnforce, v1alpha1.EgressRule{Hostname: "a.example.com"})
	p.UID, p.ResourceVersion = "uid-1", "1"
	cache := &SourceCache{}
	allow := func() string {
		sel := Select(Pod{Namespace: "ns"}, Objects{EgressPolicies: []*v1alpha1.EgressPolicy{p}, Cache: cache}, Options{})
		return ruleStrings(Merge(sel.Sources).Policy.Allow)
	}
	if got := allow(); got != "a.example.com" {
		t.Fatalf("allow %q", got)
	}
	// Informer objects never change in place; this one does, at the same
	// version, to show the cache answered.
	p.Spec.Egress = []v1alpha1.EgressRule{{Hostname: "b.example.com"}}
	if got := allow(); got != "a.example.com" {
		t.Errorf("same version: %q, want the cached a.example.com", got)
	}
	p.ResourceVersion = "2"
	if got := allow(); got != "b.example.com" {
		t.Errorf("new version: %q, want b.example.com", got)
	}
	cache.Forget("uid-1")
	if len(cache.m) != 0 {
		t.Errorf("Forget left %d entries", len(cache.m))
	}
}
