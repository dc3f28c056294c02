// Package kube starts a real Kubernetes API server (kube-apiserver built
// from k8s.io/kubernetes by test/k8s/build.sh, and etcd) for integration
// tests, on loopback, in a temporary directory, torn down with the test.
package kube

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/sluice-io/sluice/test/testbed"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
)

// Binaries are found through these variables (make test sets them after
// test/k8s/build.sh).
const (
	EnvAPIServer = "SLUICE_KUBE_APISERVER"
	EnvEtcd      = "SLUICE_ETCD"
)

// Cluster is a running API server.
type Cluster struct {
	Client     kubernetes.Interface
	Config     *rest.Config
	Kubeconfig string // path of a kubeconfig for other processes
	// EtcdDir is etcd's data directory (on tmpfs where there is one).
	EtcdDir string
}

// Binaries returns the kube-apiserver and etcd paths, or a reason they are
// not available.
func Binaries() (apiserver, etcd string, why string) {
	apiserver, etcd = os.Getenv(EnvAPIServer), os.Getenv(EnvEtcd)
	if etcd == "" {
		etcd, _ = exec.LookPath("etcd")
	}
	switch {
	case apiserver == "":
		return "", "", EnvAPIServer + " is not set (make test builds kube-apiserver and sets it)"
	case etcd == "":
		return "", "", "no etcd (apt-get install etcd-server, or set " + EnvEtcd + ")"
	}
	for _, p := range []string{apiserver, etcd} {
		if _, err := os.Stat(p); err != nil {
			return "", "", err.Error()
		}
	}
	return apiserver, etcd, ""
}

// Start runs etcd and kube-apiserver on loopback in network namespace ns
// (the testbed's node, where the agent runs) until the test ends; the
// returned client reaches it from the test process through sockets
// created in ns. Under CI=true missing binaries fail the test; otherwise it
// skips.
func Start(t testing.TB, ns *testbed.Netns) *Cluster {
	t.Helper()
	apiserverBin, etcdBin, why := Binaries()
	if why != "" {
		if os.Getenv("CI") == "true" {
			t.Fatalf("no API server to test against under CI=true: %s", why)
		}
		t.Skip(why)
	}
	dir := t.TempDir()
	etcdPort, peerPort, apiPort := FreePort(t), FreePort(t), FreePort(t)
	etcdURL := fmt.Sprintf("http://127.0.0.1:%d", etcdPort)
	peerURL := fmt.Sprintf("http://127.0.0.1:%d", peerPort)
	dial := func(ctx context.Context, network, addr string) (net.Conn, error) {
		var c net.Conn
		err := ns.Do(func() error {
			var err error
			c, err = (&net.Dialer{}).DialContext(ctx, network, addr)
			return err
		})
		return c, err
	}
	etcdDir := etcdDataDir(t, dir)
	start(t, ns, "etcd", filepath.Join(dir, "etcd.log"), etcdBin,
		"--data-dir", etcdDir,
		"--listen-client-urls", etcdURL, "--advertise-client-urls", etcdURL,
		"--listen-peer-urls", peerURL, "--initial-advertise-peer-urls", peerURL,
		"--initial-cluster", "default="+peerURL)
	waitHTTP(t, "etcd", etcdURL+"/health", &http.Client{Transport: &http.Transport{DialContext: dial}, Timeout: 5 * time.Second}, 30*time.Second)

	token := randomHex(t)
	keyFile, pubFile := writeServiceAccountKeys(t, dir)
	tokens := filepath.Join(dir, "tokens.csv")
	if err := os.WriteFile(tokens, []byte(token+",sluice-test-admin,1,system:masters\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	start(t, ns, "kube-apiserver", filepath.Join(dir, "apiserver.log"), apiserverBin,
		"--etcd-servers", etcdURL,
		"--bind-address", "127.0.0.1", "--advertise-address", "127.0.0.1",
		"--secure-port", fmt.Sprint(apiPort),
		"--cert-dir", filepath.Join(dir, "certs"),
		"--token-auth-file", tokens,
		"--authorization-mode", "RBAC",
		"--service-account-key-file", pubFile,
		"--service-account-signing-key-file", keyFile,
		"--service-account-issuer", "https://kubernetes.default.svc",
		"--service-cluster-ip-range", "10.96.0.0/16",
		// 127.0.0.1 "may not be in the loopback range" for the endpoint
		// reconciler; no controller-manager makes default service accounts.
		"--endpoint-reconciler-type", "none",
		"--disable-admission-plugins", "ServiceAccount",
		// As kubeadm and kind run it: the DaemonSet's bpffs init container
		// is privileged.
		"--allow-privileged=true",
	)
	host := fmt.Sprintf("https://127.0.0.1:%d", apiPort)
	// QPS: client-go's default of 5 requests/s would be what the tests
	// and benchmarks measure.
	cfg := &rest.Config{Host: host, BearerToken: token, TLSClientConfig: rest.TLSClientConfig{Insecure: true}, Dial: dial, QPS: 1000, Burst: 2000}
	rt, err := rest.TransportFor(cfg)
	if err != nil {
		t.Fatal(err)
	}
	waitHTTP(t, "kube-apiserver", host+"/readyz", &http.Client{Transport: rt, Timeout: 5 * time.Second}, 90*time.Second)
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	kc := filepath.Join(dir, "kubeconfig")
	writeKubeconfig(t, kc, host, token)
	return &Cluster{Client: client, Config: cfg, Kubeconfig: kc, EtcdDir: etcdDir}
}

// writeKubeconfig writes a kubeconfig (mode 0600) for the API server at
// host, authenticating with token.
func writeKubeconfig(t testing.TB, path, host, token string) {
	t.Helper()
	if err := clientcmd.WriteToFile(clientcmdapi.Config{
		Clusters:       map[string]*clientcmdapi.Cluster{"test": {Server: host, InsecureSkipTLSVerify: true}},
		AuthInfos:      map[string]*clientcmdapi.AuthInfo{"test": {Token: token}},
		Contexts:       map[string]*clientcmdapi.Context{"test": {Cluster: "test", AuthInfo: "test"}},
		CurrentContext: "test",
	}, path); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		t.Fatal(err)
	}
}

// start runs a server process in ns with its output in logPath, killed
// (by PID) when the test ends; the log is shown if the test failed.
func start(t testing.TB, ns *testbed.Netns, name, logPath, bin string, args ...string) {
	t.Helper()
	log, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("nsenter", append([]string{"--net=" + ns.Path(), "--", bin}, args...)...)
	cmd.Stdout, cmd.Stderr = log, log
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", name, err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
		log.Close()
		if t.Failed() {
			b, _ := os.ReadFile(logPath)
			if len(b) > 4000 {
				b = b[len(b)-4000:]
			}
			t.Logf("%s log (tail):\n%s", name, b)
		}
	})
}

func waitHTTP(t testing.TB, name, url string, client *http.Client, timeout time.Duration) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	last := ""
	for ctx.Err() == nil {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		resp, err := client.Do(req)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return
			}
			last = resp.Status
		} else {
			last = err.Error()
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Fatalf("%s not ready after %v: %s", name, timeout, last)
}

// etcdDataDir is on tmpfs when there is one: etcd fsyncs every write, and
// on this kind of disk that made each API write take 100-200 ms, which
// measured the disk rather than the agent. (Debian's etcd 3.4 has no
// --unsafe-no-fsync.)
func etcdDataDir(t testing.TB, fallback string) string {
	t.Helper()
	if fi, err := os.Stat("/dev/shm"); err == nil && fi.IsDir() {
		d, err := os.MkdirTemp("/dev/shm", "sluice-etcd-")
		if err == nil {
			t.Cleanup(func() { os.RemoveAll(d) })
			return d
		}
	}
	return filepath.Join(fallback, "etcd")
}

// FreePort asks the kernel for a free TCP port on loopback.
func FreePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func randomHex(t testing.TB) string {
	b := make([]byte, 16)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}

func writeServiceAccountKeys(t testing.TB, dir string) (keyFile, pubFile string) {
	t.Helper()
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	pub, err := x509.MarshalPKIXPublicKey(&key.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	keyFile, pubFile = filepath.Join(dir, "sa.key"), filepath.Join(dir, "sa.pub")
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(key)}), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(pubFile, pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pub}), 0o644); err != nil {
		t.Fatal(err)
	}
	return keyFile, pubFile
}
