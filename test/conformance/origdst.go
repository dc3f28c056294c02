package conformance

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// SOOriginalDst is SO_ORIGINAL_DST / IP6T_SO_ORIGINAL_DST.
const SOOriginalDst = 80

// OriginalDst asks the kernel (answered by sluice's getsockopt program) for
// the original destination of an accepted connection, as Envoy does.
func OriginalDst(c *net.TCPConn) (netip.AddrPort, error) {
	raw, err := c.SyscallConn()
	if err != nil {
		return netip.AddrPort{}, err
	}
	local := c.LocalAddr().(*net.TCPAddr).AddrPort()
	level := unix.SOL_IP
	if local.Addr().Is6() && !local.Addr().Is4In6() {
		level = unix.SOL_IPV6
	}
	var buf [128]byte // sizeof(struct sockaddr_storage)
	n := uint32(len(buf))
	var errno syscall.Errno
	err = raw.Control(func(fd uintptr) {
		_, _, errno = unix.Syscall6(unix.SYS_GETSOCKOPT, fd, uintptr(level), SOOriginalDst,
			uintptr(unsafe.Pointer(&buf[0])), uintptr(unsafe.Pointer(&n)), 0)
	})
	if err != nil {
		return netip.AddrPort{}, err
	}
	if errno != 0 {
		return netip.AddrPort{}, errno
	}
	return parseSockaddr(buf[:n])
}

func parseSockaddr(b []byte) (netip.AddrPort, error) {
	if len(b) < 2 {
		return netip.AddrPort{}, fmt.Errorf("short sockaddr (%d bytes)", len(b))
	}
	switch binary.NativeEndian.Uint16(b) {
	case unix.AF_INET:
		if len(b) < 8 {
			return netip.AddrPort{}, errors.New("short sockaddr_in")
		}
		return netip.AddrPortFrom(netip.AddrFrom4([4]byte(b[4:8])), binary.BigEndian.Uint16(b[2:4])), nil
	case unix.AF_INET6:
		if len(b) < 24 {
			return netip.AddrPort{}, errors.New("short sockaddr_in6")
		}
		return netip.AddrPortFrom(netip.AddrFrom16([16]byte(b[8:24])), binary.BigEndian.Uint16(b[2:4])), nil
	}
	return netip.AddrPort{}, fmt.Errorf("unknown address family %d", binary.NativeEndian.Uint16(b))
}
