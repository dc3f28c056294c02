// Command scheduler is kube-scheduler, as upstream's cmd/kube-scheduler
// builds it, for sluice's real-node tests (test/node): DaemonSet pods are
// bound by the scheduler. It shares the API server's module: the same
// Kubernetes version and replace list.
package main

import (
	"os"
	_ "time/tzdata"

	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"
	_ "k8s.io/component-base/metrics/prometheus/clientgo"
	_ "k8s.io/component-base/metrics/prometheus/version"
	"k8s.io/kubernetes/cmd/kube-scheduler/app"
)

func main() {
	os.Exit(cli.Run(app.NewSchedulerCommand()))
}
