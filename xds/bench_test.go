package xds

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// benchState is a busy node: 250 selected pods, each enforcing 20 allow
// entries (hostnames with and without ports, wildcards, IPv4 and IPv6
// prefixes).
func benchState(tb testing.TB) State { return benchStateN(tb, 250) }

// benchStateN is benchState with n pods.
func benchStateN(tb testing.TB, n int) State {
	tb.Helper()
	s := State{Proxy: testProxy}
	for i := range n {
		var entries []string
		for j := range 20 {
			switch j % 5 {
			case 0:
				entries = append(entries, fmt.Sprintf("api%d.svc%d.example.com:443", j, i))
			case 1:
				entries = append(entries, fmt.Sprintf("*.tenant%d.example.net", j))
			case 2:
				entries = append(entries, fmt.Sprintf("status%d.example.org", j))
			case 3:
				entries = append(entries, fmt.Sprintf("10.%d.%d.0/24:5432", i%250, j))
			case 4:
				entries = append(entries, fmt.Sprintf("[2001:db8:%x:%x::/64]:443", i, j))
			}
		}
		w := pod(fmt.Sprintf("ns%d", i%10), fmt.Sprintf("pod-%d", i), "enforce", strings.Join(entries, ","),
			fmt.Sprintf("10.%d.%d.%d", 244+i/40000, i/200%200, i%200+2), fmt.Sprintf("fd00:244::%x", i+2))
		if w.PolicyError != "" {
			tb.Fatal(w.PolicyError)
		}
		s.Workloads = append(s.Workloads, w)
	}
	return s
}

// BenchmarkBuild250x20: building the resources alone.
func BenchmarkBuild250x20(b *testing.B) {
	s := benchState(b)
	b.ReportAllocs()
	for b.Loop() {
		if _, _, err := Build(s); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkBuildValidate250x20: what the agent pays per change before
// publishing: build plus the strict validation.
func BenchmarkBuildValidate250x20(b *testing.B) {
	s := benchState(b)
	b.ReportAllocs()
	for b.Loop() {
		r, _, err := Build(s)
		if err != nil {
			b.Fatal(err)
		}
		if err := Validate(r); err != nil {
			b.Fatal(err)
		}
	}
}

// cpuTime is the process's CPU time so far (user and system, all threads):
// the benchmarks report it per update beside the wall time, since a build
// and its validation use every CPU the process may (GOMAXPROCS).
func cpuTime(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// timedUpdate is srv.Update(s), its CPU time added to *cpu.
func timedUpdate(b *testing.B, srv *Server, s State, cpu *time.Duration) {
	t0 := cpuTime(b)
	if _, _, err := srv.Update(context.Background(), s); err != nil {
		b.Fatal(err)
	}
	*cpu += cpuTime(b) - t0
}

func newBenchServer(b *testing.B) *Server {
	srv, err := NewServer(ServerConfig{SocketPath: filepath.Join(b.TempDir(), "x.sock"), Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		b.Fatal(err)
	}
	return srv
}

// BenchmarkUpdate250x20: Server.Update end to end (build, validate, hash,
// snapshot) with one workload changing each time, so every call publishes.
// The server has served the state once before the clock starts.
func BenchmarkUpdate250x20(b *testing.B) { benchUpdateOneChange(b, 250) }

// BenchmarkUpdateOneChange: the same at other numbers of workloads, for
// the cost's growth per workload.
func BenchmarkUpdateOneChange(b *testing.B) {
	for _, n := range []int{100, 500, 1000} {
		b.Run(fmt.Sprintf("workloads=%d", n), func(b *testing.B) { benchUpdateOneChange(b, n) })
	}
}

func benchUpdateOneChange(b *testing.B, n int) {
	s := benchStateN(b, n)
	srv := newBenchServer(b)
	if _, _, err := srv.Update(context.Background(), s); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	i := 0
	var cpu time.Duration
	for b.Loop() {
		i++
		s.Workloads[0].IPs = []netip.Addr{netip.AddrFrom4([4]byte{10, 250, byte(i >> 8), byte(i)})}
		timedUpdate(b, srv, s, &cpu)
	}
	b.ReportMetric(float64(cpu.Nanoseconds())/float64(b.N), "cpu-ns/op")
}

// BenchmarkUpdateFull: the first Update of a new server (a restarted
// agent): everything built and validated, nothing remembered.
func BenchmarkUpdateFull(b *testing.B) {
	for _, n := range []int{250, 1000} {
		b.Run(fmt.Sprintf("workloads=%d", n), func(b *testing.B) {
			s := benchStateN(b, n)
			b.ReportAllocs()
			var cpu time.Duration
			for b.Loop() {
				b.StopTimer()
				srv := newBenchServer(b)
				b.StartTimer()
				timedUpdate(b, srv, s, &cpu)
			}
			b.ReportMetric(float64(cpu.Nanoseconds())/float64(b.N), "cpu-ns/op")
		})
	}
}

// BenchmarkUpdateUnchanged250x20: Server.Update with the same state again
// (a resync, a change that does not reach the proxy's configuration).
func BenchmarkUpdateUnchanged250x20(b *testing.B) {
	s := benchState(b)
	srv := newBenchServer(b)
	if _, _, err := srv.Update(context.Background(), s); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, _, err := srv.Update(context.Background(), s); err != nil {
			b.Fatal(err)
		}
	}
}

// The benchmark's state is valid and its size is what the docs quote.
func TestBenchStateValid(t *testing.T) {
	r, issues, err := Build(benchState(t))
	if err != nil || len(issues) != 0 {
		t.Fatalf("err %v issues %v", err, issues)
	}
	if err := Validate(r); err != nil {
		t.Fatal(err)
	}
	if n := len(r.Listeners[0].GetFilterChains()); n != 2+250*(1+1+1+1+1) {
		// Per pod: deny, tcp, tls, http|443 and http|*.
		t.Fatalf("%d filter chains", n)
	}
}
