package testbed

import (
	"io"
	"net"
	"sync"
	"testing"
)

// EchoServer accepts connections in the external namespace and answers each
// with "peer=<remote address it saw>", recording the peers.
type EchoServer struct {
	mu    sync.Mutex
	peers []string
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
func (s *EchoServer) Add(l net.Listener) { go s.serve(l) }

func (s *EchoServer) serve(l net.Listener) {
	for {
		c, err := l.Accept()
		if err != nil {
			return
		}
		peer := c.RemoteAddr().(*net.TCPAddr).AddrPort()
		s.mu.Lock()
		s.peers = append(s.peers, peer.String())
		s.mu.Unlock()
		go func() {
			defer c.Close()
			c.Write([]byte("peer=" + peer.Addr().Unmap().String() + "\n"))
			io.Copy(c, c) // then echo until the client is done
		}()
	}
}

// Peers returns the remote addresses seen so far.
func (s *EchoServer) Peers() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.peers...)
}
