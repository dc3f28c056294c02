package daemonset

import (
	"bytes"
	"github.com/sluice-io/sluice/policy"
	"os"
	"path/filepath"
	"testing"

	corev1 "k8s.io/api/core/v1"
)

// The Vagrant/kind path cannot run here; what can be checked is checked:
// its overlay renders with kind's kubelet settings, and its workloads
// decode strictly with the policies the script expects.
func TestKindOverlayAndWorkloads(t *testing.T) {
	kindDir := filepath.Join(Dir(), "..", "test", "e2e-kind")
	var cm *corev1.ConfigMap
	for _, o := range render(t, filepath.Join(kindDir, "overlay")) {
		if v, ok := decode(t, o).(*corev1.ConfigMap); ok {
			cm = v
		}
	}
	if cm == nil || cm.Data["KUBELET_CGROUP_ROOT"] != "/kubelet" || cm.Data["CGROUP_DRIVER"] != "systemd" || cm.Data["EXCLUDE"] != "" {
		t.Fatalf("overlay ConfigMap %+v", cm)
	}

	raw, err := os.ReadFile(filepath.Join(kindDir, "workloads.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	pods := map[string]*corev1.Pod{}
	for _, doc := range bytes.Split(raw, []byte("\n---\n")) {
		obj := decode(t, Object{Kind: "e2e", Name: "workloads.yaml", YAML: doc})
		if p, ok := obj.(*corev1.Pod); ok {
			pods[p.Name] = p
		}
	}
	want := map[string]policy.Mode{"audit": policy.Audit, "enforce": policy.Enforce}
	for name, mode := range want {
		p := pods[name]
		if p == nil || p.Labels["sluice.io/redirect"] != "true" {
			t.Fatalf("pod %s missing or not selected", name)
		}
		pol, err := policy.ParsePolicy(p.Labels, p.Annotations)
		if err != nil || pol.Mode != mode {
			t.Errorf("pod %s: policy %+v, %v; want mode %v", name, pol, err, mode)
		}
		if len(p.Spec.Containers) != 1 || p.Spec.Containers[0].Image == "" {
			t.Errorf("pod %s: the YAML anchor did not give it the client container", name)
		}
	}
	if p := pods["plain"]; p == nil || p.Labels["sluice.io/redirect"] != "" {
		t.Error("the plain pod is missing or selected")
	}
}
