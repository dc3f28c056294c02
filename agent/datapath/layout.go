package datapath

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"
)

// LayoutVersion is the version of the pinned layout this binary makes: the
// names and definitions of its maps. It goes up by one whenever a map is
// added, removed or redefined (TestLayoutIsVersioned fails until it does),
// and the previous release's compiled objects are then frozen in
// test/layouts, so that upgrading from them stays tested.
//
//	1  everything before the layout map (the first release)
//	2  adds the layout map
//	3  adds the flows ring buffer (flow_event)
//	4  keys pending_tuples by the client's first sequence number instead
//	   of its port (the same sizes: the map is reused; see tuple_key_v3)
//	5  keeps a redirected socket's original destination in its own storage
//	   (the redirects sk_storage map) instead of orig_dsts, which stays
//	   for the sockets the previous release redirected and is no longer
//	   written; drops the sock_release program
//
// An agent that finds an older layout migrates it in place (see reopen); one
// that finds a newer layout refuses it unless Config.AllowDowngrade says
// otherwise.
const LayoutVersion = 5

// ErrNewerLayout is returned when the pins were made by a newer release than
// this binary: a downgrade.
var ErrNewerLayout = errors.New("pinned datapath has a newer layout than this version understands (a downgrade)")

// layoutKey is the layout map's only key.
const layoutKey = uint32(0)

// PinnedLayout returns the layout version of the pins in pinPath: 1 when
// they predate the layout map.
func PinnedLayout(pinPath string) (int, error) {
	m, err := ebpf.LoadPinnedMap(filepath.Join(pinPath, "layout"), &ebpf.LoadPinOptions{ReadOnly: true})
	if errors.Is(err, os.ErrNotExist) {
		if _, err := os.Stat(pinPath); err != nil {
			return 0, fmt.Errorf("%s: %w", pinPath, ErrNotInstalled)
		}
		return 1, nil
	}
	if err != nil {
		return 0, fmt.Errorf("open pinned layout map: %w", err)
	}
	defer m.Close()
	var v sluiceLayoutInfo
	if err := m.Lookup(layoutKey, &v); err != nil {
		return 0, fmt.Errorf("read pinned layout version: %w", err)
	}
	if v.Version == 0 {
		// Created but never written: an install or migration that did
		// not finish; the maps are this layout's or the one before.
		return 1, nil
	}
	return int(v.Version), nil
}

// copyable says whether the entries of old fit a map made from spec as they
// are: same type and key and value sizes, where only the capacity or flags
// differ. Per-CPU maps are not copied byte for byte here.
func copyable(spec *ebpf.MapSpec, old *ebpf.Map) bool {
	return copyableFrom(spec, &ebpf.MapSpec{Type: old.Type(), KeySize: old.KeySize(), ValueSize: old.ValueSize()})
}

func copyableFrom(spec, old *ebpf.MapSpec) bool {
	switch spec.Type {
	case ebpf.PerCPUHash, ebpf.PerCPUArray, ebpf.LRUCPUHash, ebpf.SkStorage, ebpf.RingBuf:
		return false
	}
	return spec.Type == old.Type && spec.KeySize == old.KeySize && spec.ValueSize == old.ValueSize
}

// copyEntries copies every entry of from into to. Entries the kernel adds to
// from while it runs may be missed: they belong to connections between the
// copy and the program switch, which the migration may lose (mid-handshake).
func copyEntries(from, to *ebpf.Map) (int, error) {
	key := make([]byte, from.KeySize())
	val := make([]byte, from.ValueSize())
	it := from.Iterate()
	n := 0
	for it.Next(&key, &val) {
		if err := to.Put(key, val); err != nil {
			return n, err
		}
		n++
	}
	return n, it.Err()
}

// describeLayout is the layout of spec's maps as text, one map per line:
// name, type, key and value types (with their members' offsets), capacity
// and flags. Two specs with the same description pin the same layout. The
// in-flight maps' capacity is the operator's choice, not the layout's.
func describeLayout(spec *ebpf.CollectionSpec) string {
	var lines []string
	for name, m := range spec.Maps {
		if strings.HasPrefix(name, ".") {
			continue
		}
		entries := fmt.Sprint(m.MaxEntries)
		if slices.Contains(inFlightMaps, name) {
			entries = "configurable"
		}
		lines = append(lines, fmt.Sprintf("%s %s key=%s value=%s max_entries=%s flags=%#x",
			name, m.Type, describeType(m.Key, m.KeySize), describeType(m.Value, m.ValueSize), entries, m.Flags))
	}
	sort.Strings(lines)
	return strings.Join(lines, "\n") + "\n"
}

func describeType(t btf.Type, size uint32) string {
	if t == nil {
		return fmt.Sprintf("[%d]byte", size)
	}
	sz, _ := btf.Sizeof(t)
	t = btf.UnderlyingType(t)
	s, ok := t.(*btf.Struct)
	if !ok {
		return fmt.Sprintf("%s(%d)", t.TypeName(), sz)
	}
	var ms []string
	for _, m := range s.Members {
		msz, _ := btf.Sizeof(m.Type)
		ms = append(ms, fmt.Sprintf("%s@%d:%d", m.Name, m.Offset.Bytes(), msz))
	}
	return fmt.Sprintf("%s(%d){%s}", s.Name, sz, strings.Join(ms, ","))
}
