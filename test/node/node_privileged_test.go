package node

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sluice-io/sluice/agent"
	"github.com/sluice-io/sluice/test/harness"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

func TestMain(m *testing.M) { Main(m) }

func pod(name string, hostNetwork bool, res corev1.ResourceRequirements) *corev1.Pod {
	f := false
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: name},
		Spec: corev1.PodSpec{
			NodeName: Name, HostNetwork: hostNetwork, EnableServiceLinks: &f, AutomountServiceAccountToken: &f,
			TerminationGracePeriodSeconds: new(int64),
			Containers:                    []corev1.Container{{Name: "app", Image: PauseImage, ImagePullPolicy: corev1.PullNever, Resources: res}},
		},
	}
}

// TestPrivilegedRealKubeletPodCgroups runs pods of every QoS class (and a
// hostNetwork one) on a real kubelet, and checks the agent's cgroup
// resolution against what the kubelet and runc really made: the directory
// PodCgroupLayout computes for the pod exists under the cgroup v2 mount
// and holds the pod's processes (the pause container's and the app's, each
// in a directory of its own below it), and nothing else does. Afterwards
// the node has left nothing behind.
func TestPrivilegedRealKubeletPodCgroups(t *testing.T) {
	hostPaths := preexisting("/var/lib/kubelet", "/var/log/containers", "/run/containerd", "/var/log/pods")
	var n *Node
	t.Run("pods", func(t *testing.T) {
		n = Start(t)
		runPods(t, n)
	})
	if n == nil {
		return
	}
	var left []string
	if pids := pidsWith(n.Dir); len(pids) > 0 {
		left = append(left, fmt.Sprintf("processes %v", pids))
	}
	if _, err := os.Stat(n.Netns.Path()); err == nil {
		left = append(left, "netns "+n.Netns.Name)
	}
	for _, c := range cgroupHierarchies(t) {
		if _, err := os.Stat(filepath.Join(c.path, n.CgroupRoot)); err == nil {
			left = append(left, "cgroup "+filepath.Join(c.path, n.CgroupRoot))
		}
	}
	left = append(left, mountsUnder(n.Dir)...)
	if _, err := os.Stat(n.Cluster.EtcdDir); err == nil {
		left = append(left, "etcd data "+n.Cluster.EtcdDir)
	}
	for p, existed := range hostPaths {
		if _, err := os.Lstat(p); err == nil && !existed {
			left = append(left, "host path "+p)
		}
	}
	if len(left) > 0 {
		t.Errorf("the node left behind: %s", strings.Join(left, "; "))
	}
}

func runPods(t *testing.T, n *Node) {
	ctx := context.Background()
	q := func(cpu, mem string) corev1.ResourceList {
		return corev1.ResourceList{corev1.ResourceCPU: resource.MustParse(cpu), corev1.ResourceMemory: resource.MustParse(mem)}
	}
	pods := []struct {
		pod *corev1.Pod
		qos corev1.PodQOSClass
	}{
		{pod("besteffort", false, corev1.ResourceRequirements{}), corev1.PodQOSBestEffort},
		{pod("burstable", false, corev1.ResourceRequirements{Requests: q("10m", "16Mi")}), corev1.PodQOSBurstable},
		{pod("guaranteed", false, corev1.ResourceRequirements{Requests: q("100m", "32Mi"), Limits: q("100m", "32Mi")}), corev1.PodQOSGuaranteed},
		{pod("hostnet", true, corev1.ResourceRequirements{}), corev1.PodQOSBestEffort},
	}
	for _, p := range pods {
		if _, err := n.Cluster.Client.CoreV1().Pods("default").Create(ctx, p.pod, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	layout := agent.PodCgroupLayout{Mount: n.Cgroup2, Driver: agent.DriverCgroupfs, KubeletRoot: n.CgroupRoot}
	podNet := netip.MustParsePrefix("10.88.0.0/24")
	for _, p := range pods {
		t.Run(p.pod.Name, func(t *testing.T) {
			got := n.WaitRunning(t, "default", p.pod.Name)
			if got.Status.QOSClass != p.qos {
				t.Errorf("QoS %s, want %s", got.Status.QOSClass, p.qos)
			}
			ip, err := netip.ParseAddr(got.Status.PodIP)
			switch {
			case err != nil:
				t.Errorf("pod IP %q", got.Status.PodIP)
			case p.pod.Spec.HostNetwork && ip != n.IP:
				t.Errorf("hostNetwork pod IP %s, want the node's %s", ip, n.IP)
			case !p.pod.Spec.HostNetwork && !podNet.Contains(ip):
				t.Errorf("pod IP %s, want one from the CNI bridge's %s", ip, podNet)
			}
			cg, err := layout.PodCgroup(string(got.UID), string(got.Status.QOSClass))
			if err != nil {
				t.Fatal(err)
			}
			// A container reported started may still be runc's init
			// process for a moment, before it execs the image's command.
			var procs map[int]string
			harness.WaitFor(t, "the pod's processes started", 10*time.Second, func() bool {
				procs = procsBelow(t, cg)
				for pid := range procs {
					if b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid)); strings.HasPrefix(string(b), "runc\x00init") {
						return false
					}
				}
				return true
			})
			if len(procs) < 2 {
				t.Fatalf("%s holds %d processes, want the pause and the app container's: the agent would select an empty cgroup", cg, len(procs))
			}
			for pid, dir := range procs {
				if dir == cg {
					t.Errorf("process %d sits in the pod's cgroup itself, not in a container's below it", pid)
				}
				b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
				if !strings.Contains(string(b), "pause") {
					t.Errorf("process %d in the pod's cgroup is %q, not the pod's", pid, b)
				}
			}
			t.Logf("%s (%s): %s holds %d processes", p.pod.Name, got.Status.QOSClass, strings.TrimPrefix(cg, n.Cgroup2), len(procs))
		})
	}
}

// procsBelow maps each process in dir or a cgroup below it to its cgroup.
func procsBelow(t *testing.T, dir string) map[int]string {
	t.Helper()
	out := map[int]string{}
	err := filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			b, err := os.ReadFile(filepath.Join(p, "cgroup.procs"))
			if err != nil {
				return err
			}
			for _, f := range strings.Fields(string(b)) {
				var pid int
				fmt.Sscanf(f, "%d", &pid)
				out[pid] = p
			}
		}
		return nil
	})
	if err != nil {
		t.Fatalf("%s: %v", dir, err)
	}
	return out
}
