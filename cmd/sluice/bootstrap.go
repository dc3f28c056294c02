package main

import (
	"fmt"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"strings"

	"github.com/sluice-io/sluice/xds"
	"google.golang.org/protobuf/encoding/protojson"
)

// Default paths shared by the agent and the bootstrap.
const defaultXDSSocket = "/run/sluice/xds.sock"

func defaultNodeID() string {
	if n := os.Getenv("NODE_NAME"); n != "" {
		return n
	}
	if h, err := os.Hostname(); err == nil {
		return h
	}
	return "sluice"
}

func runBootstrap(args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("bootstrap", `Print the Envoy bootstrap that makes Envoy take its listeners and clusters
from this node's agent over ADS (the unix socket below), with Envoy's admin on
loopback only; its /ready is the readiness probe. Start Envoy with
  envoy -c <file>.yaml
The configuration is validated before it is printed.`, stderr)
	nodeID := fs.String("node-id", defaultNodeID(), "node id Envoy reports; the default is $NODE_NAME if set, else the host name")
	socket := fs.String("xds-socket", defaultXDSSocket, "the agent's ADS unix socket")
	admin := fs.String("admin-address", xds.DefaultAdminAddress.String(), "Envoy admin address: a loopback ip:port, or unix:PATH (a socket only this pod reaches: the DaemonSet's, so that an update's two Envoys never claim one port)")
	format := fs.String("format", "yaml", "output format: yaml or json")
	output := fs.String("output", "-", "file to write (written atomically), or - for stdout")
	maxHeap := fs.Uint64("max-heap-bytes", xds.DefaultMaxHeapBytes, "Envoy's overload manager: at 95% of this heap Envoy shrinks its heap, at 98% it stops accepting requests and connections; keep it below the Envoy container's memory limit")
	maxConns := fs.Uint64("max-downstream-connections", xds.DefaultMaxDownstreamConnections, "Envoy closes new downstream connections beyond this many open ones (all pods of the node together)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		fs.Usage()
		return fmt.Errorf("bootstrap takes no arguments, got %q: %w", fs.Args(), errUsage)
	}
	var adminAddr netip.AddrPort
	adminSocket, isSocket := strings.CutPrefix(*admin, "unix:")
	if !isSocket {
		adminSocket = ""
		var err error
		if adminAddr, err = netip.ParseAddrPort(*admin); err != nil {
			return fmt.Errorf("--admin-address %q: want ip:port or unix:PATH: %w", *admin, err)
		}
	} else if !filepath.IsAbs(adminSocket) {
		return fmt.Errorf("--admin-address %q: want an absolute socket path", *admin)
	}
	if *maxHeap < 64<<20 || *maxConns < 1 {
		return fmt.Errorf("--max-heap-bytes %d, --max-downstream-connections %d: want at least 64 MiB and 1", *maxHeap, *maxConns)
	}
	bs, err := xds.Bootstrap(xds.BootstrapConfig{NodeID: *nodeID, SocketPath: *socket, AdminAddress: adminAddr, AdminSocket: adminSocket, MaxHeapBytes: *maxHeap, MaxDownstreamConnections: *maxConns})
	if err != nil {
		return err
	}
	var out []byte
	switch *format {
	case "yaml":
		out, err = xds.MarshalYAML(bs)
	case "json":
		out, err = protojson.MarshalOptions{UseProtoNames: true, Multiline: true}.Marshal(bs)
		out = append(out, '\n')
	default:
		return fmt.Errorf("--format %q: want yaml or json", *format)
	}
	if err != nil {
		return err
	}
	if *output == "-" {
		_, err = stdout.Write(out)
		return err
	}
	return writeFileAtomic(*output, out)
}

// writeFileAtomic writes through a temporary file in the same directory and
// renames it, so a reader (Envoy starting) never sees half a file.
func writeFileAtomic(path string, data []byte) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := tmp.Chmod(0o644); err != nil {
		tmp.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}
