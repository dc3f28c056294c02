package xds

import (
	"bytes"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"

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
	// seen, if set, remembers the Anys walked in this validation by
	// identity, so an Any shared by many chains (builder.sharedAny) is
	// checked once: an Any's checks depend on nothing but its contents.
	// The DNS caches found in one are recorded again at every place it
	// is, as checkDNSCacheSet and a remembered chain need them there.
	seen map[*anypb.Any]*walkedAny
}

// walkedAny is what a walk found inside an Any: the DNS caches, with paths
// relative to the Any.
type walkedAny struct {
	caches []dnsCacheAt
}

func (o walkOpts) unpack(a *anypb.Any) (proto.Message, error) {
	// The builder packed m into a with anypb.MarshalFrom: a's bytes are
	// m's deterministic encoding, unless a was changed since (its type is
	// checked; nothing in the package changes an Any's value).
	if m, ok := o.packed[a]; ok && a.GetTypeUrl() == typeURL(m) {
		return m, nil
	}
	return a.UnmarshalNew()
}

func (o walkOpts) skips(m proto.Message) bool { return o.skip != nil && o.skip(m) }

// unpackAs is the rules' a.UnmarshalTo: the message packed in a, if it is an
// M, read from the builder's record when it packed a (o.packed).
func unpackAs[M proto.Message](o walkOpts, a *anypb.Any) (M, bool) {
	var zero M
	if a == nil {
		return zero, false
	}
	m, err := o.unpack(a)
	if err != nil {
		return zero, false
	}
	t, ok := m.(M)
	return t, ok
}

func isA[M proto.Message](o walkOpts, a *anypb.Any) bool {
	_, ok := unpackAs[M](o, a)
	return ok
}

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
	w := walker{o: o, root: name}
	w.message(m)
	if jsonRoundTrip {
		if err := roundTrip(m); err != nil {
			w.errs = append(w.errs, fmt.Errorf("%s: %w", name, err))
		}
	}
	return w.caches, w.errs
}

// walker is one validateResource walk: ValidateAll on the resource and on
// every message packed in an Any inside it, at any depth (PGV covers the
// embedded messages, and stops at Anys), and checkDNSCache on every DNS
// cache configuration. It descends only into fields whose type can hold
// an Any or a DNS cache configuration (mayHold), and keeps the path to
// where it is as a stack of steps, written out only for an error or a
// cache: most of a configuration is neither, and building every field's
// path was most of a validation's cost.
type walker struct {
	o      walkOpts
	root   string
	steps  []step
	errs   []error
	caches []dnsCacheAt
}

// step is one step of a path below the root: a field, a list element or map
// value of that field, or the message packed in an Any.
type step struct {
	field protoreflect.Name
	index int // list element, or -1
	key   *protoreflect.MapKey
	any   protoreflect.FullName // the Any's contents' type, for a step into an Any
}

// path renders the steps as the validator's errors name fields:
// root.field[3].map[key](type.Name).field.
func (w *walker) path() string {
	var b strings.Builder
	b.WriteString(w.root)
	b.WriteString(w.relPath())
	return b.String()
}

func (w *walker) relPath() string {
	var b strings.Builder
	for _, s := range w.steps {
		switch {
		case s.any != "":
			b.WriteString("(" + string(s.any) + ")")
		case s.key != nil:
			b.WriteString("." + string(s.field) + "[" + s.key.String() + "]")
		case s.index >= 0:
			b.WriteString("." + string(s.field) + "[" + strconv.Itoa(s.index) + "]")
		default:
			b.WriteString("." + string(s.field))
		}
	}
	return b.String()
}

// message checks m, the resource or an Any's contents, and walks it.
func (w *walker) message(m proto.Message) {
	if v, ok := w.o.withoutSkipped(m).(interface{ ValidateAll() error }); ok {
		if err := v.ValidateAll(); err != nil {
			w.errs = append(w.errs, fmt.Errorf("%s: %w", w.path(), err))
		}
	}
	w.walk(m)
}

func (w *walker) walk(m proto.Message) {
	if w.o.skips(m) {
		return
	}
	switch x := m.(type) {
	case *anypb.Any:
		if seen, ok := w.o.seen[x]; ok {
			if len(seen.caches) > 0 {
				at := w.relPath()
				for _, c := range seen.caches {
					w.caches = append(w.caches, dnsCacheAt{at + c.path, c.dc})
				}
			}
			return
		}
		inner, err := w.o.unpack(x)
		if err != nil {
			w.errs = append(w.errs, fmt.Errorf("%s: typed_config %q: %w (Envoy rejects type URLs it does not know)", w.path(), x.GetTypeUrl(), err))
			return
		}
		found, failed := len(w.caches), len(w.errs)
		w.steps = append(w.steps, step{index: -1, any: inner.ProtoReflect().Descriptor().FullName()})
		w.message(inner)
		w.steps = w.steps[:len(w.steps)-1]
		// An Any with errors is not remembered: every chain holding it
		// reports them, whichever worker validates it first.
		if w.o.seen != nil && len(w.errs) == failed {
			seen := &walkedAny{}
			if len(w.caches) > found {
				at := w.relPath()
				for _, c := range w.caches[found:] {
					seen.caches = append(seen.caches, dnsCacheAt{strings.TrimPrefix(c.path, at), c.dc})
				}
			}
			w.o.seen[x] = seen
		}
		return
	case *dnscache.DnsCacheConfig:
		w.caches = append(w.caches, dnsCacheAt{w.relPath(), x})
		w.errs = append(w.errs, checkDNSCache(w.path(), x, w.o)...)
	}
	rm := m.ProtoReflect()
	if p := structPlanOf(m, rm.Descriptor()); p != nil && !reflectiveWalk {
		w.walkStruct(m, p)
		return
	}
	for _, fd := range walkedFields(rm.Descriptor()) {
		if !rm.Has(fd) {
			continue
		}
		v := rm.Get(fd)
		switch {
		case fd.IsMap():
			v.Map().Range(func(k protoreflect.MapKey, mv protoreflect.Value) bool {
				w.into(fd, -1, &k, mv.Message().Interface())
				return true
			})
		case fd.IsList():
			l := v.List()
			for i := 0; i < l.Len(); i++ {
				w.into(fd, i, nil, l.Get(i).Message().Interface())
			}
		default:
			w.into(fd, -1, nil, v.Message().Interface())
		}
	}
}

// into walks m, the value of fd (its element index, or its map value
// under key), one step below where the walk is.
func (w *walker) into(fd protoreflect.FieldDescriptor, index int, key *protoreflect.MapKey, m proto.Message) {
	w.steps = append(w.steps, step{field: fd.Name(), index: index, key: key})
	w.walk(m)
	w.steps = w.steps[:len(w.steps)-1]
}

// reflectiveWalk makes every walk read fields through protoreflect, as it
// does for a type without a structPlan: the tests compare the two.
var reflectiveWalk = false

// walkStruct is walk's loop over the fields walkedFields names, read from
// m's generated Go struct as plan says (see structPlan).
func (w *walker) walkStruct(m proto.Message, plan *structPlan) {
	v := reflect.ValueOf(m).Elem()
	for _, f := range plan.fields {
		fv := v.Field(f.index)
		switch {
		case f.oneof != nil:
			// The oneof's interface holds a pointer to a wrapper struct
			// whose one field is the member's value.
			if fv.IsNil() {
				continue
			}
			wrapper := fv.Elem()
			if wrapperNumber(wrapper.Type()) != f.fd.Number() {
				continue
			}
			w.intoValue(f.fd, -1, nil, wrapper.Elem().Field(0))
		case f.fd.IsMap():
			for it := fv.MapRange(); it.Next(); {
				k := protoreflect.ValueOf(it.Key().Interface()).MapKey()
				w.intoValue(f.fd, -1, &k, it.Value())
			}
		case f.fd.IsList():
			for i := range fv.Len() {
				w.intoValue(f.fd, i, nil, fv.Index(i))
			}
		default:
			w.intoValue(f.fd, -1, nil, fv)
		}
	}
}

// intoValue is into for a field's Go value: a pointer to a generated
// message, nil when the field is unset.
func (w *walker) intoValue(fd protoreflect.FieldDescriptor, index int, key *protoreflect.MapKey, v reflect.Value) {
	if v.IsNil() {
		return
	}
	if m, ok := v.Interface().(proto.Message); ok {
		w.into(fd, index, key, m)
	}
}

// structPlan is how a walk reads the fields walkedFields names straight
// from a generated message's Go struct. protoreflect wraps every message
// it hands out (a reflect.NewAt per field), which was most of a
// validation's cost; the struct's fields are the same values, read with
// reflect.Value.Field. The plan is derived from the struct tags that
// protoc-gen-go writes (the field number in "protobuf", the oneof's name in
// "protobuf_oneof"), so it follows the library's types; a type whose tags
// do not account for every walked field has no plan and is walked through
// protoreflect.
type structPlan struct {
	fields []structField
}

type structField struct {
	fd    protoreflect.FieldDescriptor
	index int // the Go struct field holding fd (for a oneof member, the oneof's interface)
	oneof protoreflect.OneofDescriptor
}

var structPlans sync.Map // reflect.Type -> *structPlan (nil: none)

var wrapperNumbers sync.Map // reflect.Type -> protoreflect.FieldNumber

// wrapperNumber is the field number of the oneof member whose wrapper
// struct t points to (protoc-gen-go writes one wrapper type per member,
// its one field tagged with the member's number), 0 if t is not one.
func wrapperNumber(t reflect.Type) protoreflect.FieldNumber {
	if v, ok := wrapperNumbers.Load(t); ok {
		return v.(protoreflect.FieldNumber)
	}
	var n protoreflect.FieldNumber
	if t.Kind() == reflect.Pointer && t.Elem().Kind() == reflect.Struct && t.Elem().NumField() == 1 {
		n = tagNumber(t.Elem().Field(0).Tag)
	}
	wrapperNumbers.Store(t, n)
	return n
}

// tagNumber is the field number in a protoc-gen-go "protobuf" struct tag
// ("bytes,4,opt,name=typed_config,json=typedConfig,proto3"), 0 if none.
func tagNumber(tag reflect.StructTag) protoreflect.FieldNumber {
	v, ok := tag.Lookup("protobuf")
	if !ok {
		return 0
	}
	parts := strings.Split(v, ",")
	if len(parts) < 2 {
		return 0
	}
	n, err := strconv.Atoi(parts[1])
	if err != nil || n <= 0 {
		return 0
	}
	return protoreflect.FieldNumber(n)
}

func structPlanOf(m proto.Message, md protoreflect.MessageDescriptor) *structPlan {
	t := reflect.TypeOf(m)
	if v, ok := structPlans.Load(t); ok {
		return v.(*structPlan)
	}
	p := newStructPlan(t, md)
	structPlans.Store(t, p)
	return p
}

func newStructPlan(t reflect.Type, md protoreflect.MessageDescriptor) *structPlan {
	if t.Kind() != reflect.Pointer || t.Elem().Kind() != reflect.Struct {
		return nil
	}
	st := t.Elem()
	byNumber := map[protoreflect.FieldNumber]int{}
	byOneof := map[protoreflect.Name]int{}
	for i := range st.NumField() {
		sf := st.Field(i)
		if _, ok := sf.Tag.Lookup("protobuf"); ok {
			n := tagNumber(sf.Tag)
			if n == 0 {
				return nil
			}
			byNumber[n] = i
		}
		if name, ok := sf.Tag.Lookup("protobuf_oneof"); ok {
			byOneof[protoreflect.Name(name)] = i
		}
	}
	p := &structPlan{}
	for _, fd := range walkedFields(md) {
		if od := fd.ContainingOneof(); od != nil && !od.IsSynthetic() {
			i, ok := byOneof[od.Name()]
			if !ok || st.Field(i).Type.Kind() != reflect.Interface {
				return nil
			}
			p.fields = append(p.fields, structField{fd: fd, index: i, oneof: od})
			continue
		}
		i, ok := byNumber[fd.Number()]
		if !ok {
			return nil
		}
		want := reflect.Pointer
		switch {
		case fd.IsMap():
			want = reflect.Map
		case fd.IsList():
			want = reflect.Slice
		}
		if st.Field(i).Type.Kind() != want {
			return nil
		}
		p.fields = append(p.fields, structField{fd: fd, index: i})
	}
	return p
}

// fieldPlans memoises walkedFields per message type, keyed by the
// descriptor itself (hashing its pointer is cheaper than its name).
var fieldPlans sync.Map // protoreflect.MessageDescriptor -> []protoreflect.FieldDescriptor

// walkedFields are the fields of md a walk descends into: those holding
// messages (or map values) that are, or can hold, an Any or a DNS cache
// configuration.
func walkedFields(md protoreflect.MessageDescriptor) []protoreflect.FieldDescriptor {
	if v, ok := fieldPlans.Load(md); ok {
		return v.([]protoreflect.FieldDescriptor)
	}
	var walked []protoreflect.FieldDescriptor
	if mayHold(md) {
		fs := md.Fields()
		for i := 0; i < fs.Len(); i++ {
			fd := fs.Get(i)
			if t := heldType(fd); t != nil && mayHoldOrIs(t) {
				walked = append(walked, fd)
			}
		}
	}
	fieldPlans.Store(md, walked)
	return walked
}

// heldType is the message type fd holds (a map's values' type), or nil.
func heldType(fd protoreflect.FieldDescriptor) protoreflect.MessageDescriptor {
	if fd.IsMap() {
		return fd.MapValue().Message()
	}
	return fd.Message()
}

// The message types a walk looks for: an Any (whose contents are
// validated) and a DNS cache configuration (checkDNSCache).
var (
	anyType      = (&anypb.Any{}).ProtoReflect().Descriptor().FullName()
	dnsCacheType = (&dnscache.DnsCacheConfig{}).ProtoReflect().Descriptor().FullName()
)

func mayHoldOrIs(md protoreflect.MessageDescriptor) bool {
	return md.FullName() == anyType || md.FullName() == dnsCacheType || mayHold(md)
}

// holds memoises mayHold per message type.
var holds sync.Map // protoreflect.FullName -> bool

// mayHold reports whether a message of type md can hold an Any or a DNS
// cache configuration in its fields, at any depth (an Any's contents are
// another walk's). It depends only on the types, so it is computed once
// per type: over every type reachable from md, to a fixpoint, since types
// may be recursive.
func mayHold(md protoreflect.MessageDescriptor) bool {
	if v, ok := holds.Load(md.FullName()); ok {
		return v.(bool)
	}
	// Every message type reachable from md through fields, with the
	// types its fields hold.
	var order []protoreflect.MessageDescriptor
	fields := map[protoreflect.FullName][]protoreflect.MessageDescriptor{}
	var collect func(protoreflect.MessageDescriptor)
	collect = func(d protoreflect.MessageDescriptor) {
		if _, seen := fields[d.FullName()]; seen {
			return
		}
		fields[d.FullName()] = nil
		order = append(order, d)
		fs := d.Fields()
		for i := 0; i < fs.Len(); i++ {
			fd := fs.Get(i)
			t := heldType(fd)
			if t == nil {
				continue
			}
			fields[d.FullName()] = append(fields[d.FullName()], t)
			collect(t)
		}
	}
	collect(md)
	result := map[protoreflect.FullName]bool{}
	for changed := true; changed; {
		changed = false
		for _, d := range order {
			if result[d.FullName()] {
				continue
			}
			for _, t := range fields[d.FullName()] {
				if t.FullName() == anyType || t.FullName() == dnsCacheType || result[t.FullName()] {
					result[d.FullName()] = true
					changed = true
					break
				}
			}
		}
	}
	for _, d := range order {
		holds.Store(d.FullName(), result[d.FullName()])
	}
	return result[md.FullName()]
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
// them back: r must not be read concurrently meanwhile. It records the
// digest of each chain it encoded in r (hash reuses them): r's chains must
// not change between Validate and hash.
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
	seen := map[*anypb.Any]*walkedAny{}
	clusters := map[string]bool{}
	var names []string
	for _, c := range r.Clusters {
		name := "cluster " + quoteName(c.GetName())
		found, cerrs := validateResource(name, c, v.JSONRoundTrip, walkOpts{packed: r.packed, seen: seen})
		addCaches(name, found)
		errs = append(errs, cerrs...)
		if clusters[c.GetName()] {
			errs = append(errs, fmt.Errorf("%s: duplicate cluster name", name))
		}
		clusters[c.GetName()] = true
		names = append(names, c.GetName())
		errs = append(errs, checkCluster(name, c, walkOpts{packed: r.packed})...)
	}
	// A chain's cluster references are checked against these names: they
	// are part of what a chain's validity depends on.
	slices.Sort(names)
	clusterKey := sha256.Sum256([]byte(strings.Join(names, "\x00")))
	next := map[[sha256.Size]byte][]dnsCacheAt{}
	nextBuilt := map[*listener.FilterChain]builtChain{}
	// A workload's matcher branch validated before (with the chains it
	// names, which come with it in its part) is not walked again.
	o := walkOpts{packed: r.packed, seen: seen, skip: func(m proto.Message) bool { return v.builtMatchers[m] }}
	listeners := map[string]bool{}
	for _, l := range r.Listeners {
		name := "listener " + quoteName(l.GetName())
		if listeners[l.GetName()] {
			errs = append(errs, fmt.Errorf("%s: duplicate listener name", name))
		}
		listeners[l.GetName()] = true
		// The listener around its chains, and each chain not validated
		// before, are independent checks of read-only messages: they run
		// on every CPU the process may use (parallel), and their results
		// are merged in order, so errors and caches come in the same order
		// whatever the scheduling.
		chains := l.FilterChains
		var lfound []dnsCacheAt
		var lerrs []error
		results := make([]chainCheck, len(chains))
		parallel(len(chains)+1, newValidateWorker, func(w *validateWorker, i int) {
			// The listener first: its matcher tree is the longest job.
			if i == 0 {
				ow := o
				ow.seen = w.seen
				l.FilterChains = nil
				lfound, lerrs = validateResource(name, l, v.JSONRoundTrip, ow)
				l.FilterChains = chains
				lerrs = append(lerrs, checkListener(name, l, clusters, ow)...)
				return
			}
			results[i-1] = v.checkFilterChain(name, i-1, chains[i-1], r, clusters, clusterKey, w)
		})
		addCaches(name, lfound)
		errs = append(errs, lerrs...)
		for i, c := range chains {
			res := results[i]
			addCaches(res.path, res.caches)
			errs = append(errs, res.errs...)
			if res.encoded {
				if r.digests == nil {
					r.digests = make(map[*listener.FilterChain][sha256.Size]byte, len(chains))
				}
				r.digests[c] = res.digest
			}
			if res.ok {
				next[res.key] = res.caches
				nextBuilt[c] = builtChain{clusterKey, res.key, res.caches}
			}
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

// chainCheck is what checkFilterChain found of one filter chain.
type chainCheck struct {
	path    string
	caches  []dnsCacheAt
	errs    []error
	ok      bool // valid: remembered under key
	key     [sha256.Size]byte
	encoded bool // digest is set
	digest  [sha256.Size]byte
}

// checkFilterChain validates listener name's chain i, c, unless v validated it
// before (the same chain of the same build, or one with the same encoding
// and cluster names). w is the calling worker (its memo of walked Anys,
// its encoding buffer).
// It only reads v, r and clusters.
func (v *Validator) checkFilterChain(name string, i int, c *listener.FilterChain, r *Resources, clusters map[string]bool, clusterKey [sha256.Size]byte, w *validateWorker) chainCheck {
	res := chainCheck{path: fmt.Sprintf("%s.filter_chains[%d]", name, i)}
	if r.parts != nil {
		if bc, ok := v.builtChains[c]; ok && bc.clusterKey == clusterKey {
			res.caches, res.ok, res.key = bc.caches, true, bc.key
			return res
		}
	}
	key, digest, err := w.chainKey(c, clusterKey)
	if err != nil {
		res.errs = []error{fmt.Errorf("%s: %w", res.path, err)}
		return res
	}
	res.key, res.digest, res.encoded = key, digest, true
	if found, ok := v.chains[key]; ok {
		res.caches, res.ok = found, true
		return res
	}
	res.caches, res.errs = validateResource(res.path, c, v.JSONRoundTrip, walkOpts{packed: r.packed, seen: w.seen})
	res.errs = append(res.errs, checkChain(fmt.Sprintf("%s: filter chain %q", name, c.GetName()), c, clusters, walkOpts{packed: r.packed})...)
	res.ok = len(res.errs) == 0
	return res
}

// parallel runs job(w, 0..n-1) on up to GOMAXPROCS goroutines (one of them
// the caller's), each with its own state w made by worker, and returns the
// workers' states when every job has run.
func parallel[W any](n int, worker func() W, job func(w W, i int)) []W {
	ws := make([]W, max(1, min(runtime.GOMAXPROCS(0), n)))
	var next atomic.Int64
	work := func(k int) {
		ws[k] = worker()
		for {
			i := int(next.Add(1)) - 1
			if i >= n {
				return
			}
			job(ws[k], i)
		}
	}
	var wg sync.WaitGroup
	for k := 1; k < len(ws); k++ {
		wg.Go(func() { work(k) })
	}
	work(0)
	wg.Wait()
	return ws
}

// validateWorker is one Validate worker's state: its memo of walked Anys
// (walkOpts.seen) and the buffer it encodes chains in.
type validateWorker struct {
	seen map[*anypb.Any]*walkedAny
	buf  []byte
}

func newValidateWorker() *validateWorker {
	return &validateWorker{seen: map[*anypb.Any]*walkedAny{}}
}

// chainKey digests a chain's deterministic encoding (digest) and that with
// the cluster names it is checked against (key).
func (w *validateWorker) chainKey(c *listener.FilterChain, clusterKey [sha256.Size]byte) (key, digest [sha256.Size]byte, err error) {
	w.buf, err = proto.MarshalOptions{Deterministic: true}.MarshalAppend(w.buf[:0], c)
	if err != nil {
		return key, digest, err
	}
	digest = sha256.Sum256(w.buf)
	return sha256.Sum256(append(clusterKey[:], digest[:]...)), digest, nil
}

func quoteName(s string) string { return fmt.Sprintf("%q", s) }
