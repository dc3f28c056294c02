package agent

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"sort"
	"sync"
	"time"
)

// Defaults of the TCP-hostname resolver (the --dns-* flags).
const (
	DefaultNameMinTTL   = 5 * time.Second
	DefaultNameMaxTTL   = 5 * time.Minute
	DefaultNameGrace    = 10 * time.Minute
	DefaultNameMaxAddrs = 32
	DefaultMaxNames     = 4096
	// nameLookupWorkers bounds concurrent lookups: a slow resolver delays
	// the refresh of other names, never the agent.
	nameLookupWorkers = 8
	nameFailureBase   = 2 * time.Second
	nameFailureMax    = 30 * time.Second
)

// NameConfig configures Names.
type NameConfig struct {
	// Resolvers are asked in order; the next one only when one fails.
	Resolvers []netip.AddrPort
	// A name is looked up again after its answers' TTL, held to
	// [MinTTL, MaxTTL]: a TTL of 0 does not make the agent hammer the
	// resolver, a TTL of a day does not pin a stale answer.
	MinTTL, MaxTTL time.Duration
	// Grace keeps an address allowed this long after its TTL ran out
	// without DNS giving it again (it left DNS, or lookups fail), so that
	// clients that resolved it earlier, and reconnect, are not cut off.
	Grace time.Duration
	// MaxAddrs caps the addresses kept per name (current answers first).
	MaxAddrs int
	// MaxNames caps the names resolved; the ones beyond allow nothing.
	MaxNames int
	// Refuse drops answers that must never be allowed (the never-dial set:
	// a name that resolves to 127.0.0.1 or the metadata service).
	Refuse func(netip.Addr) bool
	// OnChange is called (without locks held) when the allowed addresses
	// of a wanted name change.
	OnChange func()
	Logger   *slog.Logger

	// For tests: the lookup and the clock. nil: DNS over Resolvers, time.Now.
	Lookup func(ctx context.Context, name string) ([]Answer, error)
	Now    func() time.Time
}

// NameAddr is one allowed address of a name and until when it stays so
// without DNS giving it again.
type NameAddr struct {
	Addr  netip.Addr `json:"addr"`
	Until time.Time  `json:"until"`
}

// NameStatus is what `sluice status` shows of one resolved name.
type NameStatus struct {
	Addrs []NameAddr `json:"addrs"`
	// Next is when the name is looked up again.
	Next time.Time `json:"next"`
	// Error is the last lookup's failure; empty after a success.
	Error string `json:"error,omitempty"`
	// Dropped counts the answers of the last successful lookup that were
	// not allowed: node-local ones, and those beyond the cap.
	Dropped int `json:"dropped,omitempty"`
}

// Names resolves the names of TCP-hostname rules ("tcp://db.example.com:5432")
// and keeps, per name, the addresses a workload may connect to: what DNS
// answers, re-resolved by TTL within a floor and a ceiling, each answer kept
// for a grace period after it leaves DNS, at most MaxAddrs per name, never a
// node-local one. Its methods are safe for concurrent use.
type Names struct {
	cfg  NameConfig
	log  *slog.Logger
	wake chan struct{}

	mu      sync.Mutex
	names   map[string]*nameState
	refused []string // wanted beyond MaxNames: not resolved
	lookups map[string]uint64
}

type nameState struct {
	addrs    map[netip.Addr]time.Time // allowed until
	next     time.Time
	backoff  time.Duration
	err      string
	dropped  int
	inFlight bool
}

// NewNames returns the resolver; Run drives it.
func NewNames(cfg NameConfig) *Names {
	cfg.MinTTL = cmp.Or(cfg.MinTTL, DefaultNameMinTTL)
	cfg.MaxTTL = max(cmp.Or(cfg.MaxTTL, DefaultNameMaxTTL), cfg.MinTTL)
	cfg.MaxAddrs = cmp.Or(cfg.MaxAddrs, DefaultNameMaxAddrs)
	cfg.MaxNames = cmp.Or(cfg.MaxNames, DefaultMaxNames)
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Lookup == nil {
		rs := slices.Clone(cfg.Resolvers)
		cfg.Lookup = func(ctx context.Context, name string) ([]Answer, error) { return LookupDNS(ctx, rs, name) }
	}
	n := &Names{cfg: cfg, log: cmp.Or(cfg.Logger, slog.Default()), wake: make(chan struct{}, 1),
		names: map[string]*nameState{}, lookups: map[string]uint64{}}
	return n
}

// Want makes names the whole set to resolve: new ones are looked up at
// once, the others forgotten.
func (n *Names) Want(names []string) {
	names = slices.Clone(names)
	sort.Strings(names)
	names = slices.Compact(names)
	var refused []string
	if len(names) > n.cfg.MaxNames {
		names, refused = names[:n.cfg.MaxNames], names[n.cfg.MaxNames:]
	}
	n.mu.Lock()
	added := false
	keep := make(map[string]bool, len(names))
	for _, name := range names {
		keep[name] = true
		if n.names[name] == nil {
			n.names[name] = &nameState{addrs: map[netip.Addr]time.Time{}, next: n.cfg.Now()}
			added = true
		}
	}
	for name := range n.names {
		if !keep[name] {
			delete(n.names, name)
		}
	}
	newRefused := !slices.Equal(refused, n.refused)
	n.refused = refused
	n.mu.Unlock()
	if newRefused && len(refused) > 0 {
		n.log.Warn("too many TCP-hostname names; these allow nothing", "max", n.cfg.MaxNames, "names", refused)
	}
	if added {
		n.poke()
	}
}

func (n *Names) poke() {
	select {
	case n.wake <- struct{}{}:
	default:
	}
}

// Addrs returns the addresses name allows now, sorted.
func (n *Names) Addrs(name string) []netip.Addr {
	now := n.cfg.Now()
	n.mu.Lock()
	defer n.mu.Unlock()
	s := n.names[name]
	if s == nil {
		return nil
	}
	return s.current(now)
}

func (s *nameState) current(now time.Time) []netip.Addr {
	out := make([]netip.Addr, 0, len(s.addrs))
	for a, until := range s.addrs {
		if now.Before(until) {
			out = append(out, a)
		}
	}
	slices.SortFunc(out, func(a, b netip.Addr) int { return a.Compare(b) })
	return out
}

// Status returns each wanted name's state (for the state file).
func (n *Names) Status() map[string]NameStatus {
	now := n.cfg.Now()
	n.mu.Lock()
	defer n.mu.Unlock()
	out := make(map[string]NameStatus, len(n.names))
	for name, s := range n.names {
		st := NameStatus{Addrs: []NameAddr{}, Next: s.next.UTC(), Error: s.err, Dropped: s.dropped}
		for _, a := range s.current(now) {
			st.Addrs = append(st.Addrs, NameAddr{Addr: a, Until: s.addrs[a].UTC()})
		}
		out[name] = st
	}
	for _, name := range n.refused {
		out[name] = NameStatus{Addrs: []NameAddr{}, Error: fmt.Sprintf("not resolved: more than %d names", n.cfg.MaxNames)}
	}
	return out
}

// Lookups returns the lookups done so far by result (ok, nxdomain, error).
func (n *Names) Lookups() map[string]uint64 {
	n.mu.Lock()
	defer n.mu.Unlock()
	out := make(map[string]uint64, len(n.lookups))
	for k, v := range n.lookups {
		out[k] = v
	}
	return out
}

// Run looks names up when they are due and expires addresses when their
// grace ends, until ctx is done.
func (n *Names) Run(ctx context.Context) {
	t := time.NewTimer(0)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-n.wake:
		}
		next := n.Step(ctx)
		t.Stop()
		select {
		case <-t.C:
		default:
		}
		t.Reset(max(next.Sub(n.cfg.Now()), 10*time.Millisecond))
	}
}

// Step does one round: looks up the names that are due (concurrently, at
// most nameLookupWorkers at a time), drops expired addresses, calls
// OnChange if any name's allowed addresses changed, and returns when the
// next round is due.
func (n *Names) Step(ctx context.Context) time.Time {
	now := n.cfg.Now()
	n.mu.Lock()
	var due []string
	for name, s := range n.names {
		if !s.inFlight && !now.Before(s.next) {
			s.inFlight = true
			due = append(due, name)
		}
	}
	n.mu.Unlock()

	changed := n.expire(now)
	var (
		wg  sync.WaitGroup
		mu  sync.Mutex
		sem = make(chan struct{}, nameLookupWorkers)
	)
	for _, name := range due {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			lctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			answers, err := n.cfg.Lookup(lctx, name)
			cancel()
			if n.apply(name, answers, err) {
				mu.Lock()
				changed = true
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	if changed && n.cfg.OnChange != nil {
		n.cfg.OnChange()
	}
	return n.nextDue()
}

// expire drops addresses whose grace ended; it reports whether any did.
func (n *Names) expire(now time.Time) bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	changed := false
	for name, s := range n.names {
		for a, until := range s.addrs {
			if !now.Before(until) {
				delete(s.addrs, a)
				changed = true
				n.log.Info("TCP-hostname address expired", "name", name, "addr", a)
			}
		}
	}
	return changed
}

// apply records one lookup's outcome; it reports whether the allowed
// addresses changed.
func (n *Names) apply(name string, answers []Answer, err error) bool {
	// Refuse runs without n.mu: it may take its owner's lock, whose holder
	// may be waiting in Addrs.
	refused := make([]bool, len(answers))
	for i, a := range answers {
		refused[i] = n.cfg.Refuse != nil && n.cfg.Refuse(a.Addr.Unmap())
	}
	now := n.cfg.Now()
	n.mu.Lock()
	defer n.mu.Unlock()
	s := n.names[name]
	if s == nil {
		return false // no longer wanted
	}
	s.inFlight = false
	before := s.current(now)
	switch {
	case err != nil && !errors.Is(err, ErrNXDomain):
		n.lookups["error"]++
		s.backoff = min(max(2*s.backoff, nameFailureBase), nameFailureMax, n.cfg.MaxTTL)
		s.next = now.Add(s.backoff)
		if s.err != err.Error() {
			n.log.Warn("TCP-hostname lookup failed; its addresses stay allowed until their grace ends", "name", name, "error", err, "retry_in", s.backoff)
		}
		s.err = err.Error()
		return false
	case err != nil:
		n.lookups["nxdomain"]++
		s.err = err.Error()
	default:
		n.lookups["ok"]++
		s.err = ""
	}
	s.backoff = 0
	ttl := n.cfg.MaxTTL
	var fresh []netip.Addr
	dropped := 0
	for i, a := range answers {
		addr := a.Addr.Unmap()
		if refused[i] {
			dropped++
			continue
		}
		if slices.Contains(fresh, addr) {
			continue
		}
		if len(fresh) == n.cfg.MaxAddrs {
			dropped++
			continue
		}
		fresh = append(fresh, addr)
		ttl = min(ttl, max(a.TTL, n.cfg.MinTTL))
	}
	if len(fresh) == 0 {
		ttl = n.cfg.MinTTL
	}
	if dropped > 0 && dropped != s.dropped {
		n.log.Warn("TCP-hostname answers not allowed (node-local, or beyond the cap)", "name", name, "dropped", dropped, "max", n.cfg.MaxAddrs)
	}
	s.dropped = dropped
	until := now.Add(ttl + n.cfg.Grace)
	for _, a := range fresh {
		s.addrs[a] = until
	}
	// The cap counts addresses kept in grace too: the ones DNS gave last
	// stay, the stale ones that expire first go.
	if len(s.addrs) > n.cfg.MaxAddrs {
		var stale []netip.Addr
		for a := range s.addrs {
			if !slices.Contains(fresh, a) {
				stale = append(stale, a)
			}
		}
		slices.SortFunc(stale, func(a, b netip.Addr) int { return s.addrs[a].Compare(s.addrs[b]) })
		for _, a := range stale[:len(s.addrs)-n.cfg.MaxAddrs] {
			delete(s.addrs, a)
		}
	}
	s.next = now.Add(ttl)
	after := s.current(now)
	if !slices.Equal(before, after) {
		n.log.Info("TCP-hostname resolved", "name", name, "addrs", after, "next_lookup", ttl)
		return true
	}
	return false
}

func (n *Names) nextDue() time.Time {
	n.mu.Lock()
	defer n.mu.Unlock()
	next := n.cfg.Now().Add(n.cfg.MaxTTL)
	for _, s := range n.names {
		if !s.inFlight && s.next.Before(next) {
			next = s.next
		}
		for _, until := range s.addrs {
			if until.Before(next) {
				next = until
			}
		}
	}
	return next
}
