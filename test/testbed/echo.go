package testbed

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"testing"
)

// EchoServer accepts connections in the external namespace and answers each
// with "peer=<remote address it saw>", recording the peers.
type EchoServer struct {
	mu        sync.Mutex
	peers     []string
	conns     []Conn
	datagrams []Datagram
}

// Conn is one TCP connection an echo server accepted: from the client's
// address (as the server saw it) to the server's.
type Conn struct {
	From, To string
}

// Datagram is one UDP datagram an echo server received.
type Datagram struct {
	From, To string
	Payload  string
}

// ServeEcho starts an echo server on every listener until the test ends.
func ServeEcho(t testing.TB, ls ...net.Listener) *EchoServer {
	s := &EchoServer{}
	for _, l := range ls {
		s.Add(l)
	}
	return s
}

// Add serves one more listener.
func (s *EchoServer) Add(l net.Listener) {
	go s.accept(l, func(c net.Conn, greeting string) {
		c.Write([]byte(greeting))
		io.Copy(c, c) // then echo until the client is done
	})
}

// AddHTTP serves HTTP/1.1 on l: each request gets 200 with the body
// "peer=<remote address>"; a WebSocket upgrade gets 101, then that line,
// then an echo of the stream. Connections are recorded as for Add.
func (s *EchoServer) AddHTTP(l net.Listener) { go s.accept(l, serveHTTPEcho) }

// accept records each connection on l and hands it to serve with the line
// "peer=<remote address>\n".
func (s *EchoServer) accept(l net.Listener, serve func(c net.Conn, greeting string)) {
	for {
		c, err := l.Accept()
		if err != nil {
			return
		}
		peer := c.RemoteAddr().(*net.TCPAddr).AddrPort()
		local := c.LocalAddr().(*net.TCPAddr).AddrPort()
		s.mu.Lock()
		s.peers = append(s.peers, peer.String())
		s.conns = append(s.conns, Conn{From: peer.String(), To: netip.AddrPortFrom(local.Addr().Unmap(), local.Port()).String()})
		s.mu.Unlock()
		go func() {
			defer c.Close()
			serve(c, "peer="+peer.Addr().Unmap().String()+"\n")
		}()
	}
}

func serveHTTPEcho(c net.Conn, body string) {
	br := bufio.NewReader(c)
	for {
		req, err := http.ReadRequest(br)
		if err != nil {
			return
		}
		io.Copy(io.Discard, req.Body)
		if strings.EqualFold(req.Header.Get("Upgrade"), "websocket") {
			fmt.Fprintf(c, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n%s", body)
			io.Copy(c, br)
			return
		}
		fmt.Fprintf(c, "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\nServer: testbed-echo\r\n\r\n%s", len(body), body)
	}
}

// AddUDP records every datagram arriving on c (to is c's address, for the
// record) and answers it with "peer=<source address>".
func (s *EchoServer) AddUDP(c net.PacketConn) {
	go func() {
		buf := make([]byte, 2048)
		for {
			n, from, err := c.ReadFrom(buf)
			if err != nil {
				return
			}
			src := from.(*net.UDPAddr).AddrPort()
			s.mu.Lock()
			s.datagrams = append(s.datagrams, Datagram{From: src.String(), To: c.LocalAddr().String(), Payload: string(buf[:n])})
			s.mu.Unlock()
			c.WriteTo([]byte("peer="+src.Addr().Unmap().String()+"\n"), from)
		}
	}()
}

// Datagrams returns the UDP datagrams received so far.
func (s *EchoServer) Datagrams() []Datagram {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]Datagram(nil), s.datagrams...)
}

// Conns returns the TCP connections accepted so far.
func (s *EchoServer) Conns() []Conn {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]Conn(nil), s.conns...)
}

// Peers returns the remote addresses seen so far.
func (s *EchoServer) Peers() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.peers...)
}
