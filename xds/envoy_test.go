package xds

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
)

// TestEnvoyAcceptsConfig runs a real Envoy (ENVOY_BIN) with the bootstrap
// against the ADS server and checks that it accepted the generated
// configuration: /ready answers LIVE, config_dump holds our listener and
// clusters at the served version, and no NACK was recorded. Envoy cannot
// be installed on the build machines, so this runs where one is available
// (the Vagrant/kind VM, a laptop).
func TestEnvoyAcceptsConfig(t *testing.T) {
	bin := os.Getenv("ENVOY_BIN")
	if bin == "" {
		t.Skip("ENVOY_BIN not set: no Envoy binary to check the configuration against (set ENVOY_BIN=/path/to/envoy)")
	}
	s, sock := startServer(t)
	proxyPort, adminPort := freePort(t), freePort(t)
	state := goldenCases[len(goldenCases)-1].state
	state.Proxy = Proxy{IPv4: netip.MustParseAddr("127.0.0.1"), Port: proxyPort}
	version, _, err := s.Update(context.Background(), state)
	if err != nil {
		t.Fatal(err)
	}

	bs, err := Bootstrap(BootstrapConfig{NodeID: "envoy-test", SocketPath: sock, AdminAddress: netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), adminPort)})
	if err != nil {
		t.Fatal(err)
	}
	y, err := MarshalYAML(bs)
	if err != nil {
		t.Fatal(err)
	}
	cfg := filepath.Join(t.TempDir(), "envoy.yaml")
	if err := os.WriteFile(cfg, y, 0o644); err != nil {
		t.Fatal(err)
	}
	var logs bytes.Buffer
	cmd := exec.Command(bin, "-c", cfg, "--disable-hot-restart", "--base-id", fmt.Sprint(os.Getpid()), "-l", "info")
	cmd.Stdout, cmd.Stderr = &logs, &logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
		if t.Failed() {
			t.Logf("envoy output:\n%s", logs.String())
		}
	})

	admin := fmt.Sprintf("http://127.0.0.1:%d", adminPort)
	deadline := time.Now().Add(60 * time.Second)
	for {
		body, code := get(admin + "/ready")
		if code == http.StatusOK && strings.TrimSpace(body) == "LIVE" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("envoy not ready after 60s: /ready %d %q", code, body)
		}
		time.Sleep(200 * time.Millisecond)
	}
	waitFor(t, "ACK of the listener", func() bool { return s.Status().Acked[resource.ListenerType] == version })
	if st := s.Status(); st.NACKs != 0 {
		t.Fatalf("envoy rejected the configuration: %+v", st.LastNACK)
	}
	dump, code := get(admin + "/config_dump")
	if code != http.StatusOK {
		t.Fatalf("config_dump: %d", code)
	}
	for _, want := range []string{`"name": "` + ListenerName + `"`, OriginalDstClusterName, DenyClusterName, `"version_info": "` + version + `"`, "audit|a/one"} {
		if !strings.Contains(dump, want) {
			t.Errorf("config_dump lacks %s", want)
		}
	}
}

func freePort(t *testing.T) uint16 {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return uint16(l.Addr().(*net.TCPAddr).Port)
}

func get(url string) (string, int) {
	resp, err := http.Get(url)
	if err != nil {
		return err.Error(), 0
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b), resp.StatusCode
}
