// Package testbed builds throwaway node/pod/external topologies out of network
// namespaces and cgroups, for the privileged tests, the benchmarks and the
// demo. Nothing it builds has a route off the machine, programs are only ever
// attached to cgroups it created, and everything is removed by t.Cleanup, by
// PID and by name, even when a test fails.
package testbed

import (
	"os"
	"testing"

	"golang.org/x/sys/unix"
)

// InCI reports whether we run under CI, where a test that cannot get the
// privileges it needs fails instead of skipping.
func InCI() bool { return os.Getenv("CI") == "true" }

// RequirePrivileged skips t (fails it under CI=true) unless the process is
// root on a kernel with cgroup v2 and BPF.
func RequirePrivileged(t testing.TB) {
	t.Helper()
	reason := ""
	switch {
	case os.Geteuid() != 0:
		reason = "needs root (run the privileged tests with sudo)"
	case !haveCgroup2():
		reason = "needs a cgroup v2 hierarchy"
	case !haveBPF():
		reason = "needs the bpf() syscall"
	}
	if reason == "" {
		return
	}
	if InCI() {
		t.Fatalf("privileged test cannot run under CI=true: %s", reason)
	}
	t.Skip(reason)
}

func haveCgroup2() bool {
	_, err := cgroup2Root()
	return err == nil
}

func haveBPF() bool {
	// BPF_PROG_LOAD with a bad attr fails with EINVAL/EFAULT when bpf()
	// exists, ENOSYS when not.
	_, _, errno := unix.Syscall(unix.SYS_BPF, 5, 0, 0)
	return errno != unix.ENOSYS && errno != unix.EPERM
}
