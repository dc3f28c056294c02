package xds

import (
	"bytes"
	stream "github.com/envoyproxy/go-control-plane/envoy/extensions/access_loggers/stream/v3"
	"net/netip"
	"reflect"
	"strings"
	"testing"
	"time"

	matcher "github.com/cncf/xds/go/xds/type/matcher/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/sluice-io/sluice/policy"
	"google.golang.org/protobuf/proto"
)

// Every field of the state, at any depth, is in stateKey: changing any one
// of them changes the key. A field added later and not encoded fails here
// (an update that changed only it would be skipped as unchanged).
func TestKeyEncodingCoversEveryField(t *testing.T) {
	base := func() State {
		return State{
			Proxy:                  Proxy{IPv4: netip.MustParseAddr("169.254.77.1"), IPv6: netip.MustParseAddr("fd73::1"), Port: 15001},
			NeverDial:              []netip.Prefix{netip.MustParsePrefix("169.254.0.0/16")},
			DNSResolvers:           []netip.AddrPort{netip.MustParseAddrPort("10.96.0.10:53")},
			ListenerFiltersTimeout: time.Second, TCPIdleTimeout: time.Hour, HTTPStreamIdleTimeout: time.Minute,
			MaxConnectionsPerChain: 7,
			Workloads: []Workload{{
				Namespace: "ns", Name: "a", IPs: []netip.Addr{netip.MustParseAddr("10.0.0.2")}, PolicyError: "e",
				Policy: policy.Policy{Mode: policy.Enforce, FailClosed: true, Allow: []policy.Rule{{
					Host: "h.example", Prefix: netip.MustParsePrefix("10.1.0.0/16"), Port: 443, Resolve: true, Via: "v", Narrowed: "n",
				}}},
			}},
		}
	}
	want := stateKey(base())
	leaves := 0
	var visit func(path string, get func(*State) reflect.Value)
	visit = func(path string, get func(*State) reflect.Value) {
		s := base()
		v := get(&s)
		switch v.Interface().(type) {
		case netip.Addr, netip.Prefix, netip.AddrPort:
			leaves++
			switch x := v.Interface().(type) {
			case netip.Addr:
				v.Set(reflect.ValueOf(x.Next()))
			case netip.Prefix:
				v.Set(reflect.ValueOf(netip.PrefixFrom(x.Addr(), x.Bits()-1)))
			case netip.AddrPort:
				v.Set(reflect.ValueOf(netip.AddrPortFrom(x.Addr(), x.Port()+1)))
			}
			if stateKey(s) == want {
				t.Errorf("changing %s does not change the state key", path)
			}
			return
		}
		switch v.Kind() {
		case reflect.Struct:
			for i := 0; i < v.NumField(); i++ {
				i := i
				visit(path+"."+v.Type().Field(i).Name, func(s *State) reflect.Value { return get(s).Field(i) })
			}
			return
		case reflect.Slice:
			if v.Len() == 0 {
				t.Fatalf("%s: the sample has no element", path)
			}
			visit(path+"[0]", func(s *State) reflect.Value { return get(s).Index(0) })
			return
		case reflect.String:
			v.SetString(v.String() + "x")
		case reflect.Bool:
			v.SetBool(!v.Bool())
		case reflect.Int, reflect.Int64:
			v.SetInt(v.Int() + 1)
		case reflect.Uint16, reflect.Uint64:
			v.SetUint(v.Uint() + 1)
		default:
			t.Fatalf("%s: kind %s is not handled by this test (nor, probably, by the key)", path, v.Kind())
		}
		leaves++
		if stateKey(s) == want {
			t.Errorf("changing %s does not change the state key", path)
		}
	}
	visit("State", func(s *State) reflect.Value { return reflect.ValueOf(s).Elem() })
	if leaves < 20 {
		t.Fatalf("only %d fields visited", leaves)
	}
	// The order of workloads does not matter; their number does.
	s := base()
	s.Workloads = append(s.Workloads, Workload{Namespace: "ns", Name: "b"})
	r := base()
	r.Workloads = append([]Workload{{Namespace: "ns", Name: "b"}}, r.Workloads...)
	if stateKey(s) != stateKey(r) || stateKey(s) == want {
		t.Error("the key depends on workload order, or not on the workloads")
	}
	// A group's digest names each of its fields (digest in key.go).
	if n := reflect.TypeOf(group{}).NumField(); n != 6 {
		t.Errorf("group has %d fields; group.digest encodes 6: add the new one to it", n)
	}
}

// The source trie's Any, assembled from each group's cached encoding, is
// byte for byte the deterministic encoding of the trie it stands for.
func TestSourceTrieEncoding(t *testing.T) {
	s := benchStateN(t, 30)
	s.Workloads = append(s.Workloads, pod("audit", "a", "audit", "", "10.99.0.2"))
	bl := new(Builder)
	for round := 0; round < 2; round++ { // cold, then from the cache with one group rebuilt
		s.Workloads[0].IPs = []netip.Addr{netip.AddrFrom4([4]byte{10, 98, 0, byte(round + 2)})}
		r, _, err := bl.Build(s)
		if err != nil {
			t.Fatal(err)
		}
		found := 0
		for a, m := range r.packed {
			im, ok := m.(*matcher.IPMatcher)
			if !ok || len(im.GetRangeMatchers()) < 2 {
				continue
			}
			found++
			b, err := proto.MarshalOptions{Deterministic: true}.Marshal(im)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(a.GetValue(), b) {
				t.Errorf("round %d: the trie's Any differs from its message's encoding", round)
			}
			back := &matcher.IPMatcher{}
			if err := a.UnmarshalTo(back); err != nil || !proto.Equal(back, im) {
				t.Errorf("round %d: the trie's Any does not decode to its message: %v", round, err)
			}
		}
		if found != 1 {
			t.Fatalf("round %d: %d source tries, want 1", round, found)
		}
	}
}

// go-control-plane's Snapshot.Consistent, which Server.Update does not run,
// holds for what the builders make: no RDS or EDS names to resolve.
func TestSnapshotConsistent(t *testing.T) {
	s := benchStateN(t, 5)
	s.Workloads = append(s.Workloads, pod("audit", "a", "audit", "", "10.99.0.2"))
	r, _, err := Build(s)
	if err != nil {
		t.Fatal(err)
	}
	snap, err := cache.NewSnapshot("1", map[resource.Type][]types.Resource{
		resource.ListenerType: toResources(r.Listeners),
		resource.ClusterType:  toResources(r.Clusters),
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := snap.Consistent(); err != nil {
		t.Fatal(err)
	}
}

// A Validator warm from a Builder's last output skips the source-trie
// branches it validated, and only those: a new branch that breaks a rule
// is still found, in its range or deep in its matcher.
func TestValidatorChecksNewTrieBranches(t *testing.T) {
	for _, tc := range []struct {
		name, want string
		break_     func(p *groupParts)
	}{
		{"range prefix length", "PrefixLen", func(p *groupParts) { p.rangeMatcher.Ranges[0].PrefixLen = wrapU32(200) }},
		{"branch predicate", "Predicate", func(p *groupParts) {
			p.onMatch.GetMatcher().GetMatcherList().Matchers[0].Predicate = nil
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := benchStateN(t, 20)
			bl, v := new(Builder), new(Validator)
			r1, _, err := bl.Build(s)
			if err != nil {
				t.Fatal(err)
			}
			if err := v.Validate(r1); err != nil {
				t.Fatal(err)
			}
			s.Workloads[3].IPs = []netip.Addr{netip.MustParseAddr("10.97.0.2")}
			r2, _, err := bl.Build(s)
			if err != nil {
				t.Fatal(err)
			}
			old := map[*groupParts]bool{}
			for _, p := range r1.parts {
				old[p] = true
			}
			var fresh []*groupParts
			for _, p := range r2.parts {
				if !old[p] {
					fresh = append(fresh, p)
				}
			}
			if len(fresh) != 1 {
				t.Fatalf("%d parts rebuilt, want 1", len(fresh))
			}
			tc.break_(fresh[0])
			if err := v.Validate(r2); err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("warm Validator: %v, want an error naming %s", err, tc.want)
			}
		})
	}
}

// Every access log, assembled from its kind's template, is byte for byte
// the deterministic encoding of the message the validator reads for it, in
// every kind (listener, TCP, HTTP) and with names that need escaping.
func TestAccessLogEncoding(t *testing.T) {
	s := benchStateN(t, 3)
	s.Workloads = append(s.Workloads,
		pod("audit", "a%b", "audit", "", "10.99.0.2"),
		pod("ns%x", "enforced", "enforce", "example.com,10.0.0.0/8", "10.99.0.3"))
	bad := pod("bad", "p", "enforce", "", "10.99.0.4")
	bad.PolicyError = `entry "100%" is not a hostname`
	s.Workloads = append(s.Workloads, bad)
	r, _, err := Build(s)
	if err != nil {
		t.Fatal(err)
	}
	kinds := map[int]int{}
	for a, m := range r.packed {
		l, ok := m.(*stream.StdoutAccessLog)
		if !ok {
			continue
		}
		kinds[len(l.GetLogFormat().GetJsonFormat().GetFields())]++
		b, err := proto.MarshalOptions{Deterministic: true}.Marshal(l)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(a.GetValue(), b) {
			t.Errorf("access log of %v: its Any differs from its message's encoding", l.GetLogFormat().GetJsonFormat().GetFields()["pod"])
		}
		if a.GetTypeUrl() != "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog" {
			t.Errorf("type URL %s", a.GetTypeUrl())
		}
	}
	if len(kinds) != 3 {
		t.Errorf("access logs by field count: %v, want three kinds", kinds)
	}
}
