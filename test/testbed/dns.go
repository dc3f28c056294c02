package testbed

import (
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"

	"golang.org/x/net/dns/dnsmessage"
)

// DNSV4 is the testbed's DNS server, on the external namespace's lo: the
// resolver a proxy uses for hostname rules, as the cluster DNS is on a node.
var DNSV4 = netip.MustParseAddr("203.0.113.53")

// DNSServer answers A and AAAA queries over UDP from a table the test
// changes while it runs. Unknown names get NXDOMAIN; names set to fail get
// SERVFAIL. It counts the queries per name.
type DNSServer struct {
	mu      sync.Mutex
	addrs   map[string][]netip.Addr
	fail    map[string]bool
	queries map[string]int
	ttl     uint32
}

// ServeDNS answers on c until the test ends; answers carry ttl seconds.
func ServeDNS(t testing.TB, c net.PacketConn, ttl uint32) *DNSServer {
	s := &DNSServer{addrs: map[string][]netip.Addr{}, fail: map[string]bool{}, queries: map[string]int{}, ttl: ttl}
	go s.serve(c)
	t.Cleanup(func() { c.Close() })
	return s
}

func canonical(name string) string { return strings.ToLower(strings.TrimSuffix(name, ".")) }

// Set makes name resolve to addrs (none: NXDOMAIN).
func (s *DNSServer) Set(name string, addrs ...netip.Addr) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.addrs[canonical(name)] = addrs
	delete(s.fail, canonical(name))
}

// Fail makes queries for name answer SERVFAIL.
func (s *DNSServer) Fail(name string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.fail[canonical(name)] = true
}

// Queries returns how many queries name got.
func (s *DNSServer) Queries(name string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.queries[canonical(name)]
}

func (s *DNSServer) serve(c net.PacketConn) {
	buf := make([]byte, 1500)
	for {
		n, from, err := c.ReadFrom(buf)
		if err != nil {
			return
		}
		if out, ok := s.answer(buf[:n]); ok {
			c.WriteTo(out, from)
		}
	}
}

// answer builds the reply to one query message.
func (s *DNSServer) answer(q []byte) ([]byte, bool) {
	var p dnsmessage.Parser
	h, err := p.Start(q)
	if err != nil {
		return nil, false
	}
	qs, err := p.AllQuestions()
	if err != nil || len(qs) != 1 {
		return nil, false
	}
	question := qs[0]
	name := canonical(question.Name.String())
	s.mu.Lock()
	s.queries[name]++
	addrs, known := s.addrs[name]
	fail := s.fail[name]
	s.mu.Unlock()

	rh := dnsmessage.Header{ID: h.ID, Response: true, Authoritative: true, RecursionDesired: h.RecursionDesired, RecursionAvailable: true}
	switch {
	case fail:
		rh.RCode = dnsmessage.RCodeServerFailure
	case !known || len(addrs) == 0:
		rh.RCode = dnsmessage.RCodeNameError
	}
	b := dnsmessage.NewBuilder(nil, rh)
	b.EnableCompression()
	if b.StartQuestions() != nil || b.Question(question) != nil || b.StartAnswers() != nil {
		return nil, false
	}
	if rh.RCode == dnsmessage.RCodeSuccess {
		for _, a := range addrs {
			hdr := dnsmessage.ResourceHeader{Name: question.Name, Class: dnsmessage.ClassINET, TTL: s.ttl}
			switch {
			case question.Type == dnsmessage.TypeA && a.Is4():
				if b.AResource(hdr, dnsmessage.AResource{A: a.As4()}) != nil {
					return nil, false
				}
			case question.Type == dnsmessage.TypeAAAA && a.Is6() && !a.Is4In6():
				if b.AAAAResource(hdr, dnsmessage.AAAAResource{AAAA: a.As16()}) != nil {
					return nil, false
				}
			}
		}
	}
	out, err := b.Finish()
	return out, err == nil
}
