package node

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// containerdConfig is containerd 1.6's, everything under the node's
// directory. restrict_oom_score_adj: this machine kind's bounding set
// lacks CAP_SYS_RESOURCE, so not even root may lower oom_score_adj, and
// runc would fail every sandbox.
const containerdConfig = `version = 2
root = "DIR/containerd/root"
state = "DIR/containerd/state"
[grpc]
  address = "DIR/containerd/containerd.sock"
[ttrpc]
  address = "DIR/containerd/containerd.sock.ttrpc"
[debug]
  address = "DIR/containerd/debug.sock"
  level = "info"
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "DIR/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "PAUSE"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    discard_unpacked_layers = false
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "DIR/containerd/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "DIR/cni/net.d"
    max_conf_num = 1
`

// cniConfig: pods on a bridge in the node's namespace, host-local
// addresses, no masquerade; the namespace has no route off the machine.
const cniConfig = `{
  "cniVersion": "1.0.0",
  "name": "sluice-node",
  "plugins": [{
    "type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
    "ipam": {"type": "host-local", "dataDir": "DIR/cni/ipam", "ranges": [[{"subnet": "10.88.0.0/24"}]], "routes": [{"dst": "0.0.0.0/0"}]}
  }]
}
`

// kubeletConfig: cgroupfs under a cgroup root of the test's own, no
// oom_score_adj (see containerdConfig), cgroup v1 allowed (a hybrid host
// counts as v1), paths under the node's directory.
const kubeletConfig = `apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: cgroupfs
cgroupRoot: CGROOT
cgroupsPerQOS: true
failCgroupV1: false
failSwapOn: false
containerRuntimeEndpoint: unix://DIR/containerd/containerd.sock
staticPodPath: DIR/manifests
podLogsDir: DIR/pod-logs
address: NODEIP
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous: {enabled: true}
  webhook: {enabled: false}
authorization: {mode: AlwaysAllow}
resolvConf: ""
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {"memory.available": "10Mi", "nodefs.available": "1%", "imagefs.available": "1%"}
syncFrequency: 10s
fileCheckFrequency: 5s
nodeStatusUpdateFrequency: 10s
serializeImagePulls: false
enforceNodeAllocatable: ["pods"]
oomScoreAdj: 0
volumePluginDir: DIR/volume-plugins
`

func (n *Node) writeConfigs(t testing.TB, hybrid bool) {
	t.Helper()
	r := strings.NewReplacer("DIR", n.Dir, "PAUSE", PauseImage, "CGROOT", n.CgroupRoot, "NODEIP", n.IP.String())
	for _, d := range []string{"containerd", "cni/net.d", "cni/ipam", "manifests", "pod-logs", "volume-plugins", "kubelet"} {
		if err := os.MkdirAll(filepath.Join(n.Dir, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	kc := kubeletConfig
	if !hybrid {
		kc = strings.Replace(kc, "failCgroupV1: false\n", "", 1)
	}
	for name, content := range map[string]string{
		"containerd/config.toml":            containerdConfig,
		"cni/net.d/10-sluice-node.conflist": cniConfig,
		"kubelet-config.yaml":               kc,
	} {
		if err := os.WriteFile(filepath.Join(n.Dir, name), []byte(r.Replace(content)), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}
