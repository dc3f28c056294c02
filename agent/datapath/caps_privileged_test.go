package datapath

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sluice-io/sluice/test/testbed"
)

func TestMain(m *testing.M) {
	testbed.Main(m, map[string]testbed.Role{"install": installRole})
}

// installRole installs the datapath on args[0] pinned at args[1], programs
// it, and uninstalls it: everything the agent does with the kernel.
func installRole(args []string) int {
	cfg := Config{CgroupPath: args[0], PinPath: args[1]}
	err := func() error {
		if err := CheckKernel(); err != nil {
			return err
		}
		d, err := Open(cfg)
		if err != nil {
			return err
		}
		defer d.Close()
		if err := d.SetProxy(Proxy{IPv4: DefaultProxyIPv4, Port: DefaultProxyPort}); err != nil {
			return err
		}
		if err := d.SetWorkload(1, Workload{ID: 1}); err != nil {
			return err
		}
		if _, err := d.Counters(); err != nil {
			return err
		}
		return nil
	}()
	if uerr := Uninstall(cfg.PinPath); err == nil {
		err = uerr
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 0
}

// runWithCaps re-executes this test binary as root whose capability bounding
// set (and so permitted set after exec) holds only caps.
func runWithCaps(t *testing.T, caps []string, cfg Config) (string, error) {
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	bounding := "-all"
	for _, c := range caps {
		bounding += ",+" + strings.ToLower(strings.TrimPrefix(c, "CAP_"))
	}
	cmd := exec.Command("setpriv", "--bounding-set", bounding, "--", self, cfg.CgroupPath, cfg.PinPath)
	cmd.Env = append(os.Environ(), "SLUICE_TESTBED_ROLE=install")
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// The capabilities declared for this kernel alone are enough to install,
// program and uninstall the datapath, and each of CAP_BPF and CAP_NET_ADMIN
// is necessary. (CAP_SYS_RESOURCE is declared only before 5.11, where maps
// count against RLIMIT_MEMLOCK; CAP_PERFMON matters only on older
// verifiers: make test-kernels runs this test on 5.10, 6.1 and 6.12.)
func TestPrivilegedCapabilities(t *testing.T) {
	testbed.RequirePrivileged(t)
	if _, err := exec.LookPath("setpriv"); err != nil {
		if testbed.InCI() {
			t.Fatal("setpriv (util-linux) is required")
		}
		t.Skip("needs setpriv (util-linux)")
	}
	if err := EnsureBPFFS(DefaultBPFFS); err != nil {
		t.Fatal(err)
	}
	cg := testbed.NewRootCgroup(t, "sluice-caps")
	cfg := Config{CgroupPath: cg.Path, PinPath: filepath.Join(DefaultBPFFS, filepath.Base(cg.Path))}
	t.Cleanup(func() { Uninstall(cfg.PinPath) })

	var all []string
	for _, c := range RequiredCapabilities() {
		all = append(all, c.Name)
	}
	if out, err := runWithCaps(t, all, cfg); err != nil {
		t.Fatalf("with only %v: %v\n%s", all, err, out)
	}
	for _, drop := range []string{"CAP_BPF", "CAP_NET_ADMIN"} {
		var some []string
		for _, c := range all {
			if c != drop {
				some = append(some, c)
			}
		}
		if out, err := runWithCaps(t, some, cfg); err == nil {
			t.Errorf("installed without %s (had %v): the declared set overstates what is needed\n%s", drop, some, out)
		}
	}
}
