package policy

import (
	"net/netip"
	"slices"
	"strings"
)

// Decision is what the generated Envoy configuration does with one
// connection.
type Decision struct {
	Allowed bool
	Reason  string
	// Host is set when a hostname entry allowed the connection: the proxy
	// then dials the address DNS gives for Host (Envoy's dynamic forward
	// proxy), at the original destination's port, never the address the
	// client dialled. Empty: the proxy dials the original destination.
	Host string
}

// Decide says what the generated Envoy configuration does with one
// connection of a workload with this policy: the same decision, in the same
// order, as the enforce matcher (matcher.go). sni is the TLS server name
// ("" if not TLS); host is the HTTP Host without port ("" if not plaintext
// HTTP). Tools and the demo use it to explain a connection; Envoy, not this
// function, enforces.
func (p Policy) Decide(dst netip.AddrPort, sni, host string) Decision {
	if p.Mode == Audit {
		return Decision{Allowed: true, Reason: "audit mode"}
	}
	a := dst.Addr().Unmap()
	for _, r := range p.Allow {
		if !r.IsHost() && r.Prefix.Contains(a) && (r.Port == 0 || r.Port == dst.Port()) {
			if r.Via != "" {
				return Decision{Allowed: true, Reason: "destination is an address of " + r.Via + " (" + r.Prefix.Addr().String() + ")"}
			}
			return Decision{Allowed: true, Reason: "destination in the allow list (" + r.String() + ")"}
		}
	}
	name := sni
	if name == "" {
		// One trailing dot on a Host is the same name
		// (strip_trailing_host_dot); a server name is taken as sent.
		name = strings.TrimSuffix(host, ".")
	}
	if name != "" {
		name = strings.ToLower(name)
		for _, r := range p.Allow {
			if r.IsHost() && hostMatches(r.Host, name) && (r.Port == 0 || r.Port == dst.Port()) {
				if sni != "" {
					return Decision{Allowed: true, Reason: "SNI in the allow list (" + r.String() + ")", Host: name}
				}
				return Decision{Allowed: true, Reason: "Host in the allow list (" + r.String() + ")", Host: name}
			}
		}
	}
	switch {
	case host != "":
		return Decision{Reason: "HTTP 403: Host not in the allow list"}
	case sni != "":
		return Decision{Reason: "closed: SNI not in the allow list"}
	}
	return Decision{Reason: "closed: destination not in the allow list"}
}

func hostMatches(pattern, name string) bool {
	if suffix, ok := strings.CutPrefix(pattern, "*"); ok {
		return strings.HasSuffix(name, suffix)
	}
	return pattern == name
}

// Expand returns the policy with each TCP-hostname rule replaced, for the
// builders, by address rules at its port: one per address answers gives
// for its name (the agent's resolutions, already filtered of node-local
// answers). The TCP-hostname rules stay in Allow, where the builders and
// Decide skip them. A name with no answers allows nothing.
func (p Policy) Expand(answers func(name string) []netip.Addr) Policy {
	out := p
	out.Allow = slices.Clone(p.Allow)
	seen := map[Rule]bool{}
	for _, r := range p.Allow {
		if !r.IsResolved() {
			continue
		}
		for _, a := range answers(r.Host) {
			a = a.Unmap()
			ar := Rule{Prefix: netip.PrefixFrom(a, a.BitLen()), Port: r.Port, Via: r.String()}
			if !seen[ar] {
				seen[ar] = true
				out.Allow = append(out.Allow, ar)
			}
		}
	}
	return out
}

// ResolvedNames lists the names of the policy's TCP-hostname rules.
func (p Policy) ResolvedNames() []string {
	var out []string
	for _, r := range p.Allow {
		if r.IsResolved() && !slices.Contains(out, r.Host) {
			out = append(out, r.Host)
		}
	}
	return out
}
