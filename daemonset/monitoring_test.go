package daemonset

import (
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/common/model"
	"github.com/prometheus/prometheus/model/labels"
	"github.com/prometheus/prometheus/model/rulefmt"
	"github.com/prometheus/prometheus/promql/parser"
	"github.com/prometheus/prometheus/promql/promqltest"
	"github.com/prometheus/prometheus/rules"
	"github.com/sluice-io/sluice/agent"
	"github.com/sluice-io/sluice/agent/datapath"
	"sigs.k8s.io/yaml"
)

// exported is what the agent really exports: each metric's name and its
// variable labels, read from the descriptors it registers (NewMetrics and
// the scrape-time collector), histograms with their _bucket/_sum/_count
// series.
func exported(t *testing.T) map[string][]string {
	t.Helper()
	reg := &capture{}
	agent.NewMetrics(reg)
	agent.RegisterCollector(reg, nil, nil, nil, nil)
	out := map[string][]string{}
	descRE := regexp.MustCompile(`fqName: "([^"]+)".*variableLabels: \{([^}]*)\}`)
	for _, c := range reg.cs {
		_, histogram := c.(prometheus.Histogram)
		ch := make(chan *prometheus.Desc, 64)
		c.Describe(ch)
		close(ch)
		for d := range ch {
			m := descRE.FindStringSubmatch(d.String())
			if m == nil {
				t.Fatalf("cannot read descriptor %s", d)
			}
			var ls []string
			for _, l := range strings.Split(m[2], ",") {
				if l = strings.TrimSpace(l); l != "" {
					ls = append(ls, l)
				}
			}
			if histogram { // scraped as three series
				out[m[1]+"_bucket"], out[m[1]+"_sum"], out[m[1]+"_count"] = append(ls, "le"), ls, ls
				continue
			}
			out[m[1]] = ls
		}
	}
	if len(out) < 20 {
		t.Fatalf("only %d metrics read from the agent's descriptors: %v", len(out), out)
	}
	return out
}

type capture struct{ cs []prometheus.Collector }

func (c *capture) Register(col prometheus.Collector) error { c.cs = append(c.cs, col); return nil }
func (c *capture) MustRegister(cols ...prometheus.Collector) {
	c.cs = append(c.cs, cols...)
}
func (c *capture) Unregister(prometheus.Collector) bool { return false }

// Labels Prometheus adds to every scraped series.
var targetLabels = []string{"instance", "job", "namespace", "pod", "node"}

// checkNames fails for a selector naming a metric the agent does not
// export, a label the metric does not have, or an event the datapath does
// not count.
func checkNames(t *testing.T, where, expr string, have map[string][]string) {
	t.Helper()
	e, err := parser.NewParser(parser.Options{}).ParseExpr(expr)
	if err != nil {
		t.Errorf("%s: %v\n%s", where, err, expr)
		return
	}
	n := 0
	parser.Inspect(e, func(node parser.Node, _ []parser.Node) error {
		vs, ok := node.(*parser.VectorSelector)
		if !ok {
			return nil
		}
		n++
		ls, ok := have[vs.Name]
		if !ok {
			t.Errorf("%s: metric %q is not one the agent exports", where, vs.Name)
			return nil
		}
		for _, m := range vs.LabelMatchers {
			if m.Name == labels.MetricName || slices.Contains(targetLabels, m.Name) {
				continue
			}
			if !slices.Contains(ls, m.Name) {
				t.Errorf("%s: %s has no label %q (it has %v)", where, vs.Name, m.Name, ls)
			}
			if m.Name == "event" {
				for _, v := range strings.Split(m.Value, "|") {
					if !slices.Contains(datapath.CounterNames(), v) {
						t.Errorf("%s: the datapath counts no event %q", where, v)
					}
				}
			}
		}
		return nil
	})
	if n == 0 {
		t.Errorf("%s: selects no metric: %s", where, expr)
	}
}

// ruleGroups reads the PrometheusRule's spec.groups as Prometheus reads a
// rule file (rulefmt: strict fields, every expression and template
// parsed).
func ruleGroups(t *testing.T) *rulefmt.RuleGroups {
	t.Helper()
	var pr struct {
		Kind string `json:"kind"`
		Spec struct {
			Groups json.RawMessage `json:"groups"`
		} `json:"spec"`
	}
	for _, o := range render(t, filepath.Join(Dir(), "monitoring")) {
		if o.Kind == "PrometheusRule" {
			if err := yaml.Unmarshal(o.YAML, &pr); err != nil {
				t.Fatal(err)
			}
		}
	}
	if pr.Kind == "" {
		t.Fatal("daemonset/monitoring renders no PrometheusRule")
	}
	file, err := yaml.JSONToYAML([]byte(`{"groups":` + string(pr.Spec.Groups) + `}`))
	if err != nil {
		t.Fatal(err)
	}
	groups, errs := rulefmt.Parse(file, false, model.UTF8Validation, parser.NewParser(parser.Options{}), slog.New(slog.NewTextHandler(io.Discard, nil)))
	for _, err := range errs {
		t.Error(err)
	}
	if groups == nil {
		t.FailNow()
	}
	return groups
}

// Every alert and dashboard query parses and names only what the agent
// exports.
func TestMonitoringNamesExportedMetrics(t *testing.T) {
	have := exported(t)
	n := 0
	for _, g := range ruleGroups(t).Groups {
		for _, r := range g.Rules {
			n++
			checkNames(t, "alert "+r.Alert, r.Expr, have)
			if r.Labels["severity"] == "" || r.Annotations["summary"] == "" || r.Annotations["description"] == "" {
				t.Errorf("alert %s lacks a severity, summary or description", r.Alert)
			}
		}
	}
	if n < 10 {
		t.Errorf("%d alerts", n)
	}
	b, err := os.ReadFile(filepath.Join(Dir(), "..", "charts", "sluice", "files", "dashboard.json"))
	if err != nil {
		t.Fatal(err)
	}
	var dash struct {
		UID    string `json:"uid"`
		Panels []struct {
			Title   string `json:"title"`
			Targets []struct {
				Expr string `json:"expr"`
			} `json:"targets"`
		} `json:"panels"`
	}
	if err := json.Unmarshal(b, &dash); err != nil {
		t.Fatal(err)
	}
	// Grafana's variables, as it substitutes them before querying.
	vars := strings.NewReplacer("$__rate_interval", "1m", "$instance", ".*")
	for _, p := range dash.Panels {
		if len(p.Targets) == 0 {
			t.Errorf("panel %q has no query", p.Title)
		}
		for _, tg := range p.Targets {
			checkNames(t, "panel "+p.Title, vars.Replace(tg.Expr), have)
		}
	}
	// The dashboard ships as a ConfigMap Grafana's sidecar picks up.
	var found bool
	for _, o := range render(t, filepath.Join(Dir(), "monitoring")) {
		if o.Kind == "ConfigMap" && strings.Contains(string(o.YAML), "grafana_dashboard: \"1\"") && strings.Contains(string(o.YAML), dash.UID) {
			found = true
		}
	}
	if !found {
		t.Error("no ConfigMap labelled grafana_dashboard=1 holds the dashboard")
	}
}

// alertCase is a rule unit test, as promtool's: series loaded at one
// sample a minute, the alert firing at some minutes and not firing
// (inactive, or pending within its for: clause) at others.
type alertCase struct {
	series        string
	firing, quiet []int // minutes
}

var alertCases = map[string][]alertCase{
	"SluiceProxyNotReady": {{
		series: `sluice_proxy_ready{instance="n1"} 1 1 0 0 0 0 1 1`,
		firing: []int{4, 5}, quiet: []int{1, 2, 3, 6, 7},
	}},
	"SluiceReadinessLeaseExpiring": {{
		series: `sluice_readiness_lease_remaining_seconds{instance="n1"} 30 29 9 30 29`,
		firing: []int{2}, quiet: []int{0, 1, 3, 4},
	}},
	"SluiceReadinessLeaseExpired": {{
		series: `sluice_datapath_events_total{event="lease_expired",instance="n1"} 0 0 3 3 3 3 3 3 3 3 3`,
		firing: []int{2, 5}, quiet: []int{1, 9},
	}},
	"SluiceConfigRejected": {{
		// Rejected at minute 2; a new version accepted at minute 17. A
		// NACKed version is not resent, so the NACK counter stays flat
		// while the problem lasts: the gauge, not the counter, says so.
		series: `sluice_xds_served_version_rejected{instance="n1"} 0 0 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 0 0`,
		firing: []int{2, 10, 16}, quiet: []int{1, 17, 18},
	}},
	"SluiceOriginalDestinationLost": {{
		// Lost while the maps are full; still lost, maps no longer full:
		// not this alert.
		series: `sluice_datapath_events_total{event="orig_dst_unknown",instance="n1"} 0 5 10 15 20 25 30 35
sluice_datapath_inflight_entries{map="orig_dsts",instance="n1"} 0 0 0 0 0 0 0 0
sluice_datapath_inflight_entries{map="pending_tuples",instance="n1"} 100 64000 64000 64000 100 100 100 100
sluice_datapath_inflight_capacity{instance="n1"} 65536 65536 65536 65536 65536 65536 65536 65536`,
		firing: []int{1, 2, 3}, quiet: []int{0, 4, 5, 7},
	}},
	"SluiceCgroupNotFound": {{
		series: `sluice_cgroup_resolution_failures_total{instance="n1"} 0+5x20 100x20`,
		firing: []int{18, 20}, quiet: []int{3, 36, 40},
	}, {
		// A few retries while the kubelet creates a cgroup: normal.
		series: `sluice_cgroup_resolution_failures_total{instance="n1"} 0 3 5 5 5 5 5 5 5 5 5 5 5 5 5 5 5 5 5 5 5 5 5 5`,
		quiet:  []int{2, 12, 20},
	}},
	"SluiceFlowEventsDropped": {{
		series: `sluice_datapath_events_total{event="flow_events_dropped",instance="n1"} 0 0 0 500 500 500 500 500 500 500 500 500 500 500 500 500 500
sluice_datapath_events_total{event="denied_non_tcp",instance="n1"} 0+1000x16`,
		firing: []int{3, 11}, quiet: []int{2, 14},
	}},
	"SluiceDatapathFull": {{
		series: `sluice_workload_datapath_failures_total{reason="map_full",instance="n1"} 0 0 1 1 1 1 1 1 1 1 1 1 1 1 1
sluice_workload_datapath_failures_total{reason="other",instance="n1"} 0+1x14`,
		firing: []int{2, 10}, quiet: []int{1, 13},
	}},
	"SluicePolicyErrors": {{
		series: `sluice_policy_errors_total{instance="n1"} 0 0 2 2 2 2 2 2 2 2 2 2 2 2 2`,
		firing: []int{2, 10}, quiet: []int{1, 13},
	}},
	"SluiceWorkloadRefusalsRising": {{
		series: `sluice_workload_connections_total{workload_namespace="shop",workload_pod="web",outcome="failed_closed",instance="n1"} 0+120x10 1200x10
sluice_workload_connections_total{workload_namespace="shop",workload_pod="api",outcome="redirected",instance="n1"} 0+6000x20`,
		firing: []int{8, 10}, quiet: []int{2, 7, 18, 20},
	}},
	"SluiceHostnameLookupsFailing": {{
		series: `sluice_tcp_hostname_lookups_total{result="error",instance="n1"} 0+60x15 900x15
sluice_tcp_hostname_lookups_total{result="ok",instance="n1"} 0+30x30`,
		firing: []int{12, 15}, quiet: []int{5, 22, 29},
	}},
	"SluiceSourceErrors": {{
		series: `sluice_source_errors_total{source="kubernetes",instance="n1"} 0+2x10 20x15`,
		firing: []int{5, 10}, quiet: []int{1, 22},
	}},
}

// Each alert fires on the series that should fire it and resolves when
// they recover, evaluated minute by minute as Prometheus's rule manager
// does (the alerts' for: clauses included).
func TestAlertRules(t *testing.T) {
	groups := ruleGroups(t)
	engine := promqltest.NewTestEngine(t, false, 5*time.Minute, 100000)
	seen := map[string]bool{}
	for _, g := range groups.Groups {
		for _, r := range g.Rules {
			cases, ok := alertCases[r.Alert]
			if !ok {
				t.Errorf("alert %s has no rule unit test", r.Alert)
				continue
			}
			seen[r.Alert] = true
			for i, c := range cases {
				t.Run(r.Alert, func(t *testing.T) {
					storage := promqltest.LoadedStorage(t, "load 1m\n"+indent(c.series))
					expr, err := parser.NewParser(parser.Options{}).ParseExpr(r.Expr)
					if err != nil {
						t.Fatal(err)
					}
					rule := rules.NewAlertingRule(r.Alert, expr, time.Duration(r.For), time.Duration(r.KeepFiringFor),
						labels.FromMap(r.Labels), labels.FromMap(r.Annotations), labels.EmptyLabels(), "", true,
						slog.New(slog.NewTextHandler(io.Discard, nil)))
					query := rules.EngineQueryFunc(engine, storage)
					last := slices.Max(append(slices.Clone(c.firing), c.quiet...))
					for m := 0; m <= last; m++ {
						if _, err := rule.Eval(context.Background(), 0, time.Unix(0, 0).Add(time.Duration(m)*time.Minute), query, nil, 0); err != nil {
							t.Fatalf("case %d, minute %d: %v", i, m, err)
						}
						var firing int
						if os.Getenv("DEBUG_ALERTS") != "" {
							for _, a := range rule.ActiveAlerts() {
								t.Logf("minute %d: %s %v active %v value %v", m, a.State, a.Labels, a.ActiveAt, a.Value)
							}
						}
						for _, a := range rule.ActiveAlerts() {
							if a.State == rules.StateFiring {
								firing++
							}
						}
						switch {
						case slices.Contains(c.firing, m) && firing != 1:
							t.Errorf("case %d, minute %d: %d alerts firing, want 1", i, m, firing)
						case slices.Contains(c.quiet, m) && firing != 0:
							t.Errorf("case %d, minute %d: %d alerts firing, want none", i, m, firing)
						}
					}
				})
			}
		}
	}
	for name := range alertCases {
		if !seen[name] {
			t.Errorf("unit test for %s, which is not an alert", name)
		}
	}
}

func indent(s string) string {
	var b strings.Builder
	for _, l := range strings.Split(s, "\n") {
		b.WriteString("  " + strings.TrimSpace(l) + "\n")
	}
	return b.String()
}
