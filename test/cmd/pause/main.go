// Command pause is the pod sandbox's process for the real-node tests
// (test/node), and their app containers' too: it sleeps until SIGTERM or
// SIGINT and exits 0, as the kubelet's pause image does. Built static, it
// is the whole content of its image.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	c := make(chan os.Signal, 1)
	signal.Notify(c, syscall.SIGTERM, syscall.SIGINT)
	<-c
}
