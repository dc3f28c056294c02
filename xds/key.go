package xds

import (
	"crypto/sha256"
	"encoding/binary"
	"hash"
	"net/netip"
	"slices"
	"strings"

	"github.com/sluice-io/sluice/policy"
)

// The digests that let an update skip work (Server.Update's state key, the
// Builder's group keys) are SHA-256 over this encoding of their inputs:
// every field, strings and lists length-prefixed, in declaration order.
// It is written out by hand because encoding/json took 5 ms for 250
// workloads; TestKeyEncodingCoversEveryField changes every field of every
// type in turn and fails if the encoding does not change, so a field added
// later cannot be left out (an update would then be skipped as unchanged).

type keyWriter struct {
	h   hash.Hash
	buf []byte
}

func newKeyWriter() *keyWriter { return &keyWriter{h: sha256.New(), buf: make([]byte, 0, 4096)} }

func (k *keyWriter) flush() {
	k.h.Write(k.buf)
	k.buf = k.buf[:0]
}

func (k *keyWriter) maybeFlush() {
	if len(k.buf) > 3072 {
		k.flush()
	}
}

func (k *keyWriter) uint(v uint64) { k.buf = binary.AppendUvarint(k.buf, v) }

func (k *keyWriter) bool(v bool) {
	if v {
		k.buf = append(k.buf, 1)
	} else {
		k.buf = append(k.buf, 0)
	}
}

func (k *keyWriter) string(s string) {
	k.uint(uint64(len(s)))
	k.buf = append(k.buf, s...)
	k.maybeFlush()
}

func (k *keyWriter) addr(a netip.Addr) {
	b, _ := a.MarshalBinary() // never fails; zone included; invalid is empty
	k.uint(uint64(len(b)))
	k.buf = append(k.buf, b...)
}

func (k *keyWriter) prefix(p netip.Prefix) {
	k.addr(p.Addr())
	k.buf = binary.AppendVarint(k.buf, int64(p.Bits()))
}

func (k *keyWriter) sum() [sha256.Size]byte {
	k.flush()
	var out [sha256.Size]byte
	k.h.Sum(out[:0])
	return out
}

// global writes everything of s but its workloads.
func (k *keyWriter) global(s State) {
	k.addr(s.Proxy.IPv4)
	k.addr(s.Proxy.IPv6)
	k.uint(uint64(s.Proxy.Port))
	k.uint(uint64(len(s.NeverDial)))
	for _, p := range s.NeverDial {
		k.prefix(p)
	}
	k.uint(uint64(len(s.DNSResolvers)))
	for _, ap := range s.DNSResolvers {
		k.addr(ap.Addr())
		k.uint(uint64(ap.Port()))
	}
	k.uint(uint64(s.ListenerFiltersTimeout))
	k.uint(uint64(s.TCPIdleTimeout))
	k.uint(uint64(s.HTTPStreamIdleTimeout))
	k.uint(s.MaxConnectionsPerChain)
}

func (k *keyWriter) ips(ips []netip.Addr) {
	k.uint(uint64(len(ips)))
	for _, a := range ips {
		k.addr(a)
	}
}

func (k *keyWriter) policy(p policy.Policy) {
	k.uint(uint64(p.Mode))
	k.bool(p.FailClosed)
	k.uint(uint64(len(p.Allow)))
	for _, r := range p.Allow {
		k.string(r.Host)
		k.prefix(r.Prefix)
		k.uint(uint64(r.Port))
		k.bool(r.Resolve)
		k.string(r.Via)
		k.string(r.Narrowed)
	}
}

func (k *keyWriter) workload(w Workload) {
	k.string(w.Namespace)
	k.string(w.Name)
	k.ips(w.IPs)
	k.policy(w.Policy)
	k.string(w.PolicyError)
}

// stateKey digests a state independently of its workloads' order (the
// builders sort them).
func stateKey(st State) string {
	k := newKeyWriter()
	k.global(st)
	ws := slices.Clone(st.Workloads)
	slices.SortFunc(ws, func(a, b Workload) int {
		if c := strings.Compare(a.Namespace, b.Namespace); c != 0 {
			return c
		}
		return strings.Compare(a.Name, b.Name)
	})
	k.uint(uint64(len(ws)))
	for _, w := range ws {
		k.workload(w)
	}
	s := k.sum()
	return string(s[:])
}

// globalKey digests the state without its workloads: what every group's
// parts are also built from.
func globalKey(st State) [sha256.Size]byte {
	k := newKeyWriter()
	k.global(st)
	return k.sum()
}

// digest is the group's identity for the Builder: its fields, with the
// state they are built in (global: globalKey).
func (g *group) digest(global [sha256.Size]byte) [sha256.Size]byte {
	k := newKeyWriter()
	k.buf = append(k.buf, global[:]...)
	k.string(g.key)
	k.string(g.namespace)
	k.string(g.name)
	k.string(g.policyError)
	k.ips(g.ips)
	k.policy(g.policy)
	return k.sum()
}
