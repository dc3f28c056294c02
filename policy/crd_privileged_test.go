package policy

import (
	"context"
	"fmt"
	"strings"
	"testing"

	"github.com/sluice-io/sluice/policy/apis/policy/v1alpha1"
	"github.com/sluice-io/sluice/policy/client/clientset/versioned"
	"github.com/sluice-io/sluice/test/kube"
	"github.com/sluice-io/sluice/test/testbed"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// installCRDs installs the shipped CRDs and returns a typed client.
func installCRDs(t *testing.T, cluster *kube.Cluster) *versioned.Clientset {
	t.Helper()
	cluster.InstallCRDs(t)
	pc, err := versioned.NewForConfig(cluster.Config)
	if err != nil {
		t.Fatal(err)
	}
	return pc
}

// TestPrivilegedCRDValidation hands every row of egressCases, and the
// objects the schema must refuse, to a real kube-apiserver with the
// shipped CRDs: the CEL and OpenAPI rules reject at create time exactly
// what the agent's validation rejects, with a message naming the field.
func TestPrivilegedCRDValidation(t *testing.T) {
	testbed.RequirePrivileged(t)
	ns := testbed.NewNetns(t, "sluice-crd-"+testbed.RandomID())
	cluster := kube.Start(t, ns)
	pc := installCRDs(t, cluster)
	ctx := context.Background()
	api := pc.PolicyV1alpha1()
	for i, tc := range egressCases {
		p := egressPolicy("default", fmt.Sprintf("case-%03d", i), nil, v1alpha1.ModeEnforce, tc.rule)
		_, err := api.EgressPolicies("default").Create(ctx, p, metav1.CreateOptions{})
		_, agentErr := RulesFromEgress([]v1alpha1.EgressRule{tc.rule})
		switch {
		case tc.ok && err != nil:
			t.Errorf("%+v: the API server refused a valid rule: %v", tc.rule, err)
		case !tc.ok && err == nil:
			t.Errorf("%+v: the API server accepted an invalid rule (the agent says: %v)", tc.rule, agentErr)
		case !tc.ok && !apierrors.IsInvalid(err):
			t.Errorf("%+v: refused, but not as Invalid: %v", tc.rule, err)
		case !tc.ok && !strings.Contains(err.Error(), "spec.egress[0]"):
			t.Errorf("%+v: the error does not name the field: %v", tc.rule, err)
		}
	}
	sel := func(ls metav1.LabelSelector) v1alpha1.ClusterEgressPolicySpec {
		return v1alpha1.ClusterEgressPolicySpec{Tier: v1alpha1.TierGuardrail, PodSelector: ls}
	}
	for _, tc := range []struct {
		name string
		spec v1alpha1.ClusterEgressPolicySpec
		want string
	}{
		{"baseline-with-mode", v1alpha1.ClusterEgressPolicySpec{Tier: v1alpha1.TierBaseline, Mode: v1alpha1.ModeEnforce}, "sets no mode"},
		{"no-tier", v1alpha1.ClusterEgressPolicySpec{}, "spec.tier"},
		{"bad-tier", v1alpha1.ClusterEgressPolicySpec{Tier: "Admin"}, "spec.tier"},
		{"bad-mode", v1alpha1.ClusterEgressPolicySpec{Tier: v1alpha1.TierGuardrail, Mode: "enforce"}, "spec.mode"},
		{"bad-fail-mode", v1alpha1.ClusterEgressPolicySpec{Tier: v1alpha1.TierGuardrail, FailMode: "Sometimes"}, "spec.failMode"},
		{"bad-operator", sel(metav1.LabelSelector{MatchExpressions: []metav1.LabelSelectorRequirement{{Key: "app", Operator: "Near"}}}), "operator"},
		{"in-without-values", sel(metav1.LabelSelector{MatchExpressions: []metav1.LabelSelectorRequirement{{Key: "app", Operator: "In"}}}), "operator"},
		{"exists-with-values", sel(metav1.LabelSelector{MatchExpressions: []metav1.LabelSelectorRequirement{{Key: "app", Operator: "Exists", Values: []string{"x"}}}}), "operator"},
	} {
		obj := &v1alpha1.ClusterEgressPolicy{ObjectMeta: metav1.ObjectMeta{Name: tc.name}, Spec: tc.spec}
		_, err := api.ClusterEgressPolicies().Create(ctx, obj, metav1.CreateOptions{})
		if err == nil || !apierrors.IsInvalid(err) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: want Invalid naming %q, got %v", tc.name, tc.want, err)
		}
		if _, agentErr := ValidateClusterPolicy(obj); agentErr == nil {
			t.Errorf("%s: the agent accepts what the API server refuses", tc.name)
		}
	}
	// 40 rules of 32 ports: 1,280 entries, past the 1,024 both refuse.
	ports := make([]v1alpha1.Port, 32)
	for i := range ports {
		ports[i] = v1alpha1.Port(2000 + i)
	}
	var rules []v1alpha1.EgressRule
	for i := range 40 {
		rules = append(rules, v1alpha1.EgressRule{Hostname: fmt.Sprintf("h%d.example.com", i), Ports: ports})
	}
	big := egressPolicy("default", "too-many", nil, "", rules...)
	if _, err := api.EgressPolicies("default").Create(ctx, big, metav1.CreateOptions{}); err == nil || !strings.Contains(err.Error(), "more than 1024 entries") {
		t.Errorf("1,280 entries: the API server said %v", err)
	}
	if _, err := ValidateEgressPolicy(big); err == nil {
		t.Error("1,280 entries: the agent accepts what the API server refuses")
	}
	ok := &v1alpha1.ClusterEgressPolicy{ObjectMeta: metav1.ObjectMeta{Name: "ok"}, Spec: v1alpha1.ClusterEgressPolicySpec{
		Tier: v1alpha1.TierGuardrail, Mode: v1alpha1.ModeEnforce,
		NamespaceSelector: metav1.LabelSelector{MatchExpressions: []metav1.LabelSelectorRequirement{{Key: "env", Operator: "In", Values: []string{"prod"}}}},
		Egress:            []v1alpha1.EgressRule{{Hostname: "*.example.com"}, {CIDR: "10.0.0.0/8", Ports: []v1alpha1.Port{5432}}}}}
	if _, err := api.ClusterEgressPolicies().Create(ctx, ok, metav1.CreateOptions{}); err != nil {
		t.Fatalf("a valid guardrail was refused: %v", err)
	}

	// The examples apply as they are (server-side, strict field validation).
	if _, err := cluster.Client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "shop"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	_, _, docs := exampleObjects(t)
	if err := cluster.Apply(ctx, false, docs...); err != nil {
		t.Errorf("examples/: %v", err)
	}
}
