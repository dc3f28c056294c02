package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	listerscorev1 "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"
	"k8s.io/client-go/util/workqueue"
)

// DefaultSelector selects pods that opted in.
const DefaultSelector = "sluice.io/redirect=true"

// cgroupRetriesBeforeEvent: the kubelet creates a pod's cgroup shortly
// after the pod is bound; only a cgroup still missing after this many
// backed-off retries (about 10 s) is worth an Event.
const cgroupRetriesBeforeEvent = 8

// KubeSource follows the selected pods of one node through a pod informer
// and programs each through the reconciler, one key at a time from a
// rate-limited work queue (client-go's controller pattern).
type KubeSource struct {
	Client   kubernetes.Interface
	NodeName string
	// Selector picks the pods to redirect (label selector syntax).
	Selector string
	Layout   PodCgroupLayout
	// HostNetworkIPs are the source addresses of hostNetwork pods'
	// connections to the proxy: the proxy addresses themselves, which the
	// kernel picks as the source for a local destination.
	HostNetworkIPs []netip.Addr
	Recorder       record.EventRecorder
	Logger         *slog.Logger
	// RetryBaseDelay is the first retry's delay for a pod that could not
	// be applied; it doubles up to 30 s. Zero: 50 ms.
	RetryBaseDelay time.Duration

	lister listerscorev1.PodLister
	queue  workqueue.TypedRateLimitingInterface[string]
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
	if _, err := labels.Parse(sel); err != nil {
		return fmt.Errorf("kubernetes source: selector %q: %w", sel, err)
	}
	if s.Logger == nil {
		s.Logger = slog.Default()
	}
	if err := s.checkNode(ctx); err != nil {
		return err
	}
	factory := informers.NewSharedInformerFactoryWithOptions(s.Client, 0, informers.WithTweakListOptions(func(o *metav1.ListOptions) {
		o.FieldSelector = fields.OneTermEqualSelector("spec.nodeName", s.NodeName).String()
		o.LabelSelector = sel
	}))
	inf := factory.Core().V1().Pods()
	s.lister = inf.Lister()
	base := s.RetryBaseDelay
	if base <= 0 {
		base = 50 * time.Millisecond
	}
	s.queue = workqueue.NewTypedRateLimitingQueueWithConfig(
		workqueue.NewTypedItemExponentialFailureRateLimiter[string](base, 30*time.Second),
		workqueue.TypedRateLimitingQueueConfig[string]{Name: "sluice-pods"})
	defer s.queue.ShutDown()

	reg, err := inf.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    s.enqueue,
		UpdateFunc: func(_, obj any) { s.enqueue(obj) },
		DeleteFunc: s.enqueue, // tombstones included: the key is all we need
	})
	if err != nil {
		return err
	}
	factory.Start(ctx.Done())
	defer factory.Shutdown()
	// The handler's own HasSynced: every pod of the initial list has been
	// enqueued, not just stored.
	if !cache.WaitForCacheSync(ctx.Done(), inf.Informer().HasSynced, reg.HasSynced) {
		return fmt.Errorf("kubernetes source: pod cache did not sync: %w", ctx.Err())
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
	s.Logger.Info("kubernetes source synced", "node", s.NodeName, "selector", sel, "selected", len(r.Keys()))
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
	_, err := s.Client.CoreV1().Nodes().Get(ctx, s.NodeName, metav1.GetOptions{})
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
	w, err := s.workload(pod)
	if err != nil {
		return err
	}
	return r.Upsert(w)
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
