package agent

import (
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
