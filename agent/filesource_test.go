package agent

import (
	"context"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

const goodFile = `
workloads:
  - name: web
    namespace: shop
    cgroup: system.slice/web.service
    ips: [10.0.0.5, "fd00::5", "::ffff:10.0.0.6"]
    labels:
      sluice.io/mode: enforce
    annotations:
      sluice.io/allow: "api.github.com:443"
  - name: batch
    cgroup: /sys/fs/cgroup/system.slice/batch.service
`

func TestParseWorkloadFile(t *testing.T) {
	ws, err := ParseWorkloadFile([]byte(goodFile), "/sys/fs/cgroup")
	if err != nil {
		t.Fatal(err)
	}
	if len(ws) != 2 {
		t.Fatalf("%d workloads", len(ws))
	}
	w := ws[0]
	if w.Key() != "shop/web" || w.CgroupPath != "/sys/fs/cgroup/system.slice/web.service" ||
		w.Labels["sluice.io/mode"] != "enforce" || w.Annotations["sluice.io/allow"] != "api.github.com:443" {
		t.Fatalf("workload %+v", w)
	}
	want := []netip.Addr{netip.MustParseAddr("10.0.0.5"), netip.MustParseAddr("fd00::5"), netip.MustParseAddr("10.0.0.6")}
	if len(w.IPs) != 3 || w.IPs[0] != want[0] || w.IPs[1] != want[1] || w.IPs[2] != want[2] {
		t.Fatalf("ips %v, want %v (v4-mapped unmapped)", w.IPs, want)
	}
	if ws[1].Key() != "batch" || ws[1].CgroupPath != "/sys/fs/cgroup/system.slice/batch.service" {
		t.Fatalf("workload %+v", ws[1])
	}
}

func TestParseWorkloadFileErrors(t *testing.T) {
	for _, tc := range []struct{ name, file, want string }{
		{"unknown field", "workloads:\n- name: a\n  cgroup: x\n  cgroups: y\n", `unknown field "cgroups"`},
		{"not yaml", "workloads: [", "workloads file"},
		{"no name", "workloads:\n- cgroup: x\n", "workloads[0] (): name is required"},
		{"bad name", "workloads:\n- name: Web_1\n  cgroup: x\n", `name "Web_1": character 'W'`},
		{"no cgroup", "workloads:\n- name: a\n", "workloads[0] (a): cgroup is required"},
		{"escape", "workloads:\n- name: a\n  cgroup: ../../etc\n", "is not below the cgroup v2 mount"},
		{"absolute elsewhere", "workloads:\n- name: a\n  cgroup: /tmp/x\n", "is not below the cgroup v2 mount"},
		{"root cgroup", "workloads:\n- name: a\n  cgroup: /sys/fs/cgroup/\n", "is not below the cgroup v2 mount"},
		{"bad ip", "workloads:\n- name: a\n  cgroup: x\n  ips: [10.0.0.300]\n", `ips[0] "10.0.0.300": not an IP address`},
		{"duplicate", "workloads:\n- name: a\n  cgroup: x\n- name: a\n  cgroup: y\n", "workloads[1]: a is also workloads[0]"},
		{"too big", "workloads: []\n" + strings.Repeat("#", MaxWorkloadFileBytes), "more than"},
	} {
		ws, err := ParseWorkloadFile([]byte(tc.file), "/sys/fs/cgroup")
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: err = %v, want %q", tc.name, err, tc.want)
		}
		if ws != nil {
			t.Errorf("%s: workloads returned with an error", tc.name)
		}
	}
}

// Every bad workload is reported, not just the first.
func TestParseWorkloadFileReportsAll(t *testing.T) {
	_, err := ParseWorkloadFile([]byte("workloads:\n- name: a\n- name: B\n  cgroup: x\n"), "/sys/fs/cgroup")
	if err == nil || !strings.Contains(err.Error(), "workloads[0]") || !strings.Contains(err.Error(), "workloads[1]") {
		t.Fatalf("err = %v", err)
	}
}

func FuzzParseWorkloadFile(f *testing.F) {
	f.Add([]byte(goodFile))
	f.Add([]byte("workloads:\n- name: a\n  cgroup: ../x\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		ws, err := ParseWorkloadFile(data, "/sys/fs/cgroup")
		if err != nil {
			return
		}
		for _, w := range ws {
			if !strings.HasPrefix(w.CgroupPath, "/sys/fs/cgroup/") || strings.Contains(w.CgroupPath, "/../") {
				t.Fatalf("accepted cgroup %q outside the mount", w.CgroupPath)
			}
			if checkName("name", w.Name, true) != nil || checkName("namespace", w.Namespace, false) != nil {
				t.Fatalf("accepted bad name %q/%q", w.Namespace, w.Name)
			}
			for _, ip := range w.IPs {
				if !ip.IsValid() || ip.Is4In6() || ip.Zone() != "" {
					t.Fatalf("accepted ip %v", ip)
				}
			}
		}
	})
}

// The source applies the first version, then each changed good version;
// a broken version is reported once and changes nothing.
func TestFileSourceReload(t *testing.T) {
	path := filepath.Join(t.TempDir(), "workloads.yaml")
	write := func(s string) {
		t.Helper()
		tmp := path + ".tmp"
		if err := os.WriteFile(tmp, []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, path); err != nil { // as editors and config management do
			t.Fatal(err)
		}
	}
	write("workloads:\n- name: a\n  cgroup: x\n")
	var (
		mu      sync.Mutex
		applied [][]Workload
		errs    []error
	)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	src := FileSource{Path: path, CgroupMount: "/sys/fs/cgroup", Interval: 10 * time.Millisecond}
	done := make(chan error, 1)
	go func() {
		done <- src.Run(ctx, func(ws []Workload) {
			mu.Lock()
			applied = append(applied, ws)
			mu.Unlock()
		}, func(err error) {
			mu.Lock()
			errs = append(errs, err)
			mu.Unlock()
		})
	}()
	wait := func(what string, cond func() bool) {
		t.Helper()
		deadline := time.Now().Add(5 * time.Second)
		for {
			mu.Lock()
			ok := cond()
			mu.Unlock()
			if ok {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("timed out waiting for %s", what)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	wait("first load", func() bool { return len(applied) == 1 })
	write("workloads:\n- name: a\n  cgroup: x\n- name: b\n  cgroup: y\n")
	wait("reload", func() bool { return len(applied) == 2 && len(applied[1]) == 2 })
	write("workloads:\n- name: a\n  cgroup: ../../escape\n")
	wait("error report", func() bool { return len(errs) == 1 })
	time.Sleep(100 * time.Millisecond) // ten more checks
	mu.Lock()
	if len(errs) != 1 || len(applied) != 2 {
		t.Fatalf("after a broken version: %d errors (want 1), %d applies (want 2)", len(errs), len(applied))
	}
	mu.Unlock()
	write("workloads: []\n")
	wait("recovery", func() bool { return len(applied) == 3 && len(applied[2]) == 0 })
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

func TestFileSourceFirstLoadMustSucceed(t *testing.T) {
	src := FileSource{Path: filepath.Join(t.TempDir(), "missing.yaml"), CgroupMount: "/sys/fs/cgroup"}
	err := src.Run(context.Background(), func([]Workload) { t.Fatal("applied") }, func(error) {})
	if err == nil || !strings.Contains(err.Error(), "no such file") {
		t.Fatalf("err = %v", err)
	}
}
