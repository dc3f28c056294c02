package conformance

import (
	"bytes"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"strings"
	"time"
)

// Limits of Envoy's inspectors: tls_inspector reads a ClientHello of up to
// 64 KiB (tls_inspector.h TLS_MAX_CLIENT_HELLO) and closes the connection
// beyond; http_inspector looks at the first 8 KiB for a request line
// (http_inspector.h MAX_INSPECT_SIZE).
const (
	maxClientHello = 64 << 10
	maxHTTPInspect = 8 << 10
)

// inspected is what the listener filters learned, and the bytes they read
// (Envoy peeks; the chain reads them again).
type inspected struct {
	transport string
	sni       string
	alpn      []string
	early     []byte
}

var errSniffed = errors.New("ClientHello read")

// inspect runs the TLS and HTTP inspectors on c within the listener's
// filter timeout. ok false: a listener filter closed the connection (an
// oversized ClientHello, or the timeout without continue_on_...).
func inspect(c net.Conn, l *Listener) (in inspected, ok bool) {
	deadline := time.Now().Add(l.FiltersTimeout)
	c.SetReadDeadline(deadline)
	defer c.SetReadDeadline(time.Time{})
	var read bytes.Buffer
	timedOut := func(err error) bool {
		var ne net.Error
		return errors.As(err, &ne) && ne.Timeout()
	}
	first := make([]byte, 1)
	if _, err := io.ReadFull(c, first); err != nil {
		// Nothing sent (a server-first protocol) within the timeout.
		return in, timedOut(err) && l.ContinueOnTimeout
	}
	read.Write(first)
	if l.TLSInspector && first[0] == 0x16 { // TLS handshake record
		var hello *tls.ClientHelloInfo
		lim := &limitedReader{r: io.TeeReader(c, &read), n: maxClientHello - 1}
		conn := &sniffConn{Conn: c, r: io.MultiReader(bytes.NewReader(first), lim)}
		err := tls.Server(conn, &tls.Config{GetConfigForClient: func(h *tls.ClientHelloInfo) (*tls.Config, error) {
			hello = h
			return nil, errSniffed
		}}).Handshake()
		in.early = read.Bytes()
		switch {
		case hello != nil:
			in.transport, in.sni = "tls", hello.ServerName
			in.alpn = hello.SupportedProtos
			return in, true
		case lim.n <= 0:
			return in, false // client_hello_too_large: Envoy closes
		case timedOut(err):
			return in, l.ContinueOnTimeout
		}
		return in, true // not TLS after all: nothing detected
	}
	if l.HTTPInspector {
		buf := append([]byte{}, first...)
		tmp := make([]byte, 4096)
		for len(buf) < maxHTTPInspect && !bytes.Contains(buf, []byte("\r\n")) && mayBeHTTP(buf) {
			n, err := c.Read(tmp[:min(len(tmp), maxHTTPInspect-len(buf))])
			buf = append(buf, tmp[:n]...)
			if err != nil {
				in.early = buf
				if timedOut(err) {
					return in, l.ContinueOnTimeout
				}
				return in, true
			}
		}
		in.early = buf
		if line, _, ok := bytes.Cut(buf, []byte("\r\n")); ok {
			if p := httpProtocol(string(line)); p != "" {
				in.alpn = []string{p}
			}
		}
		return in, true
	}
	in.early = read.Bytes()
	return in, true
}

// mayBeHTTP: the bytes so far could start an HTTP/1 request line or the
// HTTP/2 preface (a token of upper-case letters, then a space).
func mayBeHTTP(b []byte) bool {
	for i, c := range b {
		switch {
		case c == ' ' && i > 0:
			return true
		case c < 'A' || c > 'Z':
			return false
		}
	}
	return true
}

// httpProtocol is what http_inspector sets for a request line: "http/1.0",
// "http/1.1", or "h2c" for the HTTP/2 connection preface.
func httpProtocol(line string) string {
	if line == "PRI * HTTP/2.0" {
		return "h2c"
	}
	parts := strings.Split(line, " ")
	if len(parts) != 3 || parts[0] == "" || !mayBeHTTP([]byte(parts[0]+" ")) || parts[1] == "" {
		return ""
	}
	switch parts[2] {
	case "HTTP/1.0":
		return "http/1.0"
	case "HTTP/1.1":
		return "http/1.1"
	}
	return ""
}

type limitedReader struct {
	r io.Reader
	n int
}

func (l *limitedReader) Read(p []byte) (int, error) {
	if l.n <= 0 {
		return 0, errors.New("ClientHello too large")
	}
	if len(p) > l.n {
		p = p[:l.n]
	}
	n, err := l.r.Read(p)
	l.n -= n
	return n, err
}

// sniffConn reads from r and swallows writes: the client never sees the
// alert of the abandoned handshake.
type sniffConn struct {
	net.Conn
	r io.Reader
}

func (c *sniffConn) Read(p []byte) (int, error)  { return c.r.Read(p) }
func (c *sniffConn) Write(p []byte) (int, error) { return len(p), nil }

// replayConn gives back the bytes the inspectors read before the rest.
type replayConn struct {
	*net.TCPConn
	r io.Reader
}

func newReplayConn(c *net.TCPConn, early []byte) *replayConn {
	return &replayConn{TCPConn: c, r: io.MultiReader(bytes.NewReader(early), c)}
}

func (c *replayConn) Read(p []byte) (int, error) { return c.r.Read(p) }
