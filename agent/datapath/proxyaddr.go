package datapath

import (
	"errors"
	"fmt"
	"net"
	"net/netip"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Proxy address defaults. 169.254.77.1 is link-local, like NodeLocal
// DNSCache's 169.254.20.10: every pod reaches it through its default route and
// the node delivers it locally. The IPv6 default is in the ULA prefix
// fd73:6c75:6963::/48, whose global ID and first subnet byte spell "sluice" in
// ASCII hex (73 6c 75 69 63 65).
var (
	DefaultProxyIPv4 = netip.MustParseAddr("169.254.77.1")
	DefaultProxyIPv6 = netip.MustParseAddr("fd73:6c75:6963:65::1")
)

const (
	// DefaultProxyPort is where the proxy's listener binds.
	DefaultProxyPort = 15001
	// ProxyInterface is the dummy interface that carries the proxy address.
	ProxyInterface = "sluice0"
)

// ProxyAddrs puts the proxy's addresses on the node through a netlink handle
// (a network namespace; netlink.Handle{} for the current one).
type ProxyAddrs struct {
	Handle *netlink.Handle
}

func (p ProxyAddrs) h() *netlink.Handle {
	if p.Handle != nil {
		return p.Handle
	}
	return &netlink.Handle{}
}

// Ensure puts addrs (host routes: /32 and /128) on the dummy interface
// sluice0, creating it, or on lo when the kernel has no dummy interfaces
// (CONFIG_DUMMY off). It is idempotent; it returns the interface it used
// and the addresses it added (those that were not on it already), which
// Datapath.MarkAdded records for uninstall.
func (p ProxyAddrs) Ensure(addrs ...netip.Addr) (dev string, added []netip.Addr, err error) {
	link, err := p.proxyLink()
	if err != nil {
		return "", nil, err
	}
	name := link.Attrs().Name
	if err := p.h().LinkSetUp(link); err != nil {
		return "", nil, fmt.Errorf("set %s up: %w", name, err)
	}
	have, err := p.addrsOn(link)
	if err != nil {
		return "", nil, err
	}
	for _, a := range addrs {
		if !a.IsValid() {
			continue
		}
		addr := hostAddr(a)
		if a.Is6() {
			// The proxy must bind at once: skip duplicate address detection.
			addr.Flags = unix.IFA_F_NODAD
		}
		if err := p.h().AddrReplace(link, addr); err != nil {
			return "", nil, fmt.Errorf("add %s to %s: %w", a, name, err)
		}
		if !have[a] {
			added = append(added, a)
		}
	}
	return name, added, nil
}

// addrsOn lists the host addresses (/32, /128) on link.
func (p ProxyAddrs) addrsOn(link netlink.Link) (map[netip.Addr]bool, error) {
	list, err := p.h().AddrList(link, netlink.FAMILY_ALL)
	if err != nil {
		return nil, fmt.Errorf("list addresses of %s: %w", link.Attrs().Name, err)
	}
	out := map[netip.Addr]bool{}
	for _, a := range list {
		ones, bits := a.Mask.Size()
		if ip, ok := netip.AddrFromSlice(a.IP); ok && ones == bits {
			out[ip.Unmap()] = true
		}
	}
	return out, nil
}

func hostAddr(a netip.Addr) *netlink.Addr {
	return &netlink.Addr{IPNet: &net.IPNet{IP: a.AsSlice(), Mask: net.CIDRMask(a.BitLen(), a.BitLen())}}
}

func (p ProxyAddrs) proxyLink() (netlink.Link, error) {
	if l, err := p.h().LinkByName(ProxyInterface); err == nil {
		return l, nil
	}
	dummy := &netlink.Dummy{LinkAttrs: netlink.LinkAttrs{Name: ProxyInterface}}
	err := p.h().LinkAdd(dummy)
	if err == nil || errors.Is(err, unix.EEXIST) {
		return p.h().LinkByName(ProxyInterface)
	}
	if !errors.Is(err, unix.EOPNOTSUPP) && !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.EINVAL) {
		return nil, fmt.Errorf("create %s: %w", ProxyInterface, err)
	}
	// No dummy support in this kernel: fall back to lo.
	l, lerr := p.h().LinkByName("lo")
	if lerr != nil {
		return nil, fmt.Errorf("no dummy interfaces (%v) and no lo: %w", err, lerr)
	}
	return l, nil
}

// Remove takes addrs off sluice0 or lo, wherever Ensure put them, and
// deletes sluice0 if it exists. It returns the addresses it removed:
// addresses already gone are not an error, and not reported as removed.
// Pass only what Ensure added (ProxyState.Added): an address that was on lo
// before sluice came is someone else's.
func (p ProxyAddrs) Remove(addrs ...netip.Addr) ([]netip.Addr, error) {
	var (
		errs    []error
		removed []netip.Addr
		onDummy bool
	)
	// Ensure used sluice0 where the kernel has dummy interfaces, else lo:
	// only that one holds what it added. A copy of the address on lo beside
	// sluice0 is someone else's.
	for _, name := range []string{ProxyInterface, "lo"} {
		l, err := p.h().LinkByName(name)
		if err != nil {
			continue
		}
		if name == "lo" && onDummy {
			break
		}
		onDummy = name == ProxyInterface
		for _, a := range addrs {
			if !a.IsValid() {
				continue
			}
			err := p.h().AddrDel(l, hostAddr(a))
			switch {
			case err == nil:
				removed = append(removed, a)
			case !errors.Is(err, unix.EADDRNOTAVAIL) && !errors.Is(err, unix.ENOENT):
				errs = append(errs, fmt.Errorf("remove %s from %s: %w", a, name, err))
			}
		}
		if name == ProxyInterface {
			if err := p.h().LinkDel(l); err != nil {
				errs = append(errs, fmt.Errorf("delete %s: %w", name, err))
			}
		}
	}
	return removed, errors.Join(errs...)
}
