package xds

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"

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
	var errs []error
	walkAny(name, m, func(path string, msg proto.Message) {
		if v, ok := msg.(interface{ ValidateAll() error }); ok {
			if err := v.ValidateAll(); err != nil {
				errs = append(errs, fmt.Errorf("%s: %w", path, err))
			}
		}
	}, func(path string, err error) {
		errs = append(errs, fmt.Errorf("%s: %w", path, err))
	})
	if err := roundTrip(m); err != nil {
		errs = append(errs, fmt.Errorf("%s: %w", name, err))
	}
	return errors.Join(errs...)
}

// walkAny calls visit on m and on every message packed in an Any inside it,
// at any depth; anyErr gets the Anys that cannot be unpacked.
func walkAny(path string, m proto.Message, visit func(string, proto.Message), anyErr func(string, error)) {
	visit(path, m)
	var walk func(string, protoreflect.Message)
	walk = func(p string, rm protoreflect.Message) {
		if a, ok := rm.Interface().(*anypb.Any); ok {
			inner, err := a.UnmarshalNew()
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

// Validate checks a complete configuration as Envoy would load it. The
// error joins every problem found.
func Validate(r *Resources) error {
	var errs []error
	clusters := map[string]bool{}
	for _, c := range r.Clusters {
		name := "cluster " + quoteName(c.GetName())
		if err := validateMessage(name, c); err != nil {
			errs = append(errs, err)
		}
		if clusters[c.GetName()] {
			errs = append(errs, fmt.Errorf("%s: duplicate cluster name", name))
		}
		clusters[c.GetName()] = true
		errs = append(errs, checkCluster(name, c)...)
	}
	listeners := map[string]bool{}
	for _, l := range r.Listeners {
		name := "listener " + quoteName(l.GetName())
		if err := validateMessage(name, l); err != nil {
			errs = append(errs, err)
		}
		if listeners[l.GetName()] {
			errs = append(errs, fmt.Errorf("%s: duplicate listener name", name))
		}
		listeners[l.GetName()] = true
		errs = append(errs, checkListener(name, l, clusters)...)
	}
	errs = append(errs, checkDNSCaches(r)...)
	return errors.Join(errs...)
}

func quoteName(s string) string { return fmt.Sprintf("%q", s) }
