package xds

import (
	"fmt"
	"strings"

	accesslog "github.com/envoyproxy/go-control-plane/envoy/config/accesslog/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	stream "github.com/envoyproxy/go-control-plane/envoy/extensions/access_loggers/stream/v3"
	"google.golang.org/protobuf/types/known/structpb"
)

// commandOperators are Envoy's substitution format command operators that
// take no argument
// (https://www.envoyproxy.io/docs/envoy/latest/configuration/observability/access_log/usage).
// Envoy refuses a format with an operator it does not know, at load time;
// so does the validator.
var commandOperators = map[string]bool{}

// argOperators take a "(...)" argument (and some an optional ":N" length).
var argOperators = map[string]bool{
	"REQ": true, "RESP": true, "TRAILER": true, "DYNAMIC_METADATA": true, "CLUSTER_METADATA": true,
	"UPSTREAM_METADATA": true, "FILTER_STATE": true, "UPSTREAM_FILTER_STATE": true, "START_TIME": true,
	"DOWNSTREAM_PEER_CERT_V_START": true, "DOWNSTREAM_PEER_CERT_V_END": true, "ENVIRONMENT": true,
	"REQ_WITHOUT_QUERY": true, "CEL": true, "METADATA": true, "EMIT_TIME": true,
}

func init() {
	for _, op := range strings.Fields(`
		START_TIME EMIT_TIME REQUEST_HEADERS_BYTES RESPONSE_HEADERS_BYTES RESPONSE_TRAILERS_BYTES
		BYTES_RECEIVED BYTES_SENT BYTES_RETRANSMITTED PACKETS_RETRANSMITTED
		UPSTREAM_WIRE_BYTES_SENT UPSTREAM_WIRE_BYTES_RECEIVED UPSTREAM_HEADER_BYTES_SENT UPSTREAM_HEADER_BYTES_RECEIVED
		DOWNSTREAM_WIRE_BYTES_SENT DOWNSTREAM_WIRE_BYTES_RECEIVED DOWNSTREAM_HEADER_BYTES_SENT DOWNSTREAM_HEADER_BYTES_RECEIVED
		PROTOCOL UPSTREAM_PROTOCOL RESPONSE_CODE RESPONSE_CODE_DETAILS CONNECTION_TERMINATION_DETAILS
		DURATION REQUEST_DURATION REQUEST_TX_DURATION RESPONSE_DURATION RESPONSE_TX_DURATION DOWNSTREAM_HANDSHAKE_DURATION ROUNDTRIP_DURATION
		RESPONSE_FLAGS RESPONSE_FLAGS_LONG ACCESS_LOG_TYPE
		UPSTREAM_HOST UPSTREAM_HOST_NAME UPSTREAM_CLUSTER UPSTREAM_CLUSTER_RAW UPSTREAM_LOCAL_ADDRESS UPSTREAM_LOCAL_ADDRESS_WITHOUT_PORT
		UPSTREAM_LOCAL_PORT UPSTREAM_REMOTE_ADDRESS UPSTREAM_REMOTE_ADDRESS_WITHOUT_PORT UPSTREAM_REMOTE_PORT
		UPSTREAM_REQUEST_ATTEMPT_COUNT UPSTREAM_TLS_CIPHER UPSTREAM_TLS_VERSION UPSTREAM_TLS_SESSION_ID
		UPSTREAM_TRANSPORT_FAILURE_REASON UPSTREAM_CONNECTION_ID
		DOWNSTREAM_REMOTE_ADDRESS DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT DOWNSTREAM_REMOTE_PORT
		DOWNSTREAM_DIRECT_REMOTE_ADDRESS DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT DOWNSTREAM_DIRECT_REMOTE_PORT
		DOWNSTREAM_LOCAL_ADDRESS DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT DOWNSTREAM_LOCAL_PORT
		DOWNSTREAM_DIRECT_LOCAL_ADDRESS DOWNSTREAM_DIRECT_LOCAL_ADDRESS_WITHOUT_PORT DOWNSTREAM_DIRECT_LOCAL_PORT
		DOWNSTREAM_TRANSPORT_FAILURE_REASON DOWNSTREAM_TLS_VERSION DOWNSTREAM_TLS_CIPHER DOWNSTREAM_TLS_SESSION_ID
		DOWNSTREAM_LOCAL_URI_SAN DOWNSTREAM_PEER_URI_SAN DOWNSTREAM_LOCAL_SUBJECT DOWNSTREAM_PEER_SUBJECT
		DOWNSTREAM_PEER_ISSUER DOWNSTREAM_PEER_FINGERPRINT_256 DOWNSTREAM_PEER_FINGERPRINT_1 DOWNSTREAM_PEER_SERIAL
		DOWNSTREAM_PEER_CERT CONNECTION_ID STREAM_ID REQUESTED_SERVER_NAME ROUTE_NAME VIRTUAL_CLUSTER_NAME
		FILTER_CHAIN_NAME HOSTNAME LOCAL_REPLY_BODY UNIQUE_ID TRACE_ID UPSTREAM_CLUSTER
		REQ_WITHOUT_QUERY CUSTOM_FLAGS`) {
		commandOperators[op] = true
	}
}

// checkFormat parses the command operators of one format string.
func checkFormat(path, s string) []error {
	var errs []error
	for s != "" {
		i := strings.IndexByte(s, '%')
		if i < 0 {
			break
		}
		s = s[i+1:]
		if strings.HasPrefix(s, "%") { // "%%" is a literal percent sign
			s = s[1:]
			continue
		}
		j := strings.IndexByte(s, '%')
		if j < 0 {
			errs = append(errs, fmt.Errorf("%s: unterminated command operator %q", path, "%"+s))
			break
		}
		op := s[:j]
		s = s[j+1:]
		name, arg, hasArg := strings.Cut(op, "(")
		switch {
		case hasArg && argOperators[name] && strings.Contains(arg, ")"):
		case !hasArg && commandOperators[name]:
		default:
			errs = append(errs, fmt.Errorf("%s: unknown command operator %%%s%%", path, op))
		}
	}
	return errs
}

// checkLogFormats checks every format of the stdout access loggers.
func checkLogFormats(path string, logs []*accesslog.AccessLog, o walkOpts) []error {
	var errs []error
	for i, l := range logs {
		so, ok := unpackAs[*stream.StdoutAccessLog](o, l.GetTypedConfig())
		if !ok {
			continue // not a stdout logger: checkExtension reports it
		}
		lp := fmt.Sprintf("%s.access_log[%d]", path, i)
		errs = append(errs, checkSubstitution(lp+".log_format", so.GetLogFormat())...)
	}
	return errs
}

func checkSubstitution(path string, f *core.SubstitutionFormatString) []error {
	var errs []error
	if t := f.GetTextFormatSource(); t != nil {
		errs = append(errs, checkFormat(path+".text_format_source", t.GetInlineString())...)
	}
	if t := f.GetTextFormat(); t != "" {
		errs = append(errs, checkFormat(path+".text_format", t)...)
	}
	// The path of a JSON field is written only for an error: most formats
	// have none, and writing every field's path was most of this check.
	var keys []string
	var walk func(v *structpb.Value)
	walk = func(v *structpb.Value) {
		switch k := v.GetKind().(type) {
		case *structpb.Value_StringValue:
			if len(checkFormat("", k.StringValue)) > 0 {
				errs = append(errs, checkFormat(path+".json_format."+strings.Join(keys, "."), k.StringValue)...)
			}
		case *structpb.Value_StructValue:
			for key, sub := range k.StructValue.GetFields() {
				keys = append(keys, key)
				walk(sub)
				keys = keys[:len(keys)-1]
			}
		}
	}
	for key, v := range f.GetJsonFormat().GetFields() {
		keys = append(keys[:0], key)
		walk(v)
	}
	return errs
}
