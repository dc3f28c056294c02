package datapath

import (
	"errors"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/sluice-io/sluice/test/layouts"
)

// Upgrading from every frozen layout: the pins of that release's datapath,
// programmed, are adopted in place. The workloads and the proxy
// configuration keep their entries, every hook keeps exactly one program
// (now this binary's), the maps the new layout adds are pinned, and the
// layout map says LayoutVersion.
func TestPrivilegedUpgradeFromEveryLayout(t *testing.T) {
	for _, v := range layouts.Versions() {
		cfg := testConfig(t)
		if err := layouts.Install(v, cfg.CgroupPath, cfg.PinPath); err != nil {
			t.Fatalf("install layout %d: %v", v, err)
		}
		if got, err := PinnedLayout(cfg.PinPath); err != nil || got != v {
			t.Fatalf("layout %d installed: PinnedLayout = %d, %v", v, got, err)
		}
		old, err := OpenPinned(cfg.PinPath)
		if err != nil {
			t.Fatalf("open layout %d pins: %v", v, err)
		}
		if err := old.SetWorkload(4242, Workload{ID: 9, FailMode: FailClosed, Enforce: true}); err != nil {
			t.Fatal(err)
		}
		if err := old.SetProxy(Proxy{IPv4: DefaultProxyIPv4, Port: 15001}); err != nil {
			t.Fatal(err)
		}
		old.Close()
		before := map[ebpf.AttachType][]ebpf.ProgramID{}
		for _, a := range attachments() {
			before[a.attach] = attachedIDs(t, cfg.CgroupPath, a.attach)
		}

		d, err := Open(cfg)
		if err != nil {
			t.Fatalf("upgrade from layout %d: %v", v, err)
		}
		ws, err := d.Workloads()
		if err != nil {
			t.Fatal(err)
		}
		if w := ws[4242]; w.ID != 9 || w.FailMode != FailClosed || !w.Enforce {
			t.Errorf("workload after the upgrade from layout %d: %+v", v, ws)
		}
		if st, err := d.ProxyState(); err != nil || st.Port != 15001 || st.IPv4 != DefaultProxyIPv4 {
			t.Errorf("proxy after the upgrade from layout %d: %+v, %v", v, st, err)
		}
		for _, a := range attachments() {
			after := attachedIDs(t, cfg.CgroupPath, a.attach)
			if len(after) != 1 || slices.Equal(after, before[a.attach]) {
				t.Errorf("%s: programs %v before, %v after: want one, replaced", a.prog, before[a.attach], after)
			}
		}
		if got, err := PinnedLayout(cfg.PinPath); err != nil || got != LayoutVersion {
			t.Errorf("after the upgrade from layout %d: PinnedLayout = %d, %v; want %d", v, got, err, LayoutVersion)
		}
		for name := range d.mapsByName() {
			if _, err := os.Stat(filepath.Join(cfg.PinPath, name)); err != nil {
				t.Errorf("map %s not pinned after the upgrade: %v", name, err)
			}
		}
		d.Close()
	}
}

// Pins of a newer layout (a downgrade) are refused, and nothing is touched;
// allowed, they are adopted and the layout map says this version's.
func TestPrivilegedDowngradeRefused(t *testing.T) {
	cfg := testConfig(t)
	d, err := Open(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := d.maps.Layout.Put(layoutKey, sluiceLayoutInfo{Version: LayoutVersion + 1}); err != nil {
		t.Fatal(err)
	}
	if err := d.SetWorkload(77, Workload{ID: 3}); err != nil {
		t.Fatal(err)
	}
	ids := attachedIDs(t, cfg.CgroupPath, ebpf.AttachCGroupInet4Connect)
	d.Close()

	_, err = Open(cfg)
	if !errors.Is(err, ErrNewerLayout) {
		t.Fatalf("open pins of layout %d: %v, want ErrNewerLayout", LayoutVersion+1, err)
	}
	t.Logf("refused: %v", err)
	if got := attachedIDs(t, cfg.CgroupPath, ebpf.AttachCGroupInet4Connect); !slices.Equal(got, ids) {
		t.Errorf("a refused downgrade replaced programs: %v -> %v", ids, got)
	}
	if v, _ := PinnedLayout(cfg.PinPath); v != LayoutVersion+1 {
		t.Errorf("a refused downgrade rewrote the layout: %d", v)
	}

	cfg.AllowDowngrade = true
	d, err = Open(cfg)
	if err != nil {
		t.Fatalf("allowed downgrade: %v", err)
	}
	defer d.Close()
	if v, _ := PinnedLayout(cfg.PinPath); v != LayoutVersion {
		t.Errorf("after an allowed downgrade the layout is %d, want %d", v, LayoutVersion)
	}
	if ws, _ := d.Workloads(); ws[77].ID != 3 {
		t.Errorf("allowed downgrade lost the workloads: %v", ws)
	}
}

// A map whose definition changed only in capacity is migrated: a new map
// with this layout's definition replaces the pin, with the old entries.
func TestPrivilegedMigrationCopiesChangedMap(t *testing.T) {
	cfg := testConfig(t)
	d, err := Open(cfg)
	if err != nil {
		t.Fatal(err)
	}
	d.Close()
	// Stand in for an older layout whose excluded_ports held 16 entries.
	spec, err := loadSpec()
	if err != nil {
		t.Fatal(err)
	}
	ms := spec.Maps["excluded_ports"].Copy()
	ms.MaxEntries = 16
	old, err := ebpf.NewMap(ms)
	if err != nil {
		t.Fatal(err)
	}
	defer old.Close()
	for _, p := range []uint16{22, 443, 8443} {
		if err := old.Put(p, uint8(1)); err != nil {
			t.Fatal(err)
		}
	}
	pin := filepath.Join(cfg.PinPath, "excluded_ports")
	if err := os.Remove(pin); err != nil {
		t.Fatal(err)
	}
	if err := old.Pin(pin); err != nil {
		t.Fatal(err)
	}

	d, err = Open(cfg)
	if err != nil {
		t.Fatalf("reopen with a changed map: %v", err)
	}
	defer d.Close()
	m, err := ebpf.LoadPinnedMap(pin, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if m.MaxEntries() != spec.Maps["excluded_ports"].MaxEntries {
		t.Errorf("migrated excluded_ports holds %d entries, want this layout's %d", m.MaxEntries(), spec.Maps["excluded_ports"].MaxEntries)
	}
	got, err := d.ExcludedPorts()
	if err != nil {
		t.Fatal(err)
	}
	slices.Sort(got)
	if !slices.Equal(got, []uint16{22, 443, 8443}) {
		t.Errorf("migrated excluded ports %v, want 22 443 8443", got)
	}
	if _, err := os.Stat(pin + "_migrating"); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("migration left its temporary pin: %v", err)
	}
}
