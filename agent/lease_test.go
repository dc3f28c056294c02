package agent

import (
	"context"
	"io"
	"log/slog"
	"strconv"
	"sync"
	"testing"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/runtime/schema"
)

// memLeases is one namespace's Leases with the API server's optimistic
// concurrency: an update at a stale resourceVersion is a conflict.
type memLeases struct {
	mu     sync.Mutex
	leases map[string]*coordinationv1.Lease
	rv     int
	// afterGet runs after each Get (to interleave another writer).
	afterGet func()
	// hang: every call waits for its context to end (an API server that
	// accepts the request and never answers).
	hang bool
}

func (m *memLeases) hanging(ctx context.Context) error {
	m.mu.Lock()
	h := m.hang
	m.mu.Unlock()
	if !h {
		return nil
	}
	<-ctx.Done()
	return ctx.Err()
}

var leaseResource = schema.GroupResource{Group: "coordination.k8s.io", Resource: "leases"}

func (m *memLeases) Get(ctx context.Context, name string) (*coordinationv1.Lease, error) {
	if err := m.hanging(ctx); err != nil {
		return nil, err
	}
	m.mu.Lock()
	l, ok := m.leases[name]
	m.mu.Unlock()
	if m.afterGet != nil {
		defer m.afterGet()
	}
	if !ok {
		return nil, apierrors.NewNotFound(leaseResource, name)
	}
	return l.DeepCopy(), nil
}

func (m *memLeases) Create(_ context.Context, l *coordinationv1.Lease) (*coordinationv1.Lease, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.leases[l.Name]; ok {
		return nil, apierrors.NewAlreadyExists(leaseResource, l.Name)
	}
	m.rv++
	c := l.DeepCopy()
	c.ResourceVersion = strconv.Itoa(m.rv)
	m.leases[l.Name] = c
	return c.DeepCopy(), nil
}

func (m *memLeases) Update(_ context.Context, l *coordinationv1.Lease) (*coordinationv1.Lease, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	cur, ok := m.leases[l.Name]
	if !ok {
		return nil, apierrors.NewNotFound(leaseResource, l.Name)
	}
	if cur.ResourceVersion != l.ResourceVersion {
		return nil, apierrors.NewConflict(leaseResource, l.Name, nil)
	}
	m.rv++
	c := l.DeepCopy()
	c.ResourceVersion = strconv.Itoa(m.rv)
	m.leases[l.Name] = c
	return c.DeepCopy(), nil
}

func (m *memLeases) holder(t *testing.T) (string, int32) {
	t.Helper()
	l, err := m.Get(context.Background(), "status")
	if err != nil {
		t.Fatal(err)
	}
	return *l.Spec.HolderIdentity, *l.Spec.LeaseTransitions
}

// A Lease is taken from its holder only once it has not changed for the
// lease duration by the taker's own clock; of two agents writing at once,
// one gets a conflict; a released Lease is taken at once.
func TestLeaseElection(t *testing.T) {
	leases := &memLeases{leases: map[string]*coordinationv1.Lease{}}
	var clock time.Time = time.Unix(1_000_000, 0)
	now := func() time.Time { return clock }
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	elector := func(id string) *leaseElection {
		return &leaseElection{leases: leases, name: "status", identity: id, leaseDuration: 15 * time.Second,
			renewDeadline: 10 * time.Second, retryPeriod: 2 * time.Second, logger: quiet, now: now}
	}
	ctx := context.Background()
	a, b, c := elector("node-a"), elector("node-b"), elector("node-c")

	if !a.tryAcquireOrRenew(ctx) {
		t.Fatal("node-a did not create the Lease")
	}
	if b.tryAcquireOrRenew(ctx) {
		t.Fatal("node-b took a Lease node-a had just created")
	}
	clock = clock.Add(14 * time.Second)
	if b.tryAcquireOrRenew(ctx) {
		t.Fatal("node-b took the Lease before it expired")
	}
	if !a.tryAcquireOrRenew(ctx) {
		t.Fatal("node-a could not renew")
	}
	// node-b saw the renewal change the Lease: its 15 s start again.
	clock = clock.Add(14 * time.Second)
	if b.tryAcquireOrRenew(ctx) {
		t.Fatal("node-b took the Lease 14 s after it last changed")
	}
	if h, n := leases.holder(t); h != "node-a" || n != 0 {
		t.Fatalf("holder %s, transitions %d; want node-a, 0", h, n)
	}

	// node-a stops renewing. Once expired, node-b and node-c both try;
	// node-c writes between node-b's read and its update.
	clock = clock.Add(2 * time.Second)
	c.tryAcquireOrRenew(ctx) // c observes the Lease as it is now
	clock = clock.Add(15 * time.Second)
	leases.afterGet = func() {
		leases.afterGet = nil
		if !c.tryAcquireOrRenew(ctx) {
			t.Error("node-c did not take the expired Lease")
		}
	}
	if b.tryAcquireOrRenew(ctx) {
		t.Fatal("node-b's update at a stale resourceVersion succeeded")
	}
	if h, n := leases.holder(t); h != "node-c" || n != 1 {
		t.Fatalf("holder %s, transitions %d; want node-c, 1", h, n)
	}

	// node-c leaves, releasing the Lease: node-a takes it at once.
	c.release()
	if !a.tryAcquireOrRenew(ctx) {
		t.Fatal("node-a could not take a released Lease")
	}
	if h, n := leases.holder(t); h != "node-a" || n != 2 {
		t.Fatalf("holder %s, transitions %d; want node-a, 2", h, n)
	}
}

// The holder stops leading once it has failed to renew for the renew
// deadline, before anyone else may take the Lease.
func TestLeaseElectionStopsLeadingWhenRenewalsFail(t *testing.T) {
	leases := &memLeases{leases: map[string]*coordinationv1.Lease{}}
	e := &leaseElection{leases: leases, name: "status", identity: "node-a", leaseDuration: 3 * time.Second,
		renewDeadline: 2 * time.Second, retryPeriod: 100 * time.Millisecond, logger: slog.New(slog.NewTextHandler(io.Discard, nil))}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	led := make(chan time.Time, 1)
	stopped := make(chan time.Time, 1)
	go e.run(ctx, func(lctx context.Context) {
		led <- time.Now()
		<-lctx.Done()
		stopped <- time.Now()
	})
	start := <-led
	// Someone else takes the Lease behind node-a's back (its renewals now
	// conflict or find another holder).
	l, _ := leases.Get(ctx, "status")
	other := "node-b"
	l.Spec.HolderIdentity = &other
	if _, err := leases.Update(ctx, l); err != nil {
		t.Fatal(err)
	}
	select {
	case end := <-stopped:
		if d := end.Sub(start); d < 1500*time.Millisecond || d > 3*time.Second {
			t.Errorf("stopped leading %v after the Lease was taken; want within the renew deadline (2 s) and before the lease duration (3 s)", d)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("still leading 10 s after the Lease was taken")
	}
}

// An API server that takes renewals and never answers: the holder stops
// leading within the renew deadline of its last renewal's start, not a
// request timeout later, so before its Lease may be taken.
func TestLeaseElectionStopsLeadingWhenTheAPIServerHangs(t *testing.T) {
	leases := &memLeases{leases: map[string]*coordinationv1.Lease{}}
	e := &leaseElection{leases: leases, name: "status", identity: "node-a", leaseDuration: 3 * time.Second,
		renewDeadline: 2 * time.Second, retryPeriod: 500 * time.Millisecond, logger: slog.New(slog.NewTextHandler(io.Discard, nil))}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	led, stopped := make(chan struct{}, 1), make(chan time.Time, 1)
	go e.run(ctx, func(lctx context.Context) {
		led <- struct{}{}
		<-lctx.Done()
		stopped <- time.Now()
	})
	<-led
	time.Sleep(1200 * time.Millisecond) // two renewals
	leases.mu.Lock()
	lastRenew := leases.leases["status"].Spec.RenewTime.Time
	leases.hang = true
	leases.mu.Unlock()
	select {
	case end := <-stopped:
		if d := end.Sub(lastRenew); d > 2300*time.Millisecond {
			t.Errorf("stopped leading %v after the last renewal; want within the renew deadline (2 s), and before the lease duration (3 s)", d)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("still leading 10 s after the API server stopped answering")
	}
}
