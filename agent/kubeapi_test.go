package agent

import (
	"context"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"
)

// clientsetKube adapts a client-go clientset (the fake one, in these tests)
// to KubeAPI, making the same calls the agent's REST clients make.
type clientsetKube struct{ cs kubernetes.Interface }

func (k clientsetKube) Pods(node string) cache.ListerWatcher {
	sel := fields.OneTermEqualSelector("spec.nodeName", node).String()
	pods := k.cs.CoreV1().Pods(metav1.NamespaceAll)
	return typedListWatch(func(ctx context.Context, o metav1.ListOptions) (*corev1.PodList, error) {
		o.FieldSelector = sel
		return pods.List(ctx, o)
	}, func(ctx context.Context, o metav1.ListOptions) (watch.Interface, error) {
		o.FieldSelector = sel
		return pods.Watch(ctx, o)
	}, k.cs)
}

func (k clientsetKube) Namespaces() cache.ListerWatcher {
	ns := k.cs.CoreV1().Namespaces()
	return typedListWatch(ns.List, ns.Watch, k.cs)
}

func (k clientsetKube) GetNode(ctx context.Context, name string) (*corev1.Node, error) {
	return k.cs.CoreV1().Nodes().Get(ctx, name, metav1.GetOptions{})
}

func (k clientsetKube) ServesGroupVersion(_ context.Context, gv schema.GroupVersion) error {
	_, err := k.cs.Discovery().ServerResourcesForGroupVersion(gv.String())
	return err
}

func (k clientsetKube) Events() record.EventSink {
	return &typedcorev1.EventSinkImpl{Interface: k.cs.CoreV1().Events("")}
}

func (k clientsetKube) Leases(namespace string) LeaseAPI { return clientsetLeases{k.cs, namespace} }

type clientsetLeases struct {
	cs        kubernetes.Interface
	namespace string
}

func (l clientsetLeases) Get(ctx context.Context, name string) (*coordinationv1.Lease, error) {
	return l.cs.CoordinationV1().Leases(l.namespace).Get(ctx, name, metav1.GetOptions{})
}

func (l clientsetLeases) Create(ctx context.Context, lease *coordinationv1.Lease) (*coordinationv1.Lease, error) {
	return l.cs.CoordinationV1().Leases(l.namespace).Create(ctx, lease, metav1.CreateOptions{})
}

func (l clientsetLeases) Update(ctx context.Context, lease *coordinationv1.Lease) (*coordinationv1.Lease, error) {
	return l.cs.CoordinationV1().Leases(l.namespace).Update(ctx, lease, metav1.UpdateOptions{})
}
