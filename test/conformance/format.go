package conformance

import (
	"bytes"
	"encoding/json"
	"fmt"
	"strings"
)

// operators are the command operators implemented, and whether each is
// numeric (a JSON format value that is only that operator is then a
// number, as Envoy's typed JSON formatter writes it).
// https://www.envoyproxy.io/docs/envoy/latest/configuration/observability/access_log/usage
var operators = map[string]bool{
	"START_TIME":                        false,
	"DURATION":                          true,
	"BYTES_RECEIVED":                    true,
	"BYTES_SENT":                        true,
	"DOWNSTREAM_REMOTE_ADDRESS":         false,
	"DOWNSTREAM_LOCAL_ADDRESS":          false,
	"DOWNSTREAM_LOCAL_PORT":             true,
	"UPSTREAM_HOST":                     false,
	"REQUESTED_SERVER_NAME":             false,
	"RESPONSE_FLAGS":                    false,
	"FILTER_CHAIN_NAME":                 false,
	"ROUTE_NAME":                        false,
	"RESPONSE_CODE":                     true,
	"REQ(:AUTHORITY)":                   false,
	"REQ(:METHOD)":                      false,
	"ACCESS_LOG_TYPE":                   false,
	"CONNECTION_ID":                     true,
	"CONNECTION_TERMINATION_DETAILS":    false,
	"UPSTREAM_LOCAL_ADDRESS":            false,
	"UPSTREAM_TRANSPORT_FAILURE_REASON": false,
	"RESPONSE_CODE_DETAILS":             false,
}

type formatPart struct {
	literal  string
	operator string
}

// parseFormat splits a format string into literals and command operators;
// an operator not implemented is an error (so is an unterminated one).
func parseFormat(s string) ([]formatPart, error) {
	var out []formatPart
	for s != "" {
		i := strings.IndexByte(s, '%')
		if i < 0 {
			out = append(out, formatPart{literal: s})
			break
		}
		if i > 0 {
			out = append(out, formatPart{literal: s[:i]})
		}
		s = s[i+1:]
		if strings.HasPrefix(s, "%") { // "%%": a literal percent sign
			out = append(out, formatPart{literal: "%"})
			s = s[1:]
			continue
		}
		j := strings.IndexByte(s, '%')
		if j < 0 {
			return nil, fmt.Errorf("unterminated command operator in %q", s)
		}
		op := s[:j]
		if _, ok := operators[op]; !ok {
			return nil, fmt.Errorf("command operator %%%s%% is not implemented", op)
		}
		out = append(out, formatPart{operator: op})
		s = s[j+1:]
	}
	return out, nil
}

// values are a connection's (or request's) command operator values; a
// missing key has no value.
type values map[string]any

// render writes one access log line: a JSON object with the log's fields,
// keys sorted when asked (Envoy's sort_properties), command operators
// substituted; a value that is one operator keeps its type (a number, or
// null when the operator has no value), a mixed one is a string with "-"
// for missing values.
func (l *AccessLog) render(v values) []byte {
	var buf bytes.Buffer
	buf.WriteByte('{')
	for i, k := range sortedKeys(l.Fields) {
		if i > 0 {
			buf.WriteByte(',')
		}
		kb, _ := json.Marshal(k)
		buf.Write(kb)
		buf.WriteByte(':')
		parts, _ := parseFormat(l.Fields[k]) // checked at compile time
		var out any
		if len(parts) == 1 && parts[0].operator != "" {
			out = v[parts[0].operator]
		} else {
			out = formatText(l.Fields[k], v)
		}
		vb, _ := json.Marshal(out)
		buf.Write(vb)
	}
	buf.WriteString("}\n")
	return buf.Bytes()
}

// formatText renders a text format (set_filter_state's, or a JSON value
// mixing literals and operators) with v: "-" for a missing value.
func formatText(format string, v values) string {
	parts, _ := parseFormat(format)
	var sb strings.Builder
	for _, p := range parts {
		if p.operator == "" {
			sb.WriteString(p.literal)
		} else if x, ok := v[p.operator]; ok && x != nil {
			fmt.Fprint(&sb, x)
		} else {
			sb.WriteString("-")
		}
	}
	return sb.String()
}
