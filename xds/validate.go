package xds

import (
	"bytes"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"

	matcher "github.com/cncf/xds/go/xds/type/matcher/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	dnscache "github.com/envoyproxy/go-control-plane/envoy/extensions/common/dynamic_forward_proxy/v3"

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/known/anypb"

	// Every extension the validator may meet must be linked in, so that
	// anypb can resolve its type URL; what is not linked in is unknown.
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/access_loggers/file/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/listener/proxy_protocol/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/direct_response/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/rbac/v3"
)

// Envoy cannot run on the machines that build sluice, so every
// configuration passes through this validator before it is served, in tests
// and at run time. It checks, in order:
//
//  1. the protoc-gen-validate rules (ValidateAll) of every message, and of
//     every message packed in an Any, recursively: PGV stops at Any, Envoy
//     does not, and Envoy rejects type URLs it does not know;
//  2. a strict protojson round trip (what Envoy's YAML/JSON loaders see);
//  3. the cross-field rules Envoy enforces at load time that PGV cannot
//     express (rules.go).
//
// Errors name the resource and the path to the offending field.

// validateMessage runs checks 1 and 2 on one top-level resource.
func validateMessage(name string, m proto.Message) error {
	_, errs := validateResource(name, m, true, walkOpts{})
	return errors.Join(errs...)
}

// walkOpts let a walk use what the builder knows: packed maps an Any to
// the message packed into it (read instead of unmarshalling the Any), and
// skip names messages validated before, whose subtree is not walked again.
type walkOpts struct {
	packed packedAnys
	skip   func(proto.Message) bool
}

func (o walkOpts) unpack(a *anypb.Any) (proto.Message, error) {
	// The builder packed m into a with anypb.MarshalFrom: a's bytes are
	// m's deterministic encoding, unless a was changed since (its type is
	// checked; nothing in the package changes an Any's value).
	if m, ok := o.packed[a]; ok && a.GetTypeUrl() == "type.googleapis.com/"+string(m.ProtoReflect().Descriptor().FullName()) {
		return m, nil
	}
	return a.UnmarshalNew()
}

func (o walkOpts) skips(m proto.Message) bool { return o.skip != nil && o.skip(m) }

// withoutSkipped is what ValidateAll runs on for msg: msg itself, or, for
// the source-address trie, a copy without the range matchers o skips (each
// validated before, with its branch). PGV's ValidateAll descends into every
// embedded message (Anys excepted), so the whole trie of 250 branches would
// otherwise be validated each time one branch changed.
func (o walkOpts) withoutSkipped(msg proto.Message) proto.Message {
	im, ok := msg.(*matcher.IPMatcher)
	if !ok || o.skip == nil {
		return msg
	}
	kept := slices.DeleteFunc(slices.Clone(im.GetRangeMatchers()), func(rm *matcher.IPMatcher_IPRangeMatcher) bool {
		return rm != nil && o.skip(rm)
	})
	if len(kept) == len(im.GetRangeMatchers()) {
		return msg
	}
	return &matcher.IPMatcher{RangeMatchers: kept}
}

// validateResource runs checks 1 and 2 on one resource (or one filter
// chain), and in the same walk finds the DNS cache configurations in it,
// Anys included, each checked by checkDNSCache. Their paths are relative
// to name, so a remembered chain's caches can be placed at its index.
func validateResource(name string, m proto.Message, jsonRoundTrip bool, o walkOpts) ([]dnsCacheAt, []error) {
	var errs []error
	var found []dnsCacheAt
	walkAny(name, m, o, func(path string, msg proto.Message) {
		if v, ok := o.withoutSkipped(msg).(interface{ ValidateAll() error }); ok {
			if err := v.ValidateAll(); err != nil {
				errs = append(errs, fmt.Errorf("%s: %w", path, err))
			}
		}
		eachField(path, msg.ProtoReflect(), o.skip, func(p string, fm protoreflect.Message) {
			if dc, ok := fm.Interface().(*dnscache.DnsCacheConfig); ok {
				found = append(found, dnsCacheAt{strings.TrimPrefix(p, name), dc})
				errs = append(errs, checkDNSCache(p, dc)...)
			}
		})
	}, func(path string, err error) {
		errs = append(errs, fmt.Errorf("%s: %w", path, err))
	})
	if jsonRoundTrip {
		if err := roundTrip(m); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", name, err))
		}
	}
	return found, errs
}

// walkAny calls visit on m and on every message packed in an Any inside it,
// at any depth; anyErr gets the Anys that cannot be unpacked.
func walkAny(path string, m proto.Message, o walkOpts, visit func(string, proto.Message), anyErr func(string, error)) {
	visit(path, m)
	var walk func(string, protoreflect.Message)
	walk = func(p string, rm protoreflect.Message) {
		if o.skips(rm.Interface()) {
			return
		}
		if a, ok := rm.Interface().(*anypb.Any); ok {
			inner, err := o.unpack(a)
			if err != nil {
				anyErr(p, fmt.Errorf("typed_config %q: %w (Envoy rejects type URLs it does not know)", a.GetTypeUrl(), err))
				return
			}
			ip := p + "(" + string(inner.ProtoReflect().Descriptor().FullName()) + ")"
			visit(ip, inner)
			walk(ip, inner.ProtoReflect())
			return
		}
		rm.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
			fp := p + "." + string(fd.Name())
			switch {
			case fd.IsList() && fd.Message() != nil:
				l := v.List()
				for i := 0; i < l.Len(); i++ {
					walk(fmt.Sprintf("%s[%d]", fp, i), l.Get(i).Message())
				}
			case fd.IsMap() && fd.MapValue().Message() != nil:
				v.Map().Range(func(k protoreflect.MapKey, mv protoreflect.Value) bool {
					walk(fmt.Sprintf("%s[%s]", fp, k.String()), mv.Message())
					return true
				})
			case !fd.IsList() && !fd.IsMap() && fd.Message() != nil:
				walk(fp, v.Message())
			}
			return true
		})
	}
	walk(path, m.ProtoReflect())
}

// roundTrip marshals m to JSON, reads it back strictly (unknown fields are
// errors) and checks that nothing changed. protojson re-encodes Any
// contents deterministically, as the builders do, so proto.Equal is the
// fast check; Anys encoded otherwise are compared in canonical JSON.
func roundTrip(m proto.Message) error {
	j1, err := protojson.Marshal(m)
	if err != nil {
		return fmt.Errorf("to JSON: %w", err)
	}
	back := m.ProtoReflect().New().Interface()
	if err := (protojson.UnmarshalOptions{DiscardUnknown: false}).Unmarshal(j1, back); err != nil {
		return fmt.Errorf("strict JSON round trip: %w", err)
	}
	if proto.Equal(m, back) {
		return nil
	}
	j2, err := protojson.Marshal(back)
	if err != nil {
		return fmt.Errorf("strict JSON round trip: back to JSON: %w", err)
	}
	var c1, c2 bytes.Buffer
	if err := json.Compact(&c1, j1); err != nil {
		return fmt.Errorf("strict JSON round trip: %w", err)
	}
	if err := json.Compact(&c2, j2); err != nil {
		return fmt.Errorf("strict JSON round trip: %w", err)
	}
	if !bytes.Equal(c1.Bytes(), c2.Bytes()) {
		return fmt.Errorf("strict JSON round trip changed the resource")
	}
	return nil
}

// Validate checks a complete configuration as Envoy would load it, the
// JSON round trip included. The error joins every problem found.
func Validate(r *Resources) error { return (&Validator{JSONRoundTrip: true}).Validate(r) }

// Validator is Validate with a memory of the filter chains of the last
// configuration it found valid. A listener's chains are validated one by
// one (every check of Validate, on each chain as a message of its own), and
// a chain whose deterministic encoding, with the set of cluster names it may
// reference, is one it validated last time is not validated again: the
// checks depend on nothing else. So a configuration in which one workload's
// chains changed costs those chains, the listener around them and the
// clusters. A Validator is safe for concurrent use.
type Validator struct {
	// JSONRoundTrip adds check 2, the strict protojson round trip. The
	// Server leaves it out at run time (two thirds of a validation's
	// cost, and the builders only produce what round-trips: the tests and
	// the golden files run every built configuration through it); the
	// package's Validate, which every test uses, includes it.
	JSONRoundTrip bool

	mu sync.Mutex
	// chains maps a validated chain's digest to the DNS caches in it
	// (their consistency across chains is checked every time).
	chains map[[sha256.Size]byte][]dnsCacheAt
	// built: what it validated of a Builder's output last time, by
	// identity: a Builder's parts are never modified once built, so the
	// same pointer is the same content. A chain is remembered with the
	// cluster names it was checked against.
	builtChains map[*listener.FilterChain]builtChain
	// builtMatchers: branches (skipped by checkMatcher) and their range
	// matchers (skipped by the PGV walk).
	builtMatchers map[proto.Message]bool
}

type builtChain struct {
	clusterKey [sha256.Size]byte
	key        [sha256.Size]byte
	caches     []dnsCacheAt
}

// Validate checks r as the package's Validate does. It sets each listener's
// filter_chains aside while it validates the rest of the listener and puts
// them back: r must not be read concurrently meanwhile.
func (v *Validator) Validate(r *Resources) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	var errs []error
	var caches []dnsCacheAt
	addCaches := func(prefix string, found []dnsCacheAt) {
		for _, c := range found {
			caches = append(caches, dnsCacheAt{prefix + c.path, c.dc})
		}
	}
	clusters := map[string]bool{}
	var names []string
	for _, c := range r.Clusters {
		name := "cluster " + quoteName(c.GetName())
		found, cerrs := validateResource(name, c, v.JSONRoundTrip, walkOpts{packed: r.packed})
		addCaches(name, found)
		errs = append(errs, cerrs...)
		if clusters[c.GetName()] {
			errs = append(errs, fmt.Errorf("%s: duplicate cluster name", name))
		}
		clusters[c.GetName()] = true
		names = append(names, c.GetName())
		errs = append(errs, checkCluster(name, c)...)
	}
	// A chain's cluster references are checked against these names: they
	// are part of what a chain's validity depends on.
	slices.Sort(names)
	clusterKey := sha256.Sum256([]byte(strings.Join(names, "\x00")))
	next := map[[sha256.Size]byte][]dnsCacheAt{}
	nextBuilt := map[*listener.FilterChain]builtChain{}
	// A workload's matcher branch validated before (with the chains it
	// names, which come with it in its part) is not walked again.
	o := walkOpts{packed: r.packed, skip: func(m proto.Message) bool { return v.builtMatchers[m] }}
	listeners := map[string]bool{}
	for _, l := range r.Listeners {
		name := "listener " + quoteName(l.GetName())
		chains := l.FilterChains
		l.FilterChains = nil
		found, lerrs := validateResource(name, l, v.JSONRoundTrip, o)
		l.FilterChains = chains
		addCaches(name, found)
		errs = append(errs, lerrs...)
		if listeners[l.GetName()] {
			errs = append(errs, fmt.Errorf("%s: duplicate listener name", name))
		}
		listeners[l.GetName()] = true
		errs = append(errs, checkListener(name, l, clusters, o)...)
		for i, c := range chains {
			path := fmt.Sprintf("%s.filter_chains[%d]", name, i)
			if r.parts != nil {
				if bc, ok := v.builtChains[c]; ok && bc.clusterKey == clusterKey {
					next[bc.key] = bc.caches
					nextBuilt[c] = bc
					addCaches(path, bc.caches)
					continue
				}
			}
			key, err := chainKey(c, clusterKey)
			if err != nil {
				errs = append(errs, fmt.Errorf("%s: %w", path, err))
				continue
			}
			if found, ok := v.chains[key]; ok {
				next[key] = found
				nextBuilt[c] = builtChain{clusterKey, key, found}
				addCaches(path, found)
				continue
			}
			found, chainErrs := validateResource(path, c, v.JSONRoundTrip, walkOpts{packed: r.packed})
			chainErrs = append(chainErrs, checkChain(fmt.Sprintf("%s: filter chain %q", name, c.GetName()), c, clusters)...)
			if len(chainErrs) == 0 {
				next[key] = found
				nextBuilt[c] = builtChain{clusterKey, key, found}
			}
			addCaches(path, found)
			errs = append(errs, chainErrs...)
		}
	}
	errs = append(errs, checkDNSCacheSet(caches)...)
	if len(errs) > 0 {
		return errors.Join(errs...)
	}
	v.chains = next
	v.builtChains, v.builtMatchers = nil, nil
	if r.parts != nil {
		v.builtChains = nextBuilt
		v.builtMatchers = make(map[proto.Message]bool, 2*len(r.parts))
		for _, p := range r.parts {
			v.builtMatchers[p.onMatch] = true
			v.builtMatchers[p.rangeMatcher] = true
		}
	}
	return nil
}

// chainKey digests a chain's deterministic encoding with the cluster
// names it is checked against.
func chainKey(c *listener.FilterChain, clusterKey [sha256.Size]byte) ([sha256.Size]byte, error) {
	b, err := proto.MarshalOptions{Deterministic: true}.Marshal(c)
	if err != nil {
		return [sha256.Size]byte{}, err
	}
	h := sha256.New()
	h.Write(clusterKey[:])
	h.Write(b)
	var k [sha256.Size]byte
	h.Sum(k[:0])
	return k, nil
}

func quoteName(s string) string { return fmt.Sprintf("%q", s) }
