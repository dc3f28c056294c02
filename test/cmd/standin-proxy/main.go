// Command standin-proxy runs the stand-in for Envoy's original_dst listener
// (see package standin): used by `make demo` when ENVOY_BIN is not set.
package main

import (
	"os"

	"github.com/sluice-io/sluice/test/standin"
)

func main() { os.Exit(standin.Main(os.Args[1:])) }
