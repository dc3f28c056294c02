package agent

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/dns/dnsmessage"
)

// fakeDNS answers Names' lookups from a table on a fake clock.
type fakeDNS struct {
	mu      sync.Mutex
	now     time.Time
	answers map[string][]Answer
	errs    map[string]error
	queries map[string]int
}

func newFakeDNS() *fakeDNS {
	return &fakeDNS{now: time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC), answers: map[string][]Answer{}, errs: map[string]error{}, queries: map[string]int{}}
}

func (f *fakeDNS) lookup(_ context.Context, name string) ([]Answer, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.queries[name]++
	if err := f.errs[name]; err != nil {
		return nil, err
	}
	return f.answers[name], nil
}

func (f *fakeDNS) set(name string, ttl time.Duration, addrs ...string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var as []Answer
	for _, a := range addrs {
		as = append(as, Answer{Addr: netip.MustParseAddr(a), TTL: ttl})
	}
	f.answers[name] = as
	delete(f.errs, name)
}

func (f *fakeDNS) fail(name string, err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.errs[name] = err
}

func (f *fakeDNS) clock() time.Time {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.now
}

func (f *fakeDNS) advance(d time.Duration) {
	f.mu.Lock()
	f.now = f.now.Add(d)
	f.mu.Unlock()
}

func (f *fakeDNS) count(name string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.queries[name]
}

func newTestNames(f *fakeDNS, changes *int) *Names {
	return NewNames(NameConfig{
		MinTTL: 5 * time.Second, MaxTTL: time.Minute, Grace: 30 * time.Second, MaxAddrs: 3,
		Refuse:   func(a netip.Addr) bool { return a.IsLoopback() || a.IsLinkLocalUnicast() },
		OnChange: func() { *changes++ },
		Lookup:   f.lookup, Now: f.clock,
	})
}

func addrs(ss ...string) []netip.Addr {
	out := []netip.Addr{}
	for _, s := range ss {
		out = append(out, netip.MustParseAddr(s))
	}
	return out
}

func checkAddrs(t *testing.T, n *Names, name string, want ...string) {
	t.Helper()
	got := n.Addrs(name)
	if got == nil {
		got = []netip.Addr{}
	}
	if !slices.Equal(got, addrs(want...)) {
		t.Fatalf("%s allows %v, want %v", name, got, want)
	}
}

// A name is looked up at once, again after its TTL (within the floor and
// the ceiling), and an address that leaves DNS stays allowed for its TTL
// plus the grace period, then goes.
func TestNamesTTLAndGrace(t *testing.T) {
	f := newFakeDNS()
	changes := 0
	n := newTestNames(f, &changes)
	ctx := context.Background()
	f.set("db.example.com", 20*time.Second, "203.0.113.7", "2001:db8::7")
	n.Want([]string{"db.example.com", "db.example.com"})
	next := n.Step(ctx)
	checkAddrs(t, n, "db.example.com", "203.0.113.7", "2001:db8::7")
	if changes != 1 || f.count("db.example.com") != 1 {
		t.Fatalf("after the first lookup: %d changes, %d queries", changes, f.count("db.example.com"))
	}
	if d := next.Sub(f.clock()); d != 20*time.Second {
		t.Fatalf("next round in %v, want the TTL (20s)", d)
	}
	// Not due yet: no lookup.
	f.advance(10 * time.Second)
	n.Step(ctx)
	if f.count("db.example.com") != 1 {
		t.Fatalf("looked up before its TTL ran out")
	}
	// DNS moves to a new address.
	f.set("db.example.com", 20*time.Second, "203.0.113.8")
	f.advance(10 * time.Second)
	n.Step(ctx)
	checkAddrs(t, n, "db.example.com", "203.0.113.7", "203.0.113.8", "2001:db8::7")
	if changes != 2 {
		t.Fatalf("%d changes, want 2", changes)
	}
	// The old ones were last given at t=0 with TTL 20 s: kept until 20 s +
	// 30 s grace = 50 s; now is 20 s.
	f.advance(29 * time.Second)
	n.Step(ctx)
	checkAddrs(t, n, "db.example.com", "203.0.113.7", "203.0.113.8", "2001:db8::7")
	f.advance(time.Second)
	n.Step(ctx)
	checkAddrs(t, n, "db.example.com", "203.0.113.8")
	if changes != 3 {
		t.Fatalf("%d changes, want 3 (the expiry)", changes)
	}
	st := n.Status()["db.example.com"]
	if len(st.Addrs) != 1 || st.Error != "" {
		t.Fatalf("status %+v", st)
	}

	// Floor and ceiling.
	f.set("zero.example.com", 0, "203.0.113.9")
	f.set("day.example.com", 24*time.Hour, "203.0.113.10")
	n.Want([]string{"zero.example.com", "day.example.com"})
	n.Step(ctx)
	if _, ok := n.Status()["db.example.com"]; ok {
		t.Fatal("a name no longer wanted is still resolved")
	}
	for name, want := range map[string]time.Duration{"zero.example.com": 5 * time.Second, "day.example.com": time.Minute} {
		if d := n.Status()[name].Next.Sub(f.clock()); d != want {
			t.Errorf("%s: next lookup in %v, want %v", name, d, want)
		}
	}
}

// A failing lookup keeps what was allowed until its grace ends, retrying
// with backoff; NXDOMAIN is an answer (the name left DNS), and the grace
// applies to it the same way.
func TestNamesFailuresKeepUntilGrace(t *testing.T) {
	f := newFakeDNS()
	changes := 0
	n := newTestNames(f, &changes)
	ctx := context.Background()
	f.set("db.example.com", 10*time.Second, "203.0.113.7")
	n.Want([]string{"db.example.com"})
	n.Step(ctx)
	f.fail("db.example.com", errors.New("i/o timeout"))
	f.advance(10 * time.Second)
	n.Step(ctx)
	checkAddrs(t, n, "db.example.com", "203.0.113.7")
	st := n.Status()["db.example.com"]
	if st.Error != "i/o timeout" || st.Next.Sub(f.clock()) != 2*time.Second {
		t.Fatalf("after a failure: %+v (want a retry in 2s)", st)
	}
	f.advance(2 * time.Second)
	n.Step(ctx)
	if d := n.Status()["db.example.com"].Next.Sub(f.clock()); d != 4*time.Second {
		t.Fatalf("second retry in %v, want 4s", d)
	}
	if n.Lookups()["error"] != 2 {
		t.Fatalf("lookups %v", n.Lookups())
	}
	// 10 s TTL + 30 s grace from t=0.
	f.advance(28 * time.Second)
	n.Step(ctx)
	checkAddrs(t, n, "db.example.com")

	f.set("nx.example.com", 10*time.Second, "203.0.113.20")
	n.Want([]string{"nx.example.com"})
	n.Step(ctx)
	f.fail("nx.example.com", ErrNXDomain)
	f.advance(10 * time.Second)
	n.Step(ctx)
	checkAddrs(t, n, "nx.example.com", "203.0.113.20")
	if st := n.Status()["nx.example.com"]; st.Error == "" || st.Next.Sub(f.clock()) != 5*time.Second {
		t.Fatalf("NXDOMAIN: %+v (want the error shown and the next lookup at the floor)", st)
	}
	f.advance(30 * time.Second)
	n.Step(ctx)
	checkAddrs(t, n, "nx.example.com")
	if n.Lookups()["nxdomain"] < 1 {
		t.Fatalf("lookups %v", n.Lookups())
	}
}

// Node-local answers are never allowed; at most MaxAddrs per name, the
// latest answers first, stale ones evicted before fresh ones.
func TestNamesRefuseAndCap(t *testing.T) {
	f := newFakeDNS()
	changes := 0
	n := newTestNames(f, &changes)
	ctx := context.Background()
	f.set("rebind.example.com", time.Minute, "127.0.0.1", "169.254.169.254", "203.0.113.7")
	f.set("big.example.com", time.Minute, "203.0.113.1", "203.0.113.2", "203.0.113.3", "203.0.113.4", "203.0.113.5")
	n.Want([]string{"rebind.example.com", "big.example.com"})
	n.Step(ctx)
	checkAddrs(t, n, "rebind.example.com", "203.0.113.7")
	if st := n.Status()["rebind.example.com"]; st.Dropped != 2 {
		t.Fatalf("rebind: %+v, want 2 dropped", st)
	}
	checkAddrs(t, n, "big.example.com", "203.0.113.1", "203.0.113.2", "203.0.113.3")
	// New answers displace the stale ones (kept in grace) beyond the cap.
	f.set("big.example.com", time.Minute, "203.0.113.9", "203.0.113.8")
	f.advance(time.Minute)
	n.Step(ctx)
	got := n.Addrs("big.example.com")
	if len(got) != 3 || !slices.Contains(got, netip.MustParseAddr("203.0.113.8")) || !slices.Contains(got, netip.MustParseAddr("203.0.113.9")) {
		t.Fatalf("big allows %v: want 3, with both fresh answers", got)
	}
}

func TestNamesMaxNames(t *testing.T) {
	f := newFakeDNS()
	n := NewNames(NameConfig{MaxNames: 2, Lookup: f.lookup, Now: f.clock})
	for _, name := range []string{"a.example.com", "b.example.com", "c.example.com"} {
		f.set(name, time.Minute, "203.0.113.1")
	}
	n.Want([]string{"c.example.com", "a.example.com", "b.example.com"})
	n.Step(context.Background())
	checkAddrs(t, n, "c.example.com")
	if st := n.Status()["c.example.com"]; st.Error == "" {
		t.Fatalf("the name beyond the cap is not reported: %+v", st)
	}
	checkAddrs(t, n, "a.example.com", "203.0.113.1")
}

// LookupDNS against a real UDP server: A and AAAA, TTLs, NXDOMAIN, a
// SERVFAIL resolver passed over for the next one.
func TestLookupDNS(t *testing.T) {
	srv := func(handle func(q dnsmessage.Question, h dnsmessage.Header) []byte) netip.AddrPort {
		c, err := net.ListenPacket("udp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		go func() {
			buf := make([]byte, 1500)
			for {
				n, from, err := c.ReadFrom(buf)
				if err != nil {
					return
				}
				var p dnsmessage.Parser
				h, err := p.Start(buf[:n])
				if err != nil {
					continue
				}
				q, err := p.Question()
				if err != nil {
					continue
				}
				c.WriteTo(handle(q, h), from)
			}
		}()
		return c.LocalAddr().(*net.UDPAddr).AddrPort()
	}
	reply := func(q dnsmessage.Question, h dnsmessage.Header, rcode dnsmessage.RCode, add func(b *dnsmessage.Builder)) []byte {
		b := dnsmessage.NewBuilder(nil, dnsmessage.Header{ID: h.ID, Response: true, RCode: rcode})
		b.StartQuestions()
		b.Question(q)
		b.StartAnswers()
		if add != nil {
			add(&b)
		}
		out, err := b.Finish()
		if err != nil {
			panic(err)
		}
		return out
	}
	servfail := srv(func(q dnsmessage.Question, h dnsmessage.Header) []byte {
		return reply(q, h, dnsmessage.RCodeServerFailure, nil)
	})
	good := srv(func(q dnsmessage.Question, h dnsmessage.Header) []byte {
		if q.Name.String() != "db.example.com." {
			return reply(q, h, dnsmessage.RCodeNameError, nil)
		}
		return reply(q, h, dnsmessage.RCodeSuccess, func(b *dnsmessage.Builder) {
			// A CNAME chain with a shorter TTL than the address, and a
			// record for a name off the chain that must be ignored.
			target := dnsmessage.MustNewName("real.example.net.")
			b.CNAMEResource(dnsmessage.ResourceHeader{Name: q.Name, Class: dnsmessage.ClassINET, TTL: 30}, dnsmessage.CNAMEResource{CNAME: target})
			hdr := dnsmessage.ResourceHeader{Name: target, Class: dnsmessage.ClassINET, TTL: 300}
			other := dnsmessage.ResourceHeader{Name: dnsmessage.MustNewName("evil.example.org."), Class: dnsmessage.ClassINET, TTL: 300}
			switch q.Type {
			case dnsmessage.TypeA:
				b.AResource(hdr, dnsmessage.AResource{A: [4]byte{203, 0, 113, 7}})
				b.AResource(other, dnsmessage.AResource{A: [4]byte{198, 51, 100, 66}})
			case dnsmessage.TypeAAAA:
				b.AAAAResource(hdr, dnsmessage.AAAAResource{AAAA: netip.MustParseAddr("2001:db8::7").As16()})
			}
		})
	})
	ctx := context.Background()
	got, err := LookupDNS(ctx, []netip.AddrPort{servfail, good}, "db.example.com")
	if err != nil {
		t.Fatal(err)
	}
	want := []Answer{{netip.MustParseAddr("203.0.113.7"), 30 * time.Second}, {netip.MustParseAddr("2001:db8::7"), 30 * time.Second}}
	if !slices.Equal(got, want) {
		t.Fatalf("got %v, want %v", got, want)
	}
	if _, err := LookupDNS(ctx, []netip.AddrPort{good}, "nope.example.com"); !errors.Is(err, ErrNXDomain) {
		t.Fatalf("unknown name: %v, want NXDOMAIN", err)
	}
	_, err = LookupDNS(ctx, []netip.AddrPort{servfail}, "db.example.com")
	if err == nil || errors.Is(err, ErrNXDomain) || !strings.Contains(err.Error(), "RCodeServerFailure") {
		t.Fatalf("SERVFAIL only: %v", err)
	}
	if _, err := LookupDNS(ctx, nil, "db.example.com"); err == nil {
		t.Fatal("no resolvers: no error")
	}
}
