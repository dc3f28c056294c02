package agent

import (
	"net/netip"
	"slices"
	"strings"
	"testing"
)

func TestParseResolvers(t *testing.T) {
	got, err := ParseResolvers(" 10.96.0.10, 169.254.20.10:5353,[fd00::10]:53, fd00::a, ::ffff:10.0.0.1,10.96.0.10")
	if err != nil {
		t.Fatal(err)
	}
	want := []netip.AddrPort{
		netip.MustParseAddrPort("10.96.0.10:53"), netip.MustParseAddrPort("169.254.20.10:5353"),
		netip.MustParseAddrPort("[fd00::10]:53"), netip.MustParseAddrPort("[fd00::a]:53"),
		netip.MustParseAddrPort("10.0.0.1:53"),
	}
	if !slices.Equal(got, want) {
		t.Errorf("got %v, want %v", got, want)
	}
	if rs, err := ParseResolvers(""); err != nil || len(rs) != 0 {
		t.Errorf("empty: %v, %v; want none", rs, err)
	}
	for in, why := range map[string]string{
		"dns.local":      "want an address",
		"10.0.0.1:0":     "port 0",
		"fe80::1%eth0":   "zones",
		"0.0.0.0":        "not a unicast",
		"224.0.0.1":      "not a unicast",
		"fd00::1:53:x":   "want an address",
		"10.0.0.1:70000": "want an address",
	} {
		if _, err := ParseResolvers(in); err == nil || !strings.Contains(err.Error(), why) {
			t.Errorf("%q: err %v, want %q", in, err, why)
		}
	}
	var many []string
	for i := range 65 {
		many = append(many, netip.AddrFrom4([4]byte{10, 0, 0, byte(i + 1)}).String())
	}
	if _, err := ParseResolvers(strings.Join(many, ",")); err == nil || !strings.Contains(err.Error(), "at most 64") {
		t.Errorf("65 resolvers: %v", err)
	}
}

func TestReadResolvConf(t *testing.T) {
	got, err := ReadResolvConf(strings.NewReader("# kubelet\nsearch default.svc.cluster.local\nnameserver 10.96.0.10\nnameserver fd00::10\nnameserver bogus\nnameserver\noptions ndots:5\n"))
	if err != nil {
		t.Fatal(err)
	}
	want := []netip.AddrPort{netip.MustParseAddrPort("10.96.0.10:53"), netip.MustParseAddrPort("[fd00::10]:53")}
	if !slices.Equal(got, want) {
		t.Errorf("got %v, want %v", got, want)
	}
}

// Whatever the flag says, the parser returns an error or valid resolvers
// the datapath accepts: never a panic, never a zero port or a zone.
func FuzzParseResolvers(f *testing.F) {
	for _, s := range []string{"10.96.0.10", "[fd00::10]:53,10.0.0.1:5353", "::ffff:1.2.3.4", "a,b,,", "[::1]:0", "1.2.3.4:65535"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		rs, err := ParseResolvers(s)
		if err != nil {
			return
		}
		for _, r := range rs {
			if !r.IsValid() || r.Port() == 0 || r.Addr().Zone() != "" || r.Addr().Is4In6() {
				t.Fatalf("%q gave invalid resolver %v", s, r)
			}
		}
	})
}
