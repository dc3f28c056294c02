package testbed

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Role is a program the test binary can become when re-executed inside a
// pod's cgroup and network namespace (see Main and Start).
type Role func(args []string) int

const roleEnv = "SLUICE_TESTBED_ROLE"

// Main is the TestMain of packages that use the testbed: when the binary was
// started as a role it runs that role and exits; otherwise it runs the tests.
// The "client" role is always available.
func Main(m interface{ Run() int }, roles map[string]Role) {
	if name := os.Getenv(roleEnv); name != "" {
		all := map[string]Role{"client": clientMain, "hold": holdMain, "stream": streamMain, "reuse": reuseMain, "pending": pendingMain, "httpget": httpgetMain, "stale": staleMain}
		for k, v := range roles {
			all[k] = v
		}
		r, ok := all[name]
		if !ok {
			fmt.Fprintf(os.Stderr, "unknown testbed role %q\n", name)
			os.Exit(2)
		}
		os.Exit(r(os.Args[1:]))
	}
	code := m.Run()
	atExitMu.Lock()
	hooks := atExit
	atExitMu.Unlock()
	for i := len(hooks) - 1; i >= 0; i-- {
		hooks[i]()
	}
	os.Exit(code)
}

var (
	atExitMu sync.Mutex
	atExit   []func()
)

// AtExit runs f when Main's tests are done, last registered first: for
// what outlives one test (a binary built once per test process).
func AtExit(f func()) {
	atExitMu.Lock()
	atExit = append(atExit, f)
	atExitMu.Unlock()
}

// Command returns a command that runs role (this test binary, re-executed)
// in cgroup cg and network namespace ns. The process is placed in the cgroup
// at clone time (CLONE_INTO_CGROUP), before it creates any socket, and only
// then enters the namespace: `ip netns exec` would remount /sys and hide the
// cgroup2 mount.
func Command(t testing.TB, cg *Cgroup, ns *Netns, role string, args ...string) *exec.Cmd {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatalf("find test binary: %v", err)
	}
	cmd := ExecCommand(t, cg, ns, self, args...)
	cmd.Env = append(cmd.Env, roleEnv+"="+role)
	return cmd
}

// ExecCommand is Command for another program (sluice itself, say): it
// runs path in cgroup cg and network namespace ns.
func ExecCommand(t testing.TB, cg *Cgroup, ns *Netns, path string, args ...string) *exec.Cmd {
	t.Helper()
	dir, err := os.Open(cg.Path)
	if err != nil {
		t.Fatalf("open cgroup: %v", err)
	}
	t.Cleanup(func() { dir.Close() })
	cmd := exec.Command("nsenter", append([]string{"--net=" + ns.Path(), "--", path}, args...)...)
	cmd.Env = os.Environ()
	cmd.SysProcAttr = &syscall.SysProcAttr{
		UseCgroupFD: true,
		CgroupFD:    int(dir.Fd()),
		Pdeathsig:   syscall.SIGKILL,
	}
	return cmd
}

// Run runs a role to completion (at most timeout) and returns its stdout.
func Run(t testing.TB, timeout time.Duration, cg *Cgroup, ns *Netns, role string, args ...string) []byte {
	t.Helper()
	cmd := Command(t, cg, ns, role, args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", role, err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("%s %v: %v\nstderr: %s", role, args, err, stderr.String())
		}
	case <-time.After(timeout):
		cmd.Process.Kill()
		<-done
		t.Fatalf("%s %v: still running after %v\nstderr: %s", role, args, timeout, stderr.String())
	}
	return stdout.Bytes()
}

// Daemon is a role running in the background until the test ends.
type Daemon struct {
	Cmd    *exec.Cmd
	Stderr *bytes.Buffer
	done   chan error
	ready  chan bool
	once   sync.Once
}

// StartDaemon starts a role that prints "READY" on its stdout once it serves,
// waits for that line, and kills the process (by PID) when the test ends.
func StartDaemon(t testing.TB, cg *Cgroup, ns *Netns, role string, args ...string) *Daemon {
	t.Helper()
	return StartCmd(t, role, Command(t, cg, ns, role, args...))
}

// StartCmd starts cmd as a daemon: it must print "READY" on stdout once it
// serves; it is killed (by PID) when the test ends.
func StartCmd(t testing.TB, role string, cmd *exec.Cmd) *Daemon {
	t.Helper()
	d := LaunchCmd(t, role, cmd)
	select {
	case ok := <-d.ready:
		if !ok {
			t.Fatalf("%s exited before READY: %s", role, d.Stderr.String())
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("%s not READY after 10s: %s", role, d.Stderr.String())
	}
	return d
}

// LaunchCmd is StartCmd without waiting for READY: Ready says when (and
// whether) it came.
func LaunchCmd(t testing.TB, role string, cmd *exec.Cmd) *Daemon {
	t.Helper()
	d := &Daemon{Cmd: cmd, Stderr: &bytes.Buffer{}, done: make(chan error, 1), ready: make(chan bool, 1)}
	cmd.Stderr = d.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", role, err)
	}
	go func() { d.done <- cmd.Wait() }()
	t.Cleanup(d.Stop)

	go func() {
		s := bufio.NewScanner(out)
		ok := false
		for s.Scan() {
			if f := strings.Fields(s.Text()); len(f) > 0 && f[0] == "READY" {
				ok = true
				break
			}
		}
		d.ready <- ok
		io.Copy(io.Discard, out)
	}()
	return d
}

// Ready receives true once the daemon printed READY, false if it exited
// first (once).
func (d *Daemon) Ready() <-chan bool { return d.ready }

// Signal sends sig to the daemon and waits up to timeout for it to exit;
// it returns the exit error (nil for a clean exit).
func (d *Daemon) Signal(sig os.Signal, timeout time.Duration) error {
	if err := d.Cmd.Process.Signal(sig); err != nil {
		return err
	}
	var err error
	d.once.Do(func() {
		select {
		case err = <-d.done:
		case <-time.After(timeout):
			d.Cmd.Process.Kill()
			<-d.done
			err = fmt.Errorf("still running %v after %v", sig, timeout)
		}
	})
	return err
}

// Stop kills the daemon and waits for it; calling it twice is fine.
func (d *Daemon) Stop() {
	d.once.Do(func() {
		d.Cmd.Process.Kill()
		select {
		case <-d.done:
		case <-time.After(5 * time.Second):
		}
	})
}

// StartPiped starts cmd with pipes to its stdin and from its stdout: for
// roles that report on stdout and wait on stdin (hold, pending).
func StartPiped(t testing.TB, cmd *exec.Cmd) (io.WriteCloser, io.Reader) {
	t.Helper()
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", cmd.Path, err)
	}
	return stdin, stdout
}

// LineReader returns a function that reads the next line r prints (say, a
// "hold" client's), failing the test after timeout; "EOF" when r ended.
func LineReader(r io.Reader, timeout time.Duration) func(t testing.TB) string {
	lines := bufio.NewScanner(r)
	return func(t testing.TB) string {
		t.Helper()
		got := make(chan string, 1)
		go func() {
			if lines.Scan() {
				got <- lines.Text()
			} else {
				got <- "EOF"
			}
		}()
		select {
		case l := <-got:
			return l
		case <-time.After(timeout):
			t.Fatalf("no line for %v", timeout)
			return ""
		}
	}
}
