package main

import (
	"io"
	"maps"
	"os"
	"path/filepath"
	"strings"
	"testing"

	bootstrap "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	"github.com/sluice-io/sluice/agent/datapath"
	"github.com/sluice-io/sluice/daemonset"
	"google.golang.org/protobuf/encoding/protojson"
	"sigs.k8s.io/yaml"
)

// expand resolves $(VAR) as the kubelet does; every reference must resolve.
func expand(t *testing.T, args []string, env map[string]string) []string {
	t.Helper()
	out, undefined := daemonset.Expand(args, env)
	if len(undefined) > 0 {
		t.Fatalf("%v: undefined $(%v)", args, undefined)
	}
	return out
}

// The shipped DaemonSet's agent command line parses with the agent's own
// flags into the configuration the manifest means.
func TestDaemonSetAgentArgsParse(t *testing.T) {
	in, err := daemonset.Load()
	if err != nil {
		t.Fatal(err)
	}
	env := map[string]string{"NODE_NAME": "node-a", "HOST_IP": "10.0.0.7", "POD_UID": "0b9e3c1a-5d2f-4c47-9a61-6f0e1c2d3b4a"}
	for k, v := range in.ConfigByKey {
		env[k] = v
	}
	c := in.Agent
	if len(c.Command) != 2 || c.Command[0] != "/sluice" || c.Command[1] != "agent" {
		t.Fatalf("agent command %v", c.Command)
	}
	cfg, _, err := parseAgentFlags(expand(t, c.Args, env), io.Discard)
	if err != nil {
		t.Fatalf("the DaemonSet's agent arguments do not parse: %v\n%v", err, c.Args)
	}
	if cfg.Source != "kubernetes" || cfg.NodeName != "node-a" || cfg.CgroupMount != "/host/sys/fs/cgroup" ||
		cfg.AttachCgroup != "/host/sys/fs/cgroup" || cfg.XDSSocketMode != 0o660 || cfg.MetricsAddr != "10.0.0.7:9464" ||
		cfg.Selector != in.ConfigByKey["SELECTOR"] || cfg.AttachScope != datapath.ScopeNode {
		t.Errorf("parsed configuration differs from the manifest's intent: %+v", cfg)
	}
	// ATTACH_SCOPE=workloads: the proxy's cgroup is the agent's pod's.
	ws := maps.Clone(env)
	ws["ATTACH_SCOPE"] = "workloads"
	if cfg, _, err := parseAgentFlags(expand(t, c.Args, ws), io.Discard); err != nil {
		t.Errorf("ATTACH_SCOPE=workloads: %v", err)
	} else if cfg.AttachScope != datapath.ScopeWorkloads || cfg.ProxyPodUID != env["POD_UID"] || cfg.ProxyCgroup != "" {
		t.Errorf("ATTACH_SCOPE=workloads: scope %v, proxy pod uid %q, proxy cgroup %q", cfg.AttachScope, cfg.ProxyPodUID, cfg.ProxyCgroup)
	}

	// A user's ConfigMap edit with a typo is refused at start, not ignored.
	env["EXCLUDE"] = "10.244.0.0/16,10.96.0.0/333"
	if _, _, err := parseAgentFlags(expand(t, c.Args, env), io.Discard); err == nil || !strings.Contains(err.Error(), "--exclude") {
		t.Errorf("bad EXCLUDE in the ConfigMap: err = %v", err)
	}
}

// The init container's command writes a bootstrap Envoy accepts as a
// Bootstrap, with the node's name and the agent's socket.
func TestDaemonSetBootstrapArgs(t *testing.T) {
	in, err := daemonset.Load()
	if err != nil {
		t.Fatal(err)
	}
	c := in.InitByName["envoy-bootstrap"]
	args := expand(t, c.Command, map[string]string{"NODE_NAME": "node-a"})
	if args[0] != "/sluice" || args[1] != "bootstrap" {
		t.Fatalf("init container runs %v", args)
	}
	out := filepath.Join(t.TempDir(), "envoy.yaml")
	for i, a := range args {
		if strings.HasPrefix(a, "--output=") {
			args[i] = "--output=" + out
		}
	}
	if _, stderr, err := runCLI(args[1:]...); err != nil {
		t.Fatalf("%v: %v\n%s", args, err, stderr)
	}
	y, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	j, err := yaml.YAMLToJSON(y)
	if err != nil {
		t.Fatal(err)
	}
	var b bootstrap.Bootstrap
	if err := protojson.Unmarshal(j, &b); err != nil {
		t.Fatal(err)
	}
	if b.GetNode().GetId() != "node-a" || !strings.Contains(string(y), "/run/sluice/xds.sock") {
		t.Errorf("bootstrap node %q, socket missing:\n%s", b.GetNode().GetId(), y)
	}
}
