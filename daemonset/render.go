// Package daemonset holds sluice's Kubernetes manifests (the YAML files in
// this directory, installed with `kubectl apply -k daemonset/`) and renders
// them exactly as kubectl does, with kustomize, for the tests that check
// them against the Kubernetes types, the agent's flags and a real API server.
package daemonset

import (
	"fmt"
	"path/filepath"
	"regexp"
	goruntime "runtime"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer/json"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/kyaml/filesys"
)

// Dir is the directory of the manifests: this package's source directory.
func Dir() string {
	_, file, _, _ := goruntime.Caller(0)
	return filepath.Dir(file)
}

// Object is one rendered manifest: its kind, name, and YAML.
type Object struct {
	Kind, Namespace, Name string
	YAML                  []byte
}

// Render runs kustomize on dir (a directory holding a kustomization.yaml)
// and returns the objects in kustomize's output order.
func Render(dir string) ([]Object, error) {
	k := krusty.MakeKustomizer(krusty.MakeDefaultOptions())
	m, err := k.Run(filesys.MakeFsOnDisk(), dir)
	if err != nil {
		return nil, fmt.Errorf("kustomize %s: %w", dir, err)
	}
	var objs []Object
	for _, r := range m.Resources() {
		y, err := r.AsYAML()
		if err != nil {
			return nil, fmt.Errorf("%s/%s: %w", r.GetKind(), r.GetName(), err)
		}
		objs = append(objs, Object{Kind: r.GetKind(), Namespace: r.GetNamespace(), Name: r.GetName(), YAML: y})
	}
	return objs, nil
}

// scheme knows the built-in kinds and CustomResourceDefinition.
var scheme = func() *runtime.Scheme {
	s := runtime.NewScheme()
	if err := clientgoscheme.AddToScheme(s); err != nil {
		panic(err)
	}
	if err := apiextensionsv1.AddToScheme(s); err != nil {
		panic(err)
	}
	return s
}()

// strict decodes manifests as the API server's strict field validation
// does: unknown and duplicate fields are errors.
var strict = json.NewSerializerWithOptions(json.DefaultMetaFactory, scheme, scheme,
	json.SerializerOptions{Yaml: true, Strict: true})

// Decode decodes the object strictly into its Kubernetes type.
func (o Object) Decode() (runtime.Object, error) {
	obj, _, err := strict.Decode(o.YAML, nil, nil)
	if err != nil {
		return nil, fmt.Errorf("%s %s: %w", o.Kind, o.Name, err)
	}
	return obj, nil
}

// Install is the main kustomization (`kubectl apply -k daemonset/`),
// rendered and strictly decoded.
type Install struct {
	Objects   []Object
	Namespace *corev1.Namespace
	SA        *corev1.ServiceAccount
	Account   *rbacv1.ClusterRole
	Binding   *rbacv1.ClusterRoleBinding
	// StatusRole lets the agent hold the policy status Lease.
	StatusRole    *rbacv1.Role
	StatusBinding *rbacv1.RoleBinding
	// CRDs are the policy API's: EgressPolicy, ClusterEgressPolicy.
	CRDs        []*apiextensionsv1.CustomResourceDefinition
	Config      *corev1.ConfigMap
	DaemonSet   *appsv1.DaemonSet
	Agent       corev1.Container
	Envoy       corev1.Container
	InitByName  map[string]corev1.Container
	ConfigByKey map[string]string
}

// Load renders and decodes the main kustomization and checks it holds each
// object sluice needs, once.
func Load() (*Install, error) {
	objs, err := Render(Dir())
	if err != nil {
		return nil, err
	}
	in := &Install{Objects: objs, InitByName: map[string]corev1.Container{}}
	for _, o := range objs {
		obj, err := o.Decode()
		if err != nil {
			return nil, err
		}
		switch v := obj.(type) {
		case *corev1.Namespace:
			in.Namespace = v
		case *corev1.ServiceAccount:
			in.SA = v
		case *rbacv1.ClusterRole:
			in.Account = v
		case *rbacv1.ClusterRoleBinding:
			in.Binding = v
		case *rbacv1.Role:
			in.StatusRole = v
		case *rbacv1.RoleBinding:
			in.StatusBinding = v
		case *corev1.ConfigMap:
			in.Config = v
		case *appsv1.DaemonSet:
			in.DaemonSet = v
		case *apiextensionsv1.CustomResourceDefinition:
			in.CRDs = append(in.CRDs, v)
		default:
			return nil, fmt.Errorf("unexpected object %s %s", o.Kind, o.Name)
		}
	}
	if len(in.CRDs) != 2 || in.StatusRole == nil || in.StatusBinding == nil || in.Namespace == nil || in.SA == nil || in.Account == nil || in.Binding == nil || in.Config == nil || in.DaemonSet == nil {
		return nil, fmt.Errorf("the kustomization lacks an object sluice needs (has %d objects)", len(objs))
	}
	in.ConfigByKey = in.Config.Data
	for _, c := range in.DaemonSet.Spec.Template.Spec.Containers {
		switch c.Name {
		case "agent":
			in.Agent = c
		case "envoy":
			in.Envoy = c
		default:
			return nil, fmt.Errorf("unexpected container %q", c.Name)
		}
	}
	if in.Agent.Name == "" || in.Envoy.Name == "" {
		return nil, fmt.Errorf("the DaemonSet lacks the agent or envoy container")
	}
	for _, c := range in.DaemonSet.Spec.Template.Spec.InitContainers {
		in.InitByName[c.Name] = c
	}
	return in, nil
}

// varRef is a $(VAR) reference in a container's command or args.
var varRef = regexp.MustCompile(`\$\(([A-Za-z_][A-Za-z0-9_]*)\)`)

// Expand does what the kubelet does to $(VAR) references in a container's
// command and args, with env as the container's environment, and returns
// the names it found no value for (which the kubelet would leave verbatim).
func Expand(args []string, env map[string]string) (expanded, undefined []string) {
	expanded = make([]string, len(args))
	for i, a := range args {
		expanded[i] = varRef.ReplaceAllStringFunc(a, func(m string) string {
			name := m[2 : len(m)-1]
			v, ok := env[name]
			if !ok {
				undefined = append(undefined, name)
				return m
			}
			return v
		})
	}
	return expanded, undefined
}
