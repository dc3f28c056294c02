package main

import (
	"bytes"
	"strings"
	"testing"

	"github.com/sluice-io/sluice/policy"
	"github.com/sluice-io/sluice/policy/apis/policy/v1alpha1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
)

func TestExplainText(t *testing.T) {
	optIn, _ := labels.Parse("sluice.io/redirect=true")
	objs := policy.Objects{
		EgressPolicies: []*v1alpha1.EgressPolicy{{ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: "web"},
			Spec: v1alpha1.EgressPolicySpec{Mode: v1alpha1.ModeAudit, Egress: []v1alpha1.EgressRule{{Hostname: "*.example.com", Ports: []v1alpha1.Port{443}}}}}},
		ClusterPolicies: []*v1alpha1.ClusterEgressPolicy{{ObjectMeta: metav1.ObjectMeta{Name: "prod"},
			Spec: v1alpha1.ClusterEgressPolicySpec{Tier: v1alpha1.TierGuardrail, Mode: v1alpha1.ModeEnforce, Egress: []v1alpha1.EgressRule{{Hostname: "api.example.com"}}}}},
	}
	ex := explain(policy.Pod{Namespace: "shop", Labels: map[string]string{"app": "web"}, Annotations: map[string]string{"sluice.io/allow": "203.0.113.1"}}, objs, policy.Options{OptIn: optIn, IgnoreAnnotations: true})
	ex.Pod, ex.Node, ex.Settings = "shop/web-1", "node-a", map[string]string{"from": "flags", "SELECTOR": "sluice.io/redirect=true", "IGNORE_ALLOW_ANNOTATIONS": "true"}
	var b bytes.Buffer
	printExplanation(&b, ex)
	for _, want := range []string{
		"selected by: EgressPolicy shop/web, ClusterEgressPolicy prod",
		"its sluice.io/allow annotation is ignored",
		"EgressPolicy shop/web     grant      audit    -          *.example.com:443",
		"effective policy: enforce, fail closed",
		"allow api.example.com:443",
		"ClusterEgressPolicy prod: *.example.com:443 narrowed to api.example.com:443",
	} {
		if !strings.Contains(b.String(), want) {
			t.Errorf("explain lacks %q:\n%s", want, b.String())
		}
	}
	none := explain(policy.Pod{Namespace: "shop"}, policy.Objects{}, policy.Options{OptIn: optIn})
	none.Settings = map[string]string{}
	b.Reset()
	printExplanation(&b, none)
	if !strings.Contains(b.String(), "not selected") {
		t.Errorf("an unselected pod:\n%s", b.String())
	}
}
