package testbed

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Cgroup is a cgroup v2 directory the testbed created.
type Cgroup struct {
	Path string
}

// cgroup2Root finds the cgroup2 mount from mountinfo: hybrid hosts mount it at
// /sys/fs/cgroup/unified.
func cgroup2Root() (string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return "", err
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		fields := strings.Fields(s.Text())
		for i, fld := range fields {
			if fld == "-" && i+1 < len(fields) && i >= 5 {
				if fields[i+1] == "cgroup2" {
					return fields[4], nil
				}
				break
			}
		}
	}
	return "", errors.New("no cgroup2 mount")
}

// NewRootCgroup creates a fresh cgroup under the cgroup2 mount named after
// the test, to attach programs to: never the machine's root cgroup.
func NewRootCgroup(t testing.TB, prefix string) *Cgroup {
	t.Helper()
	root, err := cgroup2Root()
	if err != nil {
		t.Fatalf("cgroup2: %v", err)
	}
	dir, err := os.MkdirTemp(root, prefix+"-")
	if err != nil {
		t.Fatalf("create test cgroup: %v", err)
	}
	cg := &Cgroup{Path: dir}
	t.Cleanup(func() { cg.remove(t) })
	return cg
}

// Child creates a child cgroup, removed by t.Cleanup.
func (c *Cgroup) Child(t testing.TB, name string) *Cgroup {
	t.Helper()
	dir := filepath.Join(c.Path, name)
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatalf("create cgroup %s: %v", dir, err)
	}
	cg := &Cgroup{Path: dir}
	t.Cleanup(func() { cg.remove(t) })
	return cg
}

// remove kills what still runs in the cgroup (by PID) and removes it.
func (c *Cgroup) remove(t testing.TB) {
	deadline := time.Now().Add(5 * time.Second)
	for {
		err := os.Remove(c.Path)
		if err == nil || errors.Is(err, os.ErrNotExist) {
			return
		}
		if !errors.Is(err, syscall.EBUSY) || time.Now().After(deadline) {
			t.Errorf("remove cgroup %s: %v", c.Path, err)
			return
		}
		for _, pid := range c.pids() {
			syscall.Kill(pid, syscall.SIGKILL)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (c *Cgroup) pids() []int {
	b, err := os.ReadFile(filepath.Join(c.Path, "cgroup.procs"))
	if err != nil {
		return nil
	}
	var out []int
	for _, f := range strings.Fields(string(b)) {
		var pid int
		if _, err := fmt.Sscan(f, &pid); err == nil {
			out = append(out, pid)
		}
	}
	return out
}
