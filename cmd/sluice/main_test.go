package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	bootstrap "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	"github.com/sluice-io/sluice/xds"
	"google.golang.org/protobuf/encoding/protojson"
	"sigs.k8s.io/yaml"
)

func runCLI(args ...string) (string, string, error) {
	var out, errb bytes.Buffer
	err := run(args, &out, &errb)
	return out.String(), errb.String(), err
}

// The printed bootstrap reads back as a valid Envoy bootstrap with the
// flags' values in it.
func TestBootstrapCommand(t *testing.T) {
	for _, format := range []string{"yaml", "json"} {
		out, _, err := runCLI("bootstrap", "--node-id", "node-7", "--xds-socket", "/run/x/xds.sock", "--admin-address", "127.0.0.1:19000", "--format", format)
		if err != nil {
			t.Fatal(err)
		}
		j := []byte(out)
		if format == "yaml" {
			if j, err = yaml.YAMLToJSON(j); err != nil {
				t.Fatal(err)
			}
		}
		var bs bootstrap.Bootstrap
		if err := protojson.Unmarshal(j, &bs); err != nil {
			t.Fatalf("%s output does not parse as a bootstrap: %v", format, err)
		}
		if err := xds.ValidateBootstrap(&bs); err != nil {
			t.Fatal(err)
		}
		if bs.GetNode().GetId() != "node-7" || bs.GetAdmin().GetAddress().GetSocketAddress().GetPortValue() != 19000 ||
			bs.GetStaticResources().GetClusters()[0].GetLoadAssignment().GetEndpoints()[0].GetLbEndpoints()[0].GetEndpoint().GetAddress().GetPipe().GetPath() != "/run/x/xds.sock" {
			t.Fatalf("%s: flags not reflected: %v", format, &bs)
		}
	}
}

func TestBootstrapCommandWritesFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "envoy.yaml")
	if _, _, err := runCLI("bootstrap", "--output", path); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(path)
	if err != nil || !strings.Contains(string(b), "sluice_xds") {
		t.Fatalf("file %q, err %v", b, err)
	}
	entries, _ := os.ReadDir(filepath.Dir(path))
	if len(entries) != 1 {
		t.Fatalf("temporary files left: %v", entries)
	}
}

func TestBootstrapCommandErrors(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"bootstrap", "--admin-address", "0.0.0.0:15000"}, "is not loopback"},
		{[]string{"bootstrap", "--admin-address", "localhost"}, "want ip:port"},
		{[]string{"bootstrap", "--format", "xml"}, "want yaml or json"},
		{[]string{"bootstrap", "extra"}, "takes no arguments"},
		{[]string{"nope"}, "usage"},
		{[]string{"agent", "--workloads-file", "w.yaml", "--xds-socket-mode", "0666"}, "want 0600 or 0660"},
		{[]string{"agent", "--workloads-file", "w.yaml", "--xds-socket-mode", "rw"}, "want 0600 or 0660"},
	} {
		if _, _, err := runCLI(tc.args...); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%v: err = %v, want %q", tc.args, err, tc.want)
		}
	}
}

func TestHelpExplainsFlags(t *testing.T) {
	_, stderr, err := runCLI("bootstrap", "--help")
	if err == nil {
		t.Fatal("--help returned no error (flag.ErrHelp expected)")
	}
	for _, want := range []string{"--xds-socket", "/run/sluice/xds.sock", "loopback", "-admin-address"} {
		if !strings.Contains(stderr, strings.TrimPrefix(want, "-")) {
			t.Errorf("bootstrap --help lacks %q:\n%s", want, stderr)
		}
	}
	_, stderr, _ = runCLI("help")
	if !strings.Contains(stderr, "bootstrap") || !strings.Contains(stderr, "version") {
		t.Errorf("help lists no commands:\n%s", stderr)
	}
}
