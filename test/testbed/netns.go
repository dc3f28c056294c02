package testbed

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"golang.org/x/sys/unix"
	"net"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// Netns is a named network namespace the testbed created (/run/netns/<Name>).
type Netns struct {
	Name string
}

// Path is the namespace's bind mount, for nsenter --net=.
func (n *Netns) Path() string { return "/run/netns/" + n.Name }

// RandomID returns 8 random hex digits for unique test object names.
func RandomID() string {
	var b [4]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// NewNetns creates a network namespace with lo up, deleted by t.Cleanup.
func NewNetns(t testing.TB, name string) *Netns {
	t.Helper()
	ns := &Netns{Name: name}
	mustRun(t, "ip", "netns", "add", name)
	t.Cleanup(func() {
		if out, err := exec.Command("ip", "netns", "del", name).CombinedOutput(); err != nil {
			t.Errorf("delete netns %s: %v: %s", name, err, out)
		}
	})
	ns.IP(t, "link", "set", "lo", "up")
	// Interfaces created from now on skip IPv6 duplicate address detection:
	// a tentative link-local address stalls neighbour discovery for about a
	// second, and these links are point-to-point veths we address ourselves.
	ns.Sysctl(t, "net.ipv6.conf.default.accept_dad", "0")
	ns.Sysctl(t, "net.ipv6.conf.all.accept_dad", "0")
	return ns
}

// IP runs `ip -n <ns> args...` and fails the test on error.
func (n *Netns) IP(t testing.TB, args ...string) {
	t.Helper()
	mustRun(t, "ip", append([]string{"-n", n.Name}, args...)...)
}

// Sysctl sets a namespaced sysctl inside n.
func (n *Netns) Sysctl(t testing.TB, key, value string) {
	t.Helper()
	mustRun(t, "ip", "netns", "exec", n.Name, "sysctl", "-qw", key+"="+value)
}

// Do runs f on an OS thread switched into n. Sockets created inside f belong
// to n for their whole life, whichever thread later uses them.
func (n *Netns) Do(f func() error) error {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	orig, err := netns.Get()
	if err != nil {
		return fmt.Errorf("current netns: %w", err)
	}
	defer orig.Close()
	target, err := netns.GetFromName(n.Name)
	if err != nil {
		return fmt.Errorf("open netns %s: %w", n.Name, err)
	}
	defer target.Close()
	if err := netns.Set(target); err != nil {
		return fmt.Errorf("enter netns %s: %w", n.Name, err)
	}
	ferr := f()
	if err := netns.Set(orig); err != nil {
		// The thread is in the wrong namespace: let it die with the
		// goroutine rather than be reused.
		runtime.LockOSThread()
		return fmt.Errorf("leave netns %s: %w", n.Name, err)
	}
	return ferr
}

// Listen opens a TCP listener inside n.
func (n *Netns) Listen(t testing.TB, network, addr string) net.Listener {
	t.Helper()
	var l net.Listener
	err := n.Do(func() (err error) {
		lc := net.ListenConfig{}
		lc.SetMultipathTCP(false)
		l, err = lc.Listen(t.Context(), network, addr)
		return err
	})
	if err != nil {
		t.Fatalf("listen %s %s in %s: %v", network, addr, n.Name, err)
	}
	t.Cleanup(func() { l.Close() })
	return l
}

// ListenPacket opens a UDP socket inside n.
func (n *Netns) ListenPacket(t testing.TB, network, addr string) net.PacketConn {
	t.Helper()
	var c net.PacketConn
	err := n.Do(func() (err error) {
		c, err = (&net.ListenConfig{}).ListenPacket(t.Context(), network, addr)
		return err
	})
	if err != nil {
		t.Fatalf("listen %s %s in %s: %v", network, addr, n.Name, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func mustRun(t testing.TB, name string, args ...string) {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Env = append(os.Environ(), "LC_ALL=C")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%s %s: %v: %s", name, strings.Join(args, " "), err, out)
	}
}

// NetlinkHandle returns a netlink handle inside n, closed when the test
// ends.
func (n *Netns) NetlinkHandle(t testing.TB) *netlink.Handle {
	t.Helper()
	ns, err := netns.GetFromName(n.Name)
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	// Route sockets only: by default netlink also opens XFRM and netfilter
	// sockets, which fail (EPROTONOSUPPORT) on kernels without those
	// modules loaded, as in make test-kernels' VMs.
	h, err := netlink.NewHandleAt(ns, unix.NETLINK_ROUTE)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(h.Close)
	return h
}
