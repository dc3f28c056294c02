package policy

import (
	"net/netip"
	"strings"
	"testing"
)

func TestDecide(t *testing.T) {
	enforce, err := ParsePolicy(map[string]string{LabelMode: "enforce"}, map[string]string{AnnotationAllow: "203.0.113.0/24:443, [2001:db8::/32], api.example.com:443, *.cdn.example.net"})
	if err != nil {
		t.Fatal(err)
	}
	audit, _ := ParsePolicy(nil, nil)
	for _, tc := range []struct {
		p         Policy
		dst       string
		sni, host string
		allowed   bool
		reason    string
		forward   string // the hostname dialled through DNS; "" for the original destination
	}{
		{audit, "198.51.100.1:22", "", "", true, "audit", ""},
		{enforce, "203.0.113.7:443", "", "", true, "destination in the allow list (203.0.113.0/24:443)", ""},
		{enforce, "203.0.113.7:80", "", "", false, "closed: destination", ""},
		{enforce, "[2001:db8::1]:5432", "", "", true, "destination", ""},
		{enforce, "198.51.100.1:443", "API.example.com", "", true, "SNI in the allow list", "api.example.com"},
		{enforce, "198.51.100.1:8443", "api.example.com", "", false, "closed: SNI", ""},
		{enforce, "198.51.100.1:80", "", "img.cdn.example.net", true, "Host in the allow list", "img.cdn.example.net"},
		// A CIDR entry wins over a name: the original destination is dialled.
		{enforce, "203.0.113.9:443", "api.example.com", "", true, "destination in the allow list", ""},
		{enforce, "198.51.100.1:80", "", "cdn.example.net", false, "HTTP 403", ""},
		{enforce, "198.51.100.1:443", "evil.example.org", "", false, "closed: SNI", ""},
	} {
		d := tc.p.Decide(netip.MustParseAddrPort(tc.dst), tc.sni, tc.host)
		if d.Allowed != tc.allowed || !strings.Contains(d.Reason, tc.reason) || d.Host != tc.forward {
			t.Errorf("%v %s sni=%q host=%q: %+v, want %v %q forward %q", tc.p.Mode, tc.dst, tc.sni, tc.host, d, tc.allowed, tc.reason, tc.forward)
		}
	}
}
