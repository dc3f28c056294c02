package kube

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"testing"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/restmapper"
	"sigs.k8s.io/yaml"
)

// Apply server-side applies each YAML object (as `kubectl apply
// --server-side --field-validation=Strict` does), or only dry-runs it on
// the server (admission, validation, defaulting; nothing stored).
func (c *Cluster) Apply(ctx context.Context, dryRun bool, objects ...[]byte) error {
	dc, err := discovery.NewDiscoveryClientForConfig(c.Config)
	if err != nil {
		return err
	}
	mapper := restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(dc))
	dyn, err := dynamic.NewForConfig(c.Config)
	if err != nil {
		return err
	}
	force := true
	opts := metav1.PatchOptions{FieldManager: "sluice-test", Force: &force, FieldValidation: "Strict"}
	if dryRun {
		opts.DryRun = []string{metav1.DryRunAll}
	}
	for _, y := range objects {
		var u unstructured.Unstructured
		if err := yaml.Unmarshal(y, &u.Object); err != nil {
			return err
		}
		gvk := u.GroupVersionKind()
		m, err := mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
		if err != nil {
			return fmt.Errorf("%s %s: %w", gvk.Kind, u.GetName(), err)
		}
		j, err := u.MarshalJSON()
		if err != nil {
			return err
		}
		var ri dynamic.ResourceInterface = dyn.Resource(m.Resource)
		if m.Scope.Name() == meta.RESTScopeNameNamespace {
			ri = dyn.Resource(m.Resource).Namespace(u.GetNamespace())
		}
		if _, err := ri.Patch(ctx, u.GetName(), types.ApplyPatchType, j, opts); err != nil {
			return fmt.Errorf("apply %s %s/%s: %w", gvk.Kind, u.GetNamespace(), u.GetName(), err)
		}
	}
	return nil
}

// KubeconfigFor mints a token for a service account (TokenRequest, as the
// kubelet does for a pod) and writes a kubeconfig that authenticates as
// it: a process using it has exactly the account's RBAC.
func (c *Cluster) KubeconfigFor(t testing.TB, namespace, account string) string {
	t.Helper()
	tr, err := c.Client.CoreV1().ServiceAccounts(namespace).CreateToken(context.Background(), account,
		&authenticationv1.TokenRequest{Spec: authenticationv1.TokenRequestSpec{}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("token for %s/%s: %v", namespace, account, err)
	}
	kc := filepath.Join(t.TempDir(), "kubeconfig-"+account)
	writeKubeconfig(t, kc, c.Config.Host, tr.Status.Token)
	return kc
}

// WaitServed waits until the API server serves every resource of
// groupVersion ("policy.sluice.io/v1alpha1"): CRDs just applied take a
// moment to become Established and discoverable.
func (c *Cluster) WaitServed(t testing.TB, groupVersion string, resources int) {
	t.Helper()
	dc, err := discovery.NewDiscoveryClientForConfig(c.Config)
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		l, err := dc.ServerResourcesForGroupVersion(groupVersion)
		if err == nil && len(l.APIResources) >= resources {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s not served after 30 s: %v", groupVersion, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// InstallCRDs applies the shipped CRDs (daemonset/crds, as `kubectl apply
// -k daemonset/` does) and waits until the API server serves the policy
// API.
func (c *Cluster) InstallCRDs(t testing.TB) {
	t.Helper()
	_, file, _, _ := runtime.Caller(0)
	files, _ := filepath.Glob(filepath.Join(filepath.Dir(file), "..", "..", "daemonset", "crds", "*.yaml"))
	if len(files) != 2 {
		t.Fatalf("want the two shipped CRDs, found %v", files)
	}
	for _, f := range files {
		y, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		if err := c.Apply(context.Background(), false, y); err != nil {
			t.Fatalf("%s: %v", filepath.Base(f), err)
		}
	}
	c.WaitServed(t, "policy.sluice.io/v1alpha1", 4)
}
