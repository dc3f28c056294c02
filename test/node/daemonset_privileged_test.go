package node

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sluice-io/sluice/daemonset"
	"github.com/sluice-io/sluice/test/harness"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"
)

// Images of the real-node DaemonSet test.
const (
	SluiceImage = "localhost/sluice:dev" // what the kustomization's image is
	ProxyImage  = "sluice.local/standin:test"
)

// overlay writes the test overlay over a copy of daemonset/ and returns its
// directory. It changes only what this node requires:
//   - images: the project's own, imported (imagePullPolicy Never), and the
//     conformance proxy in place of Envoy (no Envoy image here), with the
//     same socket, admin address and probes;
//   - the kubelet's cgroupfs driver and cgroup root; the agent attaches at
//     the node's cgroup root, never the machine's, and pins under a name of
//     its own;
//   - a kubeconfig from a hostPath: this API server has no controller
//     manager to mint service account tokens, nor a Service route to it;
//   - the node's own address as the DNS resolver: the node has no
//     cluster DNS, and nothing answers there (lookups fail, as they must).
func (n *Node) overlay(t testing.TB, kubeconfigDir, pinPath string) string {
	t.Helper()
	base, err := daemonset.Load()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	if err := os.CopyFS(filepath.Join(dir, "daemonset"), os.DirFS(daemonset.Dir())); err != nil {
		t.Fatal(err)
	}
	var ops []map[string]any
	op := func(o, path string, v any) { ops = append(ops, map[string]any{"op": o, "path": path, "value": v}) }
	spec := base.DaemonSet.Spec.Template.Spec
	for i := range spec.InitContainers {
		op("replace", fmt.Sprintf("/spec/template/spec/initContainers/%d/imagePullPolicy", i), "Never")
	}
	for i, c := range spec.Containers {
		op("replace", fmt.Sprintf("/spec/template/spec/containers/%d/imagePullPolicy", i), "Never")
		switch c.Name {
		case "agent":
			for j, a := range c.Args {
				switch {
				case strings.HasPrefix(a, "--cgroup-attach="):
					op("replace", fmt.Sprintf("/spec/template/spec/containers/%d/args/%d", i, j), "--cgroup-attach=/host"+n.Cgroup2+n.CgroupRoot)
				case strings.HasPrefix(a, "--pin-path="):
					op("replace", fmt.Sprintf("/spec/template/spec/containers/%d/args/%d", i, j), "--pin-path="+pinPath)
				}
			}
			op("add", fmt.Sprintf("/spec/template/spec/containers/%d/args/-", i), "--kubeconfig=/var/run/sluice-test/kubeconfig")
			op("add", fmt.Sprintf("/spec/template/spec/containers/%d/volumeMounts/-", i), map[string]any{"name": "test-kubeconfig", "mountPath": "/var/run/sluice-test", "readOnly": true})
		case "envoy":
			op("replace", fmt.Sprintf("/spec/template/spec/containers/%d/image", i), ProxyImage)
			op("replace", fmt.Sprintf("/spec/template/spec/containers/%d/command", i), []string{"/standin-proxy"})
			op("replace", fmt.Sprintf("/spec/template/spec/containers/%d/args", i), []string{"-xds", "/run/sluice/xds.sock", "-admin", "127.0.0.1:15000"})
		}
	}
	op("add", "/spec/template/spec/volumes/-", map[string]any{"name": "test-kubeconfig", "hostPath": map[string]any{"path": kubeconfigDir, "type": "Directory"}})
	dsPatch, err := json.Marshal(ops)
	if err != nil {
		t.Fatal(err)
	}
	cmPatch, err := json.Marshal([]map[string]any{
		{"op": "replace", "path": "/data/CGROUP_DRIVER", "value": "cgroupfs"},
		{"op": "replace", "path": "/data/KUBELET_CGROUP_ROOT", "value": n.CgroupRoot},
		{"op": "replace", "path": "/data/DNS_RESOLVERS", "value": n.IP.String()},
	})
	if err != nil {
		t.Fatal(err)
	}
	k := map[string]any{
		"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
		"resources": []string{"../daemonset"},
		"patches": []map[string]any{
			{"target": map[string]any{"kind": "DaemonSet", "name": base.DaemonSet.Name}, "patch": string(dsPatch)},
			{"target": map[string]any{"kind": "ConfigMap", "name": base.Config.Name}, "patch": string(cmPatch)},
		},
	}
	y, err := yaml.Marshal(k)
	if err != nil {
		t.Fatal(err)
	}
	ov := filepath.Join(dir, "overlay")
	if err := os.Mkdir(ov, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(ov, "kustomization.yaml"), y, 0o644); err != nil {
		t.Fatal(err)
	}
	return ov
}

// TestPrivilegedDaemonSetOnRealNode applies the shipped install (kubectl
// apply -k semantics, through the test overlay) to a real kubelet node and
// waits until the DaemonSet's pod is Running and each container Ready
// through its own probes: the bpffs init container, the bootstrap, the
// agent's capabilities, mounts and probes, and the ADS socket the proxy
// shares with it.
func TestPrivilegedDaemonSetOnRealNode(t *testing.T) {
	var pinPath string
	t.Run("install", func(t *testing.T) { pinPath = installOnNode(t) })
	if pinPath == "" {
		return
	}
	if _, err := os.Stat(pinPath); err == nil {
		t.Errorf("the agent's pins %s outlived the node", pinPath)
	}
}

func installOnNode(t *testing.T) (pinPath string) {
	dir := t.TempDir()
	sluice := harness.Sluice(t)
	standin := buildStatic(t, dir, "./test/cmd/standin-proxy")
	sluiceTar, proxyTar := filepath.Join(dir, "sluice.tar"), filepath.Join(dir, "standin.tar")
	BuildImage(t, SluiceImage, []string{"/sluice"}, sluiceTar, ImageFile{Path: "/sluice", From: sluice, Mode: 0o755})
	BuildImage(t, ProxyImage, []string{"/standin-proxy"}, proxyTar, ImageFile{Path: "/standin-proxy", From: standin, Mode: 0o755})
	n := Start(t, sluiceTar, proxyTar)
	ctx := context.Background()

	pinPath = "/sys/fs/bpf/" + filepath.Base(n.CgroupRoot)
	install, err := daemonset.Load()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		// Before the node goes, and once no agent runs (a DaemonSet
		// would start another): the pins are on the machine's bpffs.
		// No garbage collector runs here: the pods go by hand.
		_ = n.Cluster.Client.AppsV1().DaemonSets(install.Namespace.Name).Delete(ctx, install.DaemonSet.Name, metav1.DeleteOptions{})
		zero := int64(0)
		_ = n.Cluster.Client.CoreV1().Pods(install.Namespace.Name).DeleteCollection(ctx, metav1.DeleteOptions{GracePeriodSeconds: &zero}, metav1.ListOptions{})
		harness.WaitFor(t, "the agent's pods gone", 30*time.Second, func() bool {
			ps, err := n.Cluster.Client.CoreV1().Pods(install.Namespace.Name).List(ctx, metav1.ListOptions{})
			return err == nil && len(ps.Items) == 0
		})
		if out, err := exec.Command(sluice, "uninstall", "--pin-path", pinPath).CombinedOutput(); err != nil {
			t.Errorf("sluice uninstall: %v\n%s", err, out)
		}
	})
	// The namespace first: its service account's token is the agent's
	// kubeconfig.
	for _, o := range install.Objects {
		if o.Kind == "Namespace" || o.Kind == "ServiceAccount" {
			if err := n.Cluster.Apply(ctx, false, o.YAML); err != nil {
				t.Fatal(err)
			}
		}
	}
	kc := n.Cluster.KubeconfigFor(t, install.Namespace.Name, install.SA.Name)
	kcDir := filepath.Join(dir, "kubeconfig")
	if err := os.Mkdir(kcDir, 0o755); err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(kc)
	if err := os.WriteFile(filepath.Join(kcDir, "kubeconfig"), b, 0o600); err != nil {
		t.Fatal(err)
	}
	objs, err := daemonset.Render(n.overlay(t, kcDir, pinPath))
	if err != nil {
		t.Fatal(err)
	}
	var ys [][]byte
	for _, o := range objs {
		ys = append(ys, o.YAML)
	}
	if err := n.Cluster.Apply(ctx, false, ys...); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if !t.Failed() {
			return
		}
		ps, _ := n.Cluster.Client.CoreV1().Pods(install.Namespace.Name).List(ctx, metav1.ListOptions{})
		for _, p := range ps.Items {
			b, _ := json.MarshalIndent(p.Status, "", " ")
			t.Logf("pod %s status:\n%s", p.Name, b)
		}
		evs, _ := n.Cluster.Client.CoreV1().Events(install.Namespace.Name).List(ctx, metav1.ListOptions{})
		for _, e := range evs.Items {
			t.Logf("event %s %s: %s", e.InvolvedObject.Name, e.Reason, e.Message)
		}
		for _, c := range []string{"agent", "envoy", "envoy-bootstrap", "mount-bpffs"} {
			logs, _ := filepath.Glob(filepath.Join(n.Dir, "pod-logs", install.Namespace.Name+"_*", c, "*.log*"))
			for _, l := range logs {
				b, _ := os.ReadFile(l)
				if len(b) > 3000 {
					b = b[len(b)-3000:]
				}
				t.Logf("%s log %s:\n%s", c, l, b)
			}
		}
	})
	start := time.Now()
	var pod *corev1.Pod
	harness.WaitFor(t, "the DaemonSet's pod Running and Ready", 90*time.Second, func() bool {
		ps, err := n.Cluster.Client.CoreV1().Pods(install.Namespace.Name).List(ctx, metav1.ListOptions{})
		if err != nil || len(ps.Items) == 0 {
			return false
		}
		pod = &ps.Items[0]
		for _, c := range pod.Status.Conditions {
			if c.Type == corev1.PodReady && c.Status == corev1.ConditionTrue {
				return true
			}
		}
		return false
	})
	t.Logf("DaemonSet pod %s Ready %v after apply", pod.Name, time.Since(start).Round(10*time.Millisecond))
	for _, cs := range pod.Status.ContainerStatuses {
		if !cs.Ready || cs.RestartCount != 0 {
			t.Errorf("container %s: ready %v, %d restarts", cs.Name, cs.Ready, cs.RestartCount)
		}
	}
	// On a hybrid cgroup host the DaemonSet's /host/sys/fs/cgroup is a tmpfs
	// of v1 hierarchies: the agent must have found the v2 one below it.
	if len(cgroupHierarchies(t)) > 1 {
		logs, _ := filepath.Glob(filepath.Join(n.Dir, "pod-logs", install.Namespace.Name+"_*", "agent", "*.log"))
		var all []byte
		for _, l := range logs {
			b, _ := os.ReadFile(l)
			all = append(all, b...)
		}
		if !strings.Contains(string(all), `"msg":"hybrid cgroup host: using the cgroup v2 hierarchy","given":"/host/sys/fs/cgroup","using":"/host/sys/fs/cgroup/unified"`) {
			t.Errorf("the agent did not resolve the hybrid host's cgroup v2 hierarchy; its log:\n%s", all)
		}
	}
	if _, err := os.Stat(filepath.Join(pinPath, "link_sl_connect4")); err != nil {
		t.Errorf("the agent has not pinned its programs at %s: %v", pinPath, err)
	}
	t.Run("app pods", func(t *testing.T) { appPods(t, n, sluice, pinPath, n.stateFile(t, pod)) })
	return pinPath
}
