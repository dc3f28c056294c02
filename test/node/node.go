// Package node runs a real one-node Kubernetes node for the tests: etcd and
// kube-apiserver (test/kube), containerd with runc and the CNI bridge
// plugin (Debian's, installed with apt when missing), and the kubelet
// built from the Go module proxy next to the API server (test/k8s), all in
// a network namespace of their own with a dedicated cgroup root. Nothing is
// sent off the machine. Everything it starts or creates (processes,
// containers, network namespaces, cgroups, mounts, host paths) is removed
// when the test ends, failed or not.
package node

import (
	"bufio"
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/sluice-io/sluice/agent/datapath"
	"github.com/sluice-io/sluice/test/harness"
	"github.com/sluice-io/sluice/test/kube"
	"github.com/sluice-io/sluice/test/testbed"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// Name is the Node object's name.
const Name = "sluice-node"

// PauseImage is the sandbox image the node's containerd uses.
const PauseImage = "sluice.local/pause:test"

// Node is a running node.
type Node struct {
	Netns   *testbed.Netns
	Cluster *kube.Cluster
	Dir     string
	// CgroupRoot is the kubelet's --cgroup-root; pods are below it, at
	// <cgroup v2 mount><CgroupRoot>/kubepods/...
	CgroupRoot string
	// Cgroup2 is the cgroup v2 mount.
	Cgroup2 string
	IP      netip.Addr
	sock    string
	mntns   string // the node's mount namespace (containerd's, the kubelet's)
}

func goarch() string { return runtime.GOARCH }

// binaries are the node's Kubernetes components.
type binaries struct{ kubelet, controllerManager, scheduler string }

// Binaries finds the kubelet, kube-controller-manager and kube-scheduler:
// next to the API server test/k8s/build.sh built. why is set when
// something is missing.
func Binaries() (b binaries, why string) {
	apiserver, _, why := kube.Binaries()
	if why != "" {
		return b, why
	}
	dir := filepath.Dir(apiserver)
	b = binaries{filepath.Join(dir, "kubelet"), filepath.Join(dir, "kube-controller-manager"), filepath.Join(dir, "kube-scheduler")}
	for _, p := range []string{b.kubelet, b.controllerManager, b.scheduler} {
		if _, err := os.Stat(p); err != nil {
			return b, fmt.Sprintf("no %s next to %s (test/k8s/build.sh builds it): %v", filepath.Base(p), apiserver, err)
		}
	}
	for _, bin := range []string{"containerd", "runc", "ctr", "/usr/lib/cni/bridge", "/usr/lib/cni/host-local", "/usr/lib/cni/loopback"} {
		if _, err := exec.LookPath(bin); err != nil {
			return binaries{}, fmt.Sprintf("%s missing (apt-get install containerd runc containernetworking-plugins; make test does)", bin)
		}
	}
	return b, ""
}

// Start starts a node and waits until it is Ready. images are
// docker-archive tarballs to import into the node's containerd (the pause
// image, PauseImage, is built and imported here).
func Start(t testing.TB, images ...string) *Node {
	t.Helper()
	testbed.RequirePrivileged(t)
	bins, why := Binaries()
	if why != "" {
		if os.Getenv("CI") == "true" {
			t.Fatalf("no real node under CI=true: %s", why)
		}
		t.Skip(why)
	}
	id := testbed.RandomID()
	n := &Node{Netns: testbed.NewNetns(t, "sluice-kn-"+id), Dir: t.TempDir(), CgroupRoot: "/sluice-kn-" + id,
		IP: netip.MustParseAddr("10.99.0.1")}
	n.sock = filepath.Join(n.Dir, "containerd", "containerd.sock")
	// The node's address sits on an empty bridge: this kernel has no dummy
	// links. No route leaves the namespace.
	n.Netns.IP(t, "link", "add", "kn0", "type", "bridge")
	n.Netns.IP(t, "addr", "add", n.IP.String()+"/24", "dev", "kn0")
	n.Netns.IP(t, "link", "set", "kn0", "up")
	n.Cluster = kube.Start(t, n.Netns)

	hostPaths := preexisting("/var/lib/kubelet", "/var/log/containers", "/run/containerd", "/var/log/pods")
	netnsBefore := cniNetns()
	cgs := cgroupHierarchies(t)
	for _, c := range cgs {
		if c.v2 {
			n.Cgroup2 = c.path
		}
	}
	if n.Cgroup2 == "" {
		t.Fatal("no cgroup v2 mount")
	}
	var procs []*exec.Cmd
	var once sync.Once
	down := func(logf func(string, ...any)) {
		once.Do(func() { n.teardown(logf, t.Failed(), procs, cgs, hostPaths, netnsBefore) })
	}
	t.Cleanup(func() { down(t.Logf); unregister(n) })
	register(n, func() {
		down(func(f string, a ...any) { fmt.Fprintf(os.Stderr, f+"\n", a...) })
		// t.Cleanup will not run: the namespace and etcd's data go too.
		exec.Command("ip", "netns", "delete", n.Netns.Name).Run()
		os.RemoveAll(n.Cluster.EtcdDir)
	})
	for _, c := range cgs {
		dir := filepath.Join(c.path, n.CgroupRoot)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		if c.cpuset {
			for _, f := range []string{"cpuset.cpus", "cpuset.mems"} {
				b, _ := os.ReadFile(filepath.Join(c.path, f))
				if err := os.WriteFile(filepath.Join(dir, f), b, 0o644); err != nil {
					t.Fatal(err)
				}
			}
		}
	}

	n.writeConfigs(t, len(cgs) > 1)
	// The node's mount namespace: the host's mounts (as a slave: nothing
	// the node mounts reaches the host, and all of it goes with the
	// namespace), with /sys/fs/bpf a shared mount, as systemd makes it on
	// real nodes. The DaemonSet's bpffs init container mounts it
	// Bidirectional, which containerd refuses on a private mount.
	if err := datapath.EnsureBPFFS(datapath.DefaultBPFFS); err != nil {
		t.Fatal(err)
	}
	mntns := exec.Command("unshare", "--mount", "--propagation", "slave", "--", "sh", "-c",
		"mount --make-shared "+datapath.DefaultBPFFS+" && echo ready && exec sleep infinity")
	mntns.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	out, err := mntns.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := mntns.Start(); err != nil {
		t.Fatalf("node mount namespace: %v", err)
	}
	procs = append(procs, mntns)
	if l, err := bufio.NewReader(out).ReadString('\n'); err != nil || l != "ready\n" {
		t.Fatalf("node mount namespace: %q %v", l, err)
	}
	n.mntns = fmt.Sprintf("/proc/%d/ns/mnt", mntns.Process.Pid)
	procs = append(procs, n.start(t, "containerd", "containerd", "--config", filepath.Join(n.Dir, "containerd", "config.toml")))
	harness.WaitFor(t, "containerd", 20*time.Second, func() bool { _, err := n.ctr("version"); return err == nil })

	pause := filepath.Join(n.Dir, "pause.tar")
	BuildImage(t, PauseImage, []string{"/pause"}, pause, ImageFile{Path: "/pause", From: buildStatic(t, n.Dir, "./test/cmd/pause"), Mode: 0o755})
	for _, img := range append([]string{pause}, images...) {
		if out, err := n.ctr("images", "import", "--all-platforms", img); err != nil {
			t.Fatalf("import %s: %v\n%s", img, err, out)
		}
	}

	// Only the DaemonSet controller of kube-controller-manager, and the
	// scheduler that binds DaemonSet pods: the tests' own pods set
	// spec.nodeName.
	procs = append(procs, n.start(t, "kube-controller-manager", bins.controllerManager, "--kubeconfig", n.Cluster.Kubeconfig,
		"--controllers=daemonset", "--leader-elect=false", "--use-service-account-credentials=false",
		"--bind-address=127.0.0.1", fmt.Sprintf("--secure-port=%d", kube.FreePort(t)), "--cert-dir", filepath.Join(n.Dir, "kcm")))
	procs = append(procs, n.start(t, "kube-scheduler", bins.scheduler, "--kubeconfig", n.Cluster.Kubeconfig,
		"--leader-elect=false", "--bind-address=127.0.0.1", fmt.Sprintf("--secure-port=%d", kube.FreePort(t)), "--cert-dir", filepath.Join(n.Dir, "scheduler")))
	procs = append(procs, n.start(t, "kubelet", bins.kubelet, "--config", filepath.Join(n.Dir, "kubelet-config.yaml"),
		"--kubeconfig", n.Cluster.Kubeconfig, "--root-dir", filepath.Join(n.Dir, "kubelet"), "--cert-dir", filepath.Join(n.Dir, "kubelet", "pki"),
		"--hostname-override", Name, "--node-ip", n.IP.String(), "-v=2"))
	started := time.Now()
	harness.WaitFor(t, "the node Ready", 60*time.Second, func() bool {
		nd, err := n.Cluster.Client.CoreV1().Nodes().Get(context.Background(), Name, metav1.GetOptions{})
		if err != nil {
			return false
		}
		for _, c := range nd.Status.Conditions {
			if c.Type == corev1.NodeReady && c.Status == corev1.ConditionTrue {
				return true
			}
		}
		return false
	})
	t.Logf("node %s Ready %v after the kubelet started", Name, time.Since(started).Round(10*time.Millisecond))
	return n
}

// WaitRunning waits until a pod runs and returns it.
func (n *Node) WaitRunning(t testing.TB, namespace, name string) *corev1.Pod {
	t.Helper()
	var pod *corev1.Pod
	harness.WaitFor(t, "pod "+namespace+"/"+name+" Running", 60*time.Second, func() bool {
		p, err := n.Cluster.Client.CoreV1().Pods(namespace).Get(context.Background(), name, metav1.GetOptions{})
		if err != nil {
			return false
		}
		pod = p
		return p.Status.Phase == corev1.PodRunning
	})
	return pod
}

func (n *Node) ctr(args ...string) (string, error) {
	out, err := exec.Command("ctr", append([]string{"--address", n.sock, "-n", "k8s.io"}, args...)...).CombinedOutput()
	return string(out), err
}

// start runs a daemon in the node's network namespace (nsenter, not `ip
// netns exec`, which remounts /sys) with its log in the node's directory.
func (n *Node) start(t testing.TB, name, bin string, args ...string) *exec.Cmd {
	t.Helper()
	logPath := filepath.Join(n.Dir, name+".log")
	log, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	ns := []string{"--net=" + n.Netns.Path()}
	if n.mntns != "" {
		ns = append(ns, "--mount="+n.mntns)
	}
	cmd := exec.Command("nsenter", append(append(ns, "--", bin), args...)...)
	cmd.Stdout, cmd.Stderr = log, log
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", name, err)
	}
	return cmd
}

// teardown removes everything Start made, in order: the pods (so the
// kubelet stops their containers), the kubelet, every container and shim,
// containerd, mounts, the CNI network namespaces, the cgroups, and the host
// paths the kubelet and containerd hard-code when they did not exist
// before.
func (n *Node) teardown(logf func(string, ...any), failed bool, procs []*exec.Cmd, cgs []hierarchy, hostPaths map[string]bool, netnsBefore map[string]bool) {
	ctx := context.Background()
	zero := int64(0)
	if n.Cluster != nil {
		nss, _ := n.Cluster.Client.CoreV1().Namespaces().List(ctx, metav1.ListOptions{})
		for _, ns := range nss.Items {
			// DaemonSets first, or their controller makes new pods.
			_ = n.Cluster.Client.AppsV1().DaemonSets(ns.Name).DeleteCollection(ctx, metav1.DeleteOptions{}, metav1.ListOptions{})
		}
		for _, ns := range nss.Items {
			_ = n.Cluster.Client.CoreV1().Pods(ns.Name).DeleteCollection(ctx, metav1.DeleteOptions{GracePeriodSeconds: &zero}, metav1.ListOptions{})
		}
		deadline := time.Now().Add(20 * time.Second)
		for time.Now().Before(deadline) {
			if out, err := n.ctr("tasks", "ls", "-q"); err != nil || strings.TrimSpace(out) == "" {
				break
			}
			time.Sleep(250 * time.Millisecond)
		}
	}
	stop := func(c *exec.Cmd) {
		if c == nil || c.Process == nil {
			return
		}
		_ = c.Process.Signal(syscall.SIGTERM)
		done := make(chan struct{})
		go func() { c.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			c.Process.Kill()
			<-done
		}
	}
	for i := len(procs) - 1; i >= 0; i-- {
		if strings.Contains(strings.Join(procs[i].Args, " "), "containerd --config") {
			// Whatever the kubelet left: kill and delete every task and
			// container while containerd still answers.
			if out, err := n.ctr("tasks", "ls", "-q"); err == nil {
				for _, id := range strings.Fields(out) {
					n.ctr("tasks", "kill", "-s", "SIGKILL", id)
				}
				time.Sleep(300 * time.Millisecond)
				for _, id := range strings.Fields(out) {
					n.ctr("tasks", "delete", "-f", id)
				}
			}
			if out, err := n.ctr("containers", "ls", "-q"); err == nil {
				for _, id := range strings.Fields(out) {
					n.ctr("containers", "delete", id)
				}
			}
		}
		stop(procs[i])
	}
	// Shims reparent to init: find them by the node's socket in their
	// command line.
	for _, pid := range pidsWith(n.sock) {
		syscall.Kill(pid, syscall.SIGKILL)
	}
	for _, m := range mountsUnder(n.Dir, "/run/containerd", "/run/netns/cni-") {
		if err := syscall.Unmount(m, syscall.MNT_DETACH); err != nil {
			logf("unmount %s: %v", m, err)
		}
	}
	for ns := range cniNetns() {
		if !netnsBefore[ns] {
			syscall.Unmount(ns, syscall.MNT_DETACH)
			os.Remove(ns)
		}
	}
	for _, c := range cgs {
		removeCgroupTree(logf, filepath.Join(c.path, n.CgroupRoot))
	}
	for p, existed := range hostPaths {
		if !existed {
			os.RemoveAll(p)
		}
	}
	if failed {
		for _, name := range []string{"kubelet", "containerd", "kube-controller-manager", "kube-scheduler"} {
			b, _ := os.ReadFile(filepath.Join(n.Dir, name+".log"))
			if len(b) > 6000 {
				b = b[len(b)-6000:]
			}
			logf("%s log (tail):\n%s", name, b)
		}
	}
}

// Running nodes' teardowns, for TestMain's signal handler: a test binary
// stopped by SIGTERM or SIGINT runs no t.Cleanup.
var (
	liveMu sync.Mutex
	live   = map[*Node]func(){}
)

func register(n *Node, down func()) {
	liveMu.Lock()
	live[n] = down
	liveMu.Unlock()
}

func unregister(n *Node) {
	liveMu.Lock()
	delete(live, n)
	liveMu.Unlock()
}

// Main is TestMain for packages that start nodes: on SIGTERM or SIGINT it
// tears every running node down before exiting (143).
func Main(m interface{ Run() int }) {
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		s := <-sig
		fmt.Fprintf(os.Stderr, "node: %v: tearing the nodes down\n", s)
		liveMu.Lock()
		downs := make([]func(), 0, len(live))
		for _, d := range live {
			downs = append(downs, d)
		}
		liveMu.Unlock()
		for _, d := range downs {
			d()
		}
		os.Exit(143)
	}()
	testbed.Main(m, nil)
}

func preexisting(paths ...string) map[string]bool {
	out := map[string]bool{}
	for _, p := range paths {
		_, err := os.Lstat(p)
		out[p] = err == nil
	}
	return out
}

func cniNetns() map[string]bool {
	out := map[string]bool{}
	ms, _ := filepath.Glob("/run/netns/cni-*")
	for _, m := range ms {
		out[m] = true
	}
	return out
}

// pidsWith lists processes whose command line contains s.
func pidsWith(s string) []int {
	var out []int
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		var pid int
		if _, err := fmt.Sscanf(e.Name(), "%d", &pid); err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err == nil && strings.Contains(string(b), s) {
			out = append(out, pid)
		}
	}
	return out
}

// mountsUnder lists mount points under any of the prefixes, deepest first.
func mountsUnder(prefixes ...string) []string {
	f, err := os.Open("/proc/self/mounts")
	if err != nil {
		return nil
	}
	defer f.Close()
	var out []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fs := strings.Fields(sc.Text())
		if len(fs) < 2 {
			continue
		}
		for _, p := range prefixes {
			if strings.HasPrefix(fs[1], p) {
				out = append(out, fs[1])
			}
		}
	}
	for i, j := 0, len(out)-1; i < j; i, j = i+1, j-1 {
		out[i], out[j] = out[j], out[i]
	}
	return out
}

type hierarchy struct {
	path   string
	v2     bool
	cpuset bool
}

// cgroupHierarchies lists the cgroup mounts under /sys/fs/cgroup: every
// v1 hierarchy and the v2 one (hybrid hosts have both; the kubelet and
// runc create a pod's cgroups in all of them).
func cgroupHierarchies(t testing.TB) []hierarchy {
	f, err := os.Open("/proc/self/mounts")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out []hierarchy
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fs := strings.Fields(sc.Text())
		if len(fs) < 4 || !strings.HasPrefix(fs[1], "/sys/fs/cgroup") {
			continue
		}
		switch fs[2] {
		case "cgroup2":
			out = append(out, hierarchy{path: fs[1], v2: true})
		case "cgroup":
			out = append(out, hierarchy{path: fs[1], cpuset: strings.Contains(","+fs[3]+",", ",cpuset,")})
		}
	}
	return out
}

// removeCgroupTree removes a cgroup directory and its children, deepest
// first (cgroup directories are removed with rmdir).
func removeCgroupTree(logf func(string, ...any), root string) {
	var dirs []string
	filepath.WalkDir(root, func(p string, d os.DirEntry, err error) error {
		if err == nil && d.IsDir() {
			dirs = append(dirs, p)
		}
		return nil
	})
	for i := len(dirs) - 1; i >= 0; i-- {
		if err := syscall.Rmdir(dirs[i]); err != nil && !os.IsNotExist(err) {
			logf("cgroup %s left: %v", dirs[i], err)
		}
	}
}

// repoRoot is the repository's root directory.
func repoRoot() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "..", "..")
}

// buildStatic builds a command of this repository, static, into dir.
func buildStatic(t testing.TB, dir, pkg string) string {
	t.Helper()
	out := filepath.Join(dir, filepath.Base(pkg))
	cmd := exec.Command("go", "build", "-trimpath", "-o", out, pkg)
	cmd.Dir = repoRoot()
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build %s: %v\n%s", pkg, err, b)
	}
	return out
}
