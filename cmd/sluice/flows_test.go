package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// sluice flows merges the agent's flow log and the proxy's access log in
// time order, one line per connection (a tcp_proxy connection Envoy logs
// several times shows once), skips other lines (the agent's own log, CRI
// prefixes included), and filters by pod.
func TestFlowsMergesAndFilters(t *testing.T) {
	dir := t.TempDir()
	flowLog := filepath.Join(dir, "agent.log")
	accessLog := filepath.Join(dir, "envoy.log")
	os.WriteFile(flowLog, []byte(strings.Join([]string{
		`{"time":"2026-12-01T10:00:00.300Z","level":"INFO","msg":"workload selected","workload":"shop/web"}`,
		`2026-12-01T10:00:01.000000000Z stdout F {"time":"2026-12-01T10:00:01Z","type":"flow","namespace":"shop","pod":"web","workload_id":1,"destination":"10.0.0.9:443","protocol":"tcp","decision":"direct_not_ready","direct":true,"cookie":7,"cgroup_id":9}`,
		`{"time":"2026-12-01T10:00:00.100Z","type":"flow","namespace":"shop","pod":"db","workload_id":2,"destination":"1.1.1.1:53","protocol":"udp","decision":"refused_non_tcp","direct":false,"cookie":8,"cgroup_id":10}`,
		`not json at all`,
	}, "\n")+"\n"), 0o644)
	os.WriteFile(accessLog, []byte(strings.Join([]string{
		`{"time":"2026-12-01T10:00:00.200Z","namespace":"shop","pod":"web","verdict":"allowed","reason":"allow list","log_type":"TcpUpstreamConnected","connection_id":"41","original_destination":"10.0.0.8:443"}`,
		`{"time":"2026-12-01T10:00:00.200Z","namespace":"shop","pod":"web","verdict":"allowed","reason":"allow list","log_type":"TcpConnectionEnd","connection_id":"41","original_destination":"10.0.0.8:443"}`,
		`{"time":"2026-12-01T10:00:00.500Z","namespace":"shop","pod":"web","verdict":"denied","reason":"not in the allow list","log_type":"TcpConnectionEnd","connection_id":"42","original_destination":"10.0.0.7:22"}`,
	}, "\n")+"\n"), 0o644)

	var out bytes.Buffer
	if err := run([]string{"flows", "--flow-log", flowLog, "--access-log", accessLog}, &out, &out); err != nil {
		t.Fatal(err)
	}
	want := []string{
		"2026-12-01T10:00:00.100Z  datapath  shop/db -> 1.1.1.1:53 udp refused_non_tcp",
		"2026-12-01T10:00:00.200Z  proxy     shop/web -> 10.0.0.8:443 tcp proxy_allowed",
		"2026-12-01T10:00:00.500Z  proxy     shop/web -> 10.0.0.7:22 tcp proxy_denied",
		"2026-12-01T10:00:01.000Z  datapath  shop/web -> 10.0.0.9:443 tcp direct_not_ready",
	}
	if got := strings.Split(strings.TrimSpace(out.String()), "\n"); strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("sluice flows:\n%s\nwant:\n%s", out.String(), strings.Join(want, "\n"))
	}

	out.Reset()
	if err := run([]string{"flows", "--flow-log", flowLog, "--access-log", accessLog, "--pod", "shop/db", "--output", "json"}, &out, &out); err != nil {
		t.Fatal(err)
	}
	if got := strings.TrimSpace(out.String()); strings.Count(got, "\n") != 0 || !strings.Contains(got, `"decision":"refused_non_tcp"`) || !strings.Contains(got, `"cookie":8`) {
		t.Errorf("--pod shop/db --output json: %s", got)
	}
	for _, args := range [][]string{
		{"flows"},
		{"flows", "--flow-log", "-", "--access-log", "-"},
		{"flows", "--flow-log", flowLog, "--pod", "web"},
		{"flows", "--flow-log", flowLog, "--output", "yaml"},
		{"flows", "--flow-log", filepath.Join(dir, "missing")},
	} {
		if err := run(args, &out, &out); err == nil {
			t.Errorf("%v: no error", args)
		}
	}
}
