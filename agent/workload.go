package agent

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"github.com/sluice-io/sluice/policy"
)

// Workload is one thing the agent selects, whatever its source: a pod, or
// a service on a plain Linux host described in the workloads file.
type Workload struct {
	Namespace string
	Name      string
	// CgroupPath is the absolute cgroup v2 directory whose processes (and
	// their descendants' cgroups) are redirected.
	CgroupPath string
	// IPs are the source addresses its connections reach the proxy with.
	IPs         []netip.Addr
	Labels      map[string]string
	Annotations map[string]string
	// Policy is the workload's effective policy when the source merged
	// it (the Kubernetes source, from every object that selects the pod);
	// nil: Labels and Annotations alone make it.
	Policy *policy.Effective
}

// Effective is the workload's merged policy.
func (w Workload) Effective() policy.Effective {
	if w.Policy != nil {
		return *w.Policy
	}
	return policy.FromLabels(w.Labels, w.Annotations)
}

// Key identifies a workload across updates: namespace/name.
func (w Workload) Key() string {
	if w.Namespace == "" {
		return w.Name
	}
	return w.Namespace + "/" + w.Name
}

// Equal reports whether two workloads would program the node the same way.
func (w Workload) Equal(o Workload) bool {
	return w.Namespace == o.Namespace && w.Name == o.Name && w.CgroupPath == o.CgroupPath &&
		slices.Equal(w.IPs, o.IPs) && mapsEqual(w.Labels, o.Labels) && mapsEqual(w.Annotations, o.Annotations) &&
		(w.Policy == nil) == (o.Policy == nil) && (w.Policy == nil || w.Policy.Equal(*o.Policy))
}

func mapsEqual(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if bv, ok := b[k]; !ok || bv != v {
			return false
		}
	}
	return true
}

// checkName: names end up in Envoy chain names, stats and logs; the file
// source holds them to Kubernetes' rules (RFC 1123 subdomain).
func checkName(what, s string, required bool) error {
	if s == "" {
		if required {
			return fmt.Errorf("%s is required", what)
		}
		return nil
	}
	if len(s) > 253 {
		return fmt.Errorf("%s is longer than 253 characters", what)
	}
	for i, c := range s {
		ok := c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' || c == '.'
		if !ok {
			return fmt.Errorf("%s %q: character %q at %d: use lowercase letters, digits, '-' and '.'", what, s, c, i)
		}
	}
	if strings.HasPrefix(s, "-") || strings.HasPrefix(s, ".") || strings.HasSuffix(s, "-") || strings.HasSuffix(s, ".") {
		return fmt.Errorf("%s %q must start and end with a letter or digit", what, s)
	}
	return nil
}
