package conformance

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net/netip"
	"os"
	"slices"
	"sync"
	"time"

	"github.com/sluice-io/sluice/agent"
)

// dnsCache is a dynamic forward proxy DNS cache: one per name, shared by
// the filters and the cluster that name it
// (source/extensions/common/dynamic_forward_proxy/dns_cache_impl.cc).
type dnsCache struct {
	cfg *DNSCache
	now func() time.Time

	mu    sync.Mutex
	hosts map[string]*hostEntry
	// Lookups counts the DNS lookups done (for tests and benchmarks).
	lookups int
}

type hostEntry struct {
	ready   chan struct{}
	addrs   []netip.Addr
	err     error
	at      time.Time
	ttl     time.Duration
	backoff time.Duration
	used    time.Time
}

var errOverflow = errors.New("DNS cache overflow (max_hosts)")

// resolve returns the addresses for host: an IP literal as it is (no DNS,
// no filter: Envoy's DFP takes a literal host as its address), else the
// cached answer while it is fresh (its TTL, at least dns_min_refresh_rate;
// a failure is retried after the failure backoff), else a lookup, which
// every concurrent request for the host waits for. Answers in
// resolved_address_filter are dropped; with V4_PREFERRED the IPv4 answers
// are used when there are any. Hosts unused for host_ttl are evicted; a new
// host beyond max_hosts fails.
func (c *dnsCache) resolve(ctx context.Context, host string) ([]netip.Addr, error) {
	if a, err := netip.ParseAddr(host); err == nil {
		return []netip.Addr{a}, nil
	}
	now := c.now()
	c.mu.Lock()
	for h, e := range c.hosts {
		if now.Sub(e.used) > c.cfg.HostTTL && isClosed(e.ready) {
			delete(c.hosts, h)
		}
	}
	e := c.hosts[host]
	if e != nil {
		e.used = now
		ready := e.ready
		c.mu.Unlock()
		<-ready
		c.mu.Lock()
		fresh := now.Sub(e.at) < max(e.ttl, c.cfg.MinRefresh)
		if e.err != nil {
			fresh = now.Sub(e.at) < e.backoff
		}
		if fresh {
			defer c.mu.Unlock()
			return e.addrs, e.err
		}
	} else if len(c.hosts) >= c.cfg.MaxHosts {
		c.mu.Unlock()
		return nil, errOverflow
	}
	prev := e
	e = &hostEntry{ready: make(chan struct{}), used: now}
	if prev != nil {
		e.backoff = prev.backoff
	}
	c.hosts[host] = e
	c.lookups++
	c.mu.Unlock()

	lctx, cancel := context.WithTimeout(ctx, c.cfg.QueryTimeout)
	answers, err := agent.LookupDNS(lctx, c.cfg.Resolvers, host)
	cancel()
	var v4, v6 []netip.Addr
	ttl := time.Duration(0)
	for _, a := range answers {
		addr := a.Addr.Unmap()
		if slices.ContainsFunc(c.cfg.Filter, func(p netip.Prefix) bool { return p.Contains(addr) }) {
			continue
		}
		if ttl == 0 || a.TTL < ttl {
			ttl = a.TTL
		}
		if addr.Is4() {
			v4 = append(v4, addr)
		} else {
			v6 = append(v6, addr)
		}
	}
	addrs := v4
	if len(addrs) == 0 || !c.cfg.V4Preferred {
		addrs = append(addrs, v6...)
	}
	if err == nil && len(addrs) == 0 {
		err = fmt.Errorf("no usable address for %s (%d answers, all filtered)", host, len(answers))
	}
	c.mu.Lock()
	e.at, e.ttl, e.addrs, e.err = c.now(), ttl, addrs, err
	if err != nil {
		e.addrs = nil
		e.backoff = min(max(2*e.backoff, c.cfg.FailureBase), max(c.cfg.FailureMax, c.cfg.FailureBase))
	} else {
		e.backoff = 0
	}
	close(e.ready)
	c.mu.Unlock()
	return e.addrs, e.err
}

func isClosed(c chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}

// dnsCaches holds the caches by name across configuration updates, as
// Envoy's DNS cache manager does.
type dnsCaches struct {
	mu     sync.Mutex
	caches map[string]*dnsCache
}

func (d *dnsCaches) get(cfg *DNSCache) *dnsCache {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.caches == nil {
		d.caches = map[string]*dnsCache{}
	}
	c := d.caches[cfg.Name]
	if c == nil || c.cfg.wholeConfig != cfg.wholeConfig {
		c = &dnsCache{cfg: cfg, now: time.Now, hosts: map[string]*hostEntry{}}
		d.caches[cfg.Name] = c
	}
	return c
}

// Lookups returns how many DNS lookups the named cache did.
func (d *dnsCaches) Lookups(name string) int {
	d.mu.Lock()
	c := d.caches[name]
	d.mu.Unlock()
	if c == nil {
		return 0
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.lookups
}

// SystemResolvConf is where a DNS cache configured without resolvers
// takes its nameservers from, as c-ares does.
var SystemResolvConf = "/etc/resolv.conf"

func readSystemResolvers() ([]netip.AddrPort, error) {
	f, err := os.Open(SystemResolvConf)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return agent.ReadResolvConf(f)
}
