package node

import (
	"context"
	"fmt"
	"maps"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sluice-io/sluice/agent"
	"github.com/sluice-io/sluice/test/harness"
	"github.com/sluice-io/sluice/test/testbed"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
)

// external is a server off the node: a network namespace of its own
// behind a veth, routed by the node (nothing leaves the machine).
type external struct {
	addr netip.Addr
	echo *testbed.EchoServer
}

func (n *Node) external(t *testing.T) *external {
	t.Helper()
	ext := testbed.NewNetns(t, "sluice-kx-"+testbed.RandomID())
	host, peer := "knx"+testbed.RandomID()[:6], "knx"+testbed.RandomID()[:6]
	for _, args := range [][]string{
		{"link", "add", host, "type", "veth", "peer", "name", peer},
		{"link", "set", host, "netns", n.Netns.Name},
		{"link", "set", peer, "netns", ext.Name},
	} {
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			t.Fatalf("ip %v: %v\n%s", args, err, out)
		}
	}
	n.Netns.IP(t, "addr", "add", "10.99.2.1/24", "dev", host)
	n.Netns.IP(t, "link", "set", host, "up")
	n.Netns.Sysctl(t, "net.ipv4.ip_forward", "1")
	ext.IP(t, "addr", "add", "10.99.2.2/24", "dev", peer)
	ext.IP(t, "link", "set", peer, "up")
	ext.IP(t, "link", "set", "lo", "up")
	ext.IP(t, "route", "add", "10.88.0.0/24", "via", "10.99.2.1")
	ext.IP(t, "route", "add", "10.99.0.0/24", "via", "10.99.2.1")
	e := &external{addr: netip.MustParseAddr("10.99.2.2")}
	e.echo = testbed.ServeEcho(t, ext.Listen(t, "tcp4", "10.99.2.2:8080"), ext.Listen(t, "tcp4", "10.99.2.2:8081"))
	return e
}

// inPod is a process context inside a running pod: one of its
// containers' cgroups and its network namespace.
type inPod struct {
	cg *testbed.Cgroup
	ns *testbed.Netns
	ip netip.Addr
}

func (n *Node) inPod(t *testing.T, p *corev1.Pod) inPod {
	t.Helper()
	dir := n.podCgroup(t, p)
	for cg, pid := range firstProcs(t, dir) {
		// The pod's netns, named for nsenter from this mount namespace
		// (containerd's bind mount lives in the node's).
		name := "sluice-kp-" + testbed.RandomID()
		if out, err := exec.Command("ip", "netns", "attach", name, fmt.Sprint(pid)).CombinedOutput(); err != nil {
			t.Fatalf("ip netns attach: %v\n%s", err, out)
		}
		t.Cleanup(func() { exec.Command("ip", "netns", "delete", name).Run() })
		ip, _ := netip.ParseAddr(p.Status.PodIP)
		return inPod{cg: &testbed.Cgroup{Path: cg}, ns: &testbed.Netns{Name: name}, ip: ip}
	}
	t.Fatalf("no process in %s", dir)
	return inPod{}
}

// firstProcs maps each container cgroup below dir to one of its processes.
func firstProcs(t *testing.T, dir string) map[string]int {
	out := map[string]int{}
	for pid, cg := range procsBelow(t, dir) {
		if cg != dir {
			out[cg] = pid
		}
	}
	return out
}

// dial connects once from the pod and returns what the application saw
// and which address the server saw the connection from ("" for none).
func (e *external) dial(t *testing.T, p inPod, port int) (testbed.DialResult, string) {
	t.Helper()
	before := len(e.echo.Conns())
	res := testbed.Dial(t, testbed.Run(t, 30*time.Second, p.cg, p.ns, "client", fmt.Sprintf("tcp4:%s:%d", e.addr, port)))[0]
	time.Sleep(50 * time.Millisecond)
	var from string
	if cs := e.echo.Conns()[before:]; len(cs) > 0 {
		from, _, _ = strings.Cut(cs[0].From, ":")
	}
	return res, from
}

// appPods runs app pods of every QoS class, and a hostNetwork one, on the
// node the DaemonSet serves, and checks from inside each what the external
// server saw: an enforce pod's allowed connection arrives from the node
// (through the proxy) and getpeername is the original destination, its
// other connection is closed with nothing arriving; an audit pod is
// redirected; an unlabelled pod goes direct; a hostNetwork pod is enforced
// too; relabelling and deleting take effect; sluice status lists them. In
// the workloads attach scope, the kernel's effective program arrays of each
// pod's container say that the selected ones run each client program once
// and the unlabelled one none. It returns what stays selected, for the
// uninstall.
func appPods(t *testing.T, n *Node, sluice, pinPath, stateFile, scope string) *afterApps {
	ctx := context.Background()
	ext := n.external(t)
	q := func(cpu, mem string) corev1.ResourceList {
		return corev1.ResourceList{corev1.ResourceCPU: resource.MustParse(cpu), corev1.ResourceMemory: resource.MustParse(mem)}
	}
	mk := func(name string, qos corev1.PodQOSClass, hostNetwork bool, res corev1.ResourceRequirements, labels, ann map[string]string) inPod {
		p := pod(name, hostNetwork, res)
		p.Labels, p.Annotations = labels, ann
		if _, err := n.Cluster.Client.CoreV1().Pods("default").Create(ctx, p, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		got := n.WaitRunning(t, "default", name)
		if got.Status.QOSClass != qos {
			t.Errorf("pod %s: QoS %s, want %s", name, got.Status.QOSClass, qos)
		}
		return n.inPod(t, got)
	}
	enforceLabels := map[string]string{"sluice.io/redirect": "true", "sluice.io/mode": "enforce"}
	allow8080 := map[string]string{"sluice.io/allow": ext.addr.String() + ":8080"}
	enforce := mk("enforce", corev1.PodQOSGuaranteed, false,
		corev1.ResourceRequirements{Requests: q("100m", "32Mi"), Limits: q("100m", "32Mi")}, enforceLabels, allow8080)
	audit := mk("audit", corev1.PodQOSBurstable, false,
		corev1.ResourceRequirements{Requests: q("10m", "16Mi")}, map[string]string{"sluice.io/redirect": "true"}, nil)
	plain := mk("plain", corev1.PodQOSBestEffort, false, corev1.ResourceRequirements{}, nil, nil)
	hostnet := mk("hostnet", corev1.PodQOSBestEffort, true, corev1.ResourceRequirements{}, enforceLabels, allow8080)
	const node = "10.99.2.1" // the proxy dials from the node's side of the veth

	harness.WaitFor(t, "the enforce pod redirected (its listener accepted by the proxy)", 30*time.Second, func() bool {
		_, from := ext.dial(t, enforce, 8080)
		return from == node
	})
	t.Run("enforce (Guaranteed)", func(t *testing.T) {
		res, from := ext.dial(t, enforce, 8080)
		if from != node || res.Peer != ext.addr.String()+":8080" || !strings.HasPrefix(res.Reply, "peer="+node) {
			t.Errorf("allowed: server saw %q, getpeername %q, reply %q; want it through the proxy, getpeername the original destination", from, res.Peer, res.Reply)
		}
		if res, from := ext.dial(t, enforce, 8081); from != "" || res.Reply != "" {
			t.Errorf("not allowed: server saw %q, reply %q; want nothing", from, res.Reply)
		}
	})
	t.Run("audit (Burstable)", func(t *testing.T) {
		harness.WaitFor(t, "the audit pod redirected", 30*time.Second, func() bool { _, from := ext.dial(t, audit, 8081); return from == node })
	})
	if scope == "workloads" {
		t.Run("programs per pod", func(t *testing.T) {
			ours := harness.OurPrograms(t, pinPath)
			for name, p := range map[string]inPod{"enforce": enforce, "audit": audit, "hostnet": hostnet} {
				if eff := harness.Effective(t, p.cg.Path, ours); !maps.Equal(eff, harness.WorkloadRuns()) {
					t.Errorf("selected pod %s runs %v, want %v", name, eff, harness.WorkloadRuns())
				}
			}
			if eff := harness.Effective(t, plain.cg.Path, ours); harness.Total(eff) != 0 {
				t.Errorf("the unlabelled pod runs %v, want none of sluice's programs", eff)
			}
		})
	}
	t.Run("unlabelled (BestEffort)", func(t *testing.T) {
		if _, from := ext.dial(t, plain, 8080); from != plain.ip.String() {
			t.Errorf("server saw %q, want the pod's own %s", from, plain.ip)
		}
	})
	t.Run("hostNetwork enforce", func(t *testing.T) {
		// The node's address either way: only enforcement tells the
		// proxy's hop from a direct connection.
		harness.WaitFor(t, "the hostNetwork pod's denied connection refused", 30*time.Second, func() bool {
			_, from := ext.dial(t, hostnet, 8081)
			return from == ""
		})
		res, from := ext.dial(t, hostnet, 8080)
		if from != node || res.Peer != ext.addr.String()+":8080" {
			t.Errorf("allowed: server saw %q, getpeername %q; want the node, getpeername the original destination", from, res.Peer)
		}
	})
	t.Run("sluice status", func(t *testing.T) {
		out, err := exec.Command(sluice, "status", "--pin-path", pinPath, "--state-file", stateFile).CombinedOutput()
		if err != nil {
			t.Fatalf("sluice status: %v\n%s", err, out)
		}
		for _, w := range []string{"default/enforce", "default/audit", "default/hostnet"} {
			if !strings.Contains(string(out), w) {
				t.Errorf("sluice status does not list %s:\n%s", w, out)
			}
		}
		if strings.Contains(string(out), "default/plain") {
			t.Errorf("sluice status lists the unlabelled pod:\n%s", out)
		}
	})
	t.Run("relabelled and deleted", func(t *testing.T) {
		patch := []byte(`{"metadata":{"labels":{"sluice.io/redirect":null}}}`)
		if _, err := n.Cluster.Client.CoreV1().Pods("default").Patch(ctx, "audit", types.MergePatchType, patch, metav1.PatchOptions{}); err != nil {
			t.Fatal(err)
		}
		harness.WaitFor(t, "the relabelled pod direct", 30*time.Second, func() bool { _, from := ext.dial(t, audit, 8081); return from == audit.ip.String() })
		zero := int64(0)
		if err := n.Cluster.Client.CoreV1().Pods("default").Delete(ctx, "enforce", metav1.DeleteOptions{GracePeriodSeconds: &zero}); err != nil {
			t.Fatal(err)
		}
		harness.WaitFor(t, "the deleted pod gone from sluice status", 30*time.Second, func() bool {
			out, _ := exec.Command(sluice, "status", "--pin-path", pinPath, "--state-file", stateFile).CombinedOutput()
			return !strings.Contains(string(out), "default/enforce") && !strings.Contains(string(out), "default/audit")
		})
	})
	return &afterApps{ext: ext, hostnet: hostnet, plain: plain}
}

// afterApps is what appPods leaves running: the hostNetwork pod, still
// selected and enforced, and the unlabelled pod.
type afterApps struct {
	ext            *external
	hostnet, plain inPod
}

// stateFile is the agent's state file, seen through the agent process's
// root: the pod's emptyDir is a mount in the node's mount namespace only.
func (n *Node) stateFile(t *testing.T, p *corev1.Pod) string {
	t.Helper()
	f := filepath.Join(n.agentRoot(t, p), "run/sluice/state.json")
	harness.WaitFor(t, "the agent's state file", 20*time.Second, func() bool {
		_, err := os.Stat(f)
		return err == nil
	})
	return f
}

// agentRoot is the agent container's root directory, as /proc/<pid>/root.
func (n *Node) agentRoot(t *testing.T, p *corev1.Pod) string {
	t.Helper()
	dir := n.podCgroup(t, p)
	var root string
	harness.WaitFor(t, "the agent's process", 20*time.Second, func() bool {
		for pid := range procsBelow(t, dir) {
			b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
			if strings.HasPrefix(string(b), "/sluice\x00agent") {
				root = fmt.Sprintf("/proc/%d/root", pid)
				return true
			}
		}
		return false
	})
	return root
}

// podCgroup is where the agent finds the pod's cgroup on this node.
func (n *Node) podCgroup(t *testing.T, p *corev1.Pod) string {
	t.Helper()
	layout := agent.PodCgroupLayout{Mount: n.Cgroup2, Driver: agent.DriverCgroupfs, KubeletRoot: n.CgroupRoot}
	dir, err := layout.PodCgroup(string(p.UID), string(p.Status.QOSClass))
	if err != nil {
		t.Fatal(err)
	}
	return dir
}
