package main

import (
	"io"
	"strings"
	"testing"

	"github.com/sluice-io/sluice/agent/datapath"
)

// Every agent flag that takes a bounded value refuses what is out of bounds
// with an error that names the flag, before anything is installed.
func TestAgentFlagErrors(t *testing.T) {
	base := []string{"--workloads-file=/dev/null", "--cgroup-attach=/sys/fs/cgroup", "--cgroup-mount=/sys/fs/cgroup"}
	for _, c := range []struct{ arg, want string }{
		{"--inflight-map-size=1023", "--inflight-map-size 1023: want 1024-4194304"},
		{"--inflight-map-size=4194305", "--inflight-map-size"},
		{"--readiness-lease=2s", "--readiness-lease 2s"},
		{"--readiness-lease=-1s", "--readiness-lease"},
		{"--dns-resolvers=10.0.0.1:0", "--dns-resolvers"},
		{"--xds-socket-mode=0666", "--xds-socket-mode"},
		{"--attach-scope=pods", "--attach-scope"},
		{"--attach-scope=workloads", "needs --proxy-cgroup"},
		{"--attach-scope=workloads --proxy-cgroup=proxy.slice --proxy-pod-uid=u", "give one"},
		{"--attach-scope=workloads --proxy-pod-uid=u", "needs the Kubernetes source"},
		{"--proxy-cgroup=proxy.slice", "only used with --attach-scope=workloads"},
	} {
		_, _, err := parseAgentFlags(append(append([]string{}, base...), strings.Fields(c.arg)...), io.Discard)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: error %v, want one containing %q", c.arg, err, c.want)
		}
	}
	cfg, _, err := parseAgentFlags(base, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.InFlightMapSize != datapath.DefaultInFlightEntries {
		t.Errorf("default in-flight map size %d, want %d", cfg.InFlightMapSize, datapath.DefaultInFlightEntries)
	}
	cfg, _, err = parseAgentFlags(append(base, "--inflight-map-size=262144"), io.Discard)
	if err != nil || cfg.InFlightMapSize != 262144 {
		t.Errorf("--inflight-map-size=262144: %d, %v", cfg.InFlightMapSize, err)
	}
}
