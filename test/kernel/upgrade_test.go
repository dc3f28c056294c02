package kernel

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/sluice-io/sluice/agent/datapath"
	"github.com/sluice-io/sluice/test/layouts"
	"github.com/sluice-io/sluice/test/testbed"
)

// startStream runs the stream role in pod p: a new connection to dst every
// 2 ms for d.
func startStream(t *testing.T, p *testbed.Pod, d time.Duration, dst string) (time.Time, func() []testbed.Attempt) {
	t.Helper()
	return testbed.StartStream(t, p.Cgroup, p.Netns, d+30*time.Second, "-duration", d.String(), "-interval", "2ms", "-send", "hello", dst)
}

// The upgrade the DaemonSet makes, at the datapath: the pins of a frozen
// earlier layout, programmed and carrying a steady stream of connections
// from a fail-open and a fail-closed pod, are taken over by this binary's
// Open (migrated in place, programs switched with link.Update). Every
// connection before, during and after is redirected: none fails, none goes
// direct, none is refused; a connection held open across the upgrade keeps
// working, and the proxy recovers the original destination of connections
// made after it.
func TestPrivilegedUpgradeUnderLoad(t *testing.T) {
	for _, v := range layouts.Versions() {
		t.Run(fmt.Sprintf("from-layout-%d", v), func(t *testing.T) {
			f := setupOpen(t, 2, datapath.Config{}, func(cfg datapath.Config) (*datapath.Datapath, error) {
				if err := layouts.Install(v, cfg.CgroupPath, cfg.PinPath); err != nil {
					return nil, err
				}
				return datapath.OpenPinned(cfg.PinPath)
			})
			open, closed := f.tb.Pods[0], f.tb.Pods[1]
			f.selectPod(t, open, 1, datapath.FailOpen)
			f.selectPod(t, closed, 2, datapath.FailClosed)
			dst := "tcp4:" + hostport(ext4, serverPort)

			hold := testbed.Command(t, closed.Cgroup, closed.Netns, "hold", dst)
			stdin, stdout := testbed.StartPiped(t, hold)
			t.Cleanup(func() { hold.Process.Kill(); hold.Wait() })
			readLine := testbed.LineReader(stdout, 5*time.Second)
			if l := readLine(t); l != "READY peer="+testbed.NodeV4.String() {
				t.Fatalf("held connection: %q, want it redirected", l)
			}

			const d = 3 * time.Second
			openStart, waitOpen := startStream(t, open, d, dst)
			closedStart, waitClosed := startStream(t, closed, d, dst)
			time.Sleep(d / 2)
			began := time.Now()
			dp, err := datapath.Open(f.cfg)
			if err != nil {
				t.Fatalf("upgrade from layout %d: %v", v, err)
			}
			took := time.Since(began)
			f.dp.Close()
			f.dp = dp
			if dp.AdoptedLayout() != v {
				t.Errorf("AdoptedLayout = %d, want %d", dp.AdoptedLayout(), v)
			}

			for _, s := range []struct {
				pod   *testbed.Pod
				name  string
				start time.Time
				wait  func() []testbed.Attempt
			}{{open, "fail-open", openStart, waitOpen}, {closed, "fail-closed", closedStart, waitClosed}} {
				as := s.wait()
				count := map[string]int{}
				var bad []string
				// Attempts in flight while Open ran: each runs from its
				// start to the next one's (on one slow CPU a single
				// connect may span the whole upgrade).
				during := 0
				for i, a := range as {
					from, to := s.start.Add(a.At), time.Now()
					if i+1 < len(as) {
						to = s.start.Add(as[i+1].At)
					}
					if from.Before(began.Add(took)) && to.After(began) {
						during++
					}
					o := "failed"
					switch {
					case a.Reply == "peer="+testbed.NodeV4.String():
						o = "redirected"
					case a.Reply == "peer="+s.pod.IPv4.String():
						o = "direct"
					case strings.Contains(a.Err, "operation not permitted"):
						o = "refused"
					}
					count[o]++
					if o != "redirected" && len(bad) < 5 {
						bad = append(bad, fmt.Sprintf("+%v %s: %s%s", a.At.Round(time.Millisecond), o, a.Err, a.Reply))
					}
				}
				t.Logf("%s pod: %d connections across an upgrade taking %v (%d in flight during it): %v", s.name, len(as), took.Round(time.Microsecond), during, count)
				if count["redirected"] != len(as) {
					t.Errorf("%s pod across the upgrade: %v, want every one redirected; first others: %v", s.name, count, bad)
				}
				// A slow machine (an emulated kernel) makes fewer; some
				// must have started while the programs were switched.
				if during == 0 && took > 10*time.Millisecond {
					t.Errorf("%s pod: no connection in flight during the upgrade (%d in all): the test proved nothing", s.name, len(as))
				}
			}

			stdin.Write([]byte("after-upgrade\n"))
			if l := readLine(t); l != "echo: after-upgrade" {
				t.Errorf("held connection after the upgrade: %q", l)
			}
			r := f.dial(t, closed.Cgroup, closed, "tcp4:"+hostport(ext4b, serverPort))[0]
			if r.Reply != "peer="+testbed.NodeV4.String() {
				t.Fatalf("new connection after the upgrade: %+v", r)
			}
			if rec := f.recordFor(t, r.Local); rec.OrigDst != hostport(ext4b, serverPort) {
				t.Errorf("proxy recovered %q after the upgrade, want %s", rec.OrigDst, hostport(ext4b, serverPort))
			}
			if got, err := datapath.PinnedLayout(f.cfg.PinPath); err != nil || got != datapath.LayoutVersion {
				t.Errorf("pinned layout after the upgrade: %d, %v", got, err)
			}
		})
	}
}
