package agent

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// CgroupDriver is the kubelet's --cgroup-driver.
type CgroupDriver string

const (
	DriverSystemd  CgroupDriver = "systemd"
	DriverCgroupfs CgroupDriver = "cgroupfs"
)

// QoS classes as in a pod's status.qosClass.
const (
	QoSGuaranteed = "Guaranteed"
	QoSBurstable  = "Burstable"
	QoSBestEffort = "BestEffort"
)

// PodCgroupLayout says where the kubelet puts pod cgroups: the cgroup v2
// mount, the kubelet's --cgroup-root and its driver.
type PodCgroupLayout struct {
	// Mount is the cgroup v2 mount point, e.g. /sys/fs/cgroup.
	Mount string
	// KubeletRoot is the kubelet's --cgroup-root ("/" by default; kind
	// uses "/kubelet" or "/kubelet.slice").
	KubeletRoot string
	Driver      CgroupDriver
}

// PodCgroup returns the cgroup v2 directory of a pod, the way the kubelet
// names it (pkg/kubelet/cm): the pod cgroup sits under "kubepods", below a
// QoS-class cgroup for Burstable and BestEffort pods, named "pod<uid>".
//
//	cgroupfs: <mount>/<root>/kubepods/burstable/pod<uid>
//	systemd:  <mount>/<root…>/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid with _>.slice
//
// With the systemd driver each level is a slice named after all of its
// ancestors joined with '-', and '-' inside a component is written '_'.
// Containers are children of the pod cgroup; the datapath selects them
// through the pod's (an ancestor) cgroup, whatever the runtime names them.
func (l PodCgroupLayout) PodCgroup(uid, qosClass string) (string, error) {
	if uid == "" {
		return "", fmt.Errorf("pod has no uid")
	}
	if strings.ContainsAny(uid, "/.") {
		return "", fmt.Errorf("pod uid %q is not a uid", uid)
	}
	if l.Mount == "" {
		return "", fmt.Errorf("no cgroup mount")
	}
	names := rootComponents(l.KubeletRoot)
	names = append(names, "kubepods")
	switch qosClass {
	case QoSGuaranteed:
	case QoSBurstable:
		names = append(names, "burstable")
	case QoSBestEffort:
		names = append(names, "besteffort")
	default:
		return "", fmt.Errorf("pod qos class %q: want %s, %s or %s (is status.qosClass set yet?)", qosClass, QoSGuaranteed, QoSBurstable, QoSBestEffort)
	}
	names = append(names, "pod"+uid)
	switch l.Driver {
	case DriverCgroupfs:
		return filepath.Join(append([]string{l.Mount}, names...)...), nil
	case DriverSystemd:
		parts := []string{l.Mount}
		var prefix []string
		for _, n := range names {
			prefix = append(prefix, strings.ReplaceAll(n, "-", "_"))
			parts = append(parts, strings.Join(prefix, "-")+".slice")
		}
		return filepath.Join(parts...), nil
	default:
		return "", fmt.Errorf("cgroup driver %q: want %s or %s", l.Driver, DriverSystemd, DriverCgroupfs)
	}
}

// FindPodCgroup returns the cgroup v2 directory of the pod with uid, a pod
// of this node whose QoS class is not known: the one of PodCgroup's three
// candidates that exists.
func (l PodCgroupLayout) FindPodCgroup(uid string) (string, error) {
	var tried []string
	for _, q := range []string{QoSGuaranteed, QoSBurstable, QoSBestEffort} {
		p, err := l.PodCgroup(uid, q)
		if err != nil {
			return "", err
		}
		if fi, err := os.Stat(p); err == nil && fi.IsDir() {
			return p, nil
		}
		tried = append(tried, p)
	}
	return "", fmt.Errorf("pod %s has no cgroup at %s: check the kubelet's cgroup driver and root (--cgroup-driver, --kubelet-cgroup-root) and the cgroup mount", uid, strings.Join(tried, ", "))
}

// rootComponents turns a kubelet --cgroup-root into cgroup name components,
// accepting both spellings: "/kubelet" (cgroupfs) and "/kubelet.slice" or
// "/a.slice/a-b.slice" (systemd, where the last '-' separated part of each
// slice is its own name).
func rootComponents(root string) []string {
	var out []string
	for _, p := range strings.Split(root, "/") {
		if p == "" {
			continue
		}
		if s, ok := strings.CutSuffix(p, ".slice"); ok {
			if i := strings.LastIndex(s, "-"); i >= 0 {
				s = s[i+1:]
			}
			p = s
		}
		out = append(out, p)
	}
	return out
}
