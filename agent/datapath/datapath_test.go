package datapath

import (
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
)

func TestFindMount(t *testing.T) {
	const mi = `22 1 0:21 / /proc rw,nosuid - proc proc rw
31 23 0:28 / /sys/fs/cgroup rw,relatime shared:9 - tmpfs tmpfs rw,mode=755
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:10 - cgroup2 cgroup2 rw
50 23 0:40 / /sys/fs/bpf\040x rw - bpf bpf rw
`
	got, err := findMount(strings.NewReader(mi), "cgroup2")
	if err != nil || got != "/sys/fs/cgroup/unified" {
		t.Errorf("cgroup2 = %q, %v; want /sys/fs/cgroup/unified", got, err)
	}
	got, err = findMount(strings.NewReader(mi), "bpf")
	if err != nil || got != "/sys/fs/bpf x" {
		t.Errorf("bpf = %q, %v; want the unescaped path", got, err)
	}
	if _, err := findMount(strings.NewReader(mi), "xfs"); err == nil {
		t.Error("found a filesystem that is not mounted")
	}
}

func TestByteOrders(t *testing.T) {
	// A port as the BPF side stores an __be16: the bytes in memory are
	// big-endian whatever the host.
	v := be16(15001)
	if fromBE16(v) != 15001 {
		t.Errorf("be16 round trip: %d", fromBE16(v))
	}
	a := netip.MustParseAddr("169.254.77.1")
	b := a.As4()
	if wordAddr4(be32(b[:])) != a {
		t.Errorf("be32 round trip: %v", wordAddr4(be32(b[:])))
	}
	a6 := netip.MustParseAddr("fd73:6c75:6963:65::1")
	if wordsAddr6(addr6Words(a6)) != a6 {
		t.Errorf("IPv6 round trip: %v", wordsAddr6(addr6Words(a6)))
	}
}

func TestLPMKeysAreMasked(t *testing.T) {
	k := lpm4(netip.MustParsePrefix("10.1.2.3/8"))
	if k.Prefixlen != 8 || wordAddr4(k.Addr) != netip.MustParseAddr("10.0.0.0") {
		t.Errorf("lpm4 = %+v", k)
	}
	k6 := lpm6(netip.MustParsePrefix("2001:db8::1/32"))
	if k6.Prefixlen != 32 || wordsAddr6(k6.Addr) != netip.MustParseAddr("2001:db8::") {
		t.Errorf("lpm6 = %+v", k6)
	}
}

func TestCountersMatchTheBPFEnum(t *testing.T) {
	slots := counterSlots()
	if len(slots) != int(sluiceCounterCOUNTER_MAX) {
		t.Errorf("%d counters read from BTF, the generated enum has %d", len(slots), sluiceCounterCOUNTER_MAX)
	}
	spec, err := loadSpec()
	if err != nil {
		t.Fatal(err)
	}
	seen := map[uint32]string{}
	for _, s := range slots {
		if s.field < 0 {
			t.Errorf("BPF counter %s has no Counters field (tag counter:%q)", s.name, s.name)
		}
		if s.slot >= spec.Maps["counters"].MaxEntries {
			t.Errorf("counter %s is slot %d, beyond the counters array's %d", s.name, s.slot, spec.Maps["counters"].MaxEntries)
		}
		if other, dup := seen[s.slot]; dup {
			t.Errorf("counters %s and %s share slot %d", s.name, other, s.slot)
		}
		seen[s.slot] = s.name
	}
	ty := reflect.TypeFor[Counters]()
	if ty.NumField() != len(CounterNames()) {
		t.Errorf("Counters has %d fields, %d of them match a BPF counter: %v", ty.NumField(), len(CounterNames()), CounterNames())
	}
	var c Counters
	_, ptrs := c.fields()
	var want []uint64
	for i, p := range ptrs {
		*p = uint64(i + 1)
		want = append(want, uint64(i+1))
	}
	if !slices.Equal(c.Values(), want) {
		t.Errorf("Values out of order: %v", c.Values())
	}
	// Names are the metrics' interface: the ones dashboards and alerts use
	// must stay.
	for _, n := range []string{"redirected_ipv4", "redirected_ipv6", "failed_closed", "orig_dst_unknown", "claim_missed", "flow_events_dropped", "publish_failed", "orig_store_failed"} {
		if !slices.Contains(CounterNames(), n) {
			t.Errorf("counter %s is gone", n)
		}
	}
}

func TestAttachmentsMatchPrograms(t *testing.T) {
	spec, err := loadSpec()
	if err != nil {
		t.Fatal(err)
	}
	if len(spec.Programs) != len(attachments()) {
		t.Errorf("object has %d programs, %d attachments", len(spec.Programs), len(attachments()))
	}
	for _, a := range attachments() {
		if a.attach == ebpf.AttachNone {
			t.Errorf("%s: its section names no attach type", a.prog)
		}
		ps, ok := spec.Programs[a.prog]
		if !ok {
			t.Errorf("attachment names unknown program %s", a.prog)
			continue
		}
		if ps.AttachType != a.attach {
			t.Errorf("%s: section attach type %s, attachment %s", a.prog, ps.AttachType, a.attach)
		}
		if len(a.prog) > 15 {
			t.Errorf("%s: longer than the kernel's 15-character object names", a.prog)
		}
	}
	if _, ok := spec.Maps[".bss"]; ok {
		t.Error(".bss should be dropped from the spec")
	}
	for name := range spec.Maps {
		if name == ".rodata" {
			continue // the load's constants (legacy_port_keys), in no pin
		}
		if _, ok := (&Datapath{}).mapFields()[name]; !ok {
			t.Errorf("map %s has no field: it would be neither pinned nor uninstalled", name)
		}
	}
}

func TestKernelVersion(t *testing.T) {
	for _, tc := range []struct {
		release      string
		major, minor int
		memlock      bool
	}{
		{"5.10.0-46-cloud-amd64", 5, 10, true},
		{"5.11.0", 5, 11, false},
		{"6.1.0-28-cloud-amd64", 6, 1, false},
		{"6.18.2+", 6, 18, false},
		{"4.19.0-27-amd64", 4, 19, true},
	} {
		major, minor, err := kernelVersion(tc.release)
		if err != nil || major != tc.major || minor != tc.minor {
			t.Errorf("%s: %d.%d %v", tc.release, major, minor, err)
		}
		if got := memlockAccounted(tc.release); got != tc.memlock {
			t.Errorf("%s: memlock accounted %v", tc.release, got)
		}
	}
	if _, _, err := kernelVersion("garbage"); err == nil || !memlockAccounted("garbage") {
		t.Error("garbage parsed, or not taken as accounted")
	}
}

// An upgrade switches the connect programs after every program that reads
// what they write (switchOrder), and switches every program.
func TestSwitchOrderPutsConnectLast(t *testing.T) {
	as := attachments()
	got := switchOrder(as)
	if len(got) != len(as) {
		t.Fatalf("switchOrder returned %d of %d attachments", len(got), len(as))
	}
	seen := map[string]bool{}
	connects := 0
	for i, a := range got {
		seen[a.prog] = true
		if a.isConnect() {
			connects++
		} else if connects > 0 {
			t.Errorf("%s (%s) switched at %d, after a connect program", a.prog, a.attach, i)
		}
	}
	if connects != 2 || len(seen) != len(as) {
		t.Errorf("order %v: want every program once and both connect programs last", got)
	}
}
