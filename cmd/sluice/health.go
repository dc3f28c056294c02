package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"time"
)

func runHealth(args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("health", `Ask the agent serving --socket (sluice agent --health-socket) whether it is live
(/healthz) or, with --ready, ready (/readyz: it holds the node lock and has
programmed a full view of its workloads). Exits 0 when it is, 1 with the
agent's reason when it is not: the DaemonSet's exec probes, which reach this
pod's agent even while another agent on the node holds the same host ports.`, stderr)
	socket := fs.String("socket", "/run/sluice/agent.sock", "the agent's health socket")
	ready := fs.Bool("ready", false, "ask for readiness instead of liveness")
	timeout := fs.Duration("timeout", 2*time.Second, "give up after this long")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() != 0 {
		fs.Usage()
		return errUsage
	}
	path := "/healthz"
	if *ready {
		path = "/readyz"
	}
	c := &http.Client{Timeout: *timeout, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", *socket)
		},
	}}
	resp, err := c.Get("http://agent" + path)
	if err != nil {
		return fmt.Errorf("agent health socket %s: %w", *socket, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	msg := strings.TrimSpace(string(b))
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s: %s", path, msg)
	}
	fmt.Fprintln(stdout, msg)
	return nil
}
