package conformance

import (
	"errors"
	"fmt"
	"strings"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/known/anypb"
)

// checkImplemented walks m and returns one error per field set that
// implementedFields does not name, and per typed_config of a type not in
// implementedTypes, each with its path from root.
func checkImplemented(root string, m proto.Message) error {
	var errs []error
	var walk func(path string, m protoreflect.Message)
	walk = func(path string, m protoreflect.Message) {
		if a, ok := m.Interface().(*anypb.Any); ok {
			name := strings.TrimPrefix(a.GetTypeUrl(), "type.googleapis.com/")
			if !implementedTypes[name] {
				errs = append(errs, fmt.Errorf("%s: type %s is not implemented by the conformance proxy", path, name))
				return
			}
			inner, err := a.UnmarshalNew()
			if err != nil {
				errs = append(errs, fmt.Errorf("%s: %w", path, err))
				return
			}
			walk(path+"<"+name[strings.LastIndexByte(name, '.')+1:]+">", inner.ProtoReflect())
			return
		}
		// Unknown fields (from a newer proto) are fields too.
		if len(m.GetUnknown()) > 0 {
			errs = append(errs, fmt.Errorf("%s: unknown fields in %s", path, m.Descriptor().FullName()))
		}
		m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
			key := string(m.Descriptor().FullName()) + "." + string(fd.Name())
			p := path + "." + string(fd.Name())
			if !implementedFields[key] {
				errs = append(errs, fmt.Errorf("%s: field %s is not implemented by the conformance proxy", p, key))
				return true
			}
			switch {
			case fd.IsList() && fd.Message() != nil:
				for i := 0; i < v.List().Len(); i++ {
					walk(fmt.Sprintf("%s[%d]", p, i), v.List().Get(i).Message())
				}
			case fd.IsMap() && fd.MapValue().Message() != nil:
				v.Map().Range(func(k protoreflect.MapKey, mv protoreflect.Value) bool {
					walk(fmt.Sprintf("%s[%s]", p, k.String()), mv.Message())
					return true
				})
			case fd.Message() != nil && !fd.IsList() && !fd.IsMap():
				walk(p, v.Message())
			}
			return true
		})
	}
	walk(root, m.ProtoReflect())
	return errors.Join(errs...)
}
