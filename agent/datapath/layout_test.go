package datapath

import (
	"embed"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/sluice-io/sluice/test/layouts"
)

var updateLayout = flag.Bool("update-layout", false, "rewrite testdata/layout-<LayoutVersion>.txt from the compiled spec")

// The records are embedded: the kernel matrix runs this test binary in a
// VM without the source tree.
//
//go:embed testdata/layout-*.txt
var layoutRecords embed.FS

func layoutFile(v int) string { return filepath.Join("testdata", fmt.Sprintf("layout-%d.txt", v)) }

func readLayout(v int) ([]byte, error) {
	return layoutRecords.ReadFile(fmt.Sprintf("testdata/layout-%d.txt", v))
}

// The compiled maps are exactly the layout LayoutVersion names: a change to
// a map (added, removed, redefined) fails here until LayoutVersion goes up,
// its description is recorded, and the previous objects are frozen.
func TestLayoutIsVersioned(t *testing.T) {
	spec, err := loadSpec()
	if err != nil {
		t.Fatal(err)
	}
	got := describeLayout(spec)
	if *updateLayout {
		if err := os.WriteFile(layoutFile(LayoutVersion), []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := readLayout(LayoutVersion)
	if *updateLayout {
		want, err = os.ReadFile(layoutFile(LayoutVersion))
	}
	if err != nil {
		t.Fatalf("no recorded layout %d: %v", LayoutVersion, err)
	}
	if got != string(want) {
		t.Fatalf("the compiled maps are not layout %d as recorded in %s.\nIf the change is meant: freeze the previous object in test/layouts, bump LayoutVersion, run go test -run TestLayoutIsVersioned -update-layout.\ngot:\n%s\nrecorded:\n%s",
			LayoutVersion, layoutFile(LayoutVersion), got, want)
	}
}

// Every earlier layout is frozen (so upgrading from it is tested), is what
// its record says, and differs from the next by changes the migration in
// reopen knows how to make: every map both have is either unchanged or
// copyable.
func TestEveryEarlierLayoutIsFrozenAndMigratable(t *testing.T) {
	cur, err := loadSpec()
	if err != nil {
		t.Fatal(err)
	}
	var want []int
	for v := 1; v < LayoutVersion; v++ {
		want = append(want, v)
	}
	if got := layouts.Versions(); !slices.Equal(got, want) {
		t.Fatalf("frozen layouts %v, want %v", got, want)
	}
	for _, v := range want {
		old, err := layouts.Spec(v)
		if err != nil {
			t.Fatal(err)
		}
		rec, err := readLayout(v)
		if err != nil {
			t.Fatal(err)
		}
		if got := describeLayout(old); got != string(rec) {
			t.Errorf("frozen layout %d is not its record %s:\n%s", v, layoutFile(v), got)
		}
		for name, ms := range cur.Maps {
			om, ok := old.Maps[name]
			if !ok || slices.Contains(inFlightMaps, name) && sameDefinition(ms, om, true) {
				continue
			}
			if !sameDefinition(ms, om, false) && !copyableFrom(ms, om) {
				t.Errorf("map %s changed from layout %d with no migration: %+v -> %+v", name, v, om, ms)
			}
		}
	}
}

func sameDefinition(a, b *ebpf.MapSpec, ignoreEntries bool) bool {
	return a.Type == b.Type && a.KeySize == b.KeySize && a.ValueSize == b.ValueSize && a.Flags == b.Flags &&
		(ignoreEntries || a.MaxEntries == b.MaxEntries)
}
