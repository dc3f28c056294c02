package agent

import (
	"context"
	"fmt"

	"github.com/sluice-io/sluice/policy/apis/policy/v1alpha1"
	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	"k8s.io/apimachinery/pkg/types"
	utilruntime "k8s.io/apimachinery/pkg/util/runtime"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"
	"k8s.io/client-go/util/flowcontrol"
)

// KubeAPI is what the agent reads and writes of the Kubernetes API besides
// its own policy objects. The agent talks to it through REST clients that
// know only these types (KubeScheme), not through client-go's clientset:
// that links in, and registers at start, every type of every API group,
// which is most of the agent's resident memory before it has done anything
// (docs/performance.md). Tests adapt client-go's fake clientset to it.
type KubeAPI interface {
	// Pods lists and watches the pods scheduled to node.
	Pods(node string) cache.ListerWatcher
	// Namespaces lists and watches every namespace.
	Namespaces() cache.ListerWatcher
	// GetNode reads a node (to check the agent's node name exists).
	GetNode(ctx context.Context, name string) (*corev1.Node, error)
	// ServesGroupVersion returns nil when the API server serves gv
	// (group/version), a NotFound error when it does not.
	ServesGroupVersion(ctx context.Context, gv schema.GroupVersion) error
	// Events is where the event recorder writes.
	Events() record.EventSink
	// Leases reads and writes the Leases of a namespace.
	Leases(namespace string) LeaseAPI
}

// LeaseAPI is the coordination.k8s.io/v1 Lease calls the status writer's
// election makes.
type LeaseAPI interface {
	Get(ctx context.Context, name string) (*coordinationv1.Lease, error)
	Create(ctx context.Context, l *coordinationv1.Lease) (*coordinationv1.Lease, error)
	Update(ctx context.Context, l *coordinationv1.Lease) (*coordinationv1.Lease, error)
}

// KubeScheme holds the types the agent exchanges with the API server or
// names in events: core/v1, coordination.k8s.io/v1 and the policy objects.
var KubeScheme = runtime.NewScheme()

var kubeCodecs = serializer.NewCodecFactory(KubeScheme)

func init() {
	utilruntime.Must(corev1.AddToScheme(KubeScheme))
	utilruntime.Must(coordinationv1.AddToScheme(KubeScheme))
	utilruntime.Must(v1alpha1.AddToScheme(KubeScheme))
}

// NewKubeAPI returns the agent's client of the API server rc points at.
// Its REST clients share one rate limiter, as a clientset's do.
func NewKubeAPI(rc *rest.Config) (KubeAPI, error) {
	rc = rest.CopyConfig(rc)
	if rc.RateLimiter == nil {
		qps, burst := rc.QPS, rc.Burst
		if qps == 0 {
			qps = rest.DefaultQPS
		}
		if burst == 0 {
			burst = rest.DefaultBurst
		}
		rc.RateLimiter = flowcontrol.NewTokenBucketRateLimiter(qps, burst)
	}
	core, err := CoreREST(rc)
	if err != nil {
		return nil, err
	}
	coord, err := restClient(rc, coordinationv1.SchemeGroupVersion, "/apis")
	if err != nil {
		return nil, fmt.Errorf("coordination.k8s.io/v1 client: %w", err)
	}
	return &kubeAPI{core: core, coord: coord}, nil
}

// CoreREST is a REST client of the core/v1 API that knows KubeScheme's
// types (sluice explain reads pods, namespaces and ConfigMaps with it).
func CoreREST(rc *rest.Config) (rest.Interface, error) {
	c, err := restClient(rc, corev1.SchemeGroupVersion, "/api")
	if err != nil {
		return nil, fmt.Errorf("core/v1 client: %w", err)
	}
	return c, nil
}

func restClient(rc *rest.Config, gv schema.GroupVersion, apiPath string) (*rest.RESTClient, error) {
	c := rest.CopyConfig(rc)
	c.GroupVersion = &gv
	c.APIPath = apiPath
	c.NegotiatedSerializer = kubeCodecs.WithoutConversion()
	if c.UserAgent == "" {
		c.UserAgent = rest.DefaultKubernetesUserAgent()
	}
	return rest.RESTClientFor(c)
}

type kubeAPI struct{ core, coord rest.Interface }

func (k *kubeAPI) Pods(node string) cache.ListerWatcher {
	return cache.NewFilteredListWatchFromClient(k.core, "pods", metav1.NamespaceAll, func(o *metav1.ListOptions) {
		o.FieldSelector = fields.OneTermEqualSelector("spec.nodeName", node).String()
	})
}

func (k *kubeAPI) Namespaces() cache.ListerWatcher {
	return cache.NewListWatchFromClient(k.core, "namespaces", metav1.NamespaceAll, fields.Everything())
}

func (k *kubeAPI) GetNode(ctx context.Context, name string) (*corev1.Node, error) {
	n := &corev1.Node{}
	err := k.core.Get().Resource("nodes").Name(name).VersionedParams(&metav1.GetOptions{}, metav1.ParameterCodec).Do(ctx).Into(n)
	return n, err
}

func (k *kubeAPI) ServesGroupVersion(ctx context.Context, gv schema.GroupVersion) error {
	return k.core.Get().AbsPath("/apis", gv.Group, gv.Version).Do(ctx).Error()
}

func (k *kubeAPI) Events() record.EventSink { return eventSink{k.core} }

func (k *kubeAPI) Leases(namespace string) LeaseAPI { return leases{k.coord, namespace} }

// eventSink is client-go's EventSinkImpl on the core REST client.
type eventSink struct{ c rest.Interface }

func (s eventSink) Create(e *corev1.Event) (*corev1.Event, error) {
	out := &corev1.Event{}
	err := s.c.Post().Namespace(e.Namespace).Resource("events").Body(e).Do(context.TODO()).Into(out)
	return out, err
}

func (s eventSink) Update(e *corev1.Event) (*corev1.Event, error) {
	out := &corev1.Event{}
	err := s.c.Put().Namespace(e.Namespace).Resource("events").Name(e.Name).Body(e).Do(context.TODO()).Into(out)
	return out, err
}

func (s eventSink) Patch(e *corev1.Event, data []byte) (*corev1.Event, error) {
	out := &corev1.Event{}
	err := s.c.Patch(types.StrategicMergePatchType).Namespace(e.Namespace).Resource("events").Name(e.Name).Body(data).Do(context.TODO()).Into(out)
	return out, err
}

type leases struct {
	c         rest.Interface
	namespace string
}

func (l leases) Get(ctx context.Context, name string) (*coordinationv1.Lease, error) {
	out := &coordinationv1.Lease{}
	err := l.c.Get().Namespace(l.namespace).Resource("leases").Name(name).VersionedParams(&metav1.GetOptions{}, metav1.ParameterCodec).Do(ctx).Into(out)
	return out, err
}

func (l leases) Create(ctx context.Context, lease *coordinationv1.Lease) (*coordinationv1.Lease, error) {
	out := &coordinationv1.Lease{}
	err := l.c.Post().Namespace(l.namespace).Resource("leases").Body(lease).Do(ctx).Into(out)
	return out, err
}

func (l leases) Update(ctx context.Context, lease *coordinationv1.Lease) (*coordinationv1.Lease, error) {
	out := &coordinationv1.Lease{}
	err := l.c.Put().Namespace(l.namespace).Resource("leases").Name(lease.Name).Body(lease).Do(ctx).Into(out)
	return out, err
}
