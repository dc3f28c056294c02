package agent

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestPodCgroup(t *testing.T) {
	const uid = "0f6b4a5e-2c1d-4e8f-9a7b-3c2d1e0f9a8b"
	const uidU = "0f6b4a5e_2c1d_4e8f_9a7b_3c2d1e0f9a8b"
	for _, tc := range []struct {
		root   string
		driver CgroupDriver
		qos    string
		want   string
	}{
		{"/", DriverCgroupfs, QoSGuaranteed, "/sys/fs/cgroup/kubepods/pod" + uid},
		{"/", DriverCgroupfs, QoSBurstable, "/sys/fs/cgroup/kubepods/burstable/pod" + uid},
		{"/", DriverCgroupfs, QoSBestEffort, "/sys/fs/cgroup/kubepods/besteffort/pod" + uid},
		{"", DriverSystemd, QoSGuaranteed, "/sys/fs/cgroup/kubepods.slice/kubepods-pod" + uidU + ".slice"},
		{"/", DriverSystemd, QoSBurstable, "/sys/fs/cgroup/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod" + uidU + ".slice"},
		{"/", DriverSystemd, QoSBestEffort, "/sys/fs/cgroup/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod" + uidU + ".slice"},
		// kind: kubelet --cgroup-root=/kubelet (cgroupfs) or /kubelet.slice (systemd).
		{"/kubelet", DriverCgroupfs, QoSBurstable, "/sys/fs/cgroup/kubelet/kubepods/burstable/pod" + uid},
		{"/kubelet.slice", DriverSystemd, QoSBurstable, "/sys/fs/cgroup/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/kubelet-kubepods-burstable-pod" + uidU + ".slice"},
		{"/kubelet.slice", DriverSystemd, QoSGuaranteed, "/sys/fs/cgroup/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-pod" + uidU + ".slice"},
	} {
		l := PodCgroupLayout{Mount: "/sys/fs/cgroup", KubeletRoot: tc.root, Driver: tc.driver}
		got, err := l.PodCgroup(uid, tc.qos)
		if err != nil || got != tc.want {
			t.Errorf("%s %q %s:\n got  %s (%v)\n want %s", tc.driver, tc.root, tc.qos, got, err, tc.want)
		}
	}
}

func TestPodCgroupErrors(t *testing.T) {
	l := PodCgroupLayout{Mount: "/sys/fs/cgroup", Driver: DriverSystemd}
	for _, tc := range []struct {
		layout   PodCgroupLayout
		uid, qos string
		want     string
	}{
		{l, "", QoSBurstable, "no uid"},
		{l, "../../etc", QoSBurstable, "is not a uid"},
		{l, "abc", "", "is status.qosClass set yet"},
		{PodCgroupLayout{Mount: "/x", Driver: "docker"}, "abc", QoSBurstable, `cgroup driver "docker"`},
		{PodCgroupLayout{Driver: DriverSystemd}, "abc", QoSBurstable, "no cgroup mount"},
	} {
		if _, err := tc.layout.PodCgroup(tc.uid, tc.qos); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("PodCgroup(%q, %q) = %v, want %q", tc.uid, tc.qos, err, tc.want)
		}
	}
}

// The agent finds its own pod's cgroup from its uid alone (the downward
// API gives no QoS class), and refuses a pod cgroup it does not run in.
func TestFindPodCgroup(t *testing.T) {
	mount := t.TempDir()
	l := PodCgroupLayout{Mount: mount, KubeletRoot: "/", Driver: DriverCgroupfs}
	burstable, _ := l.PodCgroup("uid-1", QoSBurstable)
	if err := os.MkdirAll(filepath.Join(burstable, "container-a"), 0o755); err != nil {
		t.Fatal(err)
	}
	if got, err := l.FindPodCgroup("uid-1"); err != nil || got != burstable {
		t.Errorf("FindPodCgroup: %q, %v, want %q", got, err, burstable)
	}
	if _, err := l.FindPodCgroup("uid-2"); err == nil || !strings.Contains(err.Error(), "--kubelet-cgroup-root") {
		t.Errorf("a pod with no cgroup: %v, want an error naming the flags to check", err)
	}
	if _, err := l.FindPodCgroup("../x"); err == nil {
		t.Error("a uid with a path in it was accepted")
	}
	for _, c := range []struct {
		self string
		ok   bool
	}{
		{"0::/\n", true}, // a cgroup namespace: nothing to check
		{"0::/kubepods/burstable/poduid-1/container-a\n", true},
		{"12:pids:/x\n0::/kubepods/burstable/poduid-1\n", true},
		{"0::/kubepods/burstable/poduid-10/container-a\n", false},
		{"0::/system.slice/other.service\n", false},
	} {
		if err := checkOwnCgroup(burstable, mount, c.self); (err == nil) != c.ok {
			t.Errorf("own cgroup %q: %v, want ok %v", c.self, err, c.ok)
		}
	}
}
