package datapath

import (
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/sluice-io/sluice/test/testbed"
	"github.com/vishvananda/netlink"
)

func testConfig(t *testing.T) Config {
	t.Helper()
	testbed.RequirePrivileged(t)
	if err := EnsureBPFFS(DefaultBPFFS); err != nil {
		t.Fatal(err)
	}
	cg := testbed.NewRootCgroup(t, "sluice-dp-test")
	cfg := Config{CgroupPath: cg.Path, PinPath: filepath.Join(DefaultBPFFS, filepath.Base(cg.Path))}
	t.Cleanup(func() {
		if err := Uninstall(cfg.PinPath); err != nil {
			t.Errorf("uninstall: %v", err)
		}
	})
	return cfg
}

func attachedIDs(t *testing.T, cgroup string, typ ebpf.AttachType) []ebpf.ProgramID {
	t.Helper()
	res, err := link.QueryPrograms(link.QueryOptions{Target: mustOpen(t, cgroup), Attach: typ})
	if err != nil {
		t.Fatalf("query %s: %v", typ, err)
	}
	var ids []ebpf.ProgramID
	for _, p := range res.Programs {
		ids = append(ids, p.ID)
	}
	return ids
}

func mustOpen(t *testing.T, path string) int {
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return int(f.Fd())
}

func TestPrivilegedInstallReopenUninstall(t *testing.T) {
	cfg := testConfig(t)
	d, err := Open(cfg)
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range attachments() {
		if _, err := os.Stat(linkPin(cfg.PinPath, a.prog)); err != nil {
			t.Errorf("link %s not pinned: %v", a.prog, err)
		}
	}
	if err := d.SetWorkload(1234, Workload{ID: 9, FailMode: FailClosed}); err != nil {
		t.Fatal(err)
	}
	proxy := Proxy{IPv4: DefaultProxyIPv4, IPv6: DefaultProxyIPv6, Port: DefaultProxyPort}
	if err := d.SetProxy(proxy); err != nil {
		t.Fatal(err)
	}
	if err := d.SetReady(true); err != nil {
		t.Fatal(err)
	}
	before := Programs(cfg.PinPath)
	d.Close()

	// Reopen: same links (never detached), entries kept.
	d, err = Open(cfg)
	if err != nil {
		t.Fatalf("reopen: %v", err)
	}
	after := Programs(cfg.PinPath)
	for i := range before {
		if before[i].LinkID != after[i].LinkID || before[i].LinkID == 0 {
			t.Errorf("%s: link %d became %d; a restart must not re-attach", before[i].Name, before[i].LinkID, after[i].LinkID)
		}
		if before[i].Tag == "" || before[i].Tag != after[i].Tag {
			t.Errorf("%s: tag %q then %q, want the same program", before[i].Name, before[i].Tag, after[i].Tag)
		}
	}
	ws, err := d.Workloads()
	if err != nil || !reflect.DeepEqual(ws[1234], Workload{ID: 9, FailMode: FailClosed}) {
		t.Errorf("workloads after reopen: %v, %v", ws, err)
	}
	ps, err := d.ProxyState()
	if err != nil || !reflect.DeepEqual(ps, ProxyState{Proxy: proxy, Ready: true, Effective: true}) {
		t.Errorf("proxy state after reopen: %+v, %v", ps, err)
	}
	if n := len(attachedIDs(t, cfg.CgroupPath, ebpf.AttachCGroupInet4Connect)); n != 1 {
		t.Errorf("%d connect4 programs attached after reopen, want 1", n)
	}
	d.Close()

	// Reopening against another cgroup is refused, not silently moved.
	other := testbed.NewRootCgroup(t, "sluice-dp-other")
	if _, err := Open(Config{CgroupPath: other.Path, PinPath: cfg.PinPath}); !errors.Is(err, ErrOtherCgroup) {
		t.Errorf("open on another cgroup: %v, want ErrOtherCgroup", err)
	}

	if err := Uninstall(cfg.PinPath); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(cfg.PinPath); !os.IsNotExist(err) {
		t.Errorf("pin directory still there: %v", err)
	}
	for _, a := range attachments() {
		if ids := attachedIDs(t, cfg.CgroupPath, a.attach); len(ids) != 0 {
			t.Errorf("%s still attached after uninstall: %v", a.attach, ids)
		}
	}
	if err := Uninstall(cfg.PinPath); err != nil {
		t.Errorf("second uninstall: %v", err)
	}
}

// Uninstall detaches only our programs: another program on the same hook of
// the same cgroup stays.
func TestPrivilegedUninstallLeavesOthers(t *testing.T) {
	cfg := testConfig(t)
	d, err := Open(cfg)
	if err != nil {
		t.Fatal(err)
	}
	d.Close()
	spec, err := loadSpec()
	if err != nil {
		t.Fatal(err)
	}
	var objs objects
	if err := spec.LoadAndAssign(&objs, nil); err != nil {
		t.Fatal(err)
	}
	defer objs.sluicePrograms.SlConnect4.Close()
	foreign, err := link.AttachCgroup(link.CgroupOptions{Path: cfg.CgroupPath, Attach: ebpf.AttachCGroupInet4Connect, Program: objs.SlConnect4})
	if err != nil {
		t.Fatal(err)
	}
	defer foreign.Close()
	if n := len(attachedIDs(t, cfg.CgroupPath, ebpf.AttachCGroupInet4Connect)); n != 2 {
		t.Fatalf("%d programs attached, want ours and the foreign one", n)
	}
	if err := Uninstall(cfg.PinPath); err != nil {
		t.Fatal(err)
	}
	info, _ := foreign.Info()
	ids := attachedIDs(t, cfg.CgroupPath, ebpf.AttachCGroupInet4Connect)
	if len(ids) != 1 || info == nil || ids[0] != info.Program {
		t.Errorf("after uninstall attached = %v, want only the foreign program", ids)
	}
}

func TestPrivilegedMaps(t *testing.T) {
	cfg := testConfig(t)
	d, err := Open(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()

	first := []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8"), netip.MustParsePrefix("2001:db8::/32"), netip.MustParsePrefix("192.0.2.1/32")}
	second := []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8"), netip.MustParsePrefix("::ffff:198.51.100.0/120"), netip.MustParsePrefix("fd00::/8")}
	if err := d.SetExclusions(first); err != nil {
		t.Fatal(err)
	}
	if err := d.SetExclusions(second); err != nil {
		t.Fatal(err)
	}
	got, err := d.Exclusions()
	if err != nil {
		t.Fatal(err)
	}
	want := []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8"), netip.MustParsePrefix("198.51.100.0/24"), netip.MustParsePrefix("fd00::/8")}
	if !slices.Equal(got, want) {
		t.Errorf("exclusions = %v, want %v (v4-mapped stored as IPv4, stale removed)", got, want)
	}
	if err := d.SetExcludedPorts([]uint16{53, 8080}); err != nil {
		t.Fatal(err)
	}
	if err := d.SetExcludedPorts([]uint16{8080, 9090}); err != nil {
		t.Fatal(err)
	}
	if ports, err := d.ExcludedPorts(); err != nil || !slices.Equal(ports, []uint16{8080, 9090}) {
		t.Errorf("ports = %v, %v", ports, err)
	}

	// Workload counters live as long as some cgroup carries the id.
	d.SetWorkload(1, Workload{ID: 5})
	d.SetWorkload(2, Workload{ID: 5})
	d.DeleteWorkload(1)
	if st, _ := d.WorkloadStats(); len(st) != 1 {
		t.Errorf("counters of workload 5 gone while cgroup 2 still has it: %v", st)
	}
	d.DeleteWorkload(2)
	if st, _ := d.WorkloadStats(); len(st) != 0 {
		t.Errorf("counters left after the last cgroup went: %v", st)
	}
	if err := d.SetProxy(Proxy{IPv4: netip.MustParseAddr("::1"), Port: 1}); err == nil {
		t.Error("IPv6 address accepted as the IPv4 proxy")
	}
}

// The proxy address goes on lo when dummy interfaces are unavailable (as
// here), or on sluice0; Ensure is idempotent and says which addresses it
// added, and Remove takes away exactly those: an address that was on the
// node before sluice stays, and is not reported as removed.
func TestPrivilegedProxyAddrs(t *testing.T) {
	testbed.RequirePrivileged(t)
	tns := testbed.NewNetns(t, "slc-addr-"+testbed.RandomID())
	h := tns.NetlinkHandle(t)
	pa := ProxyAddrs{Handle: h}
	// Someone else's address, already on lo, that is also the IPv6 proxy's.
	tns.IP(t, "addr", "add", DefaultProxyIPv6.String()+"/128", "dev", "lo", "nodad")
	dev, added, err := pa.Ensure(DefaultProxyIPv4, DefaultProxyIPv6)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(added, []netip.Addr{DefaultProxyIPv4}) {
		t.Errorf("first Ensure added %v, want only %s (the IPv6 address was there)", added, DefaultProxyIPv4)
	}
	if _, again, err := pa.Ensure(DefaultProxyIPv4, DefaultProxyIPv6); err != nil || len(again) != 0 {
		t.Errorf("second Ensure added %v (%v), want nothing", again, err)
	}
	l, err := h.LinkByName(dev)
	if err != nil {
		t.Fatal(err)
	}
	on := func() map[netip.Addr]bool {
		addrs, err := h.AddrList(l, netlink.FAMILY_ALL)
		if err != nil {
			t.Fatal(err)
		}
		out := map[netip.Addr]bool{}
		for _, a := range addrs {
			if ip, ok := netip.AddrFromSlice(a.IP); ok {
				out[ip.Unmap()] = true
			}
		}
		return out
	}
	if got := on(); !got[DefaultProxyIPv4] || !got[DefaultProxyIPv6] {
		t.Errorf("%s after Ensure: %v, want both proxy addresses", dev, got)
	}
	removed, err := pa.Remove(added...)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(removed, []netip.Addr{DefaultProxyIPv4}) {
		t.Errorf("Remove reported %v, want [%s]", removed, DefaultProxyIPv4)
	}
	if got := on(); got[DefaultProxyIPv4] || !got[DefaultProxyIPv6] {
		t.Errorf("%s after Remove: %v, want the IPv4 proxy address gone and the pre-existing IPv6 one kept", dev, got)
	}
	// Removing what is already gone removes nothing and says so.
	if removed, err := pa.Remove(DefaultProxyIPv4); err != nil || len(removed) != 0 {
		t.Errorf("second Remove: %v, %v; want nothing removed", removed, err)
	}
}

// The pinned config records which proxy addresses sluice added, for the
// address it was recorded for only.
func TestPrivilegedMarkAdded(t *testing.T) {
	testbed.RequirePrivileged(t)
	d, err := Open(testConfig(t))
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	p := Proxy{IPv4: DefaultProxyIPv4, IPv6: DefaultProxyIPv6, Port: DefaultProxyPort}
	if err := d.SetProxy(p); err != nil {
		t.Fatal(err)
	}
	if err := d.MarkAdded([]netip.Addr{DefaultProxyIPv4, netip.MustParseAddr("192.0.2.1")}); err != nil {
		t.Fatal(err)
	}
	if ps, _ := d.ProxyState(); !slices.Equal(ps.Added, []netip.Addr{DefaultProxyIPv4}) {
		t.Errorf("added %v, want [%s]", ps.Added, DefaultProxyIPv4)
	}
	// Same address again (an agent restart): the record stays.
	if err := d.SetProxy(p); err != nil {
		t.Fatal(err)
	}
	if ps, _ := d.ProxyState(); len(ps.Added) != 1 {
		t.Errorf("after the same SetProxy: added %v, want it kept", ps.Added)
	}
	// Another address: what was recorded was of the old one.
	p.IPv4 = netip.MustParseAddr("169.254.77.2")
	if err := d.SetProxy(p); err != nil {
		t.Fatal(err)
	}
	if ps, _ := d.ProxyState(); len(ps.Added) != 0 {
		t.Errorf("after a new address: added %v, want none", ps.Added)
	}
}

// The in-flight maps get the configured capacity at install; a datapath
// already pinned keeps its own, whatever a later Open asks for, so that no
// open connection loses its original destination to a resize.
func TestPrivilegedInFlightCapacity(t *testing.T) {
	cfg := testConfig(t)
	for _, n := range []int{-1, MinInFlightEntries - 1, MaxInFlightEntries + 1} {
		bad := cfg
		bad.InFlightEntries = n
		if d, err := Open(bad); err == nil {
			d.Close()
			t.Fatalf("capacity %d accepted", n)
		} else if !strings.Contains(err.Error(), "outside") {
			t.Errorf("capacity %d: %v", n, err)
		}
	}
	if _, err := os.Stat(cfg.PinPath); !os.IsNotExist(err) {
		t.Fatalf("a refused capacity left pins behind: %v", err)
	}
	cfg.InFlightEntries = 2048
	d, err := Open(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if got := d.InFlightCapacity(); got != 2048 {
		t.Errorf("installed capacity %d, want 2048", got)
	}
	if got := d.maps.PendingTuples.MaxEntries(); got != 2048 {
		t.Errorf("pending_tuples capacity %d, want 2048", got)
	}
	d.Close()

	cfg.InFlightEntries = 0 // the default, 65536
	d, err = Open(cfg)
	if err != nil {
		t.Fatalf("reopen asking another capacity: %v", err)
	}
	defer d.Close()
	if got := d.InFlightCapacity(); got != 2048 {
		t.Errorf("reopened capacity %d, want the pinned 2048", got)
	}
}
