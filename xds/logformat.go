package xds

import (
	"fmt"
	"maps"
	"slices"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	stream "github.com/envoyproxy/go-control-plane/envoy/extensions/access_loggers/stream/v3"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/structpb"
)

// logTemplate packs the access logs of one kind. A node's logs differ only
// in the workload's identity and the verdict (logFields are the rest), and
// packing each with proto.Marshal, which sorts a Struct's map on every call,
// was a fifth of a full rebuild. The template encodes the constant fields
// once and assembles each log's bytes from them and the few fields of its
// own, in the order deterministic marshalling uses (the Struct's entries by
// key; in the enclosing message, the oneof after the other field): the
// result is byte for byte what b.any would have produced
// (TestAccessLogEncoding), so hashing and the validator (which reads the
// typed message, see packedAnys) see the same thing.
type logTemplate struct {
	fields map[string]*structpb.Value // the constant fields, shared by every log of the kind
	enc    map[string][]byte          // each constant field encoded as a one-entry Struct
	keys   []string                   // every field's key, constant and per-log, sorted
	opts   []byte                     // SubstitutionFormatString's other fields, encoded
	size   int                        // the constant fields' encoded size
}

// logFormatOptions are the JSON options of every access log.
func logFormatOptions() *core.JsonFormatOptions { return &core.JsonFormatOptions{SortProperties: true} }

var (
	jsonFormatField = (&core.SubstitutionFormatString{}).ProtoReflect().Descriptor().Fields().ByName("json_format").Number()
	logFormatField  = (&stream.StdoutAccessLog{}).ProtoReflect().Descriptor().Fields().ByName("log_format").Number()
	stdoutLogURL    = typeURL(&stream.StdoutAccessLog{})
)

var deterministic = proto.MarshalOptions{Deterministic: true}

// logTemplate is the builder's template for kind, made on first use.
func (b *builder) logTemplate(kind string) *logTemplate {
	if t, ok := b.logTemplates[kind]; ok {
		return t
	}
	t := &logTemplate{fields: logFields(kind), enc: map[string][]byte{}}
	for k, v := range t.fields {
		t.enc[k] = b.structEntry(k, v)
		t.size += len(t.enc[k])
	}
	t.keys = append(slices.Collect(maps.Keys(t.fields)), perLogFields...)
	slices.Sort(t.keys)
	// protobuf-go writes a message's oneof fields (json_format) after
	// its other fields (json_format_options, the only other one set).
	t.opts = b.marshal(&core.SubstitutionFormatString{JsonFormatOptions: logFormatOptions()})
	if b.logTemplates == nil {
		b.logTemplates = map[string]*logTemplate{}
	}
	b.logTemplates[kind] = t
	return t
}

// perLogFields are the fields newAccessLog gives each log.
var perLogFields = []string{"namespace", "pod", "verdict", "reason"}

// pack builds the log with the template's fields and own (which must have
// exactly perLogFields), packs it and records it as b.any does.
func (t *logTemplate) pack(b *builder, own map[string]*structpb.Value) *anypb.Any {
	fields := make(map[string]*structpb.Value, len(t.fields)+len(own))
	maps.Copy(fields, t.fields)
	maps.Copy(fields, own)
	for k := range own {
		if _, constant := t.fields[k]; (constant || !slices.Contains(perLogFields, k)) && b.err == nil {
			b.err = fmt.Errorf("access log: field %q is not one of a log's own", k)
		}
	}
	if len(fields) != len(t.keys) && b.err == nil {
		b.err = fmt.Errorf("access log: %d fields, the template has %d", len(fields), len(t.keys))
	}
	logger := &stream.StdoutAccessLog{AccessLogFormat: &stream.StdoutAccessLog_LogFormat{LogFormat: &core.SubstitutionFormatString{
		Format:            &core.SubstitutionFormatString_JsonFormat{JsonFormat: &structpb.Struct{Fields: fields}},
		JsonFormatOptions: logFormatOptions(),
	}}}
	// Each of the log's own fields as a one-entry Struct, then everything
	// written once into a buffer of the final size.
	ownEnc := make(map[string][]byte, len(own))
	stLen := t.size
	for k, v := range own {
		ownEnc[k] = b.structEntry(k, v)
		stLen += len(ownEnc[k])
	}
	sfsLen := len(t.opts) + protowire.SizeTag(jsonFormatField) + protowire.SizeBytes(stLen)
	out := make([]byte, 0, protowire.SizeTag(logFormatField)+protowire.SizeBytes(sfsLen))
	out = protowire.AppendTag(out, logFormatField, protowire.BytesType)
	out = protowire.AppendVarint(out, uint64(sfsLen))
	out = append(out, t.opts...)
	out = protowire.AppendTag(out, jsonFormatField, protowire.BytesType)
	out = protowire.AppendVarint(out, uint64(stLen))
	for _, k := range t.keys {
		if e, ok := t.enc[k]; ok {
			out = append(out, e...)
		} else {
			out = append(out, ownEnc[k]...)
		}
	}
	if len(out) != cap(out) && b.err == nil {
		b.err = fmt.Errorf("access log: encoded %d bytes, sized %d", len(out), cap(out))
	}
	a := &anypb.Any{TypeUrl: stdoutLogURL, Value: out}
	b.remember(a, logger)
	return a
}

var (
	structFieldsField = (&structpb.Struct{}).ProtoReflect().Descriptor().Fields().ByName("fields").Number()
	stringValueField  = (&structpb.Value{}).ProtoReflect().Descriptor().Fields().ByName("string_value").Number()
)

// structEntry is the encoding of a Struct with the one field k: v, as
// deterministic proto.Marshal writes it: the map entry's key (field 1),
// then its value (field 2), a Value whose string_value is set. It writes
// the string case by hand (every field of a log's own is a string: one
// allocation, not a map and a marshal per field), and leaves any other
// kind of value to proto.Marshal.
func (b *builder) structEntry(k string, v *structpb.Value) []byte {
	sv, ok := v.GetKind().(*structpb.Value_StringValue)
	if !ok {
		return b.marshal(&structpb.Struct{Fields: map[string]*structpb.Value{k: v}})
	}
	valLen := protowire.SizeTag(stringValueField) + protowire.SizeBytes(len(sv.StringValue))
	entryLen := protowire.SizeTag(1) + protowire.SizeBytes(len(k)) + protowire.SizeTag(2) + protowire.SizeBytes(valLen)
	out := make([]byte, 0, protowire.SizeTag(structFieldsField)+protowire.SizeBytes(entryLen))
	out = protowire.AppendTag(out, structFieldsField, protowire.BytesType)
	out = protowire.AppendVarint(out, uint64(entryLen))
	out = protowire.AppendTag(out, 1, protowire.BytesType)
	out = protowire.AppendString(out, k)
	out = protowire.AppendTag(out, 2, protowire.BytesType)
	out = protowire.AppendVarint(out, uint64(valLen))
	out = protowire.AppendTag(out, stringValueField, protowire.BytesType)
	out = protowire.AppendString(out, sv.StringValue)
	return out
}

// marshal is deterministic proto.Marshal, recording the first error in b.err.
func (b *builder) marshal(m proto.Message) []byte {
	out, err := deterministic.Marshal(m)
	if err != nil && b.err == nil {
		b.err = fmt.Errorf("encode %s: %w", m.ProtoReflect().Descriptor().FullName(), err)
	}
	return out
}
