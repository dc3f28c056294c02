package daemonset

import (
	"bytes"
	"context"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sluice-io/sluice/charts"
	"github.com/sluice-io/sluice/test/kube"
	"github.com/sluice-io/sluice/test/testbed"
	authorizationv1 "k8s.io/api/authorization/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// TestPrivilegedManifestsOnAPIServer hands the manifests to a real
// kube-apiserver: a server-side dry-run apply with strict field validation
// (admission, validation and defaulting, nothing stored) of the install,
// the uninstall DaemonSet, the metrics Service and dashboard, and the Helm
// chart rendered with default and other values; then the install for
// real, and SubjectAccessReviews showing the service account can do what
// the agent does and nothing else. (The ServiceMonitor needs the
// Prometheus Operator's CRD; TestMonitoringRenders decodes it strictly.)
func TestPrivilegedManifestsOnAPIServer(t *testing.T) {
	testbed.RequirePrivileged(t)
	ns := testbed.NewNetns(t, "sluice-mf-"+testbed.RandomID())
	cluster := kube.Start(t, ns)
	ctx := context.Background()
	in := loadInstall(t)

	var all [][]byte
	var nsYAML []byte
	for _, o := range in.Objects {
		all = append(all, o.YAML)
		if o.Kind == "Namespace" {
			nsYAML = o.YAML
		}
	}
	// Namespaced objects cannot be dry-run into a namespace that does not
	// exist (NamespaceLifecycle admission): create it first.
	if err := cluster.Apply(ctx, false, nsYAML); err != nil {
		t.Fatal(err)
	}
	if err := cluster.Apply(ctx, true, all...); err != nil {
		t.Fatalf("server-side dry-run of the install: %v", err)
	}
	for _, sub := range []string{"uninstall", "monitoring"} {
		for _, o := range render(t, filepath.Join(Dir(), sub)) {
			if o.Kind == "ServiceMonitor" || o.Kind == "PrometheusRule" { // no Prometheus Operator CRDs here
				continue
			}
			if err := cluster.Apply(ctx, true, o.YAML); err != nil {
				t.Fatalf("server-side dry-run of %s: %v", sub, err)
			}
		}
	}
	// The Helm chart's renderings, default and not, the same way.
	for _, values := range []map[string]any{nil, {
		"image": map[string]any{"repository": "registry.example.com/sluice", "tag": "v1.2.3", "pullPolicy": "Always"}, "kernelBefore511": true,
		"config":     map[string]any{"cgroupDriver": "cgroupfs", "kubeletCgroupRoot": "/kubelet"},
		"monitoring": map[string]any{"serviceMonitor": map[string]any{"enabled": true}, "prometheusRule": map[string]any{"enabled": true}, "dashboard": map[string]any{"enabled": true}},
	}, {"uninstall": true}} {
		objs, err := charts.Render(in.Namespace.Name, values)
		if err != nil {
			t.Fatal(err)
		}
		for _, o := range objs {
			if o.Kind == "ServiceMonitor" || o.Kind == "PrometheusRule" {
				continue
			}
			if err := cluster.Apply(ctx, true, o.YAML); err != nil {
				t.Fatalf("server-side dry-run of the chart (values %v), %s %s: %v", values, o.Kind, o.Name, err)
			}
		}
	}
	// The server's strict validation is live: a misspelt field is refused.
	for _, o := range in.Objects {
		if o.Kind == "DaemonSet" {
			bad := bytes.Replace(o.YAML, []byte("hostNetwork:"), []byte("hostNetwrok:"), 1)
			if err := cluster.Apply(ctx, true, bad); err == nil || !strings.Contains(err.Error(), "hostNetwrok") {
				t.Fatalf("the API server accepted a misspelt field: %v", err)
			}
		}
	}

	if err := cluster.Apply(ctx, false, all...); err != nil {
		t.Fatalf("apply: %v", err)
	}
	ds, err := cluster.Client.AppsV1().DaemonSets(in.Namespace.Name).Get(ctx, in.DaemonSet.Name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if got := len(ds.Spec.Template.Spec.Containers); got != 2 {
		t.Errorf("stored DaemonSet has %d containers", got)
	}

	user := "system:serviceaccount:" + in.Namespace.Name + ":" + in.SA.Name
	for _, tc := range []struct {
		verb, resource, namespace string
		allowed                   bool
	}{
		{"list", "pods", "", true},
		{"watch", "pods", "", true},
		{"get", "pods", "shop", true},
		{"get", "nodes", "", true},
		{"create", "events", "shop", true},
		{"patch", "events", "shop", true},
		{"list", "nodes", "", false},
		{"update", "pods", "shop", false},
		{"delete", "pods", "shop", false},
		{"create", "pods", "shop", false},
		{"get", "secrets", "shop", false},
		{"list", "secrets", "", false},
		{"get", "configmaps", in.Namespace.Name, false},
		{"update", "nodes", "", false},
		{"list", "namespaces", "", true},
		{"update", "namespaces", "", false},
		{"list", "egresspolicies", "", true},
		{"watch", "clusteregresspolicies", "", true},
		{"update", "egresspolicies", "shop", false},
		{"create", "clusteregresspolicies", "", false},
		{"delete", "egresspolicies", "shop", false},
		{"update", "egresspolicies/status", "shop", true},
		{"update", "clusteregresspolicies/status", "", true},
		{"patch", "egresspolicies/status", "shop", false},
		{"create", "leases", in.Namespace.Name, true},
		{"get", "leases/sluice-policy-status", in.Namespace.Name, true},
		{"update", "leases/sluice-policy-status", in.Namespace.Name, true},
		{"update", "leases/kube-controller-manager", in.Namespace.Name, false},
		{"create", "leases", "kube-system", false},
		{"update", "leases/sluice-policy-status", "kube-system", false},
	} {
		res, name, _ := strings.Cut(tc.resource, "/")
		group, sub := "", ""
		switch res {
		case "egresspolicies", "clusteregresspolicies":
			group, sub, name = "policy.sluice.io", name, ""
		case "leases":
			group = "coordination.k8s.io"
		}
		sar, err := cluster.Client.AuthorizationV1().SubjectAccessReviews().Create(ctx, &authorizationv1.SubjectAccessReview{
			Spec: authorizationv1.SubjectAccessReviewSpec{
				User:   user,
				Groups: []string{"system:serviceaccounts", "system:serviceaccounts:" + in.Namespace.Name, "system:authenticated"},
				ResourceAttributes: &authorizationv1.ResourceAttributes{
					Verb: tc.verb, Group: group, Resource: res, Subresource: sub, Name: name, Namespace: tc.namespace,
				},
			},
		}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if sar.Status.Allowed != tc.allowed {
			t.Errorf("%s may %s %s in %q: %v, want %v (%s)", user, tc.verb, tc.resource, tc.namespace, sar.Status.Allowed, tc.allowed, sar.Status.Reason)
		}
	}
}
