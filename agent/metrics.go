package agent

import (
	"errors"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/sluice-io/sluice/agent/datapath"
	"github.com/sluice-io/sluice/xds"
	"golang.org/x/sys/unix"
)

// BPFStats is what the collector reads from the datapath at scrape time
// (*datapath.Datapath).
type BPFStats interface {
	Counters() (datapath.Counters, error)
	WorkloadStats() (map[uint32]datapath.WorkloadStats, error)
	InFlight() (origDsts, pendingTuples int, err error)
	InFlightCapacity() int
	ProxyState() (datapath.ProxyState, error)
}

// Metrics are the agent's control-plane metrics; the datapath's are read by
// a collector at scrape time, never copied.
type Metrics struct {
	Reconcile        prometheus.Histogram
	CgroupFailures   prometheus.Counter
	PolicyErrors     prometheus.Counter
	SourceErrors     *prometheus.CounterVec
	ProxyReady       prometheus.Gauge
	ProxyTransitions prometheus.Counter
	// DatapathFailures: workload changes the datapath refused, by reason.
	DatapathFailures *prometheus.CounterVec
}

// NewMetrics registers the agent's control-plane metrics. The reconciler
// (ReconcilerConfig.Metrics) records reconcile durations and missing
// cgroups for every source; the sources record their errors.
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		Reconcile: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "sluice_reconcile_duration_seconds", Help: "Time to program one workload change (selected, updated or deselected) into the datapath, from either source.",
			Buckets: prometheus.ExponentialBuckets(0.0001, 4, 8),
		}),
		CgroupFailures: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "sluice_cgroup_resolution_failures_total", Help: "Workload changes that failed because the workload's cgroup does not exist (yet); each retry counts.",
		}),
		PolicyErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "sluice_policy_errors_total", Help: "Workload policies (labels/annotation) that did not parse; the workload got its safest policy.",
		}),
		SourceErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sluice_source_errors_total", Help: "Workload source errors: a workloads file that does not parse (source=file), a failed list or watch of the API server (source=kubernetes).",
		}, []string{"source"}),
		ProxyReady: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "sluice_proxy_ready", Help: "1 when Envoy answers /ready with LIVE and the datapath redirects; 0 while fail-open workloads go direct and fail-closed ones are refused.",
		}),
		ProxyTransitions: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "sluice_proxy_ready_transitions_total", Help: "Changes of the proxy-ready flag.",
		}),
		DatapathFailures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sluice_workload_datapath_failures_total", Help: "Workload changes the datapath refused, by reason: map_full (a datapath map is at capacity), other. The workload keeps its previous state and is retried.",
		}, []string{"reason"}),
	}
	m.DatapathFailures.WithLabelValues("map_full")
	m.DatapathFailures.WithLabelValues("other")
	// Both sources' labels exist from the start, so a rate over them is
	// defined before the first error.
	m.SourceErrors.WithLabelValues("file")
	m.SourceErrors.WithLabelValues("kubernetes")
	reg.MustRegister(m.Reconcile, m.CgroupFailures, m.PolicyErrors, m.SourceErrors, m.ProxyReady, m.ProxyTransitions, m.DatapathFailures)
	return m
}

// RegisterCollector registers the collector that reads the datapath, the
// reconciler and the xDS server at scrape time.
func RegisterCollector(reg prometheus.Registerer, bpf BPFStats, r *Reconciler, x *xds.Server, names *Names) {
	reg.MustRegister(&collector{bpf: bpf, r: r, x: x, names: names})
}

// The recorders are nil-safe: a reconciler or source without metrics
// (tests, tools) records nothing.

func (m *Metrics) observeReconcile(d time.Duration) {
	if m != nil {
		m.Reconcile.Observe(d.Seconds())
	}
}

func (m *Metrics) cgroupMissing() {
	if m != nil {
		m.CgroupFailures.Inc()
	}
}

func (m *Metrics) datapathFailed(err error) {
	if m == nil {
		return
	}
	reason := "other"
	// A full hash map answers E2BIG; ENOSPC from the others.
	if errors.Is(err, unix.E2BIG) || errors.Is(err, unix.ENOSPC) {
		reason = "map_full"
	}
	m.DatapathFailures.WithLabelValues(reason).Inc()
}

// SourceError counts one error of a workload source ("file",
// "kubernetes").
func (m *Metrics) SourceError(source string) {
	if m != nil {
		m.SourceErrors.WithLabelValues(source).Inc()
	}
}

var (
	descEvents = prometheus.NewDesc("sluice_datapath_events_total",
		"Datapath events by kind: redirected_ipv4/ipv6 connects, excluded, proxy_direct, failed_closed (refused, proxy not ready), bypass_not_ready (went direct), lease_expired (readiness lease ran out), dns_allowed, denied_non_tcp (enforce mode), node_local_refused and proxy_port_refused (never-dial destinations), metadata_direct and metadata_refused, orig_dst_answered/orig_dst_unknown (SO_ORIGINAL_DST), and the bookkeeping of original destinations.",
		[]string{"event"}, nil)
	descWorkloadConns = prometheus.NewDesc("sluice_workload_connections_total",
		"Connections of a selected workload by outcome: redirected, refused because the proxy was not ready (failed_closed), non-TCP sockets refused in enforce mode (denied_non_tcp), never-dial destinations refused (node_local_refused), or connects to a metadata address, direct or refused (metadata).",
		[]string{"workload_namespace", "workload_pod", "outcome"}, nil)
	descInFlight = prometheus.NewDesc("sluice_datapath_inflight_entries",
		"Entries in the datapath's connection maps: 4-tuples of redirected connections awaiting the proxy (pending_tuples), and original destinations stored by socket cookie before an upgrade from a release before layout 5 (orig_dsts; since then original destinations live in each socket's storage).",
		[]string{"map"}, nil)
	descInFlightCap = prometheus.NewDesc("sluice_datapath_inflight_capacity",
		"Capacity of the in-flight map pending_tuples (--inflight-map-size when the datapath was installed). Entries beyond it evict the least recently used: compare with sluice_datapath_inflight_entries.",
		nil, nil)
	descLeaseLeft = prometheus.NewDesc("sluice_readiness_lease_remaining_seconds",
		"While the proxy-ready flag is set: how long its lease still holds unless the agent renews it (every probe does). Falling towards 0 means the agent's probe loop stalled; at 0 the datapath treats the proxy as not ready. Absent without a lease or with the flag clear.",
		nil, nil)
	descSelected    = prometheus.NewDesc("sluice_selected_workloads", "Workloads selected on this node.", nil, nil)
	descScrapeErr   = prometheus.NewDesc("sluice_datapath_read_errors", "1 if the last scrape could not read the datapath.", nil, nil)
	descXDSVersions = prometheus.NewDesc("sluice_xds_versions_total", "Configurations published to Envoy.", nil, nil)
	descXDSPushes   = prometheus.NewDesc("sluice_xds_pushes_total", "xDS responses sent to Envoy.", nil, nil)
	descXDSAcks     = prometheus.NewDesc("sluice_xds_acks_total", "Configurations Envoy accepted.", nil, nil)
	descXDSNacks    = prometheus.NewDesc("sluice_xds_nacks_total", "Configurations Envoy rejected (it keeps the last good one).", nil, nil)
	descXDSRejected = prometheus.NewDesc("sluice_xds_served_version_rejected", "1 while Envoy has rejected (NACKed) the version being served: it runs its last good configuration, and the server does not resend the rejected one until the configuration changes.", nil, nil)
	descXDSStreams  = prometheus.NewDesc("sluice_xds_connected_proxies", "Envoys connected over ADS.", nil, nil)
	descXDSVersion  = prometheus.NewDesc("sluice_xds_version_info", "The configuration version being served (label), value 1.", []string{"version"}, nil)
	descNameLookups = prometheus.NewDesc("sluice_tcp_hostname_lookups_total",
		"DNS lookups of TCP-hostname rules' names by result: ok, nxdomain, error (the name's addresses stay allowed until their grace ends).", []string{"result"}, nil)
	descNames     = prometheus.NewDesc("sluice_tcp_hostnames", "Names of TCP-hostname rules the agent resolves.", nil, nil)
	descNameAddrs = prometheus.NewDesc("sluice_tcp_hostname_addresses", "Addresses TCP-hostname rules allow now, over all names.", nil, nil)
)

type collector struct {
	bpf   BPFStats
	r     *Reconciler
	x     *xds.Server
	names *Names
}

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descEvents, descWorkloadConns, descInFlight, descInFlightCap, descLeaseLeft, descSelected, descScrapeErr,
		descXDSVersions, descXDSPushes, descXDSAcks, descXDSNacks, descXDSRejected, descXDSStreams, descXDSVersion, descNameLookups, descNames, descNameAddrs} {
		ch <- d
	}
}

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	failed := 0.0
	if cs, err := c.bpf.Counters(); err == nil {
		names := datapath.CounterNames()
		for i, v := range cs.Values() {
			ch <- prometheus.MustNewConstMetric(descEvents, prometheus.CounterValue, float64(v), names[i])
		}
	} else {
		failed = 1
	}
	if ws, err := c.bpf.WorkloadStats(); err == nil && c.r != nil {
		names := c.r.Names()
		for id, s := range ws {
			key, ok := names[id]
			if !ok {
				continue // counters of a workload not (yet) claimed by a source
			}
			ns, pod := splitKey(key)
			ch <- prometheus.MustNewConstMetric(descWorkloadConns, prometheus.CounterValue, float64(s.Redirected), ns, pod, "redirected")
			ch <- prometheus.MustNewConstMetric(descWorkloadConns, prometheus.CounterValue, float64(s.FailedClosed), ns, pod, "failed_closed")
			ch <- prometheus.MustNewConstMetric(descWorkloadConns, prometheus.CounterValue, float64(s.Denied), ns, pod, "denied_non_tcp")
			ch <- prometheus.MustNewConstMetric(descWorkloadConns, prometheus.CounterValue, float64(s.NodeLocal), ns, pod, "node_local_refused")
			ch <- prometheus.MustNewConstMetric(descWorkloadConns, prometheus.CounterValue, float64(s.Metadata), ns, pod, "metadata")
		}
	} else if err != nil {
		failed = 1
	}
	if o, p, err := c.bpf.InFlight(); err == nil {
		ch <- prometheus.MustNewConstMetric(descInFlight, prometheus.GaugeValue, float64(o), "orig_dsts")
		ch <- prometheus.MustNewConstMetric(descInFlight, prometheus.GaugeValue, float64(p), "pending_tuples")
		ch <- prometheus.MustNewConstMetric(descInFlightCap, prometheus.GaugeValue, float64(c.bpf.InFlightCapacity()))
	} else {
		failed = 1
	}
	if st, err := c.bpf.ProxyState(); err != nil {
		failed = 1
	} else if st.Ready && st.HasLease {
		ch <- prometheus.MustNewConstMetric(descLeaseLeft, prometheus.GaugeValue, st.LeaseLeft.Seconds())
	}
	ch <- prometheus.MustNewConstMetric(descScrapeErr, prometheus.GaugeValue, failed)
	c.collectNames(ch)
	if c.r != nil {
		ch <- prometheus.MustNewConstMetric(descSelected, prometheus.GaugeValue, float64(len(c.r.Keys())))
	}
	if c.x != nil {
		st := c.x.Status()
		ch <- prometheus.MustNewConstMetric(descXDSVersions, prometheus.CounterValue, float64(st.Versions))
		ch <- prometheus.MustNewConstMetric(descXDSPushes, prometheus.CounterValue, float64(st.Pushes))
		ch <- prometheus.MustNewConstMetric(descXDSAcks, prometheus.CounterValue, float64(st.ACKs))
		ch <- prometheus.MustNewConstMetric(descXDSNacks, prometheus.CounterValue, float64(st.NACKs))
		rejected := st.LastNACK != nil && st.Version != "" && st.LastNACK.Rejected == st.Version
		ch <- prometheus.MustNewConstMetric(descXDSRejected, prometheus.GaugeValue, b2f(rejected))
		ch <- prometheus.MustNewConstMetric(descXDSStreams, prometheus.GaugeValue, float64(st.Streams))
		if st.Version != "" {
			ch <- prometheus.MustNewConstMetric(descXDSVersion, prometheus.GaugeValue, 1, st.Version)
		}
	}
}

func (c *collector) collectNames(ch chan<- prometheus.Metric) {
	if c.names == nil {
		return
	}
	lookups := c.names.Lookups()
	for _, r := range []string{"ok", "nxdomain", "error"} {
		ch <- prometheus.MustNewConstMetric(descNameLookups, prometheus.CounterValue, float64(lookups[r]), r)
	}
	st := c.names.Status()
	addrs := 0
	for _, s := range st {
		addrs += len(s.Addrs)
	}
	ch <- prometheus.MustNewConstMetric(descNames, prometheus.GaugeValue, float64(len(st)))
	ch <- prometheus.MustNewConstMetric(descNameAddrs, prometheus.GaugeValue, float64(addrs))
}

func splitKey(key string) (ns, name string) {
	if i := strings.IndexByte(key, '/'); i >= 0 {
		return key[:i], key[i+1:]
	}
	return "", key
}
