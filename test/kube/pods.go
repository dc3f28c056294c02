package kube

import (
	"context"
	"net/netip"
	"testing"

	"github.com/sluice-io/sluice/test/testbed"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// Pod is a pod object for the tests: in namespace default, bound to node,
// one container without resources (so the API server makes it BestEffort).
func Pod(name, node string, labels, annotations map[string]string) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: name, Labels: labels, Annotations: annotations},
		Spec: corev1.PodSpec{
			NodeName:   node,
			Containers: []corev1.Container{{Name: "app", Image: "example.invalid/app"}},
		},
	}
}

// RunPod creates pod on the API server and then does what the kubelet
// would: creates its cgroup under besteffort (the cgroupfs layout, from the
// UID the API server assigned; the pod must be BestEffort) and reports it
// Running with ips. It returns the cgroup, where the test runs the pod's
// processes.
func RunPod(t testing.TB, c kubernetes.Interface, besteffort *testbed.Cgroup, pod *corev1.Pod, ips ...netip.Addr) *testbed.Cgroup {
	t.Helper()
	ctx := context.Background()
	created, err := c.CoreV1().Pods(pod.Namespace).Create(ctx, pod, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if created.Status.QOSClass != corev1.PodQOSBestEffort {
		t.Fatalf("API server set QoS class %q, want BestEffort for a pod without resources", created.Status.QOSClass)
	}
	cg := besteffort.Child(t, "pod"+string(created.UID))
	created.Status.Phase = corev1.PodRunning
	for _, ip := range ips {
		created.Status.PodIPs = append(created.Status.PodIPs, corev1.PodIP{IP: ip.String()})
	}
	if len(ips) > 0 {
		created.Status.PodIP = ips[0].String()
	}
	if _, err := c.CoreV1().Pods(pod.Namespace).UpdateStatus(ctx, created, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	return cg
}
