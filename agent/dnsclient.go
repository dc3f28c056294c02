package agent

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"time"

	"golang.org/x/net/dns/dnsmessage"
)

// Answer is one address DNS gave for a name, with the smallest TTL along
// its CNAME chain.
type Answer struct {
	Addr netip.Addr
	TTL  time.Duration
}

// ErrNXDomain: the resolver says the name does not exist.
var ErrNXDomain = errors.New("no such name (NXDOMAIN)")

// dnsQueryTimeout bounds one query to one resolver.
const dnsQueryTimeout = 2 * time.Second

// LookupDNS asks the resolvers, in order, for name's A and AAAA records
// (name is fully qualified: no search domains). A resolver that fails
// (timeout, SERVFAIL, REFUSED, a malformed reply) passes the question to the
// next; NXDOMAIN is an answer. It returns every address with its TTL.
// The standard library's resolver hides TTLs, which the TCP-hostname rules
// need, hence this small client.
func LookupDNS(ctx context.Context, resolvers []netip.AddrPort, name string) ([]Answer, error) {
	if len(resolvers) == 0 {
		return nil, errors.New("no DNS resolvers configured (--dns-resolvers)")
	}
	q, err := dnsmessage.NewName(strings.TrimSuffix(name, ".") + ".")
	if err != nil {
		return nil, fmt.Errorf("name %q: %w", name, err)
	}
	var errs []error
	for _, r := range resolvers {
		var out []Answer
		nx := 0
		var rerr error
		for _, t := range []dnsmessage.Type{dnsmessage.TypeA, dnsmessage.TypeAAAA} {
			as, err := exchange(ctx, r, q, t)
			switch {
			case errors.Is(err, ErrNXDomain):
				nx++
			case err != nil:
				rerr = err
			}
			out = append(out, as...)
		}
		if rerr == nil {
			if nx == 2 {
				return nil, ErrNXDomain
			}
			return out, nil
		}
		errs = append(errs, fmt.Errorf("%s: %w", r, rerr))
		if ctx.Err() != nil {
			break
		}
	}
	return nil, errors.Join(errs...)
}

// exchange sends one question over UDP, and again over TCP if the reply
// is truncated.
func exchange(ctx context.Context, server netip.AddrPort, name dnsmessage.Name, t dnsmessage.Type) ([]Answer, error) {
	var idb [2]byte
	rand.Read(idb[:])
	id := binary.BigEndian.Uint16(idb[:])
	b := dnsmessage.NewBuilder(nil, dnsmessage.Header{ID: id, RecursionDesired: true})
	if err := b.StartQuestions(); err != nil {
		return nil, err
	}
	if err := b.Question(dnsmessage.Question{Name: name, Type: t, Class: dnsmessage.ClassINET}); err != nil {
		return nil, err
	}
	msg, err := b.Finish()
	if err != nil {
		return nil, err
	}
	reply, err := roundTrip(ctx, "udp", server, msg)
	if err != nil {
		return nil, err
	}
	as, truncated, err := parseReply(reply, id, name, t)
	if truncated {
		if reply, err = roundTrip(ctx, "tcp", server, msg); err != nil {
			return nil, err
		}
		as, _, err = parseReply(reply, id, name, t)
	}
	return as, err
}

func roundTrip(ctx context.Context, network string, server netip.AddrPort, msg []byte) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, dnsQueryTimeout)
	defer cancel()
	var d net.Dialer
	c, err := d.DialContext(ctx, network, server.String())
	if err != nil {
		return nil, err
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		c.SetDeadline(dl)
	}
	if network == "tcp" {
		framed := binary.BigEndian.AppendUint16(nil, uint16(len(msg)))
		if _, err := c.Write(append(framed, msg...)); err != nil {
			return nil, err
		}
		var l [2]byte
		if _, err := io.ReadFull(c, l[:]); err != nil {
			return nil, err
		}
		buf := make([]byte, binary.BigEndian.Uint16(l[:]))
		_, err := io.ReadFull(c, buf)
		return buf, err
	}
	if _, err := c.Write(msg); err != nil {
		return nil, err
	}
	buf := make([]byte, 4096)
	for {
		n, err := c.Read(buf)
		if err != nil {
			return nil, err
		}
		// Skip replies to other questions (a late answer to an earlier
		// query on a reused port); parseReply checks the rest.
		if n >= 2 && binary.BigEndian.Uint16(buf) == binary.BigEndian.Uint16(msg) {
			return buf[:n], nil
		}
	}
}

// parseReply checks that reply answers our question and returns its
// addresses of type t, following the CNAME chain from name.
func parseReply(reply []byte, id uint16, name dnsmessage.Name, t dnsmessage.Type) ([]Answer, bool, error) {
	var p dnsmessage.Parser
	h, err := p.Start(reply)
	if err != nil {
		return nil, false, fmt.Errorf("malformed reply: %w", err)
	}
	if h.ID != id || !h.Response {
		return nil, false, errors.New("reply does not match the query")
	}
	if h.Truncated {
		return nil, true, nil
	}
	qs, err := p.AllQuestions()
	if err != nil || len(qs) != 1 || !strings.EqualFold(qs[0].Name.String(), name.String()) || qs[0].Type != t {
		return nil, false, errors.New("reply is for another question")
	}
	switch h.RCode {
	case dnsmessage.RCodeSuccess:
	case dnsmessage.RCodeNameError:
		return nil, false, ErrNXDomain
	default:
		return nil, false, fmt.Errorf("resolver answered %s", h.RCode)
	}
	rrs, err := p.AllAnswers()
	if err != nil {
		return nil, false, fmt.Errorf("malformed answer: %w", err)
	}
	// The chain: name, then each CNAME target, with the smallest TTL so
	// far; at most 8 hops, as resolvers bound it too.
	chain := map[string]uint32{strings.ToLower(name.String()): ^uint32(0)}
	for hop := 0; hop < 8; hop++ {
		grew := false
		for _, rr := range rrs {
			c, ok := rr.Body.(*dnsmessage.CNAMEResource)
			if !ok {
				continue
			}
			ttl, in := chain[strings.ToLower(rr.Header.Name.String())]
			target := strings.ToLower(c.CNAME.String())
			if _, done := chain[target]; in && !done {
				chain[target] = min(ttl, rr.Header.TTL)
				grew = true
			}
		}
		if !grew {
			break
		}
	}
	var out []Answer
	for _, rr := range rrs {
		ttl, in := chain[strings.ToLower(rr.Header.Name.String())]
		if !in {
			continue
		}
		ttl = min(ttl, rr.Header.TTL)
		switch body := rr.Body.(type) {
		case *dnsmessage.AResource:
			if t == dnsmessage.TypeA {
				out = append(out, Answer{Addr: netip.AddrFrom4(body.A), TTL: time.Duration(ttl) * time.Second})
			}
		case *dnsmessage.AAAAResource:
			if t == dnsmessage.TypeAAAA {
				out = append(out, Answer{Addr: netip.AddrFrom16(body.AAAA).Unmap(), TTL: time.Duration(ttl) * time.Second})
			}
		}
	}
	return out, false, nil
}
