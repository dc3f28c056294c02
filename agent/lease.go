package agent

import (
	"context"
	"log/slog"
	"math/rand/v2"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	apiequality "k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// leaseElection is client-go's leader election on a Lease
// (k8s.io/client-go/tools/leaderelection with a LeaseLock), written out for
// the one use the agent has for it, because that package links in
// client-go's whole clientset (KubeAPI says why that matters). The
// protocol is the same, so agents of either kind share a Lease correctly:
//
//   - a Lease held by another identity is taken only once it has not
//     changed for LeaseDuration by this agent's own clock (the time it last
//     saw it change, not the holder's renewTime: clocks differ);
//   - every write is an update at the resourceVersion read, so of two
//     agents trying at once one gets a conflict;
//   - the holder renews every RetryPeriod and stops leading once no
//     renewal sent in the last RenewDeadline succeeded (less than
//     LeaseDuration, so it stops before anyone may take over), however long
//     the API server takes to answer: every attempt shares that deadline;
//   - on leaving it releases the Lease (holder cleared, duration 1 s) if
//     the API server still names it.
type leaseElection struct {
	leases                                    LeaseAPI
	name, identity                            string
	leaseDuration, renewDeadline, retryPeriod time.Duration
	logger                                    *slog.Logger
	now                                       func() time.Time

	observed     *coordinationv1.Lease
	observedTime time.Time
	reported     string // the last holder logged
}

// run campaigns until ctx is done; lead runs while this agent holds the
// Lease, with a context cancelled when it stops holding it. It releases the
// Lease when ctx ends, if the API server still names this agent.
func (e *leaseElection) run(ctx context.Context, lead func(context.Context)) {
	if e.now == nil {
		e.now = time.Now
	}
	defer e.release()
	for ctx.Err() == nil {
		last, ok := e.acquire(ctx)
		if !ok {
			return
		}
		leadCtx, stop := context.WithCancel(ctx)
		done := make(chan struct{})
		go func() {
			defer close(done)
			lead(leadCtx)
		}()
		e.renew(ctx, last)
		stop()
		<-done
		e.logger.Info("not writing policy status: lease lost or released", "identity", e.identity)
	}
}

// acquire tries every RetryPeriod, jittered as client-go's (factor 1.2),
// until it holds the Lease; it returns when the successful attempt began
// (the holder's deadlines count from then), false when ctx ended first.
func (e *leaseElection) acquire(ctx context.Context) (time.Time, bool) {
	for {
		start := e.now()
		actx, cancel := context.WithTimeout(ctx, e.renewDeadline)
		ok := e.tryAcquireOrRenew(actx)
		cancel()
		if ok {
			return start, true
		}
		select {
		case <-ctx.Done():
			return time.Time{}, false
		case <-time.After(e.retryPeriod + time.Duration(rand.Int64N(int64(e.retryPeriod)*12/10+1))):
		}
	}
}

// renew renews every RetryPeriod until ctx is done or no renewal has
// succeeded within RenewDeadline of the start of the last one that did.
// Every attempt shares that deadline, so leading stops by then however
// the API server answers, and RenewDeadline < LeaseDuration keeps it
// before anyone else may take the Lease: a renewal counts from when its
// request was sent, not answered.
func (e *leaseElection) renew(ctx context.Context, last time.Time) {
	t := time.NewTicker(e.retryPeriod)
	defer t.Stop()
	for {
		deadline := last.Add(e.renewDeadline)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-time.After(time.Until(deadline)):
			return
		}
		if !e.now().Before(deadline) {
			return
		}
		start := e.now()
		rctx, cancel := context.WithDeadline(ctx, deadline)
		ok := e.tryAcquireOrRenew(rctx)
		cancel()
		if ok {
			last = start
		}
	}
}

func (e *leaseElection) tryAcquireOrRenew(ctx context.Context) bool {
	now := metav1.NewMicroTime(e.now())
	dur := int32(e.leaseDuration / time.Second)
	l := e.leases
	cur, err := l.Get(ctx, e.name)
	if apierrors.IsNotFound(err) {
		created, err := l.Create(ctx, &coordinationv1.Lease{
			ObjectMeta: metav1.ObjectMeta{Name: e.name},
			Spec: coordinationv1.LeaseSpec{HolderIdentity: &e.identity, LeaseDurationSeconds: &dur,
				AcquireTime: &now, RenewTime: &now, LeaseTransitions: new(int32)},
		})
		if err != nil {
			e.logger.Debug("status lease: create", "error", err)
			return false
		}
		e.observe(created)
		return true
	}
	if err != nil {
		e.logger.Debug("status lease: get", "error", err)
		return false
	}
	if e.observed == nil || !apiequality.Semantic.DeepEqual(e.observed.Spec, cur.Spec) {
		e.observe(cur)
	}
	holder := holderOf(cur)
	held := time.Duration(0)
	if cur.Spec.LeaseDurationSeconds != nil {
		held = time.Duration(*cur.Spec.LeaseDurationSeconds) * time.Second
	}
	if holder != "" && holder != e.identity && e.observedTime.Add(held).After(e.now()) {
		return false
	}
	next := cur.DeepCopy()
	next.Spec.RenewTime, next.Spec.LeaseDurationSeconds = &now, &dur
	if holder != e.identity {
		var transitions int32
		if cur.Spec.LeaseTransitions != nil {
			transitions = *cur.Spec.LeaseTransitions
		}
		transitions++
		next.Spec.HolderIdentity, next.Spec.AcquireTime, next.Spec.LeaseTransitions = &e.identity, &now, &transitions
	}
	updated, err := l.Update(ctx, next)
	if err != nil {
		e.logger.Debug("status lease: update", "error", err)
		return false
	}
	e.observe(updated)
	return true
}

// observe records a Lease as seen now, and logs a change of holder.
func (e *leaseElection) observe(l *coordinationv1.Lease) {
	e.observed, e.observedTime = l, e.now()
	holder := holderOf(l)
	if holder == e.reported {
		return
	}
	e.reported = holder
	switch holder {
	case e.identity:
		e.logger.Info("writing policy status: this agent holds the lease", "lease", e.observed.Namespace+"/"+e.name, "identity", e.identity)
	case "":
	default:
		e.logger.Info("policy status is written by another agent", "holder", holder)
	}
}

// release gives the Lease up if the API server still names this agent its
// holder, so another can take it at once instead of after LeaseDuration.
// It reads the Lease first (what this agent last observed may be stale)
// and tries twice, a conflict being another writer.
func (e *leaseElection) release() {
	if e.observed == nil {
		return // never held, never read
	}
	ctx, cancel := context.WithTimeout(context.Background(), e.renewDeadline)
	defer cancel()
	for range 2 {
		cur, err := e.leases.Get(ctx, e.name)
		if err != nil {
			e.logger.Warn("status lease: release", "error", err)
			return
		}
		if holderOf(cur) != e.identity {
			return
		}
		next := cur.DeepCopy()
		one := int32(1)
		now := metav1.NewMicroTime(e.now())
		next.Spec.HolderIdentity, next.Spec.LeaseDurationSeconds, next.Spec.RenewTime, next.Spec.AcquireTime = new(string), &one, &now, &now
		_, err = e.leases.Update(ctx, next)
		if err == nil || !apierrors.IsConflict(err) {
			if err != nil {
				e.logger.Warn("status lease: release", "error", err)
			}
			return
		}
	}
}

// holderOf is a Lease's holder identity, "" when none.
func holderOf(l *coordinationv1.Lease) string {
	if l.Spec.HolderIdentity == nil {
		return ""
	}
	return *l.Spec.HolderIdentity
}
