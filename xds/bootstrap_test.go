package xds

import (
	"bytes"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestBootstrapGolden(t *testing.T) {
	bs, err := Bootstrap(BootstrapConfig{NodeID: "node-a", SocketPath: "/run/sluice/xds.sock"})
	if err != nil {
		t.Fatal(err)
	}
	y, err := MarshalYAML(bs)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join("testdata", "golden", "bootstrap.yaml")
	if *update {
		if err := os.WriteFile(path, y, 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(y, want) {
		t.Errorf("%s differs; review and run go test ./xds -run TestBootstrapGolden -update\n%s", path, firstDiff(string(want), string(y)))
	}
}

func TestBootstrapRejects(t *testing.T) {
	for _, tc := range []struct {
		name string
		cfg  BootstrapConfig
		edit func(*testing.T, BootstrapConfig) error
		want string
	}{
		{name: "no node id", cfg: BootstrapConfig{SocketPath: "/s"}, want: "node id is required"},
		{name: "no socket", cfg: BootstrapConfig{NodeID: "n"}, want: "xds socket path is required"},
		{name: "admin on a pod-reachable address", cfg: BootstrapConfig{NodeID: "n", SocketPath: "/s", AdminAddress: netip.MustParseAddrPort("0.0.0.0:15000")},
			want: `admin address "0.0.0.0" is not loopback`},
		{name: "ADS through a missing cluster", cfg: BootstrapConfig{NodeID: "n", SocketPath: "/s"}, edit: func(t *testing.T, cfg BootstrapConfig) error {
			cfg.AdminAddress = DefaultAdminAddress
			bs, err := Bootstrap(cfg)
			if err != nil {
				t.Fatal(err)
			}
			bs.StaticResources.Clusters[0].Name = "renamed"
			bs.StaticResources.Clusters[0].LoadAssignment.ClusterName = "renamed"
			return ValidateBootstrap(bs)
		}, want: `ADS names cluster "sluice_xds", which is not a static cluster`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var err error
			if tc.edit != nil {
				err = tc.edit(t, tc.cfg)
			} else {
				_, err = Bootstrap(tc.cfg)
			}
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want %q", err, tc.want)
			}
		})
	}
}
