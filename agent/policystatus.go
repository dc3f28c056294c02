package agent

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/sluice-io/sluice/policy"
	"github.com/sluice-io/sluice/policy/apis/policy/v1alpha1"
	policyclient "github.com/sluice-io/sluice/policy/client/clientset/versioned/typed/policy/v1alpha1"
	policylisters "github.com/sluice-io/sluice/policy/client/listers/policy/v1alpha1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/tools/cache"
)

// ConditionAccepted is the policy objects' condition: True when every
// selector and entry validated, False (reason Invalid) otherwise.
const ConditionAccepted = "Accepted"

// Condition reasons.
const (
	ReasonValid   = "Valid"
	ReasonInvalid = "Invalid"
)

// Lease timing, client-go's usual values: a dead holder is replaced within
// about 15 s.
const (
	statusLeaseDuration = 15 * time.Second
	statusRenewDeadline = 10 * time.Second
	statusRetryPeriod   = 2 * time.Second
)

// StatusWriter writes the status of every policy object (the Accepted
// condition and observedGeneration) from exactly one agent of the
// cluster: the holder of a Lease (client-go's leader election protocol,
// leaseElection). Every agent runs one; the others wait to take over.
type StatusWriter struct {
	Kube     KubeAPI
	Policies policyclient.PolicyV1alpha1Interface
	// Namespace and Name of the Lease; Identity is this agent's (its node).
	Namespace, Name, Identity string
	Logger                    *slog.Logger

	egress  policylisters.EgressPolicyLister
	cluster policylisters.ClusterEgressPolicyLister
	synced  []cache.InformerSynced
	kick    chan struct{}
	// written counts status updates (tests).
	written func()
}

// use takes the Kubernetes source's policy informers.
func (w *StatusWriter) use(eg, cl cache.SharedIndexInformer) {
	w.egress, w.cluster = policylisters.NewEgressPolicyLister(eg.GetIndexer()), policylisters.NewClusterEgressPolicyLister(cl.GetIndexer())
	w.kick = make(chan struct{}, 1)
	kick := func(any) {
		select {
		case w.kick <- struct{}{}:
		default:
		}
	}
	for _, inf := range []cache.SharedIndexInformer{eg, cl} {
		_, _ = inf.AddEventHandler(cache.ResourceEventHandlerFuncs{AddFunc: kick, UpdateFunc: func(_, o any) { kick(o) }, DeleteFunc: kick})
		w.synced = append(w.synced, inf.HasSynced)
	}
}

// Run campaigns for the Lease until ctx is done; while leading, it writes
// each object's status when it changes (and every resync).
func (w *StatusWriter) Run(ctx context.Context) {
	if w.Logger == nil {
		w.Logger = slog.Default()
	}
	if w.kick == nil {
		w.Logger.Error("policy status writer has no informers; not writing status")
		return
	}
	e := &leaseElection{leases: w.Kube.Leases(w.Namespace), name: w.Name, identity: w.Identity,
		leaseDuration: statusLeaseDuration, renewDeadline: statusRenewDeadline, retryPeriod: statusRetryPeriod, logger: w.Logger}
	e.run(ctx, w.lead)
}

func (w *StatusWriter) lead(ctx context.Context) {
	if !cache.WaitForCacheSync(ctx.Done(), w.synced...) {
		return
	}
	t := time.NewTicker(time.Minute)
	defer t.Stop()
	for {
		w.writeAll(ctx)
		select {
		case <-ctx.Done():
			return
		case <-w.kick:
		case <-t.C:
		}
	}
}

// writeAll brings every object's status up to date; an update that fails
// (a conflict with a newer spec) is retried at the next change or tick.
func (w *StatusWriter) writeAll(ctx context.Context) {
	egs, _ := w.egress.List(labels.Everything())
	for _, p := range egs {
		_, err := policy.ValidateEgressPolicy(p)
		if st, changed := acceptedStatus(p.Status, p.Generation, err); changed {
			c := p.DeepCopy()
			c.Status = st
			_, err := w.Policies.EgressPolicies(p.Namespace).UpdateStatus(ctx, c, metav1.UpdateOptions{})
			w.done("EgressPolicy "+p.Namespace+"/"+p.Name, err)
		}
	}
	cls, _ := w.cluster.List(labels.Everything())
	for _, p := range cls {
		_, err := policy.ValidateClusterPolicy(p)
		if st, changed := acceptedStatus(p.Status, p.Generation, err); changed {
			c := p.DeepCopy()
			c.Status = st
			_, err := w.Policies.ClusterEgressPolicies().UpdateStatus(ctx, c, metav1.UpdateOptions{})
			w.done("ClusterEgressPolicy "+p.Name, err)
		}
	}
}

func (w *StatusWriter) done(what string, err error) {
	if err != nil {
		w.Logger.Warn("policy status not written; retrying", "object", what, "error", err)
		return
	}
	if w.written != nil {
		w.written()
	}
}

// maxConditionMessage is metav1.Condition's limit on Message.
const maxConditionMessage = 32768

// acceptedStatus is the status an object of this generation with this
// validation result should have, and whether it differs from cur.
func acceptedStatus(cur v1alpha1.PolicyStatus, gen int64, verr error) (v1alpha1.PolicyStatus, bool) {
	c := metav1.Condition{Type: ConditionAccepted, Status: metav1.ConditionTrue, Reason: ReasonValid,
		Message: "every selector and egress rule is valid", ObservedGeneration: gen}
	if verr != nil {
		c.Status, c.Reason = metav1.ConditionFalse, ReasonInvalid
		c.Message = fmt.Sprintf("%v; the pods it selects are under the safest reading (it grants nothing; a guardrail allows nothing and enforces)", verr)
		if len(c.Message) > maxConditionMessage {
			c.Message = c.Message[:maxConditionMessage-3] + "..."
		}
	}
	old := meta.FindStatusCondition(cur.Conditions, ConditionAccepted)
	if cur.ObservedGeneration == gen && old != nil && old.Status == c.Status && old.Reason == c.Reason && old.Message == c.Message && old.ObservedGeneration == gen {
		return cur, false
	}
	st := *cur.DeepCopy()
	st.ObservedGeneration = gen
	meta.SetStatusCondition(&st.Conditions, c)
	return st, true
}
