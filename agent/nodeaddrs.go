package agent

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"time"

	"github.com/sluice-io/sluice/agent/datapath"
	"github.com/sluice-io/sluice/policy"
	"github.com/sluice-io/sluice/xds"
	"github.com/vishvananda/netlink"
)

// serviceVIPDevices carry Service addresses, not the node's own: kube-proxy
// in IPVS mode binds every ClusterIP, external and load-balancer IP to
// kube-ipvs0. Counted as node addresses they would be excluded (direct,
// around the proxy and the policy) or refused.
var serviceVIPDevices = map[string]bool{"kube-ipvs0": true}

// nodeAddresses lists the addresses of this network namespace's
// interfaces once each (every veth of a point-to-point CNI carries the same
// gateway address), sorted, but for loopback, link-local and the proxy's
// own (the never-dial set holds those anyway).
func nodeAddresses(p xds.Proxy) ([]netip.Addr, error) {
	ifaces, err := net.Interfaces()
	if err != nil {
		return nil, fmt.Errorf("node addresses: %w", err)
	}
	var out []netip.Addr
	for _, ifc := range ifaces {
		if serviceVIPDevices[ifc.Name] {
			continue
		}
		addrs, err := ifc.Addrs()
		if err != nil {
			return nil, fmt.Errorf("addresses of %s: %w", ifc.Name, err)
		}
		for _, a := range addrs {
			ipn, ok := a.(*net.IPNet)
			if !ok {
				continue
			}
			ip, ok := netip.AddrFromSlice(ipn.IP)
			if !ok {
				continue
			}
			ip = ip.Unmap()
			if ip.IsLoopback() || ip.IsLinkLocalUnicast() || ip == p.IPv4 || ip == p.IPv6 {
				continue
			}
			out = append(out, ip)
		}
	}
	slices.SortFunc(out, netip.Addr.Compare)
	return slices.Compact(out), nil
}

// nodeWatch keeps the never-dial set, the node-address exclusions and the
// listener's never-dial chain in step with the node's addresses: a bridge
// the CNI creates with the first pod, a renumbered interface. Until it
// catches up, a new node address would be redirected and dialled by the
// proxy from the node itself.
type nodeWatch struct {
	dp          *datapath.Datapath
	rec         *Reconciler
	log         *slog.Logger
	proxy       xds.Proxy
	metadata    []netip.Addr
	exclude     []netip.Prefix // defaults and --exclude, without node addresses
	excludeNode bool
	node        []netip.Addr // as last applied
}

// apply reads the node's addresses and, if they changed (or first is set),
// programs the datapath and the reconciler. The never-dial set is written
// before the exclusions, so a new address is refused, never redirected,
// until it is excluded.
func (w *nodeWatch) apply(first bool) (policy.NodeLocal, []netip.Prefix, error) {
	node, err := nodeAddresses(w.proxy)
	if err != nil {
		return policy.NodeLocal{}, nil, err
	}
	nl := policy.NodeLocal{Proxy: w.proxy.Addrs(), Node: node, Metadata: w.metadata}
	exclude := slices.Clone(w.exclude)
	if w.excludeNode {
		for _, a := range node {
			exclude = append(exclude, netip.PrefixFrom(a, a.BitLen()))
		}
	}
	if !first && slices.Equal(node, w.node) {
		return nl, exclude, nil
	}
	if w.dp != nil { // nil: a standby, which programs nothing
		if err := w.dp.SetNeverDial(nl.Prefixes(), nl.MetadataAddrs()); err != nil {
			return nl, exclude, err
		}
		if err := w.dp.SetExclusions(exclude); err != nil {
			return nl, exclude, err
		}
	}
	w.node = node
	if w.rec != nil {
		w.rec.SetNodeLocal(nl)
	}
	if !first {
		w.log.Info("node addresses changed", "node", node)
	}
	return nl, exclude, nil
}

// run follows netlink address changes (and rereads every resync, should an
// event be lost) until ctx is done.
func (w *nodeWatch) run(ctx context.Context, resync time.Duration) {
	updates := make(chan netlink.AddrUpdate, 64)
	done := make(chan struct{})
	defer close(done)
	if err := netlink.AddrSubscribeWithOptions(updates, done, netlink.AddrSubscribeOptions{
		ErrorCallback: func(err error) { w.log.Warn("node address events", "error", err) },
	}); err != nil {
		w.log.Warn("cannot follow node address changes; rereading them periodically", "error", err, "every", resync)
		updates = nil
	}
	tick := time.NewTicker(resync)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case _, ok := <-updates:
			if !ok {
				updates = nil
				continue
			}
			// Coalesce a burst (an interface comes up with several).
			time.Sleep(50 * time.Millisecond)
			for len(updates) > 0 {
				<-updates
			}
		case <-tick.C:
		}
		if _, _, err := w.apply(false); err != nil {
			w.log.Error("node addresses not applied", "error", err)
		}
	}
}
