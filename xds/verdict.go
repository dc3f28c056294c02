package xds

import (
	"net/netip"
	"strings"
)

// Verdict says what the generated Envoy configuration does with one
// connection of a workload with this policy: the same decision, in the same
// order, as the enforce matcher (matcher.go). sni is the TLS server name
// ("" if not TLS); host is the HTTP Host without port ("" if not plaintext
// HTTP). Tools and the demo use it to explain a connection; Envoy, not this
// function, enforces.
func (p Policy) Verdict(dst netip.AddrPort, sni, host string) (allowed bool, reason string) {
	if p.Mode == Audit {
		return true, "audit mode"
	}
	a := dst.Addr().Unmap()
	for _, r := range p.Allow {
		if !r.IsHost() && r.Prefix.Contains(a) && (r.Port == 0 || r.Port == dst.Port()) {
			return true, "destination in the allow list (" + r.String() + ")"
		}
	}
	name := sni
	if name == "" {
		name = host
	}
	if name != "" {
		name = strings.ToLower(name)
		for _, r := range p.Allow {
			if r.IsHost() && hostMatches(r.Host, name) && (r.Port == 0 || r.Port == dst.Port()) {
				if sni != "" {
					return true, "SNI in the allow list (" + r.String() + ")"
				}
				return true, "Host in the allow list (" + r.String() + ")"
			}
		}
	}
	switch {
	case host != "":
		return false, "HTTP 403: Host not in the allow list"
	case sni != "":
		return false, "closed: SNI not in the allow list"
	}
	return false, "closed: destination not in the allow list"
}

func hostMatches(pattern, name string) bool {
	if suffix, ok := strings.CutPrefix(pattern, "*"); ok {
		return strings.HasSuffix(name, suffix)
	}
	return pattern == name
}
