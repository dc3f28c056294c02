package datapath

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// FailMode says what happens to a selected workload's connections while the
// proxy is not ready.
type FailMode uint8

const (
	// FailOpen lets connections go direct, unredirected.
	FailOpen FailMode = iota
	// FailClosed refuses connect() with EPERM.
	FailClosed
)

func (m FailMode) String() string {
	if m == FailClosed {
		return "closed"
	}
	return "open"
}

// The bits of workload.flags and proxy_config.added, generated from the C
// enums workload_flag and proxy_added.
const (
	flagFailClosed = uint32(sluiceWorkloadFlagWORKLOAD_FAIL_CLOSED)
	flagEnforce    = uint32(sluiceWorkloadFlagWORKLOAD_ENFORCE)
	flagAwaiting   = uint32(sluiceWorkloadFlagWORKLOAD_AWAITING_PROXY)

	addedV4 = uint8(sluiceProxyAddedPROXY_ADDED_V4)
	addedV6 = uint8(sluiceProxyAddedPROXY_ADDED_V6)
)

// Workload is the datapath's view of a selected workload.
type Workload struct {
	// ID is the agent's stable id of the workload; it keys the per-workload
	// counters and is carried with each original destination.
	ID       uint32
	FailMode FailMode
	// Enforce closes the side doors: every socket but TCP (which goes
	// through the proxy) is refused, except DNS to the resolvers set with
	// SetResolvers.
	Enforce bool
	// AwaitingProxy: the proxy has not accepted a configuration with the
	// workload's addresses yet; its connections follow its fail mode, as
	// when the proxy is not ready.
	AwaitingProxy bool
	// MetadataGrants are the metadata destinations (see SetNeverDial) an
	// enforce-mode workload may reach, directly from its own network; port
	// 0 means any port. Without a grant its connects to them are refused.
	MetadataGrants []netip.AddrPort
	// CgroupPath is the workload's cgroup v2 directory, where the client
	// programs attach in ScopeWorkloads (unused in ScopeNode). Not stored:
	// Workloads returns it empty.
	CgroupPath string
}

// Proxy is the node-local proxy's address. An invalid address disables that
// family: its connections are treated as if the proxy were not ready.
type Proxy struct {
	IPv4 netip.Addr
	IPv6 netip.Addr
	Port uint16
}

// be32 returns the uint32 whose in-memory bytes are a's (network order), as
// the BPF side reads an __be32.
func be32(b []byte) uint32 { return binary.NativeEndian.Uint32(b) }

func be16(port uint16) uint16 {
	var b [2]byte
	binary.BigEndian.PutUint16(b[:], port)
	return binary.NativeEndian.Uint16(b[:])
}

func fromBE16(v uint16) uint16 {
	var b [2]byte
	binary.NativeEndian.PutUint16(b[:], v)
	return binary.BigEndian.Uint16(b[:])
}

func addr6Words(a netip.Addr) [4]uint32 {
	b := a.As16()
	return [4]uint32{be32(b[0:4]), be32(b[4:8]), be32(b[8:12]), be32(b[12:16])}
}

func wordsAddr6(w [4]uint32) netip.Addr {
	var b [16]byte
	for i, v := range w {
		binary.NativeEndian.PutUint32(b[i*4:], v)
	}
	return netip.AddrFrom16(b)
}

func wordAddr4(v uint32) netip.Addr {
	var b [4]byte
	binary.NativeEndian.PutUint32(b[:], v)
	return netip.AddrFrom4(b)
}

func (d *Datapath) config() (sluiceProxyConfig, error) {
	var c sluiceProxyConfig
	if err := d.maps.Config.Lookup(uint32(0), &c); err != nil {
		return c, fmt.Errorf("read proxy config: %w", err)
	}
	return c, nil
}

func (d *Datapath) updateConfig(f func(*sluiceProxyConfig)) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	c, err := d.config()
	if err != nil {
		return err
	}
	f(&c)
	if err := d.maps.Config.Update(uint32(0), &c, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("write proxy config: %w", err)
	}
	return nil
}

// SetProxy sets where redirected connections go. It leaves readiness as is.
func (d *Datapath) SetProxy(p Proxy) error {
	if p.IPv4.IsValid() && !p.IPv4.Is4() {
		return fmt.Errorf("proxy IPv4 address %s is not IPv4", p.IPv4)
	}
	if p.IPv6.IsValid() && (!p.IPv6.Is6() || p.IPv6.Is4In6()) {
		return fmt.Errorf("proxy IPv6 address %s is not IPv6", p.IPv6)
	}
	if p.Port == 0 {
		return errors.New("proxy port must not be 0")
	}
	return d.updateConfig(func(c *sluiceProxyConfig) {
		old4, old6 := c.Addr4, c.Addr6
		c.Addr4, c.Addr6 = 0, [4]uint32{}
		if p.IPv4.IsValid() {
			b := p.IPv4.As4()
			c.Addr4 = be32(b[:])
		}
		if p.IPv6.IsValid() {
			c.Addr6 = addr6Words(p.IPv6)
		}
		// Whether sluice added an address is known only of the address
		// it was recorded for.
		if c.Addr4 != old4 {
			c.Added &^= addedV4
		}
		if c.Addr6 != old6 {
			c.Added &^= addedV6
		}
		c.Port = be16(p.Port)
	})
}

// MarkAdded records that sluice put these proxy addresses on the node
// (ProxyAddrs.Ensure says which it added), so that uninstall removes them
// and only them. Addresses other than the configured proxy's are ignored.
// The record is sticky: a restarted agent finds the address present and
// adds nothing, and the first agent's record stands.
func (d *Datapath) MarkAdded(addrs []netip.Addr) error {
	return d.updateConfig(func(c *sluiceProxyConfig) {
		for _, a := range addrs {
			switch {
			case a.Is4() && c.Addr4 != 0 && wordAddr4(c.Addr4) == a:
				c.Added |= addedV4
			case a.Is6() && c.Addr6 != [4]uint32{} && wordsAddr6(c.Addr6) == a:
				c.Added |= addedV6
			}
		}
	})
}

// SetReady sets the proxy-ready flag the datapath consults on every connect,
// without a lease: it holds until changed.
func (d *Datapath) SetReady(ready bool) error {
	return d.updateConfig(func(c *sluiceProxyConfig) {
		c.Ready, c.ReadyUntil = 0, 0
		if ready {
			c.Ready = 1
		}
	})
}

// RenewReady sets the proxy ready for lease from now: unless renewed, the
// datapath treats the proxy as not ready once it runs out (each workload
// then follows its fail mode), so a node whose agent and proxy are both gone
// does not keep steering connections to a closed port. The agent renews it
// on every successful probe.
func (d *Datapath) RenewReady(lease time.Duration) error {
	if lease <= 0 {
		return d.SetReady(true)
	}
	now, err := monotonicNow()
	if err != nil {
		return err
	}
	return d.updateConfig(func(c *sluiceProxyConfig) {
		c.Ready, c.ReadyUntil = 1, uint64(now+lease)
	})
}

// monotonicNow is bpf_ktime_get_ns()'s clock: CLOCK_MONOTONIC.
func monotonicNow() (time.Duration, error) {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		return 0, fmt.Errorf("read CLOCK_MONOTONIC: %w", err)
	}
	return time.Duration(ts.Nano()), nil
}

// ProxyState is the proxy configuration as the datapath holds it.
type ProxyState struct {
	Proxy
	// Ready is the flag as set; Effective is what connects see now (the
	// flag, unless its lease ran out).
	Ready, Effective bool
	// LeaseLeft is how long the readiness lease still holds (negative:
	// expired); zero with HasLease false when there is no lease.
	LeaseLeft time.Duration
	HasLease  bool
	// Added are the proxy addresses sluice put on the node (MarkAdded):
	// what uninstall removes.
	Added []netip.Addr
}

// ProxyState reads back the proxy configuration.
func (d *Datapath) ProxyState() (ProxyState, error) {
	c, err := d.config()
	if err != nil {
		return ProxyState{}, err
	}
	s := ProxyState{Ready: c.Ready != 0, Proxy: Proxy{Port: fromBE16(c.Port)}}
	s.Effective = s.Ready
	if c.ReadyUntil != 0 {
		now, err := monotonicNow()
		if err != nil {
			return s, err
		}
		s.HasLease = true
		s.LeaseLeft = time.Duration(c.ReadyUntil) - now
		s.Effective = s.Ready && s.LeaseLeft >= 0
	}
	if c.Addr4 != 0 {
		s.IPv4 = wordAddr4(c.Addr4)
		if c.Added&addedV4 != 0 {
			s.Added = append(s.Added, s.IPv4)
		}
	}
	if c.Addr6 != [4]uint32{} {
		s.IPv6 = wordsAddr6(c.Addr6)
		if c.Added&addedV6 != 0 {
			s.Added = append(s.Added, s.IPv6)
		}
	}
	return s, nil
}

// SetWorkload selects the cgroup with the given id (see CgroupID), or updates
// its settings. Its counters are created first, so the programs never see a
// workload without them. In ScopeWorkloads the client programs are attached
// to w.CgroupPath before its entry is written: attached without an entry
// they let everything through as for an unselected cgroup, so neither
// order of a failure half-way opens anything.
func (d *Datapath) SetWorkload(cgroupID uint64, w Workload) error {
	if err := d.attachWorkload(cgroupID, w.CgroupPath); err != nil {
		return fmt.Errorf("select cgroup %d: %w", cgroupID, err)
	}
	zero := make([]sluiceWorkloadStats, ebpf.MustPossibleCPU())
	if err := d.maps.WlStats.Update(w.ID, zero, ebpf.UpdateNoExist); err != nil && !errors.Is(err, ebpf.ErrKeyExist) {
		return fmt.Errorf("create counters of workload %d: %w", w.ID, err)
	}
	// Mode and fail mode first, grants after: should the grants fail (their
	// map full), the workload is still selected and enforced, only without
	// the direct routes it asked for; the error is the caller's to report.
	v := sluiceWorkload{Id: w.ID}
	if w.FailMode == FailClosed {
		v.Flags |= flagFailClosed
	}
	if w.Enforce {
		v.Flags |= flagEnforce
	}
	if w.AwaitingProxy {
		v.Flags |= flagAwaiting
	}
	if err := d.maps.Workloads.Update(cgroupID, &v, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("select cgroup %d: %w", cgroupID, err)
	}
	return d.setMetadataGrants(w.ID, w.MetadataGrants)
}

// DeleteWorkload deselects a cgroup. The workload's counters go with it unless
// another selected cgroup carries the same workload id. In ScopeWorkloads its
// programs are detached first, the connect programs before the others.
func (d *Datapath) DeleteWorkload(cgroupID uint64) error {
	if err := d.detachWorkload(cgroupID); err != nil {
		return fmt.Errorf("deselect cgroup %d: %w", cgroupID, err)
	}
	var v sluiceWorkload
	if err := d.maps.Workloads.Lookup(cgroupID, &v); errors.Is(err, ebpf.ErrKeyNotExist) {
		return nil
	} else if err != nil {
		return fmt.Errorf("look up cgroup %d: %w", cgroupID, err)
	}
	if err := d.maps.Workloads.Delete(cgroupID); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("deselect cgroup %d: %w", cgroupID, err)
	}
	all, err := d.Workloads()
	if err != nil {
		return err
	}
	for _, w := range all {
		if w.ID == v.Id {
			return nil
		}
	}
	if err := d.maps.WlStats.Delete(v.Id); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("delete counters of workload %d: %w", v.Id, err)
	}
	return d.setMetadataGrants(v.Id, nil)
}

// setMetadataGrants makes workload id's metadata grants exactly grants. A
// grant widens what the workload reaches, so the stale ones go first: a
// failure half-way leaves fewer grants than asked, never more.
func (d *Datapath) setMetadataGrants(id uint32, grants []netip.AddrPort) error {
	want := map[sluiceMetadataKey]uint8{}
	for _, g := range grants {
		if !g.IsValid() || g.Addr().Zone() != "" {
			return fmt.Errorf("workload %d: invalid metadata grant %v", id, g)
		}
		want[sluiceMetadataKey{WorkloadId: id, Port: be16(g.Port()), Addr: addr6Words(netip.AddrFrom16(g.Addr().As16()))}] = 1
	}
	err := syncMap(d.maps.MetadataGrants, want, func(k sluiceMetadataKey) bool { return k.WorkloadId == id }, removeFirst)
	if err != nil {
		return fmt.Errorf("metadata grants of workload %d: %w", id, err)
	}
	return nil
}

// MetadataGrants returns the metadata grants of every workload id, sorted.
func (d *Datapath) MetadataGrants() (map[uint32][]netip.AddrPort, error) {
	out := map[uint32][]netip.AddrPort{}
	var k sluiceMetadataKey
	var v uint8
	it := d.maps.MetadataGrants.Iterate()
	for it.Next(&k, &v) {
		out[k.WorkloadId] = append(out[k.WorkloadId], netip.AddrPortFrom(wordsAddr6(k.Addr).Unmap(), fromBE16(k.Port)))
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("list metadata grants: %w", err)
	}
	for _, g := range out {
		slices.SortFunc(g, func(a, b netip.AddrPort) int { return a.Compare(b) })
	}
	return out, nil
}

// Workloads returns every selected cgroup id with its settings.
func (d *Datapath) Workloads() (map[uint64]Workload, error) {
	grants, err := d.MetadataGrants()
	if err != nil {
		return nil, err
	}
	out := map[uint64]Workload{}
	var (
		k uint64
		v sluiceWorkload
	)
	it := d.maps.Workloads.Iterate()
	for it.Next(&k, &v) {
		w := Workload{ID: v.Id}
		if v.Flags&flagFailClosed != 0 {
			w.FailMode = FailClosed
		}
		w.Enforce = v.Flags&flagEnforce != 0
		w.AwaitingProxy = v.Flags&flagAwaiting != 0
		w.MetadataGrants = grants[v.Id]
		out[k] = w
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("list workloads: %w", err)
	}
	return out, nil
}

// DefaultExclusions are destinations never redirected whatever the agent
// adds: loopback and link-local (the proxy address itself is checked before
// exclusions, so a link-local proxy still works).
var DefaultExclusions = []netip.Prefix{
	netip.MustParsePrefix("127.0.0.0/8"),
	netip.MustParsePrefix("169.254.0.0/16"),
	netip.MustParsePrefix("::1/128"),
	netip.MustParsePrefix("fe80::/10"),
}

func lpm4(p netip.Prefix) sluiceLpmV4Key {
	b := p.Masked().Addr().As4()
	return sluiceLpmV4Key{Prefixlen: uint32(p.Bits()), Addr: be32(b[:])}
}

func lpm6(p netip.Prefix) sluiceLpmV6Key {
	return sluiceLpmV6Key{Prefixlen: uint32(p.Bits()), Addr: addr6Words(p.Masked().Addr())}
}

// SetExclusions makes the excluded destination prefixes exactly prefixes.
// Entries are added before stale ones are removed, so a destination present
// in both the old and new sets is never redirected in between.
func (d *Datapath) SetExclusions(prefixes []netip.Prefix) error {
	t := newPrefixTries()
	for _, p := range prefixes {
		if !p.IsValid() {
			return fmt.Errorf("invalid exclusion prefix %v", p)
		}
		t.set(p, 1)
	}
	return t.sync(d.maps.ExcludedV4, d.maps.ExcludedV6, "exclusions")
}

// SetNeverDial makes the never-dial set exactly nodeLocal (class node-local:
// never redirected, refused unless excluded) and metadata (class metadata:
// never redirected; audit goes direct, enforce only where granted). Node-local
// prefixes inside link-local get the link-local class: excluded by default
// for audit workloads, granted-only for enforce workloads. A metadata address
// inside a link-local prefix keeps its own class: the datapath's
// longest-prefix match finds it first. IPv4 prefixes also match v4-mapped
// destinations.
func (d *Datapath) SetNeverDial(nodeLocal []netip.Prefix, metadata []netip.Addr) error {
	t := newPrefixTries()
	for _, p := range nodeLocal {
		if !p.IsValid() || p.Addr().Zone() != "" {
			return fmt.Errorf("invalid never-dial prefix %v", p)
		}
		class := sluiceDstClassDST_NODE_LOCAL
		if isLinkLocal(unmapPrefix(p)) {
			class = sluiceDstClassDST_LINK_LOCAL
		}
		t.set(p, uint8(class))
	}
	// Last, so that a metadata address that is also node-local keeps its
	// own class.
	for _, a := range metadata {
		if !a.IsValid() || a.Zone() != "" {
			return fmt.Errorf("invalid metadata address %v", a)
		}
		t.set(netip.PrefixFrom(a, a.BitLen()), uint8(sluiceDstClassDST_METADATA))
	}
	return t.sync(d.maps.NeverDialV4, d.maps.NeverDialV6, "never-dial set")
}

// isLinkLocal: p (unmapped) lies within IPv4 or IPv6 link-local,
// 169.254.0.0/16 or fe80::/10 (enforce-mode workloads reach it only where
// granted).
func isLinkLocal(p netip.Prefix) bool {
	bits := 16
	if p.Addr().Is6() {
		bits = 10
	}
	return p.Addr().IsLinkLocalUnicast() && p.Bits() >= bits
}

// unmapPrefix turns a v4-mapped prefix into the IPv4 prefix the programs
// look v4-mapped destinations up as; other prefixes are returned as they are.
func unmapPrefix(p netip.Prefix) netip.Prefix {
	if p.Addr().Is4In6() {
		return netip.PrefixFrom(p.Addr().Unmap(), max(p.Bits()-96, 0))
	}
	return p
}

// prefixTries are the wanted entries of an IPv4 and an IPv6 LPM trie with
// one-byte values (exclusions, the never-dial set).
type prefixTries struct {
	v4 map[sluiceLpmV4Key]uint8
	v6 map[sluiceLpmV6Key]uint8
}

func newPrefixTries() prefixTries {
	return prefixTries{v4: map[sluiceLpmV4Key]uint8{}, v6: map[sluiceLpmV6Key]uint8{}}
}

// set puts p in its family's trie with value v; a v4-mapped prefix goes in
// the IPv4 trie, as the programs look v4-mapped destinations up as IPv4.
func (t prefixTries) set(p netip.Prefix, v uint8) {
	p = unmapPrefix(p)
	if p.Addr().Is4() {
		t.v4[lpm4(p)] = v
	} else {
		t.v6[lpm6(p)] = v
	}
}

// sync makes the two maps exactly t, adding before removing (these entries
// narrow what workloads reach).
func (t prefixTries) sync(m4, m6 *ebpf.Map, what string) error {
	if err := syncMap(m4, t.v4, func(sluiceLpmV4Key) bool { return true }, addFirst); err != nil {
		return fmt.Errorf("IPv4 %s: %w", what, err)
	}
	if err := syncMap(m6, t.v6, func(sluiceLpmV6Key) bool { return true }, addFirst); err != nil {
		return fmt.Errorf("IPv6 %s: %w", what, err)
	}
	return nil
}

// readTries calls f on every prefix of an IPv4 and an IPv6 LPM trie with
// its value.
func readTries(m4, m6 *ebpf.Map, what string, f func(netip.Prefix, uint8)) error {
	var k4 sluiceLpmV4Key
	var v uint8
	it := m4.Iterate()
	for it.Next(&k4, &v) {
		f(netip.PrefixFrom(wordAddr4(k4.Addr), int(k4.Prefixlen)), v)
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("list IPv4 %s: %w", what, err)
	}
	var k6 sluiceLpmV6Key
	it = m6.Iterate()
	for it.Next(&k6, &v) {
		f(netip.PrefixFrom(wordsAddr6(k6.Addr), int(k6.Prefixlen)), v)
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("list IPv6 %s: %w", what, err)
	}
	return nil
}

// NeverDial reads back the never-dial set: node-local prefixes and metadata
// addresses, sorted.
func (d *Datapath) NeverDial() (nodeLocal []netip.Prefix, metadata []netip.Addr, err error) {
	err = readTries(d.maps.NeverDialV4, d.maps.NeverDialV6, "never-dial set", func(p netip.Prefix, class uint8) {
		if class == uint8(sluiceDstClassDST_METADATA) && p.IsSingleIP() {
			metadata = append(metadata, p.Addr())
		} else {
			nodeLocal = append(nodeLocal, p)
		}
	})
	if err != nil {
		return nil, nil, err
	}
	sortPrefixes(nodeLocal)
	slices.SortFunc(metadata, netip.Addr.Compare)
	return nodeLocal, metadata, nil
}

func sortPrefixes(ps []netip.Prefix) {
	slices.SortFunc(ps, func(a, b netip.Prefix) int {
		if c := a.Addr().Compare(b.Addr()); c != 0 {
			return c
		}
		return a.Bits() - b.Bits()
	})
}

// Exclusions returns the excluded prefixes, sorted.
func (d *Datapath) Exclusions() ([]netip.Prefix, error) {
	var out []netip.Prefix
	if err := readTries(d.maps.ExcludedV4, d.maps.ExcludedV6, "exclusions", func(p netip.Prefix, _ uint8) { out = append(out, p) }); err != nil {
		return nil, err
	}
	sortPrefixes(out)
	return out, nil
}

// SetExcludedPorts makes the set of destination ports never redirected
// exactly ports.
func (d *Datapath) SetExcludedPorts(ports []uint16) error {
	want := map[uint16]bool{}
	for _, p := range ports {
		want[p] = true
	}
	if err := syncSet(d.maps.ExcludedPorts, want); err != nil {
		return fmt.Errorf("excluded ports: %w", err)
	}
	return nil
}

// ExcludedPorts returns the excluded destination ports, sorted.
func (d *Datapath) ExcludedPorts() ([]uint16, error) {
	var out []uint16
	var k uint16
	var v uint8
	it := d.maps.ExcludedPorts.Iterate()
	for it.Next(&k, &v) {
		out = append(out, k)
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("list excluded ports: %w", err)
	}
	slices.Sort(out)
	return out, nil
}

// MaxResolvers is how many DNS resolvers SetResolvers takes: the capacity of
// the resolvers map in the embedded object (MAX_RESOLVERS).
func MaxResolvers() int { return tables().maxResolvers }

// SetResolvers makes the DNS resolvers exactly rs: selected workloads reach
// them directly over UDP and TCP, and they are the only non-TCP destinations
// an enforce-mode workload may reach. IPv4 resolvers also match v4-mapped
// destinations.
func (d *Datapath) SetResolvers(rs []netip.AddrPort) error {
	if max := int(d.maps.Resolvers.MaxEntries()); len(rs) > max {
		return fmt.Errorf("%d DNS resolvers, at most %d", len(rs), max)
	}
	want := map[sluiceResolverKey]bool{}
	for _, r := range rs {
		if !r.IsValid() || r.Port() == 0 || r.Addr().Zone() != "" {
			return fmt.Errorf("invalid DNS resolver %v", r)
		}
		want[sluiceResolverKey{Addr: addr6Words(netip.AddrFrom16(r.Addr().As16())), Port: be16(r.Port())}] = true
	}
	if err := syncSet(d.maps.Resolvers, want); err != nil {
		return fmt.Errorf("DNS resolvers: %w", err)
	}
	return nil
}

// Resolvers returns the DNS resolvers, sorted.
func (d *Datapath) Resolvers() ([]netip.AddrPort, error) {
	var out []netip.AddrPort
	var k sluiceResolverKey
	var v uint8
	it := d.maps.Resolvers.Iterate()
	for it.Next(&k, &v) {
		out = append(out, netip.AddrPortFrom(wordsAddr6(k.Addr).Unmap(), fromBE16(k.Port)))
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("list DNS resolvers: %w", err)
	}
	slices.SortFunc(out, func(a, b netip.AddrPort) int { return a.Compare(b) })
	return out, nil
}

// syncSet makes the keys of a set-like map (value 1) exactly want: it adds
// first, then removes what is no longer wanted.
func syncSet[K comparable](m *ebpf.Map, want map[K]bool) error {
	vals := make(map[K]uint8, len(want))
	for k := range want {
		vals[k] = 1
	}
	return syncMap(m, vals, func(K) bool { return true }, addFirst)
}

// The order in which syncMap changes a map: add first where an entry
// narrows what workloads reach (exclusions, never-dial), remove first where
// it widens it (grants), so that a failure half-way errs narrow.
type syncOrder bool

const (
	addFirst    syncOrder = false
	removeFirst syncOrder = true
)

// syncMap makes the entries of a map with one-byte values that mine claims
// exactly want. With addFirst it writes, then removes the claimed keys no
// longer wanted, so an entry in both sets never lapses; with removeFirst
// the other way round.
func syncMap[K comparable](m *ebpf.Map, want map[K]uint8, mine func(K) bool, order syncOrder) error {
	add := func() error {
		for k, v := range want {
			if err := m.Update(k, v, ebpf.UpdateAny); err != nil {
				return fmt.Errorf("add %v: %w", k, err)
			}
		}
		return nil
	}
	if order == addFirst {
		if err := add(); err != nil {
			return err
		}
	}
	var stale []K
	var k K
	var v uint8
	it := m.Iterate()
	for it.Next(&k, &v) {
		if _, ok := want[k]; !ok && mine(k) {
			stale = append(stale, k)
		}
	}
	if err := it.Err(); err != nil {
		return err
	}
	for _, k := range stale {
		if err := m.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("remove %v: %w", k, err)
		}
	}
	if order == removeFirst {
		return add()
	}
	return nil
}
