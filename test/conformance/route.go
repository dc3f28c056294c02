package conformance

import (
	"net"
	"strings"
)

// RouteFor picks the route for a request as Envoy's router does: the
// Host (":authority"), lowercased and, with strip_any_host_port, without
// its port, selects a virtual host (exact domain, then the longest suffix
// wildcard "*.x", then the longest prefix wildcard "x*", then "*":
// source/common/router/config_impl.cc findVirtualHost), whose routes are
// tried in order. A CONNECT request matches only connect_matcher routes,
// and a connect_matcher route only CONNECT. nil: no route (Envoy answers
// 404, NR).
func (m *HTTPConnectionManager) RouteFor(host, method, path string) (*VirtualHost, *Route) {
	host = strings.ToLower(m.normalizeHost(host))
	if m.StripAnyHostPort {
		if h, _, err := net.SplitHostPort(host); err == nil {
			host = h
		} else if strings.HasPrefix(host, "[") && strings.HasSuffix(host, "]") {
			host = host[1 : len(host)-1]
		}
	}
	vh := m.Routes.virtualHost(host)
	if vh == nil {
		return nil, nil
	}
	for _, r := range vh.Routes {
		if r.Connect {
			if method == "CONNECT" {
				return vh, r
			}
			continue
		}
		if method != "CONNECT" && strings.HasPrefix(path, r.Prefix) {
			return vh, r
		}
	}
	return vh, nil
}

// normalizeHost applies strip_trailing_host_dot: "name." (or "name.:port")
// is "name" ("name:port").
func (m *HTTPConnectionManager) normalizeHost(host string) string {
	if !m.StripTrailingDot {
		return host
	}
	if h, p, err := net.SplitHostPort(host); err == nil && !strings.HasPrefix(host, "[") {
		return strings.TrimSuffix(h, ".") + ":" + p
	}
	return strings.TrimSuffix(host, ".")
}

func (rc *RouteConfig) virtualHost(host string) *VirtualHost {
	var (
		suffix, prefix   *VirtualHost
		suffixN, prefixN int
		star             *VirtualHost
	)
	for _, vh := range rc.VHosts {
		for _, d := range vh.Domains {
			d = strings.ToLower(d)
			switch {
			case d == "*":
				if star == nil {
					star = vh
				}
			case strings.HasPrefix(d, "*"):
				// "*.example.com" matches "a.example.com" (not
				// "example.com"): the name must be longer than the suffix.
				s := d[1:]
				if len(host) > len(s) && strings.HasSuffix(host, s) && len(s) > suffixN {
					suffix, suffixN = vh, len(s)
				}
			case strings.HasSuffix(d, "*"):
				p := d[:len(d)-1]
				if len(host) > len(p) && strings.HasPrefix(host, p) && len(p) > prefixN {
					prefix, prefixN = vh, len(p)
				}
			case d == host:
				return vh
			}
		}
	}
	switch {
	case suffix != nil:
		return suffix
	case prefix != nil:
		return prefix
	}
	return star
}
