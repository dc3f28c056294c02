package testbed

import (
	"fmt"
	"io"
	"net/http"
	"os"
	"time"
)

// httpgetMain is the "httpget" role: GET its one argument and print the
// body, from inside a namespace (a metrics endpoint in the node's netns).
func httpgetMain(args []string) int {
	if len(args) != 1 {
		fmt.Fprintln(os.Stderr, "usage: httpget URL")
		return 2
	}
	c := &http.Client{Timeout: 10 * time.Second}
	resp, err := c.Get(args[0])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer resp.Body.Close()
	io.Copy(os.Stdout, resp.Body)
	if resp.StatusCode != http.StatusOK {
		fmt.Fprintln(os.Stderr, resp.Status)
		return 1
	}
	return 0
}
