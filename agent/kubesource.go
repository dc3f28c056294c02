package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"strings"
	"sync"
	"time"

	"github.com/sluice-io/sluice/policy"
	"github.com/sluice-io/sluice/policy/apis/policy/v1alpha1"
	policyclient "github.com/sluice-io/sluice/policy/client/clientset/versioned/typed/policy/v1alpha1"
	policylisters "github.com/sluice-io/sluice/policy/client/listers/policy/v1alpha1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/watch"
	listerscorev1 "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"
	"k8s.io/client-go/util/workqueue"
)

// DefaultSelector selects pods that opted in.
const DefaultSelector = "sluice.io/redirect=true"

// policyResync: the policy informers' periodic resync, so a pod whose
// reconcile raced an object's change is looked at again.
const policyResync = 10 * time.Minute

// cgroupRetriesBeforeEvent: the kubelet creates a pod's cgroup shortly
// after the pod is bound; only a cgroup still missing after this many
// backed-off retries (about 10 s) is worth an Event.
const cgroupRetriesBeforeEvent = 8

// KubeSource follows the pods of one node, and the policy objects and
// namespaces that select them, through informers, and programs each
// selected pod through the reconciler with its effective policy, one key
// at a time from a rate-limited work queue (client-go's controller
// pattern).
type KubeSource struct {
	Client   KubeAPI
	NodeName string
	// Selector is the opt-in label selector: matching pods are selected
	// whatever the policy objects say.
	Selector string
	// Policies is the policy API's client; nil: no policy objects, pods
	// are selected by Selector and governed by their own labels and
	// annotation.
	Policies policyclient.PolicyV1alpha1Interface
	// IgnoreAnnotations: the cluster setting that drops every pod's allow
	// annotation (policy.Options).
	IgnoreAnnotations bool
	// ExemptNamespaces are never selected (policy.Options): the agent's
	// own.
	ExemptNamespaces []string
	// Status, if set, writes the policy objects' status while this agent
	// holds its Lease.
	Status *StatusWriter
	Layout PodCgroupLayout
	// HostNetworkIPs are the source addresses of hostNetwork pods'
	// connections to the proxy: the proxy addresses themselves, which the
	// kernel picks as the source for a local destination.
	HostNetworkIPs []netip.Addr
	Recorder       record.EventRecorder
	Logger         *slog.Logger
	// Metrics, if set, count the API server's failed lists and watches
	// (sluice_source_errors_total{source="kubernetes"}).
	Metrics *Metrics
	// RetryBaseDelay is the first retry's delay for a pod that could not
	// be applied; it doubles up to 30 s. Zero: 50 ms.
	RetryBaseDelay time.Duration

	lister     listerscorev1.PodLister
	namespaces listerscorev1.NamespaceLister
	egress     policylisters.EgressPolicyLister
	cluster    policylisters.ClusterEgressPolicyLister
	opt        policy.Options
	sources    policy.SourceCache
	queue      workqueue.TypedRateLimitingInterface[string]
}

// Run starts the informer, waits for its cache, applies every selected pod
// once, calls synced (the reconciler's Sync goes there), and then works the
// queue until ctx is done.
func (s *KubeSource) Run(ctx context.Context, r *Reconciler, synced func()) error {
	if s.NodeName == "" {
		return errors.New("kubernetes source: node name is required (NODE_NAME from the downward API)")
	}
	sel := s.Selector
	if sel == "" {
		sel = DefaultSelector
	}
	optIn, err := labels.Parse(sel)
	if err != nil {
		return fmt.Errorf("kubernetes source: selector %q: %w", sel, err)
	}
	s.opt = policy.Options{OptIn: optIn, IgnoreAnnotations: s.IgnoreAnnotations, ExemptNamespaces: s.ExemptNamespaces}
	if s.Logger == nil {
		s.Logger = slog.Default()
	}
	if err := s.checkNode(ctx); err != nil {
		return err
	}
	if err := s.checkPolicyAPI(); err != nil {
		return err
	}
	// Every pod of the node: a policy object, not only the opt-in label,
	// may select any of them.
	inf := newInformer(s.Client.Pods(s.NodeName), &corev1.Pod{}, 0)
	s.lister = listerscorev1.NewPodLister(inf.GetIndexer())
	base := s.RetryBaseDelay
	if base <= 0 {
		base = 50 * time.Millisecond
	}
	s.queue = workqueue.NewTypedRateLimitingQueueWithConfig(
		workqueue.NewTypedItemExponentialFailureRateLimiter[string](base, 30*time.Second),
		workqueue.TypedRateLimitingQueueConfig[string]{Name: "sluice-pods"})
	defer s.queue.ShutDown()

	reg, err := inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    s.enqueue,
		UpdateFunc: func(_, obj any) { s.enqueue(obj) },
		DeleteFunc: s.enqueue, // tombstones included: the key is all we need
	})
	if err != nil {
		return err
	}
	if err := s.countWatchErrors(inf); err != nil {
		return err
	}
	if err := inf.SetTransform(trimPod); err != nil {
		return err
	}
	caches := []cache.InformerSynced{inf.HasSynced, reg.HasSynced}
	informers := []cache.SharedIndexInformer{inf}
	if s.Policies != nil {
		more, started, err := s.watchPolicies(ctx)
		if err != nil {
			return err
		}
		caches = append(caches, more...)
		informers = append(informers, started...)
	}
	// The informers stop with ctx; Run returns once they have.
	var wg sync.WaitGroup
	for _, i := range informers {
		wg.Go(func() { i.RunWithContext(ctx) })
	}
	defer wg.Wait()
	// The handler's own HasSynced: every pod of the initial list has been
	// enqueued, not just stored.
	if !cache.WaitForCacheSync(ctx.Done(), caches...) {
		return fmt.Errorf("kubernetes source: pod, namespace and policy caches did not sync: %w", ctx.Err())
	}
	// First full view: apply every pod now, so Sync removes only what no
	// pod claims; failures are requeued with backoff and retried below.
	for s.queue.Len() > 0 {
		key, shutdown := s.queue.Get()
		if shutdown {
			return nil
		}
		s.process(r, key)
	}
	synced()
	s.Logger.Info("kubernetes source synced", "node", s.NodeName, "selector", sel, "policy_objects", s.Policies != nil, "ignore_allow_annotations", s.IgnoreAnnotations, "selected", len(r.Keys()))
	go func() {
		<-ctx.Done()
		s.queue.ShutDown()
	}()
	for {
		key, shutdown := s.queue.Get()
		if shutdown {
			return nil
		}
		s.process(r, key)
	}
}

// checkNode catches a wrong node name at start: with it the field selector
// would match no pod and the agent would silently redirect nothing. Only a
// definite NotFound fails; an API error is logged and the informer retries.
func (s *KubeSource) checkNode(ctx context.Context) error {
	_, err := s.Client.GetNode(ctx, s.NodeName)
	switch {
	case err == nil:
		return nil
	case apierrors.IsNotFound(err):
		return fmt.Errorf("kubernetes source: node %q does not exist; NODE_NAME must come from the pod's spec.nodeName (downward API)", s.NodeName)
	default:
		s.Logger.Warn("cannot check this node exists; going on", "node", s.NodeName, "err", err)
		return nil
	}
}

func (s *KubeSource) enqueue(obj any) {
	key, err := cache.DeletionHandlingMetaNamespaceKeyFunc(obj)
	if err != nil {
		s.Logger.Error("pod key", "error", err)
		return
	}
	s.queue.Add(key)
}

// process reconciles one pod key: Forget on success, AddRateLimited on
// error (a cgroup the kubelet has not created yet).
func (s *KubeSource) process(r *Reconciler, key string) {
	defer s.queue.Done(key)
	err := s.reconcile(r, key)
	if err == nil {
		s.queue.Forget(key)
		return
	}
	n := s.queue.NumRequeues(key)
	if n == cgroupRetriesBeforeEvent {
		s.event(key, corev1.EventTypeWarning, "CgroupNotFound", fmt.Sprintf("sluice cannot select this pod yet: %v; retrying", err))
	}
	s.Logger.Info("pod not applied, retrying", "pod", key, "attempt", n+1, "error", err)
	s.queue.AddRateLimited(key)
}

func (s *KubeSource) reconcile(r *Reconciler, key string) error {
	ns, name, err := cache.SplitMetaNamespaceKey(key)
	if err != nil {
		return nil // never valid; do not retry
	}
	pod, err := s.lister.Pods(ns).Get(name)
	if apierrors.IsNotFound(err) {
		return r.Remove(key)
	}
	if err != nil {
		return err
	}
	if pod.Status.Phase == corev1.PodSucceeded || pod.Status.Phase == corev1.PodFailed {
		return r.Remove(key)
	}
	sel, err := s.selection(pod)
	if err != nil {
		return err
	}
	if !sel.Selected {
		return r.Remove(key)
	}
	w, err := s.workload(pod)
	if err != nil {
		return err
	}
	eff := policy.Merge(sel.Sources)
	w.Policy = &eff
	return r.Upsert(w)
}

// selection says whether the pod is selected and which sources govern
// it, from the informers' caches.
func (s *KubeSource) selection(pod *corev1.Pod) (policy.Selection, error) {
	p := policy.Pod{Namespace: pod.Namespace, Labels: pod.Labels, Annotations: pod.Annotations}
	var objs policy.Objects
	if s.Policies != nil {
		ns, err := s.namespaces.Get(pod.Namespace)
		switch {
		case err == nil:
			p.NamespaceLabels = ns.Labels
		case apierrors.IsNotFound(err):
			// Not in the cache yet: retried, a guardrail must see it.
			return policy.Selection{}, fmt.Errorf("namespace %s not known yet", pod.Namespace)
		default:
			return policy.Selection{}, err
		}
		if objs.EgressPolicies, err = s.egress.EgressPolicies(pod.Namespace).List(labels.Everything()); err != nil {
			return policy.Selection{}, err
		}
		if objs.ClusterPolicies, err = s.cluster.List(labels.Everything()); err != nil {
			return policy.Selection{}, err
		}
		objs.Cache = &s.sources
	}
	return policy.Select(p, objs, s.opt), nil
}

// checkPolicyAPI fails at start when the policy objects are wanted but
// their CRDs are not installed: the informers would wait forever.
func (s *KubeSource) checkPolicyAPI() error {
	if s.Policies == nil {
		return nil
	}
	gv := v1alpha1.SchemeGroupVersion
	if err := s.Client.ServesGroupVersion(context.Background(), gv); err != nil {
		if apierrors.IsNotFound(err) {
			return fmt.Errorf("kubernetes source: the API server does not serve %s: install the CRDs (kubectl apply -k daemonset/ installs them), or run with --policy-objects=false", gv)
		}
		s.Logger.Warn("cannot check the policy API is served; going on", "group_version", gv, "error", err)
	}
	return nil
}

// watchPolicies makes the informers of namespaces and policy objects (the
// caller runs them); any change enqueues the pods it may concern.
func (s *KubeSource) watchPolicies(ctx context.Context) ([]cache.InformerSynced, []cache.SharedIndexInformer, error) {
	nsInf := newInformer(s.Client.Namespaces(), &corev1.Namespace{}, 0)
	if err := nsInf.SetTransform(trimNamespace); err != nil {
		return nil, nil, err
	}
	s.namespaces = listerscorev1.NewNamespaceLister(nsInf.GetIndexer())
	eg, cl := s.Policies.EgressPolicies(metav1.NamespaceAll), s.Policies.ClusterEgressPolicies()
	egInf := newInformer(typedListWatch(eg.List, eg.Watch, s.Policies), &v1alpha1.EgressPolicy{}, policyResync)
	clInf := newInformer(typedListWatch(cl.List, cl.Watch, s.Policies), &v1alpha1.ClusterEgressPolicy{}, policyResync)
	s.egress, s.cluster = policylisters.NewEgressPolicyLister(egInf.GetIndexer()), policylisters.NewClusterEgressPolicyLister(clInf.GetIndexer())
	inNamespace := func(obj any) {
		if o, ok := metaObject(obj); ok {
			s.enqueueNamespace(o.GetNamespace())
		}
	}
	everyPod := func(any) { s.enqueueNamespace("") }
	forget := func(obj any) {
		if o, ok := metaObject(obj); ok {
			s.sources.Forget(o.GetUID())
		}
	}
	var synced []cache.InformerSynced
	for _, h := range []struct {
		inf  cache.SharedIndexInformer
		fn   func(any)
		gone func(any)
	}{{nsInf, func(obj any) {
		if o, ok := metaObject(obj); ok {
			s.enqueueNamespace(o.GetName())
		}
	}, nil}, {egInf, inNamespace, forget}, {clInf, everyPod, forget}} {
		fn, gone := h.fn, h.gone
		reg, err := h.inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
			AddFunc: fn, UpdateFunc: func(_, obj any) { fn(obj) }, DeleteFunc: func(obj any) {
				if gone != nil {
					gone(obj)
				}
				fn(obj)
			},
		})
		if err != nil {
			return nil, nil, err
		}
		if err := s.countWatchErrors(h.inf); err != nil {
			return nil, nil, err
		}
		synced = append(synced, h.inf.HasSynced, reg.HasSynced)
	}
	if s.Status != nil {
		s.Status.use(egInf, clInf)
		go s.Status.Run(ctx)
	}
	return synced, []cache.SharedIndexInformer{nsInf, egInf, clInf}, nil
}

// typedListWatch is the ListerWatcher of a typed client's List and Watch,
// as the generated informers make it: the wrapper tells the reflector
// whether client can stream lists (a fake cannot).
func typedListWatch[L runtime.Object](list func(context.Context, metav1.ListOptions) (L, error),
	watchFn func(context.Context, metav1.ListOptions) (watch.Interface, error), client any) cache.ListerWatcher {
	return cache.ToListWatcherWithWatchListSemantics(&cache.ListWatch{
		ListWithContextFunc:  func(ctx context.Context, o metav1.ListOptions) (runtime.Object, error) { return list(ctx, o) },
		WatchFuncWithContext: watchFn,
	}, client)
}

// newInformer is an informer as client-go's factories make them, indexed
// by namespace (the listers' lookups).
func newInformer(lw cache.ListerWatcher, obj runtime.Object, resync time.Duration) cache.SharedIndexInformer {
	return cache.NewSharedIndexInformer(lw, obj, resync, cache.Indexers{cache.NamespaceIndex: cache.MetaNamespaceIndexFunc})
}

// countWatchErrors counts the informer's failed lists and watches, then
// handles each as client-go does by default (logs it; the reflector
// backs off and retries).
func (s *KubeSource) countWatchErrors(inf cache.SharedIndexInformer) error {
	return inf.SetWatchErrorHandlerWithContext(func(ctx context.Context, r *cache.Reflector, err error) {
		s.Metrics.SourceError("kubernetes")
		cache.DefaultWatchErrorHandler(ctx, r, err)
	})
}

// trimPod is the pod informer's transform: the cache keeps only what the
// agent reads (names and uid, labels, sluice.io/ annotations, the node,
// hostNetwork, phase, QoS class and addresses), not managed fields, other
// annotations (kubectl's last-applied configuration among them), the spec
// or the rest of the status. Tombstones pass as they are.
func trimPod(obj any) (any, error) {
	pod, ok := obj.(*corev1.Pod)
	if !ok {
		return obj, nil
	}
	var ann map[string]string
	for k, v := range pod.Annotations {
		if strings.HasPrefix(k, policy.AnnotationPrefix) {
			if ann == nil {
				ann = map[string]string{}
			}
			ann[k] = v
		}
	}
	return &corev1.Pod{
		TypeMeta: pod.TypeMeta,
		ObjectMeta: metav1.ObjectMeta{
			Name: pod.Name, Namespace: pod.Namespace, UID: pod.UID, ResourceVersion: pod.ResourceVersion,
			Labels: pod.Labels, Annotations: ann, DeletionTimestamp: pod.DeletionTimestamp,
		},
		Spec:   corev1.PodSpec{NodeName: pod.Spec.NodeName, HostNetwork: pod.Spec.HostNetwork},
		Status: corev1.PodStatus{Phase: pod.Status.Phase, QOSClass: pod.Status.QOSClass, PodIP: pod.Status.PodIP, PodIPs: pod.Status.PodIPs},
	}, nil
}

// trimNamespace keeps what selection reads of a namespace: its labels.
func trimNamespace(obj any) (any, error) {
	ns, ok := obj.(*corev1.Namespace)
	if !ok {
		return obj, nil
	}
	return &corev1.Namespace{
		TypeMeta:   ns.TypeMeta,
		ObjectMeta: metav1.ObjectMeta{Name: ns.Name, UID: ns.UID, ResourceVersion: ns.ResourceVersion, Labels: ns.Labels},
	}, nil
}

// metaObject reads an informer's object, tombstones included.
func metaObject(obj any) (metav1.Object, bool) {
	if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		obj = t.Obj
	}
	o, ok := obj.(metav1.Object)
	return o, ok
}

// enqueueNamespace enqueues the node's pods of a namespace ("": all).
func (s *KubeSource) enqueueNamespace(ns string) {
	if s.lister == nil || s.queue == nil {
		return
	}
	var pods []*corev1.Pod
	var err error
	if ns == "" {
		pods, err = s.lister.List(labels.Everything())
	} else {
		pods, err = s.lister.Pods(ns).List(labels.Everything())
	}
	if err != nil {
		return
	}
	for _, p := range pods {
		s.enqueue(p)
	}
}

// workload turns a pod into a workload. The pod object is the informer's:
// read only, never modified.
func (s *KubeSource) workload(pod *corev1.Pod) (Workload, error) {
	cg, err := s.Layout.PodCgroup(string(pod.UID), string(pod.Status.QOSClass))
	if err != nil {
		return Workload{}, err
	}
	w := Workload{Namespace: pod.Namespace, Name: pod.Name, CgroupPath: cg, Labels: pod.Labels, Annotations: pod.Annotations}
	if pod.Spec.HostNetwork {
		w.IPs = append(w.IPs, s.HostNetworkIPs...)
		return w, nil
	}
	for _, ip := range pod.Status.PodIPs {
		if a, err := netip.ParseAddr(ip.IP); err == nil {
			w.IPs = append(w.IPs, a.Unmap())
		}
	}
	return w, nil
}

func (s *KubeSource) event(key, typ, reason, msg string) {
	if s.Recorder == nil || s.lister == nil {
		return
	}
	ns, name, err := cache.SplitMetaNamespaceKey(key)
	if err != nil {
		return
	}
	if pod, err := s.lister.Pods(ns).Get(name); err == nil {
		s.Recorder.Event(pod, typ, reason, msg)
	}
}

// Warn makes KubeSource the reconciler's Reporter: problems become
// Warning Events on the pod.
func (s *KubeSource) Warn(key, reason, msg string) {
	s.event(key, corev1.EventTypeWarning, reason, msg)
}
