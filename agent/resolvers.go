package agent

import (
	"bufio"
	"fmt"
	"io"
	"net/netip"
	"os"
	"strings"

	"github.com/sluice-io/sluice/agent/datapath"
)

// ResolvConf is the --dns-resolvers value meaning "the nameservers of
// /etc/resolv.conf": the cluster DNS in the DaemonSet (dnsPolicy
// ClusterFirstWithHostNet), the host's resolvers on a plain Linux host.
const ResolvConf = "resolv.conf"

// ParseResolvers parses the DNS resolvers enforce-mode workloads may reach:
// comma-separated entries, each an address (port 53) or addr:port, IPv6
// with a port in brackets ([fd00::10]:53).
func ParseResolvers(s string) ([]netip.AddrPort, error) {
	var out []netip.AddrPort
	seen := map[netip.AddrPort]bool{}
	for _, f := range strings.Split(s, ",") {
		f = strings.TrimSpace(f)
		if f == "" {
			continue
		}
		ap, err := parseResolver(f)
		if err != nil {
			return nil, err
		}
		if !seen[ap] {
			seen[ap] = true
			out = append(out, ap)
		}
	}
	if len(out) > datapath.MaxResolvers() {
		return nil, fmt.Errorf("%d DNS resolvers, at most %d", len(out), datapath.MaxResolvers())
	}
	return out, nil
}

func parseResolver(s string) (netip.AddrPort, error) {
	var ap netip.AddrPort
	if a, err := netip.ParseAddr(s); err == nil {
		ap = netip.AddrPortFrom(a, 53)
	} else if ap, err = netip.ParseAddrPort(s); err != nil {
		return ap, fmt.Errorf("DNS resolver %q: want an address or address:port ([IPv6]:port)", s)
	}
	a := ap.Addr()
	switch {
	case a.Zone() != "":
		return ap, fmt.Errorf("DNS resolver %q: zones are not allowed", s)
	case ap.Port() == 0:
		return ap, fmt.Errorf("DNS resolver %q: port 0", s)
	case a.IsUnspecified() || a.IsMulticast():
		return ap, fmt.Errorf("DNS resolver %q: not a unicast address", s)
	}
	return netip.AddrPortFrom(a.Unmap(), ap.Port()), nil
}

// ReadResolvConf returns the nameservers of a resolv.conf (port 53), in
// order; other lines are ignored, as the C library does.
func ReadResolvConf(r io.Reader) ([]netip.AddrPort, error) {
	var out []netip.AddrPort
	s := bufio.NewScanner(r)
	for s.Scan() {
		fields := strings.Fields(s.Text())
		if len(fields) < 2 || fields[0] != "nameserver" {
			continue
		}
		a, err := netip.ParseAddr(fields[1])
		if err != nil || a.Zone() != "" {
			continue // the C library skips what it cannot parse, too
		}
		out = append(out, netip.AddrPortFrom(a.Unmap(), 53))
	}
	if err := s.Err(); err != nil {
		return nil, err
	}
	return out, nil
}

// resolvers resolves the --dns-resolvers setting.
func resolvers(spec string) ([]netip.AddrPort, error) {
	if strings.TrimSpace(spec) != ResolvConf {
		return ParseResolvers(spec)
	}
	f, err := os.Open("/etc/resolv.conf")
	if err != nil {
		return nil, fmt.Errorf("DNS resolvers from resolv.conf: %w", err)
	}
	defer f.Close()
	rs, err := ReadResolvConf(f)
	if err != nil {
		return nil, fmt.Errorf("DNS resolvers from /etc/resolv.conf: %w", err)
	}
	if len(rs) > datapath.MaxResolvers() {
		rs = rs[:datapath.MaxResolvers()]
	}
	return rs, nil
}
