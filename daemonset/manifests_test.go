package daemonset

import (
	"bytes"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strings"
	"testing"

	"github.com/sluice-io/sluice/agent/datapath"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"sigs.k8s.io/yaml"
)

func decode(t *testing.T, o Object) runtime.Object {
	t.Helper()
	obj, err := o.Decode()
	if err != nil {
		t.Fatal(err)
	}
	return obj
}

func render(t *testing.T, dir string) []Object {
	t.Helper()
	objs, err := Render(dir)
	if err != nil {
		t.Fatal(err)
	}
	return objs
}

func loadInstall(t *testing.T) *Install {
	t.Helper()
	in, err := Load()
	if err != nil {
		t.Fatal(err)
	}
	return in
}

func TestInstallRendersStrictly(t *testing.T) {
	in := loadInstall(t)
	var kinds []string
	for _, o := range in.Objects {
		kinds = append(kinds, o.Kind)
		clusterScoped := o.Kind == "Namespace" || o.Kind == "CustomResourceDefinition" || strings.HasPrefix(o.Kind, "Cluster")
		if !clusterScoped && o.Namespace != in.Namespace.Name {
			t.Errorf("%s %s is in namespace %q, not %q", o.Kind, o.Name, o.Namespace, in.Namespace.Name)
		}
	}
	sort.Strings(kinds)
	if got := strings.Join(kinds, ","); got != "ClusterRole,ClusterRoleBinding,ConfigMap,CustomResourceDefinition,CustomResourceDefinition,DaemonSet,Namespace,Role,RoleBinding,ServiceAccount" {
		t.Errorf("kinds = %s", got)
	}
}

// The manifest's strict decoding is not vacuous: a misspelt field fails.
func TestStrictDecodingCatchesTypos(t *testing.T) {
	in := loadInstall(t)
	var ds Object
	for _, o := range in.Objects {
		if o.Kind == "DaemonSet" {
			ds = o
		}
	}
	bad := bytes.Replace(ds.YAML, []byte("hostNetwork:"), []byte("hostNetwrok:"), 1)
	if _, err := (Object{Kind: ds.Kind, Name: ds.Name, YAML: bad}).Decode(); err == nil || !strings.Contains(err.Error(), "hostNetwrok") {
		t.Fatalf("a misspelt field decoded: %v", err)
	}
}

// RBAC is exactly what the agent uses: read pods, namespaces and policy
// objects, get its node, write Events and the policy objects' status, and
// hold one Lease in its own namespace. Nothing else, and bound to the
// DaemonSet's service account.
func TestLeastPrivilegeRBAC(t *testing.T) {
	in := loadInstall(t)
	var got []string
	for _, r := range in.Account.Rules {
		if len(r.ResourceNames) > 0 || len(r.NonResourceURLs) > 0 {
			t.Errorf("unexpected rule %+v", r)
		}
		for _, g := range r.APIGroups {
			for _, res := range r.Resources {
				for _, v := range r.Verbs {
					got = append(got, g+"/"+res+":"+v)
				}
			}
		}
	}
	sort.Strings(got)
	want := []string{"/events:create", "/events:patch", "/namespaces:get", "/namespaces:list", "/namespaces:watch", "/nodes:get", "/pods:get", "/pods:list", "/pods:watch",
		"policy.sluice.io/clusteregresspolicies/status:update", "policy.sluice.io/clusteregresspolicies:get", "policy.sluice.io/clusteregresspolicies:list", "policy.sluice.io/clusteregresspolicies:watch",
		"policy.sluice.io/egresspolicies/status:update", "policy.sluice.io/egresspolicies:get", "policy.sluice.io/egresspolicies:list", "policy.sluice.io/egresspolicies:watch"}
	if !slices.Equal(got, want) {
		t.Errorf("ClusterRole grants %v, want exactly %v", got, want)
	}
	got = nil
	for _, r := range in.StatusRole.Rules {
		for _, res := range r.Resources {
			for _, v := range r.Verbs {
				got = append(got, strings.Join(r.APIGroups, ",")+"/"+res+":"+v+":"+strings.Join(r.ResourceNames, ","))
			}
		}
	}
	sort.Strings(got)
	want = []string{"coordination.k8s.io/leases:create:", "coordination.k8s.io/leases:get:sluice-policy-status", "coordination.k8s.io/leases:update:sluice-policy-status"}
	if !slices.Equal(got, want) || in.StatusRole.Namespace != in.Namespace.Name {
		t.Errorf("Role %s/%s grants %v, want exactly %v", in.StatusRole.Namespace, in.StatusRole.Name, got, want)
	}
	if b := in.StatusBinding; b.RoleRef.Kind != "Role" || b.RoleRef.Name != in.StatusRole.Name || len(b.Subjects) != 1 || b.Subjects[0].Name != in.SA.Name {
		t.Errorf("RoleBinding %+v does not tie the status Role to the agent's account", b)
	}
	spec := in.DaemonSet.Spec.Template.Spec
	if in.Binding.RoleRef.Name != in.Account.Name || len(in.Binding.Subjects) != 1 ||
		in.Binding.Subjects[0].Name != spec.ServiceAccountName || in.Binding.Subjects[0].Namespace != in.Namespace.Name ||
		in.SA.Name != spec.ServiceAccountName {
		t.Errorf("binding %+v does not tie role %s to the DaemonSet's account %s", in.Binding, in.Account.Name, spec.ServiceAccountName)
	}
}

func capNames(cs []datapath.Capability) []string {
	var out []string
	for _, c := range cs {
		out = append(out, strings.TrimPrefix(c.Name, "CAP_"))
	}
	sort.Strings(out)
	return out
}

func TestDaemonSetSecurity(t *testing.T) {
	in := loadInstall(t)
	spec := in.DaemonSet.Spec.Template.Spec
	if !spec.HostNetwork {
		t.Error("not hostNetwork: Envoy must bind the node's proxy address and see pods' source addresses")
	}
	// The agent: root, but only the capabilities the datapath declares
	// (TestPrivilegedCapabilities shows they suffice and are needed).
	sc := in.Agent.SecurityContext
	if sc == nil || sc.Capabilities == nil {
		t.Fatal("agent has no securityContext.capabilities")
	}
	var added []string
	for _, c := range sc.Capabilities.Add {
		added = append(added, string(c))
	}
	sort.Strings(added)
	if want := capNames(datapath.Capabilities); !slices.Equal(added, want) {
		t.Errorf("agent adds capabilities %v, datapath.Capabilities declares %v", added, want)
	}
	if !slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) {
		t.Errorf("agent drops %v, want ALL", sc.Capabilities.Drop)
	}
	if sc.Privileged != nil && *sc.Privileged {
		t.Error("agent is privileged")
	}
	if sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem {
		t.Error("agent's root filesystem is writable")
	}
	// Envoy: not root, no capabilities, in the group the socket is open to.
	es := in.Envoy.SecurityContext
	if es == nil || es.RunAsNonRoot == nil || !*es.RunAsNonRoot || es.RunAsUser == nil || *es.RunAsUser == 0 {
		t.Error("envoy may run as root")
	}
	if es == nil || es.Capabilities == nil || len(es.Capabilities.Add) > 0 || !slices.Equal(es.Capabilities.Drop, []corev1.Capability{"ALL"}) {
		t.Error("envoy keeps capabilities")
	}
	if spec.SecurityContext == nil || spec.SecurityContext.FSGroup == nil || es.RunAsGroup == nil || *spec.SecurityContext.FSGroup != *es.RunAsGroup {
		t.Error("the pod's fsGroup (the ADS socket's group) is not Envoy's group")
	}
	// A revoked destination stays reachable on open connections for the
	// drain time at most; workers are fixed, not one per node CPU.
	for _, arg := range []string{"--drain-time-s=5", "--drain-strategy=immediate", "--concurrency=2"} {
		if !slices.Contains(in.Envoy.Args, arg) {
			t.Errorf("envoy lacks %s", arg)
		}
	}
	if !slices.Contains(in.Agent.Args, "--xds-socket-mode=0660") {
		t.Error("the ADS socket is not opened to the group; Envoy (another user) could not connect")
	}
	// Only the bpffs init container is privileged.
	for name, c := range in.InitByName {
		priv := c.SecurityContext != nil && c.SecurityContext.Privileged != nil && *c.SecurityContext.Privileged
		if priv != (name == "mount-bpffs") {
			t.Errorf("init container %s privileged=%v", name, priv)
		}
	}
}

func TestDaemonSetWiring(t *testing.T) {
	in := loadInstall(t)
	spec := in.DaemonSet.Spec.Template.Spec
	// Every $(VAR) in a command resolves, or Kubernetes passes it on literally.
	for _, c := range append(slices.Clone(spec.InitContainers), spec.Containers...) {
		defined := map[string]string{}
		for _, e := range c.Env {
			defined[e.Name] = "set"
		}
		for _, ef := range c.EnvFrom {
			if ef.ConfigMapRef != nil && ef.ConfigMapRef.Name == in.Config.Name {
				for k := range in.ConfigByKey {
					defined[k] = "set"
				}
			}
		}
		if _, undefined := Expand(append(slices.Clone(c.Command), c.Args...), defined); len(undefined) > 0 {
			t.Errorf("container %s uses $(%s), not defined in its environment", c.Name, strings.Join(undefined, "), $("))
		}
		if c.Resources.Limits.Memory().IsZero() || c.Resources.Requests.Memory().IsZero() || c.Resources.Requests.Cpu().IsZero() {
			t.Errorf("container %s lacks memory limit or requests", c.Name)
		}
		if c.Image == "" || strings.HasSuffix(c.Image, ":latest") || !strings.Contains(c.Image, ":") {
			t.Errorf("container %s image %q is not pinned", c.Name, c.Image)
		}
	}
	if !regexp.MustCompile(`^envoyproxy/envoy:v1\.\d+\.\d+$`).MatchString(in.Envoy.Image) {
		t.Errorf("envoy image %q is not an official release pinned by version", in.Envoy.Image)
	}
	// NODE_NAME comes from the downward API's spec.nodeName.
	for _, e := range in.Agent.Env {
		if e.Name == "NODE_NAME" && (e.ValueFrom == nil || e.ValueFrom.FieldRef == nil || e.ValueFrom.FieldRef.FieldPath != "spec.nodeName") {
			t.Error("NODE_NAME is not spec.nodeName")
		}
	}
	// The bootstrap the init container writes is the one Envoy reads, and
	// both use the agent's socket and admin address.
	arg := func(args []string, name string) string {
		for _, a := range args {
			if v, ok := strings.CutPrefix(a, "--"+name+"="); ok {
				return v
			}
		}
		return ""
	}
	boot := in.InitByName["envoy-bootstrap"]
	if out, cfg := arg(boot.Command, "output"), arg(in.Envoy.Args, "config-path"); out == "" || out != cfg {
		t.Errorf("bootstrap written to %q, Envoy reads %q", out, cfg)
	}
	if s, a := arg(boot.Command, "xds-socket"), arg(in.Agent.Args, "xds-socket"); s == "" || s != a {
		t.Errorf("Envoy connects to %q, the agent listens on %q", s, a)
	}
	if b, a := arg(boot.Command, "admin-address"), arg(in.Agent.Args, "proxy-admin"); b == "" || b != a {
		t.Errorf("Envoy's admin is %q, the agent watches %q", b, a)
	}
	// Admin is a socket of the pod's own (two pods share the node's ports
	// during an update), which only the agent probes.
	if b := arg(boot.Command, "admin-address"); !strings.HasPrefix(b, "unix:/run/sluice/") {
		t.Errorf("Envoy's admin %q is not a unix socket in the pod's /run/sluice", b)
	}
	if in.Envoy.ReadinessProbe != nil || in.Envoy.LivenessProbe != nil {
		t.Errorf("Envoy has kubelet probes (%+v, %+v): its admin is a unix socket the kubelet cannot reach", in.Envoy.ReadinessProbe, in.Envoy.LivenessProbe)
	}
	// The update: surge, and the old Envoy drains while the new agent
	// takes over (docs/install.md, "Upgrades and restarts").
	ru := in.DaemonSet.Spec.UpdateStrategy.RollingUpdate
	if ru == nil || ru.MaxSurge == nil || ru.MaxSurge.IntValue() != 1 || ru.MaxUnavailable == nil || ru.MaxUnavailable.IntValue() != 0 {
		t.Errorf("update strategy %+v, want maxSurge 1, maxUnavailable 0", in.DaemonSet.Spec.UpdateStrategy)
	}
	for _, c := range append(slices.Clone(in.DaemonSet.Spec.Template.Spec.Containers), in.DaemonSet.Spec.Template.Spec.InitContainers...) {
		if len(c.Ports) > 0 {
			t.Errorf("container %s declares ports %v: on a hostNetwork pod they are hostPorts, and the surge pod could not be scheduled", c.Name, c.Ports)
		}
	}
	if a, b := arg(in.Agent.Args, "proxy-port"), arg(in.Agent.Args, "proxy-takeover-port"); a == "" || b == "" || a == b {
		t.Errorf("proxy ports %q and takeover %q: want two different ones", a, b)
	}
	pre := in.Envoy.Lifecycle
	if pre == nil || pre.PreStop == nil || pre.PreStop.Sleep == nil || pre.PreStop.Sleep.Seconds < 5 {
		t.Errorf("Envoy has no preStop drain: %+v", pre)
	} else if g := in.DaemonSet.Spec.Template.Spec.TerminationGracePeriodSeconds; g == nil || *g <= pre.PreStop.Sleep.Seconds {
		t.Errorf("terminationGracePeriodSeconds %v does not outlast the %d s drain", g, pre.PreStop.Sleep.Seconds)
	}
	// Every container using the socket directory shares one volume.
	for _, c := range []corev1.Container{in.Agent, in.Envoy, boot} {
		if !slices.ContainsFunc(c.VolumeMounts, func(m corev1.VolumeMount) bool { return m.Name == "run" && m.MountPath == "/run/sluice" }) {
			t.Errorf("container %s does not mount the shared /run/sluice", c.Name)
		}
	}
	// The pins live in the host's bpffs, seen from the agent.
	if !slices.ContainsFunc(in.Agent.VolumeMounts, func(m corev1.VolumeMount) bool {
		return m.MountPath == "/sys/fs/bpf" && m.MountPropagation != nil && *m.MountPropagation == corev1.MountPropagationHostToContainer
	}) || !strings.HasPrefix(arg(in.Agent.Args, "pin-path"), "/sys/fs/bpf/") {
		t.Error("the agent's pins are not in the host's bpffs")
	}
	// Metrics: the scrape annotations name the port the agent serves on;
	// the probes ask the agent's own health socket.
	ann := in.DaemonSet.Spec.Template.Annotations
	if ma := arg(in.Agent.Args, "metrics-address"); !strings.HasSuffix(ma, ":"+ann["prometheus.io/port"]) || ann["prometheus.io/scrape"] != "true" {
		t.Errorf("scrape annotations %v do not match --metrics-address=%s", ann, ma)
	}
	hs := arg(in.Agent.Args, "health-socket")
	for i, p := range []*corev1.Probe{in.Agent.LivenessProbe, in.Agent.ReadinessProbe} {
		want := []string{"/sluice", "health", "--socket=" + hs}
		if i == 1 {
			want = append(want, "--ready")
		}
		if hs == "" || p == nil || p.Exec == nil || !slices.Equal(p.Exec.Command, want) {
			t.Errorf("agent probe %+v, want exec %v", p, want)
		}
	}
}

// ServiceMonitor is a CRD (not in client-go's scheme): decode it strictly
// into the fields the Prometheus Operator defines that we use.
type serviceMonitor struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	Metadata   struct {
		Name      string            `json:"name"`
		Namespace string            `json:"namespace"`
		Labels    map[string]string `json:"labels"`
	} `json:"metadata"`
	Spec struct {
		Selector struct {
			MatchLabels map[string]string `json:"matchLabels"`
		} `json:"selector"`
		Endpoints []struct {
			Port     string `json:"port"`
			Path     string `json:"path"`
			Interval string `json:"interval"`
		} `json:"endpoints"`
	} `json:"spec"`
}

func TestMonitoringRenders(t *testing.T) {
	in := loadInstall(t)
	var svc *corev1.Service
	var sm serviceMonitor
	for _, o := range render(t, filepath.Join(Dir(), "monitoring")) {
		switch o.Kind {
		case "Service":
			svc = decode(t, o).(*corev1.Service)
		case "ServiceMonitor":
			if err := yaml.UnmarshalStrict(o.YAML, &sm); err != nil {
				t.Fatal(err)
			}
		case "PrometheusRule", "ConfigMap": // TestMonitoringNamesExportedMetrics, TestAlertRules
		default:
			t.Fatalf("unexpected %s", o.Kind)
		}
	}
	if svc == nil || sm.Kind == "" {
		t.Fatal("monitoring lacks the Service or the ServiceMonitor")
	}
	podLabels := in.DaemonSet.Spec.Template.Labels
	for k, v := range svc.Spec.Selector {
		if podLabels[k] != v {
			t.Errorf("Service selector %v does not select the agent's pods %v", svc.Spec.Selector, podLabels)
		}
	}
	for k, v := range sm.Spec.Selector.MatchLabels {
		if svc.Labels[k] != v {
			t.Errorf("ServiceMonitor selector %v does not select the Service %v", sm.Spec.Selector.MatchLabels, svc.Labels)
		}
	}
	_, metricsPort, _ := strings.Cut(in.DaemonSet.Spec.Template.Annotations["prometheus.io/port"], ":")
	if metricsPort == "" {
		metricsPort = in.DaemonSet.Spec.Template.Annotations["prometheus.io/port"]
	}
	if len(sm.Spec.Endpoints) != 1 || sm.Spec.Endpoints[0].Port != svc.Spec.Ports[0].Name || svc.Spec.Ports[0].TargetPort.String() != metricsPort {
		t.Errorf("ServiceMonitor endpoints %+v do not scrape the Service's port %+v", sm.Spec.Endpoints, svc.Spec.Ports)
	}
}

func TestUninstallRenders(t *testing.T) {
	in := loadInstall(t)
	objs := render(t, filepath.Join(Dir(), "uninstall"))
	if len(objs) != 1 {
		t.Fatalf("uninstall renders %d objects, want 1", len(objs))
	}
	ds := decode(t, objs[0]).(*appsv1.DaemonSet)
	if ds.Namespace != in.Namespace.Name {
		t.Errorf("uninstall runs in %q, not %q", ds.Namespace, in.Namespace.Name)
	}
	init := ds.Spec.Template.Spec.InitContainers
	if len(init) != 1 || !slices.Equal(init[0].Command[:2], []string{"/sluice", "uninstall"}) {
		t.Fatalf("uninstall init container runs %v", init)
	}
	if init[0].Image != in.Agent.Image {
		t.Errorf("uninstall image %q differs from the agent's %q", init[0].Image, in.Agent.Image)
	}
	if !slices.Contains(init[0].Command, "--pin-path=/sys/fs/bpf/sluice") || !slices.Contains(in.Agent.Args, "--pin-path=/sys/fs/bpf/sluice") {
		t.Error("uninstall does not remove the pins the agent makes")
	}
	if !ds.Spec.Template.Spec.HostNetwork {
		t.Error("uninstall is not in the node's network namespace: it could not remove the proxy addresses")
	}
}

// The kernel-before-5.11 component adds exactly CAP_SYS_RESOURCE to the
// agent, and nothing else changes.
func TestKernelBefore511Component(t *testing.T) {
	base := loadInstall(t)
	// A user's overlay, as the component's comment shows it. Kustomize
	// refuses a base that contains the overlay, so both go to a copy.
	dir := t.TempDir()
	if err := os.CopyFS(filepath.Join(dir, "daemonset"), os.DirFS(Dir())); err != nil {
		t.Fatal(err)
	}
	overlay := filepath.Join(dir, "overlay")
	if err := os.Mkdir(overlay, 0o755); err != nil {
		t.Fatal(err)
	}
	k := "resources: [../daemonset]\ncomponents: [../daemonset/kernel-before-5.11]\n"
	if err := os.WriteFile(filepath.Join(overlay, "kustomization.yaml"), []byte(k), 0o644); err != nil {
		t.Fatal(err)
	}
	objs, err := Render(overlay)
	if err != nil {
		t.Fatal(err)
	}
	if len(objs) != len(base.Objects) {
		t.Fatalf("%d objects, the base has %d", len(objs), len(base.Objects))
	}
	for i, o := range objs {
		if o.Kind != "DaemonSet" {
			if string(o.YAML) != string(base.Objects[i].YAML) {
				t.Errorf("%s %s changed", o.Kind, o.Name)
			}
			continue
		}
		obj, err := o.Decode()
		if err != nil {
			t.Fatal(err)
		}
		agent := obj.(*appsv1.DaemonSet).Spec.Template.Spec.Containers[0]
		var got []string
		for _, c := range agent.SecurityContext.Capabilities.Add {
			got = append(got, string(c))
		}
		sort.Strings(got)
		want := capNames(append(append([]datapath.Capability{}, datapath.Capabilities...), datapath.MemlockCapability))
		if agent.Name != "agent" || !slices.Equal(got, want) {
			t.Errorf("container %s adds %v, want %v", agent.Name, got, want)
		}
	}
}
