package node

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sluice-io/sluice/agent"
	"github.com/sluice-io/sluice/daemonset"
	"github.com/sluice-io/sluice/test/harness"
	appsv1 "k8s.io/api/apps/v1"
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
//     manager to mint service account tokens, nor a Service route to it.
//
// DNS_RESOLVERS stays the default (resolv.conf): the node has no cluster
// DNS, so the agent finds no nameserver there, and the proxy none in its
// own resolv.conf either (hostname lookups fail, as they must).
func (n *Node) overlay(t testing.TB, kubeconfigDir, pinPath, scope string) string {
	t.Helper()
	base, err := daemonset.Load()
	if err != nil {
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
			op("replace", fmt.Sprintf("/spec/template/spec/containers/%d/args", i), []string{"-xds", "/run/sluice/xds.sock", "-admin", "unix:/run/sluice/envoy-admin.sock"})
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
		{"op": "replace", "path": "/data/ATTACH_SCOPE", "value": scope},
	})
	if err != nil {
		t.Fatal(err)
	}
	return writeOverlay(t, "../daemonset", []map[string]any{
		{"target": map[string]any{"kind": "DaemonSet", "name": base.DaemonSet.Name}, "patch": string(dsPatch)},
		{"target": map[string]any{"kind": "ConfigMap", "name": base.Config.Name}, "patch": string(cmPatch)},
	})
}

// applyKustomization renders dir as kubectl apply -k does and applies it
// server-side.
func (n *Node) applyKustomization(t testing.TB, dir string) {
	t.Helper()
	objs, err := daemonset.Render(dir)
	if err != nil {
		t.Fatal(err)
	}
	var ys [][]byte
	for _, o := range objs {
		ys = append(ys, o.YAML)
	}
	if err := n.Cluster.Apply(context.Background(), false, ys...); err != nil {
		t.Fatal(err)
	}
}

// writeOverlay writes a kustomization with patches over resource (a path
// relative to it, into a copy of daemonset/) and returns its directory.
func writeOverlay(t testing.TB, resource string, patches []map[string]any) string {
	t.Helper()
	dir := t.TempDir()
	if err := os.CopyFS(filepath.Join(dir, "daemonset"), os.DirFS(daemonset.Dir())); err != nil {
		t.Fatal(err)
	}
	y, err := yaml.Marshal(map[string]any{
		"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
		"resources": []string{resource}, "patches": patches,
	})
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
func TestPrivilegedDaemonSetOnRealNode(t *testing.T) { daemonSetOnRealNode(t, "node") }

// TestPrivilegedRealNodeWorkloads is the same with the
// ConfigMap's ATTACH_SCOPE=workloads: the agent finds its own pod's cgroup
// (Envoy's) from its uid, an unselected pod's sockets run none of the
// programs, a selected pod's run each client program once, and across the
// rolling update the old pod's cgroup keeps the proxy's programs while its
// Envoy drains, the new pod's gets them, and not one connection fails.
func TestPrivilegedRealNodeWorkloads(t *testing.T) {
	daemonSetOnRealNode(t, "workloads")
}

func daemonSetOnRealNode(t *testing.T, scope string) {
	var pinPath string
	t.Run("install", func(t *testing.T) { pinPath = installOnNode(t, scope) })
	if pinPath == "" {
		return
	}
	if _, err := os.Stat(pinPath); err == nil {
		t.Errorf("the agent's pins %s outlived the node", pinPath)
	}
}

func installOnNode(t *testing.T, scope string) (pinPath string) {
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
		for _, ds := range []string{install.DaemonSet.Name, "sluice-uninstall"} {
			_ = n.Cluster.Client.AppsV1().DaemonSets(install.Namespace.Name).Delete(ctx, ds, metav1.DeleteOptions{})
		}
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
	n.applyKustomization(t, n.overlay(t, kcDir, pinPath, scope))
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
	logs, _ := filepath.Glob(filepath.Join(n.Dir, "pod-logs", install.Namespace.Name+"_*", "agent", "*.log"))
	var agentLog []byte
	for _, l := range logs {
		b, _ := os.ReadFile(l)
		agentLog = append(agentLog, b...)
	}
	// On a hybrid cgroup host the DaemonSet's /host/sys/fs/cgroup is a tmpfs
	// of v1 hierarchies: the agent must have found the v2 one below it.
	if len(cgroupHierarchies(t)) > 1 && !strings.Contains(string(agentLog), `"msg":"hybrid cgroup host: using the cgroup v2 hierarchy","given":"/host/sys/fs/cgroup","using":"/host/sys/fs/cgroup/unified"`) {
		t.Errorf("the agent did not resolve the hybrid host's cgroup v2 hierarchy; its log:\n%s", agentLog)
	}
	// DNS_RESOLVERS is the default, resolv.conf: the agent's resolvers are
	// the nameservers of the resolv.conf the kubelet wrote for its
	// container (this node has no cluster DNS).
	rc, err := os.Open(filepath.Join(n.agentRoot(t, pod), "etc/resolv.conf"))
	if err != nil {
		t.Fatal(err)
	}
	want, err := agent.ReadResolvConf(rc)
	rc.Close()
	if err != nil {
		t.Fatal(err)
	}
	wantJSON, _ := json.Marshal(want)
	if !strings.Contains(string(agentLog), `"dns_resolvers":`+string(wantJSON)) {
		t.Errorf("the agent's DNS resolvers are not its container's resolv.conf nameservers %s; its log:\n%s", wantJSON, agentLog)
	}
	switch scope {
	case "node":
		if _, err := os.Stat(filepath.Join(pinPath, "link_sl_connect4")); err != nil {
			t.Errorf("the agent has not pinned its programs at %s: %v", pinPath, err)
		}
	case "workloads":
		// The agent's pod's cgroup, where Envoy runs, and nothing else
		// yet: no pod is selected.
		cg := n.podCgroup(t, pod)
		if !strings.Contains(string(agentLog), `"msg":"the proxy's cgroup is this agent's pod's"`) || !strings.Contains(string(agentLog), `"proxy_cgroup":"/host`+cg+`"`) {
			t.Errorf("the agent did not find its pod's cgroup %s; its log:\n%s", cg, agentLog)
		}
		if eff := harness.Effective(t, cg, harness.OurPrograms(t, pinPath)); !maps.Equal(eff, harness.ProxyRuns) {
			t.Errorf("the agent's pod runs %v, want the proxy's %v", eff, harness.ProxyRuns)
		}
	}
	t.Run("app pods", func(t *testing.T) {
		apps := appPods(t, n, sluice, pinPath, n.stateFile(t, pod), scope)
		if !t.Failed() {
			// Inside: the pods' netns handles last as long as this test.
			t.Run("rolling update", func(t *testing.T) { updateOnNode(t, n, install, pinPath, scope, apps) })
			t.Run("uninstall", func(t *testing.T) { uninstallOnNode(t, n, install, pinPath, apps) })
		}
	})
	return pinPath
}

// uninstallOnNode removes sluice from the node as daemonset/uninstall.sh
// does (the steps in Go: no kubectl here): the agent's DaemonSet goes
// (the pinned datapath goes on redirecting, and with no proxy an enforce
// pod is refused: fail closed), then the uninstall DaemonSet, rendered
// from daemonset/uninstall through the same kind of test overlay, runs
// `sluice uninstall` in its init container and turns Ready. Afterwards the
// pins and the proxy address are gone and the hostNetwork pod that was
// enforced connects directly.
func uninstallOnNode(t *testing.T, n *Node, install *daemonset.Install, pinPath string, apps *afterApps) {
	ctx := context.Background()
	ns := install.Namespace.Name
	if err := n.Cluster.Client.AppsV1().DaemonSets(ns).Delete(ctx, install.DaemonSet.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	// No garbage collector runs here: the agent's pod goes by hand, with
	// its grace period, as the collector would delete it.
	if err := n.Cluster.Client.CoreV1().Pods(ns).DeleteCollection(ctx, metav1.DeleteOptions{},
		metav1.ListOptions{LabelSelector: "app.kubernetes.io/component=agent"}); err != nil {
		t.Fatal(err)
	}
	harness.WaitFor(t, "the agent's pod gone", 60*time.Second, func() bool {
		ps, err := n.Cluster.Client.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{})
		return err == nil && len(ps.Items) == 0
	})
	// The node scope's links, or the workloads scope's, of the pods still
	// selected: the proxy's links went with the agent's pod's cgroup.
	if _, err := os.Stat(filepath.Join(pinPath, "link_sl_connect4")); err != nil {
		if _, werr := os.Stat(filepath.Join(pinPath, "cgroups")); werr != nil || harness.Total(harness.Effective(t, apps.hostnet.cg.Path, harness.OurPrograms(t, pinPath))) == 0 {
			t.Fatalf("the agent's pins went with it (%v): a stopped agent must leave the datapath", err)
		}
	}
	for _, port := range []int{8080, 8081} {
		if res, from := apps.ext.dial(t, apps.hostnet, port); from != "" || res.Reply != "" {
			t.Errorf("no agent, no proxy: the fail-closed pod's connection to :%d arrived from %q (reply %q); want it refused", port, from, res.Reply)
		}
	}

	n.applyKustomization(t, n.uninstallOverlay(t, pinPath))
	start := time.Now()
	harness.WaitFor(t, "the uninstall DaemonSet's pod Ready", 60*time.Second, func() bool {
		ps, err := n.Cluster.Client.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/component=uninstall"})
		if err != nil || len(ps.Items) == 0 {
			return false
		}
		for _, c := range ps.Items[0].Status.Conditions {
			if c.Type == corev1.PodReady && c.Status == corev1.ConditionTrue {
				return true
			}
		}
		return false
	})
	t.Logf("uninstall DaemonSet pod Ready %v after apply", time.Since(start).Round(10*time.Millisecond))
	if _, err := os.Stat(pinPath); !errors.Is(err, fs.ErrNotExist) {
		left, _ := os.ReadDir(pinPath)
		t.Errorf("pins left at %s after the uninstall DaemonSet: %v", pinPath, left)
	}
	out, err := exec.Command("ip", "-n", n.Netns.Name, "addr").CombinedOutput()
	if err != nil {
		t.Fatalf("ip addr: %v\n%s", err, out)
	}
	if strings.Contains(string(out), "169.254.77.1/") {
		t.Errorf("the proxy address is still on the node:\n%s", out)
	}
	const node = "10.99.2.1"
	for _, port := range []int{8080, 8081} {
		if _, from := apps.ext.dial(t, apps.hostnet, port); from != node {
			t.Errorf("after the uninstall, the hostNetwork pod's connection to :%d arrived from %q; want it direct from the node", port, from)
		}
	}
	if _, from := apps.ext.dial(t, apps.plain, 8080); from != apps.plain.ip.String() {
		t.Errorf("after the uninstall, the unlabelled pod's connection arrived from %q; want %s", from, apps.plain.ip)
	}
	// uninstall.sh's last step.
	if err := n.Cluster.Client.AppsV1().DaemonSets(ns).Delete(ctx, "sluice-uninstall", metav1.DeleteOptions{}); err != nil {
		t.Error(err)
	}
}

// uninstallOverlay is the test overlay over daemonset/uninstall: the
// project's images imported (imagePullPolicy Never, the node's pause image
// for the container that only keeps the pod Ready), and the test's pin
// path.
func (n *Node) uninstallOverlay(t testing.TB, pinPath string) string {
	t.Helper()
	objs, err := daemonset.Render(filepath.Join(daemonset.Dir(), "uninstall"))
	if err != nil {
		t.Fatal(err)
	}
	var ds *appsv1.DaemonSet
	for _, o := range objs {
		if obj, err := o.Decode(); err == nil {
			if d, ok := obj.(*appsv1.DaemonSet); ok {
				ds = d
			}
		}
	}
	if ds == nil {
		t.Fatal("daemonset/uninstall renders no DaemonSet")
	}
	var ops []map[string]any
	op := func(o, path string, v any) { ops = append(ops, map[string]any{"op": o, "path": path, "value": v}) }
	spec := ds.Spec.Template.Spec
	for i, c := range spec.InitContainers {
		op("replace", fmt.Sprintf("/spec/template/spec/initContainers/%d/imagePullPolicy", i), "Never")
		for j, a := range c.Command {
			if strings.HasPrefix(a, "--pin-path=") {
				op("replace", fmt.Sprintf("/spec/template/spec/initContainers/%d/command/%d", i, j), "--pin-path="+pinPath)
			}
		}
	}
	for i := range spec.Containers {
		op("replace", fmt.Sprintf("/spec/template/spec/containers/%d/imagePullPolicy", i), "Never")
		op("replace", fmt.Sprintf("/spec/template/spec/containers/%d/image", i), PauseImage)
	}
	patch, err := json.Marshal(ops)
	if err != nil {
		t.Fatal(err)
	}
	return writeOverlay(t, "../daemonset/uninstall", []map[string]any{{"target": map[string]any{"kind": "DaemonSet", "name": ds.Name}, "patch": string(patch)}})
}
