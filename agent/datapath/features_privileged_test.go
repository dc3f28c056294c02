package datapath

import (
	"errors"
	"strings"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/sluice-io/sluice/test/testbed"
)

// This kernel has everything: CheckKernel passes, and each probe ran (a
// probe that cannot tell would have returned an error, not nil).
func TestPrivilegedCheckKernel(t *testing.T) {
	testbed.RequirePrivileged(t)
	if err := CheckKernel(); err != nil {
		t.Fatal(err)
	}
}

// A probe for an attach type no kernel knows reports it missing, so the
// attach-type probes can fail.
func TestPrivilegedAttachTypeProbeCanFail(t *testing.T) {
	testbed.RequirePrivileged(t)
	err := attachType(ebpf.CGroupSockAddr, 0xffff)()
	if !errors.Is(err, ebpf.ErrNotSupported) {
		t.Fatalf("unknown attach type: err = %v, want ErrNotSupported", err)
	}
}

func TestMissingFeatureErrorNamesEach(t *testing.T) {
	var missing []Requirement
	for _, r := range Requirements {
		if strings.Contains(r.Name, "getpeername4") || strings.Contains(r.Name, "sk_storage_delete") {
			missing = append(missing, r)
		}
	}
	err := error(&MissingFeatureError{Kernel: "5.4.0-1", Missing: missing})
	var mf *MissingFeatureError
	if !errors.As(err, &mf) {
		t.Fatal("not a MissingFeatureError")
	}
	for _, want := range []string{"kernel 5.4.0-1", "cgroup/getpeername4 (Linux 5.8+)", "bpf_sk_storage_delete in cgroup/connect (Linux 5.3+)", "Linux 5.8 or later"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error lacks %q:\n%s", want, err)
		}
	}
}

// On a hybrid host (this machine kind: /sys/fs/cgroup is a tmpfs of v1
// hierarchies, v2 at unified/), the host's /sys/fs/cgroup resolves to its
// v2 hierarchy; on a v2-only host it is itself.
func TestPrivilegedResolveCgroup2(t *testing.T) {
	mount, err := Cgroup2Mount()
	if err != nil {
		t.Fatal(err)
	}
	got, err := ResolveCgroup2("/sys/fs/cgroup")
	if err != nil || got != mount {
		t.Fatalf("ResolveCgroup2(/sys/fs/cgroup) = %q, %v; the cgroup v2 mount is %s", got, err, mount)
	}
	if _, err := ResolveCgroup2("/proc"); err == nil {
		t.Error("/proc resolved to a cgroup v2 hierarchy")
	}
}
