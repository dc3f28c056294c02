package xds

import (
	"encoding/json"
	"fmt"

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"sigs.k8s.io/yaml"
)

// MarshalYAML renders a message as Envoy's YAML (the proto3 JSON mapping,
// field names in snake_case as in Envoy's documentation), keys sorted.
func MarshalYAML(m proto.Message) ([]byte, error) {
	j, err := protojson.MarshalOptions{UseProtoNames: true}.Marshal(m)
	if err != nil {
		return nil, fmt.Errorf("marshal %s: %w", m.ProtoReflect().Descriptor().FullName(), err)
	}
	return yaml.JSONToYAML(j)
}

// YAML renders the resources as one YAML document with a list of listeners
// and a list of clusters, as a reviewer (or Envoy's config_dump) shows them.
func (r *Resources) YAML() ([]byte, error) {
	doc := map[string][]json.RawMessage{}
	add := func(key string, m proto.Message) error {
		j, err := protojson.MarshalOptions{UseProtoNames: true}.Marshal(m)
		if err != nil {
			return fmt.Errorf("marshal %s: %w", m.ProtoReflect().Descriptor().FullName(), err)
		}
		doc[key] = append(doc[key], j)
		return nil
	}
	for _, l := range r.Listeners {
		if err := add("listeners", l); err != nil {
			return nil, err
		}
	}
	for _, c := range r.Clusters {
		if err := add("clusters", c); err != nil {
			return nil, err
		}
	}
	j, err := json.Marshal(doc)
	if err != nil {
		return nil, err
	}
	return yaml.JSONToYAML(j)
}
