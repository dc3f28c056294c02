package charts

import (
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/sluice-io/sluice/daemonset"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"
)

func render(t *testing.T, values map[string]any) []Object {
	t.Helper()
	objs, err := Render("sluice-system", values)
	if err != nil {
		t.Fatal(err)
	}
	return objs
}

// semantic is an object as data: comments, order and formatting aside.
func semantic(t *testing.T, y []byte) any {
	t.Helper()
	var v any
	if err := yaml.Unmarshal(y, &v); err != nil {
		t.Fatal(err)
	}
	return v
}

// sameObjects fails unless chart and kustomize render the same objects,
// as data. skip are kinds only one of them has, on purpose.
func sameObjects(t *testing.T, chart []Object, kust []daemonset.Object, skip ...string) {
	t.Helper()
	key := func(kind, ns, name string) string { return kind + " " + ns + "/" + name }
	want := map[string][]byte{}
	for _, o := range kust {
		if !slices.Contains(skip, o.Kind) {
			want[key(o.Kind, o.Namespace, o.Name)] = o.YAML
		}
	}
	got := map[string][]byte{}
	for _, o := range chart {
		got[key(o.Kind, o.Namespace, o.Name)] = o.YAML
	}
	for k, y := range want {
		g, ok := got[k]
		if !ok {
			t.Errorf("kustomize renders %s, the chart does not", k)
			continue
		}
		if !reflect.DeepEqual(semantic(t, g), semantic(t, y)) {
			t.Errorf("%s differs:\nchart:\n%s\nkustomize:\n%s", k, g, y)
		}
	}
	for k := range got {
		if _, ok := want[k]; !ok {
			t.Errorf("the chart renders %s, kustomize does not", k)
		}
	}
}

func kustomize(t *testing.T, dir string) []daemonset.Object {
	t.Helper()
	objs, err := daemonset.Render(dir)
	if err != nil {
		t.Fatal(err)
	}
	return objs
}

// The kustomize install is generated from the chart: with default values
// the chart renders exactly the objects `kubectl apply -k daemonset/`
// applies, but the Namespace (helm install --create-namespace makes it);
// with monitoring, kernelBefore511 or uninstall on, those of
// daemonset/monitoring, the kernel-before-5.11 component and
// daemonset/uninstall.
func TestChartMatchesKustomize(t *testing.T) {
	sameObjects(t, render(t, nil), kustomize(t, daemonset.Dir()), "Namespace")
	sameObjects(t, filterSource(render(t, map[string]any{"monitoring": map[string]any{
		"serviceMonitor": map[string]any{"enabled": true},
		"prometheusRule": map[string]any{"enabled": true},
		"dashboard":      map[string]any{"enabled": true},
	}}), "templates/monitoring.yaml"), kustomize(t, filepath.Join(daemonset.Dir(), "monitoring")))
	sameObjects(t, filterSource(render(t, map[string]any{"uninstall": true}), "templates/uninstall.yaml"), kustomize(t, filepath.Join(daemonset.Dir(), "uninstall")))

	// The component is applied in an overlay, as its comment says.
	dir := t.TempDir()
	if err := os.CopyFS(filepath.Join(dir, "daemonset"), os.DirFS(daemonset.Dir())); err != nil {
		t.Fatal(err)
	}
	ov := filepath.Join(dir, "overlay")
	os.Mkdir(ov, 0o755)
	os.WriteFile(filepath.Join(ov, "kustomization.yaml"), []byte("resources: [../daemonset]\ncomponents: [../daemonset/kernel-before-5.11]\n"), 0o644)
	sameObjects(t, render(t, map[string]any{"kernelBefore511": true}), kustomize(t, ov), "Namespace")
}

func filterSource(objs []Object, src string) []Object {
	var out []Object
	for _, o := range objs {
		if o.Source == src {
			out = append(out, o)
		}
	}
	return out
}

func decode(t *testing.T, o Object) any {
	t.Helper()
	if o.Kind == "ServiceMonitor" || o.Kind == "PrometheusRule" {
		return semantic(t, o.YAML) // the Operator's kinds: not in client-go's scheme
	}
	obj, err := daemonset.Object{Kind: o.Kind, Name: o.Name, YAML: o.YAML}.Decode()
	if err != nil {
		t.Fatalf("%s (%s): %v", o.Kind, o.Source, err)
	}
	return obj
}

// Non-default values render objects that decode strictly and carry the
// values where they belong.
func TestChartValues(t *testing.T) {
	objs := render(t, map[string]any{
		"image":           map[string]any{"repository": "registry.example.com/sluice", "tag": "v1.2.3", "pullPolicy": "Always"},
		"proxy":           map[string]any{"image": "registry.example.com/envoy:v1.39.6", "concurrency": 4},
		"kernelBefore511": true,
		"config":          map[string]any{"cgroupDriver": "cgroupfs", "kubeletCgroupRoot": "/kubelet", "exclude": "10.244.0.0/16", "ignoreAllowAnnotations": true},
		"nodeSelector":    map[string]any{"sluice.io/egress": "true"},
		"monitoring":      map[string]any{"serviceMonitor": map[string]any{"enabled": true, "interval": "15s"}, "prometheusRule": map[string]any{"enabled": true}, "dashboard": map[string]any{"enabled": true}},
	})
	var ds *appsv1.DaemonSet
	var cm *corev1.ConfigMap
	kinds := map[string]int{}
	for _, o := range objs {
		kinds[o.Kind]++
		switch v := decode(t, o).(type) {
		case *appsv1.DaemonSet:
			ds = v
		case *corev1.ConfigMap:
			if v.Name == "sluice-config" {
				cm = v
			}
		}
	}
	for kind, n := range map[string]int{"CustomResourceDefinition": 2, "DaemonSet": 1, "ServiceMonitor": 1, "PrometheusRule": 1, "ConfigMap": 2, "Service": 1} {
		if kinds[kind] != n {
			t.Errorf("%d %s, want %d (all: %v)", kinds[kind], kind, n, kinds)
		}
	}
	if ds == nil || cm == nil {
		t.Fatal("no DaemonSet or ConfigMap")
	}
	spec := ds.Spec.Template.Spec
	for _, c := range append(slices.Clone(spec.InitContainers), spec.Containers...) {
		switch c.Name {
		case "envoy":
			if c.Image != "registry.example.com/envoy:v1.39.6" || !slices.Contains(c.Args, "--concurrency=4") {
				t.Errorf("envoy: image %s, args %v", c.Image, c.Args)
			}
		default:
			if c.Image != "registry.example.com/sluice:v1.2.3" || c.ImagePullPolicy != corev1.PullAlways {
				t.Errorf("%s: image %s %s", c.Name, c.Image, c.ImagePullPolicy)
			}
		}
		if c.Name == "agent" && !slices.Contains(c.SecurityContext.Capabilities.Add, "SYS_RESOURCE") {
			t.Errorf("kernelBefore511: agent capabilities %v lack SYS_RESOURCE", c.SecurityContext.Capabilities.Add)
		}
	}
	// Helm merges maps into the defaults: Linux nodes that are labelled.
	if spec.NodeSelector["sluice.io/egress"] != "true" || spec.NodeSelector["kubernetes.io/os"] != "linux" || len(spec.NodeSelector) != 2 {
		t.Errorf("nodeSelector %v", spec.NodeSelector)
	}
	for k, v := range map[string]string{"CGROUP_DRIVER": "cgroupfs", "KUBELET_CGROUP_ROOT": "/kubelet", "EXCLUDE": "10.244.0.0/16", "IGNORE_ALLOW_ANNOTATIONS": "true", "DNS_RESOLVERS": "resolv.conf"} {
		if cm.Data[k] != v {
			t.Errorf("ConfigMap %s = %q, want %q", k, cm.Data[k], v)
		}
	}
}

// values.schema.json refuses what the agent would refuse later, at install.
func TestChartSchemaRefuses(t *testing.T) {
	for _, tc := range []struct {
		values map[string]any
		want   string
	}{
		{map[string]any{"imagee": map[string]any{}}, "imagee"},
		{map[string]any{"config": map[string]any{"cgroupDriver": "bogus"}}, "cgroupDriver"},
		{map[string]any{"config": map[string]any{"logLevel": "verbose"}}, "logLevel"},
		{map[string]any{"config": map[string]any{"kubeletCgroupRoot": "kubelet"}}, "kubeletCgroupRoot"},
		{map[string]any{"kernelBefore511": "yes"}, "kernelBefore511"},
		{map[string]any{"image": map[string]any{"pullPolicy": "Sometimes"}}, "pullPolicy"},
		{map[string]any{"proxy": map[string]any{"concurrency": 0}}, "concurrency"},
		{map[string]any{"monitoring": map[string]any{"serviceMonitor": map[string]any{"interval": "soon"}}}, "interval"},
		{map[string]any{"image": map[string]any{"tag": "v1:latest"}}, "tag"},
		{map[string]any{"proxy": map[string]any{"takeoverPort": 15001}}, "must differ"},
		{map[string]any{"proxy": map[string]any{"drainSeconds": 1}}, "drainSeconds"},
	} {
		t.Run(fmt.Sprint(tc.values), func(t *testing.T) {
			_, err := Render("sluice-system", tc.values)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("Render(%v) = %v, want an error naming %s", tc.values, err, tc.want)
			}
		})
	}
}

// Installed in "default", the agent would exempt every pod there from
// redirection (it exempts its own namespace): the chart refuses.
func TestChartRefusesTheDefaultNamespace(t *testing.T) {
	if _, err := Render("default", nil); err == nil || !strings.Contains(err.Error(), "must not run in \"default\"") {
		t.Fatalf("Render in default: %v", err)
	}
}

// Values the schema must accept: a digest, a tag with a digest, numeric
// quantities, a compound interval.
func TestChartAcceptsValidValues(t *testing.T) {
	digest := "@sha256:" + strings.Repeat("ab", 32)
	for tag, want := range map[string]string{"v1.2.3" + digest: "reg.example.com:5000/sluice:v1.2.3" + digest, digest: "reg.example.com:5000/sluice" + digest, "": "reg.example.com:5000/sluice"} {
		objs := render(t, map[string]any{
			"image":      map[string]any{"repository": "reg.example.com:5000/sluice", "tag": tag},
			"agent":      map[string]any{"resources": map[string]any{"requests": map[string]any{"cpu": 0.5, "memory": "96Mi"}}},
			"monitoring": map[string]any{"serviceMonitor": map[string]any{"enabled": true, "interval": "1m30s"}},
		})
		for _, o := range objs {
			if ds, ok := decode(t, o).(*appsv1.DaemonSet); ok {
				if got := ds.Spec.Template.Spec.Containers[0].Image; got != want {
					t.Errorf("tag %q: image %q, want %q", tag, got, want)
				}
			}
		}
	}
}
