// Package policy owns sluice's policy model: the labels and annotation a pod
// declares, parsed by pure functions with precise errors, what the
// resulting policy allows (Decide), and the node-local destinations no
// policy can reach (NodeLocal). The xDS builder and the datapath consume
// it. A policy that does not parse never opens a pod up: ParsePolicy
// returns the safest policy along with the error.
package policy

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"
)

// Labels and annotations of the policy API.
const (
	LabelRedirect   = "sluice.io/redirect"
	LabelMode       = "sluice.io/mode"
	LabelFailMode   = "sluice.io/fail-mode"
	AnnotationAllow = "sluice.io/allow"
	// AnnotationPrefix is every sluice annotation's: the agent keeps no
	// other annotation of a pod.
	AnnotationPrefix = "sluice.io/"
)

// Limits on outside input.
const (
	MaxAllowEntries  = 1024
	MaxAllowBytes    = 64 << 10
	maxHostnameBytes = 253
)

// Mode says what the proxy does with a pod's connections.
type Mode int

const (
	// Audit allows and logs every connection.
	Audit Mode = iota
	// Enforce allows only what the pod declares.
	Enforce
)

func (m Mode) String() string {
	if m == Enforce {
		return "enforce"
	}
	return "audit"
}

// Rule is one allow entry: a hostname (exact, or "*.suffix" for subdomains
// of suffix only) or an IP prefix, and a port (0: any port); or, with
// Resolve, a TCP hostname: a name the agent resolves, whose addresses are
// allowed at Port for any protocol.
type Rule struct {
	Host   string
	Prefix netip.Prefix
	Port   uint16
	// Resolve marks a TCP-hostname rule ("tcp://db.example.com:5432"): the
	// client need not send the name (no SNI, no Host); the agent resolves
	// Host and allows connections to its answers at Port. The builders
	// never see the rule itself, only the address rules Policy.Expand
	// turns it into.
	Resolve bool
	// Via, on an address rule Expand added, is the TCP-hostname rule it
	// comes from: such a rule never grants metadata access.
	Via string
	// Narrowed, on a rule Merge cut down to a guardrail entry's scope, is
	// that guardrail: such a rule never grants metadata access either.
	Narrowed string
}

// IsHost reports whether the rule is matched against the name a client
// sends (TLS SNI, HTTP Host).
func (r Rule) IsHost() bool { return r.Host != "" && !r.Resolve }

// IsResolved reports whether the rule is a TCP hostname, allowed by the
// addresses the agent resolves it to.
func (r Rule) IsResolved() bool { return r.Host != "" && r.Resolve }

// String renders the rule in the annotation grammar; parsing it gives r back.
func (r Rule) String() string {
	var s string
	switch {
	case r.IsResolved():
		return TCPScheme + r.Host + ":" + strconv.Itoa(int(r.Port))
	case r.IsHost():
		s = r.Host
	case r.Prefix.Addr().Is6():
		s = "[" + prefixString(r.Prefix) + "]"
		if r.Port == 0 {
			return prefixString(r.Prefix)
		}
	default:
		s = prefixString(r.Prefix)
	}
	if r.Port != 0 {
		s += ":" + strconv.Itoa(int(r.Port))
	}
	return s
}

func prefixString(p netip.Prefix) string {
	if p.IsSingleIP() {
		return p.Addr().String()
	}
	return p.String()
}

// Policy is a pod's parsed policy.
type Policy struct {
	Mode Mode
	// Allow is the allow list; enforce mode denies everything else.
	Allow []Rule
	// FailClosed: while the proxy is not ready, refuse connections rather
	// than let them go direct. Defaults: enforce closed, audit open.
	FailClosed bool
}

// MetadataGrants are the metadata addresses (of metadata) and other
// link-local addresses that an enforce-mode policy lets the workload reach,
// with their ports (0: any): those that an allow entry names exactly, as a
// single address. A wider CIDR entry grants nothing, so that "0.0.0.0/0"
// (any public destination) never silently includes instance credentials or
// the node's link. Audit mode needs no grant. The datapath sends granted
// connections direct from the pod, never through the proxy: see
// docs/security.md.
func (p Policy) MetadataGrants(metadata []netip.Addr) []netip.AddrPort {
	if p.Mode != Enforce {
		return nil
	}
	var out []netip.AddrPort
	for _, r := range p.Allow {
		if r.Host != "" || r.Via != "" || r.Narrowed != "" || !r.Prefix.IsSingleIP() {
			continue
		}
		a := r.Prefix.Addr().Unmap()
		if a.IsLinkLocalUnicast() || slices.ContainsFunc(metadata, func(m netip.Addr) bool { return m.Unmap() == a }) {
			out = append(out, netip.AddrPortFrom(a, r.Port))
		}
	}
	return out
}

// EntryError says which allow entry is wrong and why.
type EntryError struct {
	Index  int // 1-based position in the annotation
	Entry  string
	Reason string
}

func (e *EntryError) Error() string {
	return fmt.Sprintf("%s entry %d %q: %s", AnnotationAllow, e.Index, e.Entry, e.Reason)
}

// ParsePolicy reads a pod's policy from its labels and annotations alone
// (FromLabels). On error it still returns the safest policy for the pod
// together with the error, which the caller reports: an enforce pod (or one
// whose mode label is not understood) gets deny-all, an audit pod stays
// audited. Nothing that fails to parse ever widens what a pod may reach.
func ParsePolicy(labels, annotations map[string]string) (Policy, error) {
	e := FromLabels(labels, annotations)
	return e.Policy, e.Err
}

// ParseAllowList parses the allow annotation: entries separated by commas or
// newlines, blank entries ignored. Each entry is one of
//
//	api.github.com            hostname, any port
//	api.github.com:443        hostname and port
//	*.googleapis.com          any subdomain (not googleapis.com itself)
//	203.0.113.0/24            IPv4 prefix or address, any port
//	203.0.113.0/24:5432       with a port
//	2001:db8::/32             IPv6 prefix or address, any port
//	[2001:db8::/32]:443       with a port (brackets required with a port)
//	tcp://db.example.com:5432 TCP hostname: any protocol to the addresses
//	                          the agent resolves the name to (port required)
//
// Every entry is checked; the error joins one *EntryError per bad entry.
func ParseAllowList(s string) ([]Rule, error) {
	if len(s) > MaxAllowBytes {
		return nil, fmt.Errorf("%s is %d bytes, more than %d", AnnotationAllow, len(s), MaxAllowBytes)
	}
	var (
		rules []Rule
		errs  []error
	)
	fields := strings.FieldsFunc(s, func(r rune) bool { return r == ',' || r == '\n' || r == '\r' })
	n := 0
	for _, f := range fields {
		entry := strings.TrimSpace(f)
		if entry == "" {
			continue
		}
		n++
		if n > MaxAllowEntries {
			return nil, fmt.Errorf("%s has more than %d entries", AnnotationAllow, MaxAllowEntries)
		}
		r, reason := parseEntry(entry)
		if reason != "" {
			errs = append(errs, &EntryError{Index: n, Entry: entry, Reason: reason})
			continue
		}
		rules = append(rules, r)
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return rules, nil
}

func parseEntry(e string) (Rule, string) {
	if rest, ok := cutPrefixFold(e, TCPScheme); ok {
		return parseTCPHost(rest)
	}
	if strings.Contains(e, "://") {
		return Rule{}, "unknown scheme: the only one is tcp:// (a TCP hostname)"
	}
	if strings.HasPrefix(e, "[") {
		end := strings.Index(e, "]")
		if end < 0 {
			return Rule{}, "missing ']'"
		}
		p, reason := parsePrefix(e[1:end])
		if reason != "" {
			return Rule{}, reason
		}
		if !p.Addr().Is6() {
			return Rule{}, "brackets are for IPv6; write IPv4 without them"
		}
		rest := e[end+1:]
		if rest == "" {
			return Rule{Prefix: p}, ""
		}
		if !strings.HasPrefix(rest, ":") {
			return Rule{}, "unexpected text after ']'"
		}
		port, reason := parsePort(rest[1:])
		return Rule{Prefix: p, Port: port}, reason
	}
	if strings.Count(e, ":") > 1 {
		// Bare IPv6, no port.
		p, reason := parsePrefix(e)
		if reason != "" {
			return Rule{}, reason + " (an IPv6 entry with a port is written [addr]:port)"
		}
		return Rule{Prefix: p}, ""
	}
	host, portStr, hasPort := strings.Cut(e, ":")
	var port uint16
	if hasPort {
		var reason string
		if port, reason = parsePort(portStr); reason != "" {
			return Rule{}, reason
		}
	}
	if looksNumeric(host) {
		p, reason := parsePrefix(host)
		return Rule{Prefix: p, Port: port}, reason
	}
	h, reason := parseHost(host)
	return Rule{Host: h, Port: port}, reason
}

// TCPScheme starts a TCP-hostname entry.
const TCPScheme = "tcp://"

func cutPrefixFold(s, prefix string) (string, bool) {
	if len(s) >= len(prefix) && strings.EqualFold(s[:len(prefix)], prefix) {
		return s[len(prefix):], true
	}
	return s, false
}

// parseTCPHost parses what follows tcp://: an exact hostname and a port.
// The port is required: an address the name shares with other services
// (a CDN, a cloud load balancer) is allowed too, and only at that port.
// A wildcard cannot be resolved.
func parseTCPHost(s string) (Rule, string) {
	host, portStr, hasPort := strings.Cut(s, ":")
	if !hasPort {
		return Rule{}, "a TCP hostname needs a port (tcp://db.example.com:5432)"
	}
	if strings.HasPrefix(host, "*") {
		return Rule{}, "a TCP hostname cannot be a wildcard: the agent resolves it"
	}
	if looksNumeric(host) || strings.HasPrefix(host, "[") {
		return Rule{}, "a TCP hostname is a name: write an address as a CIDR entry"
	}
	port, reason := parsePort(portStr)
	if reason != "" {
		return Rule{}, reason
	}
	h, reason := parseHost(host)
	if reason != "" {
		return Rule{}, reason
	}
	return Rule{Host: h, Port: port, Resolve: true}, ""
}

// looksNumeric: digits, dots and a slash only; such a name is meant as IPv4.
func looksNumeric(s string) bool {
	for _, c := range s {
		if (c < '0' || c > '9') && c != '.' && c != '/' {
			return false
		}
	}
	return s != ""
}

func parsePrefix(s string) (netip.Prefix, string) {
	if strings.Contains(s, "/") {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return netip.Prefix{}, "not a valid CIDR"
		}
		if p.Addr().Zone() != "" {
			return netip.Prefix{}, "zones are not allowed"
		}
		if p.Masked() != p {
			return netip.Prefix{}, fmt.Sprintf("host bits set; did you mean %s?", p.Masked())
		}
		if p.Addr().Is4In6() {
			return netip.Prefix{}, "write IPv4-mapped prefixes as IPv4"
		}
		return p, ""
	}
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Prefix{}, "not a valid IP address"
	}
	if a.Zone() != "" {
		return netip.Prefix{}, "zones are not allowed"
	}
	if a.Is4In6() {
		a = a.Unmap()
	}
	return netip.PrefixFrom(a, a.BitLen()), ""
}

func parsePort(s string) (uint16, string) {
	if s == "" {
		return 0, "empty port"
	}
	for _, c := range s {
		if c < '0' || c > '9' {
			return 0, fmt.Sprintf("port %q is not a number", s)
		}
	}
	n, err := strconv.Atoi(s)
	if err != nil || n < 1 || n > 65535 || (len(s) > 1 && s[0] == '0') {
		return 0, fmt.Sprintf("port %s is not in 1-65535", s)
	}
	return uint16(n), ""
}

// parseHost validates an RFC 1123 hostname or a "*." wildcard, lowercased;
// one trailing dot is dropped.
func parseHost(h string) (string, string) {
	h = strings.ToLower(strings.TrimSuffix(h, "."))
	name := h
	if strings.HasPrefix(h, "*.") {
		name = h[2:]
		if !strings.Contains(name, ".") {
			return "", "a wildcard must cover at least two labels (*.example.com, not *.com)"
		}
	}
	if name == "" {
		return "", "empty hostname"
	}
	if len(h) > maxHostnameBytes {
		return "", "hostname longer than 253 characters"
	}
	labels := strings.Split(name, ".")
	for _, label := range labels {
		if reason := checkLabel(label); reason != "" {
			return "", reason
		}
	}
	// No top-level domain is numeric (RFC 3696 section 2): "*.0.0.1" would
	// match a client's SNI or Host of "10.0.0.1", an address the proxy
	// would dial as a literal, with no DNS and no rebinding check.
	if strings.Trim(labels[len(labels)-1], "0123456789") == "" {
		return "", "the last label is numeric: write an address as a CIDR entry"
	}
	return h, ""
}

func checkLabel(l string) string {
	switch {
	case l == "":
		return "empty label"
	case l == "*":
		return "'*' is only allowed as the whole first label"
	case len(l) > 63:
		return "label longer than 63 characters"
	case l[0] == '-' || l[len(l)-1] == '-':
		return fmt.Sprintf("label %q starts or ends with '-'", l)
	}
	for _, c := range l {
		switch {
		case c >= 'a' && c <= 'z', c >= '0' && c <= '9', c == '-':
		case c > 127:
			return "non-ASCII hostname: use its punycode (xn--) form"
		default:
			return fmt.Sprintf("character %q is not allowed in a hostname", c)
		}
	}
	return ""
}
