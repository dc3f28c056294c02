// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* Copyright The sluice Authors. */

/*
 * sluice datapath: steer the outbound TCP connections of selected cgroups to
 * a node-local proxy and let that proxy recover each connection's original
 * destination with getsockopt(SO_ORIGINAL_DST), without iptables or conntrack.
 *
 *   cgroup/connect4|6   selected task, TCP, not excluded: remember the original
 *                       destination under the socket cookie, rewrite to the proxy.
 *                       Never-dial destinations (the node itself, metadata) are
 *                       never redirected: direct if excluded, else EPERM.
 *                       Enforce mode, any other socket: only DNS to the
 *                       configured resolvers, else EPERM.
 *   cgroup/sendmsg4|6   enforce mode, UDP sendto()/sendmsg() with an address:
 *                       the same rule, for datagrams that never connect().
 *   cgroup/sock_create  enforce mode: only TCP and UDP sockets may be created
 *                       (ping sockets' sendto() runs no sendmsg hook).
 *   sockops (client)    ACTIVE_ESTABLISHED: publish (addresses, client ISN+1)
 *                       -> original dst, and ask for state callbacks on that
 *                       socket.
 *                       STATE(CLOSE): forget any entry the proxy did not claim.
 *   cgroup/sock_release the socket is gone: forget its original destination
 *                       (also when connect() failed after connect4 ran).
 *   sockops (proxy)     PASSIVE_ESTABLISHED on the proxy address: move the
 *                       entry into the accepted socket's sk_storage and delete it.
 *   cgroup/getsockopt   (SOL_IP|SOL_IPV6, 80) on a claimed socket: answer it.
 *   cgroup/getpeername  the redirected application sees its original peer.
 *
 * Why claim-and-delete: a tuple entry that nobody consumes would answer a later
 * connection that reuses the same 4-tuple, even one that was never redirected.
 * The client's ACTIVE_ESTABLISHED callback runs before it sends the final ACK
 * of the handshake, so the proxy's PASSIVE_ESTABLISHED callback (run when that
 * ACK arrives) always finds the entry of its own connection. An unredirected
 * connection to the proxy clears any entry for its tuple for the same reason.
 */

#include "sluice.h"

char __license[] SEC("license") = "Dual BSD/GPL";

/* Keep the enums in BTF so bpf2go can mirror them. */
const enum counter *unused_counter __attribute__((unused));

/*
 * Whether the proxy's claim falls back to the port-keyed form of layouts
 * 1-3 (tuple_key_v3). Set by the agent before loading: only pins upgraded
 * from those layouts, in the node attach scope, can hold such entries.
 * Anywhere else no program writes them, and in the workloads scope an
 * unselected socket, which runs no sluice program, would not clear one
 * left under its port.
 */
const volatile __u8 legacy_port_keys = 1;
const enum dst_class *unused_dst_class __attribute__((unused));
const enum flow_decision *unused_flow_decision __attribute__((unused));
const enum workload_flag *unused_workload_flag __attribute__((unused));
const enum proxy_added *unused_proxy_added __attribute__((unused));
const struct flow_event *unused_flow_event __attribute__((unused));

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_WORKLOADS);
	__type(key, __u64); /* cgroup v2 id */
	__type(value, struct workload);
} workloads SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct proxy_config);
} config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, MAX_EXCLUSIONS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct lpm_v4_key);
	__type(value, __u8);
} excluded_v4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, MAX_EXCLUSIONS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct lpm_v6_key);
	__type(value, __u8);
} excluded_v6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_EXCLUDED_PORTS);
	__type(key, __u16); /* destination port, host order */
	__type(value, __u8);
} excluded_ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_RESOLVERS);
	__type(key, struct resolver_key);
	__type(value, __u8);
} resolvers SEC(".maps");

/*
 * The never-dial set (enum dst_class per prefix): unspecified, loopback,
 * link-local, the proxy's and the node's addresses, metadata services. The
 * agent fills it from policy.NodeLocal, the same set the proxy's listener
 * refuses to forward to.
 */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, MAX_NEVER_DIAL);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct lpm_v4_key);
	__type(value, __u8);
} never_dial_v4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, MAX_NEVER_DIAL);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct lpm_v6_key);
	__type(value, __u8);
} never_dial_v6 SEC(".maps");

/*
 * Metadata and other link-local destinations an enforce-mode workload's
 * policy names exactly: reached directly, never through the proxy.
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_METADATA_GRANTS);
	__type(key, struct metadata_key);
	__type(value, __u8);
} metadata_grants SEC(".maps");

/*
 * The original destination of a redirected client socket, from connect()
 * for the socket's life: its ESTABLISHED callback publishes it, getpeername
 * answers it. It dies with the socket, so nothing has to delete it (no
 * sock_release program; only a later direct connect to the proxy drops a
 * failed connect's leftover, classify()) and nothing can evict it. The kernel charges it to
 * the socket's option memory (net.core.optmem_max); a socket that has used
 * all of it cannot get one, and its connect is refused (remember()).
 */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct orig_dst);
} redirects SEC(".maps");

/*
 * Layouts 1-4 kept the original destination here, by socket cookie. Layout
 * 5's programs never write it; they read it only where redirects has
 * nothing, for sockets that the previous release's connect4 redirected
 * before an upgrade switched the programs (their handshake, and later
 * getpeername calls). An upgrade keeps the pinned map and its entries;
 * a fresh install still gives it the full capacity, for a rollback to a
 * layout 4 release, whose connect4 writes it. Only a direct connect to
 * the proxy deletes an entry now (classify()); socket cookies are never
 * reused, so a leftover entry can only ever answer for its own socket,
 * and `sluice uninstall` removes the map.
 */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MAX_INFLIGHT);
	__type(key, __u64);
	__type(value, struct orig_dst);
} orig_dsts SEC(".maps");

/* 4-tuple -> original destination, between client ESTABLISHED and proxy claim. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MAX_INFLIGHT);
	__type(key, struct tuple_key);
	__type(value, struct orig_dst);
} pending_tuples SEC(".maps");

/* The claimed original destination of a proxy-side socket; dies with it. */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct orig_dst);
} claimed SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, COUNTER_SLOTS);
	__type(key, __u32);
	__type(value, __u64);
} counters SEC(".maps");

/* The pinned layout's version (struct layout_info); written by the agent only. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct layout_info);
} layout SEC(".maps");

/*
 * Flow events (struct flow_event) of every decision that does not reach the
 * proxy; the agent turns them into its flow log. Bounded: when it is full
 * the event is dropped and counted (COUNTER_FLOW_EVENTS_DROPPED), the decision
 * stands.
 */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, FLOW_RING_BYTES);
} flows SEC(".maps");

/* Per-workload counters. The agent creates an entry with each workload. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, MAX_WORKLOADS);
	__type(key, __u32); /* workload.id */
	__type(value, struct workload_stats);
} wl_stats SEC(".maps");

static __always_inline void count(enum counter c)
{
	__u32 key = c;
	__u64 *v = bpf_map_lookup_elem(&counters, &key);

	if (v)
		*v += 1; /* per-CPU slot: no atomics needed */
}

/*
 * A connection (or socket, or datagram) being decided: what a flow event
 * says about it. a is the destination in 16-byte form (v4-mapped when v4),
 * NULL at socket().
 */
struct conn {
	void *ctx;
	struct bpf_sock *sk; /* connect4/6 only: the connecting socket */
	const __be32 *a;
	__be16 port;
	__u8 v4;
	__u8 protocol;
};

static __always_inline void flow(const struct conn *c, const struct workload *w, enum flow_decision d)
{
	struct flow_event *ev = bpf_ringbuf_reserve(&flows, sizeof(*ev), 0);

	if (!ev) {
		count(COUNTER_FLOW_EVENTS_DROPPED);
		return;
	}
	ev->time_ns = bpf_ktime_get_ns();
	ev->cookie = bpf_get_socket_cookie(c->ctx);
	ev->cgroup_id = bpf_get_current_cgroup_id();
	if (c->a) {
		ev->addr[0] = c->a[0];
		ev->addr[1] = c->a[1];
		ev->addr[2] = c->a[2];
		ev->addr[3] = c->a[3];
	} else {
		ev->addr[0] = ev->addr[1] = ev->addr[2] = ev->addr[3] = 0;
	}
	ev->port = c->port;
	ev->v4 = c->v4;
	ev->protocol = c->protocol;
	ev->decision = d;
	ev->_pad[0] = ev->_pad[1] = ev->_pad[2] = 0;
	ev->workload_id = w->id;
	bpf_ringbuf_submit(ev, BPF_RB_NO_WAKEUP);
}

static __always_inline struct workload_stats *stats_of(const struct workload *w)
{
	__u32 id = w->id;

	return bpf_map_lookup_elem(&wl_stats, &id);
}

static __always_inline struct proxy_config *get_config(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&config, &zero);
}

/*
 * The workload of the calling task: its own cgroup, else the deepest selected
 * ancestor. bpf_get_current_ancestor_cgroup_id returns the task's own cgroup
 * at its own level and 0 past it, which end the walk (the own cgroup was
 * looked up first). Every connect of an unselected task pays one lookup per
 * level: a pod's container at level 4 or 5 pays 4 or 5.
 */
static __always_inline struct workload *current_workload(void)
{
	struct workload *found = NULL, *w;
	__u64 self = bpf_get_current_cgroup_id(), id;

	w = bpf_map_lookup_elem(&workloads, &self);
	if (w)
		return w;

	for (int level = 1; level <= MAX_ANCESTOR_LEVEL; level++) {
		id = bpf_get_current_ancestor_cgroup_id(level);
		if (!id || id == self)
			break;
		w = bpf_map_lookup_elem(&workloads, &id);
		if (w)
			found = w;
	}
	return found;
}

/* A 16-byte destination (IPv4 v4-mapped) as a key of the v4 or v6 tries. */
static __always_inline void *lpm_lookup(void *trie4, void *trie6, const __be32 a[4], int v4)
{
	struct lpm_v4_key k4 = { .prefixlen = 32, .addr = a[3] };
	struct lpm_v6_key k6 = { .prefixlen = 128 };

	if (v4)
		return bpf_map_lookup_elem(trie4, &k4);
	k6.addr[0] = a[0];
	k6.addr[1] = a[1];
	k6.addr[2] = a[2];
	k6.addr[3] = a[3];
	return bpf_map_lookup_elem(trie6, &k6);
}

static __always_inline int excluded(const __be32 a[4], int v4, __u16 port)
{
	if (bpf_map_lookup_elem(&excluded_ports, &port))
		return 1;
	return lpm_lookup(&excluded_v4, &excluded_v6, a, v4) != NULL;
}

static __always_inline int is_resolver(const __be32 a[4], __be16 port)
{
	struct resolver_key key = { .port = port };

	key.addr[0] = a[0];
	key.addr[1] = a[1];
	key.addr[2] = a[2];
	key.addr[3] = a[3];
	return bpf_map_lookup_elem(&resolvers, &key) != NULL;
}

/* Refuse an enforce-mode workload's non-TCP socket (EPERM), counted. */
static __always_inline int deny_non_tcp(const struct conn *c, const struct workload *w)
{
	struct workload_stats *s;

	count(COUNTER_DENIED_NON_TCP);
	flow(c, w, FLOW_REFUSED_NON_TCP);
	s = stats_of(w);
	if (s)
		s->denied++;
	return 0;
}

/*
 * A socket other than TCP (UDP, UDP-Lite, ping, SCTP, MPTCP) of a selected
 * workload, at connect() or at sendmsg() with an address. Audit mode leaves
 * it alone; enforce mode allows DNS to the configured resolvers and refuses
 * the rest: nothing but the proxy may carry an enforced pod's traffic off
 * the node, so QUIC and ad-hoc UDP cannot go around it.
 */
static __always_inline int side_door(const struct conn *c, const struct workload *w)
{
	if (!(w->flags & WORKLOAD_ENFORCE))
		return 1;
	if (is_resolver(c->a, c->port)) {
		count(COUNTER_DNS_ALLOWED);
		return 1;
	}
	return deny_non_tcp(c, w);
}

/* out = ::ffff:a, the form IPv4 addresses take in 16-byte keys. */
static __always_inline void set_v4mapped(__be32 out[4], __be32 a)
{
	out[0] = 0;
	out[1] = 0;
	out[2] = bpf_htonl(0x0000ffff);
	out[3] = a;
}

static __always_inline int is_v4mapped(const __be32 a[4])
{
	return a[0] == 0 && a[1] == 0 && a[2] == bpf_htonl(0x0000ffff);
}

static __always_inline int proxy_has_v6(const struct proxy_config *cfg)
{
	return cfg->addr6[0] | cfg->addr6[1] | cfg->addr6[2] | cfg->addr6[3];
}

/* The ready flag, unless its lease ran out (the agent stopped renewing it). */
static __always_inline int proxy_ready(const struct proxy_config *cfg)
{
	if (!cfg->ready)
		return 0;
	if (cfg->ready_until && bpf_ktime_get_ns() > cfg->ready_until) {
		count(COUNTER_LEASE_EXPIRED);
		return 0;
	}
	return 1;
}

/*
 * Outcome of the policy checks shared by connect4 and connect6.
 * DIRECT: leave the connect alone. REFUSE: fail it with EPERM.
 * REDIRECT: rewrite the destination to the proxy.
 */
enum verdict { DIRECT, REFUSE, REDIRECT };

static __always_inline enum verdict not_ready(const struct conn *c, const struct workload *w)
{
	struct workload_stats *s;

	if (!(w->flags & WORKLOAD_FAIL_CLOSED)) {
		count(COUNTER_BYPASS_NOT_READY);
		flow(c, w, FLOW_DIRECT_NOT_READY);
		return DIRECT;
	}
	count(COUNTER_FAILED_CLOSED);
	flow(c, w, FLOW_REFUSED_NOT_READY);
	s = stats_of(w);
	if (s)
		s->failed_closed++;
	return REFUSE;
}

/*
 * Remember dst in the socket's storage. When the kernel cannot allocate it
 * (the socket's option memory is full, or memory is short) the connect is
 * refused whatever the fail mode: the pod can fill its own socket's option
 * memory (TCP MD5 keys, a socket filter), and letting that socket go direct
 * would be a way around the proxy.
 */
static __always_inline enum verdict remember(const struct conn *c, const struct workload *w,
					     const struct orig_dst *dst)
{
	struct workload_stats *s;
	struct orig_dst *slot;

	slot = bpf_sk_storage_get(&redirects, c->sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!slot) {
		count(COUNTER_ORIG_STORE_FAILED);
		flow(c, w, FLOW_REFUSED_STORE_FAILED);
		return REFUSE;
	}
	*slot = *dst;
	slot->workload_id = w->id;
	s = stats_of(w);
	if (s)
		s->redirected++;
	return REDIRECT;
}

/* a (16-byte form, v4-mapped when v4) is one of the proxy's addresses. */
static __always_inline int is_proxy_addr(const struct proxy_config *cfg, const __be32 a[4], int v4)
{
	if (v4)
		return cfg->addr4 && a[3] == cfg->addr4;
	return proxy_has_v6(cfg) && a[0] == cfg->addr6[0] && a[1] == cfg->addr6[1] &&
	       a[2] == cfg->addr6[2] && a[3] == cfg->addr6[3];
}

/* Refuse a connect to a never-dial destination (EPERM), counted. */
static __always_inline enum verdict refuse_node_local(const struct conn *cn, const struct workload *w,
						       enum counter c, enum flow_decision d)
{
	struct workload_stats *s;

	count(c);
	flow(cn, w, d);
	s = stats_of(w);
	if (s)
		s->node_local++;
	return REFUSE;
}

/* The workload's policy names a (and port, or any port) exactly. */
static __always_inline int granted(const struct workload *w, const __be32 a[4], __be16 port)
{
	struct metadata_key key = { .workload_id = w->id, .port = port };

	key.addr[0] = a[0];
	key.addr[1] = a[1];
	key.addr[2] = a[2];
	key.addr[3] = a[3];
	if (bpf_map_lookup_elem(&metadata_grants, &key))
		return 1;
	key.port = 0; /* a grant for any port */
	return bpf_map_lookup_elem(&metadata_grants, &key) != NULL;
}

/*
 * A metadata service keeps its own protection only if the pod reaches it
 * directly: through the proxy, which runs in the node's network, it would
 * see the node's identity, and IMDSv2's hop limit would stop meaning
 * anything. So it is never redirected: audit mode goes direct (counted per
 * workload, so the audit shows who touches it); enforce mode goes direct only
 * where the workload's policy grants that address and port, else EPERM.
 */
static __always_inline enum verdict metadata(const struct conn *c, const struct workload *w)
{
	struct workload_stats *s = stats_of(w);

	if (s)
		s->metadata++;
	if (!(w->flags & WORKLOAD_ENFORCE) || granted(w, c->a, c->port)) {
		count(COUNTER_METADATA_DIRECT);
		flow(c, w, FLOW_DIRECT_METADATA);
		return DIRECT;
	}
	count(COUNTER_METADATA_REFUSED);
	flow(c, w, FLOW_REFUSED_METADATA);
	return REFUSE;
}

/*
 * The checks of a selected workload's TCP connect, shared by connect4 and
 * connect6 (which sees v4-mapped IPv4 too): a is the destination in 16-byte
 * form, v4-mapped when v4. REDIRECT means "may be redirected": the caller
 * still consults readiness. Never-dial destinations are never redirected,
 * whatever the mode: the proxy dials from the node's network namespace, so
 * 0.0.0.0 or :: there is the node's loopback, and the proxy address on
 * another port is whatever listens on the node's wildcard address.
 */
static __always_inline enum verdict classify(const struct conn *c, const struct workload *w,
					     const struct proxy_config *cfg)
{
	const __be32 *a = c->a;
	int v4 = c->v4;
	__be16 port = c->port;
	__u8 *found, class;

	if (is_proxy_addr(cfg, a, v4)) {
		if (port == cfg->port) {
			/*
			 * A socket whose earlier connect was redirected and
			 * failed still holds that destination: its handshake
			 * must not publish it for this one. Also where a
			 * layout 1-4 connect4 left it, before an upgrade.
			 */
			__u64 cookie = bpf_get_socket_cookie(c->ctx);

			bpf_sk_storage_delete(&redirects, c->sk);
			bpf_map_delete_elem(&orig_dsts, &cookie);
			count(COUNTER_PROXY_DIRECT);
			return DIRECT;
		}
		return refuse_node_local(c, w, COUNTER_PROXY_PORT_REFUSED, FLOW_REFUSED_PROXY_PORT);
	}
	if (is_resolver(a, port)) {
		count(COUNTER_DNS_ALLOWED); /* DNS over TCP, as over UDP */
		return DIRECT;
	}
	found = lpm_lookup(&never_dial_v4, &never_dial_v6, a, v4);
	class = found ? *found : 0;
	if (class == DST_METADATA)
		return metadata(c, w);
	/* Link-local is excluded by default; enforce mode needs a grant. */
	if (class == DST_LINK_LOCAL && (w->flags & WORKLOAD_ENFORCE) && !granted(w, a, port))
		return refuse_node_local(c, w, COUNTER_NODE_LOCAL_REFUSED, FLOW_REFUSED_NODE_LOCAL);
	if (excluded(a, v4, bpf_ntohs(port))) {
		count(COUNTER_EXCLUDED);
		return DIRECT;
	}
	if (class)
		return refuse_node_local(c, w, COUNTER_NODE_LOCAL_REFUSED, FLOW_REFUSED_NODE_LOCAL);
	return REDIRECT;
}

/*
 * Decide a selected workload's TCP connect to a (16-byte form, v4-mapped
 * when v4) and, when it is redirected, remember the original destination.
 */
static __always_inline enum verdict decide(const struct conn *c, const struct workload *w,
					   const struct proxy_config *cfg)
{
	struct orig_dst dst = {};
	const __be32 *a = c->a;
	int v4 = c->v4;
	__be16 port = c->port;
	enum verdict v = classify(c, w, cfg);

	if (v != REDIRECT)
		return v;
	if (!proxy_ready(cfg) || (w->flags & WORKLOAD_AWAITING_PROXY) ||
	    (v4 ? !cfg->addr4 : !proxy_has_v6(cfg)))
		return not_ready(c, w);
	dst.port = port;
	if (v4) {
		dst.family = AF_INET;
		dst.addr[0] = a[3];
	} else {
		dst.family = AF_INET6;
		dst.addr[0] = a[0];
		dst.addr[1] = a[1];
		dst.addr[2] = a[2];
		dst.addr[3] = a[3];
	}
	return remember(c, w, &dst);
}

SEC("cgroup/connect4")
int sl_connect4(struct bpf_sock_addr *ctx)
{
	struct proxy_config *cfg;
	struct workload *w;
	__u32 type = ctx->type, protocol = ctx->protocol;
	__be32 mapped[4];
	__be16 port;

	w = current_workload();
	if (!w)
		return 1;
	port = (__be16)ctx->user_port; /* user_port: network order, low 16 bits */
	set_v4mapped(mapped, ctx->user_ip4);
	struct conn c = { .ctx = ctx, .sk = ctx->sk, .a = mapped, .port = port, .v4 = 1, .protocol = protocol };
	if (type != SOCK_STREAM || protocol != IPPROTO_TCP)
		return side_door(&c, w);
	cfg = get_config();
	if (!cfg)
		return 1;

	switch (decide(&c, w, cfg)) {
	case REFUSE:
		return 0;
	case DIRECT:
		return 1;
	default:
		break;
	}
	ctx->user_ip4 = cfg->addr4;
	ctx->user_port = cfg->port;
	count(COUNTER_REDIRECTED_IPV4);
	return 1;
}

SEC("cgroup/connect6")
int sl_connect6(struct bpf_sock_addr *ctx)
{
	struct proxy_config *cfg;
	struct workload *w;
	__u32 type = ctx->type, protocol = ctx->protocol;
	__be32 daddr[4];
	__be16 port;
	int v4;

	w = current_workload();
	if (!w)
		return 1;
	daddr[0] = ctx->user_ip6[0];
	daddr[1] = ctx->user_ip6[1];
	daddr[2] = ctx->user_ip6[2];
	daddr[3] = ctx->user_ip6[3];
	port = (__be16)ctx->user_port;
	v4 = is_v4mapped(daddr);
	struct conn c = { .ctx = ctx, .sk = ctx->sk, .a = daddr, .port = port, .v4 = v4, .protocol = protocol };
	/* v4-mapped destinations are keyed v4-mapped, as resolvers are. */
	if (type != SOCK_STREAM || protocol != IPPROTO_TCP)
		return side_door(&c, w);
	cfg = get_config();
	if (!cfg)
		return 1;
	/*
	 * An AF_INET6 socket connecting to ::ffff:a.b.c.d lands here, not in
	 * connect4 (Java and others do this by default). Treat it as IPv4: the
	 * IPv4 never-dial set, exclusions and proxy apply, and the original
	 * destination is recovered as IPv4.
	 */
	switch (decide(&c, w, cfg)) {
	case REFUSE:
		return 0;
	case DIRECT:
		return 1;
	default:
		break;
	}
	if (v4) {
		ctx->user_ip6[3] = cfg->addr4;
		count(COUNTER_REDIRECTED_IPV4);
	} else {
		ctx->user_ip6[0] = cfg->addr6[0];
		ctx->user_ip6[1] = cfg->addr6[1];
		ctx->user_ip6[2] = cfg->addr6[2];
		ctx->user_ip6[3] = cfg->addr6[3];
		count(COUNTER_REDIRECTED_IPV6);
	}
	ctx->user_port = cfg->port;
	return 1;
}

/*
 * UDP sendto()/sendmsg() with a destination address (connected or not; the
 * kernel runs these hooks whenever the call names an address). TCP never
 * gets here: TCP Fast Open's sendto() goes through connect4/6.
 */
SEC("cgroup/sendmsg4")
int sl_sendmsg4(struct bpf_sock_addr *ctx)
{
	struct workload *w = current_workload();
	__be32 mapped[4];

	if (!w)
		return 1;
	set_v4mapped(mapped, ctx->user_ip4);
	struct conn c = { .ctx = ctx, .a = mapped, .port = (__be16)ctx->user_port, .v4 = 1, .protocol = ctx->protocol };
	return side_door(&c, w);
}

SEC("cgroup/sendmsg6")
int sl_sendmsg6(struct bpf_sock_addr *ctx)
{
	struct workload *w = current_workload();
	__be32 daddr[4];

	if (!w)
		return 1;
	daddr[0] = ctx->user_ip6[0];
	daddr[1] = ctx->user_ip6[1];
	daddr[2] = ctx->user_ip6[2];
	daddr[3] = ctx->user_ip6[3];
	struct conn c = { .ctx = ctx, .a = daddr, .port = (__be16)ctx->user_port, .v4 = is_v4mapped(daddr), .protocol = ctx->protocol };
	return side_door(&c, w);
}

/*
 * The addresses of a sockops socket, IPv4 written v4-mapped. Every context
 * field is read exactly once, in straight-line code: when the same field is
 * read on several paths, clang likes to keep "ctx + offset" in a register,
 * and the verifier rejects loads through a modified context pointer.
 */
struct sk_view {
	__be32 local[4];
	__be32 remote[4];
	__u16 local_port;  /* host order */
	__u16 remote_port; /* host order */
};

static __always_inline void read_view(const struct bpf_sock_ops *skops, __u32 family,
				      struct sk_view *v)
{
	/*
	 * volatile: each load happens as written. Without it clang folds the
	 * two branches below into one load through a selected "ctx + off".
	 */
#define CTX(f) (*(volatile __u32 *)&skops->f)
	__u32 l0 = CTX(local_ip6[0]), l1 = CTX(local_ip6[1]);
	__u32 l2 = CTX(local_ip6[2]), l3 = CTX(local_ip6[3]);
	__u32 r0 = CTX(remote_ip6[0]), r1 = CTX(remote_ip6[1]);
	__u32 r2 = CTX(remote_ip6[2]), r3 = CTX(remote_ip6[3]);
	__u32 l4 = CTX(local_ip4), r4 = CTX(remote_ip4);
	__u32 lport = CTX(local_port), rport = CTX(remote_port);
#undef CTX

	/*
	 * Byte orders differ between the two port fields: local_port is host
	 * order; remote_port holds the network-order port in its upper 16 bits
	 * (the kernel loads skc_dport and shifts it left by 16).
	 */
	v->local_port = (__u16)lport;
	v->remote_port = bpf_ntohs((__u16)(rport >> 16));
	if (family == AF_INET) {
		set_v4mapped(v->local, l4);
		set_v4mapped(v->remote, r4);
	} else {
		v->local[0] = l0;
		v->local[1] = l1;
		v->local[2] = l2;
		v->local[3] = l3;
		v->remote[0] = r0;
		v->remote[1] = r1;
		v->remote[2] = r2;
		v->remote[3] = r3;
	}
}

/*
 * Whether a is the proxy's address. The handshake hooks below match the
 * proxy by its address alone, never by cfg->port: a takeover switches the
 * port while connections that connect4 sent to the previous proxy's port
 * are still in their handshake, and the previous proxy (draining) accepts
 * them after the switch. Their entries must still be published and
 * claimed, or that proxy gets them with no original destination.
 *
 * What keeps another socket from claiming an entry is the key, not the port:
 * the client's address, the proxy's and the client's ISN + 1, so a claim
 * needs a handshake from the victim's own address with the victim's ISN
 * while its entry is pending (see docs/datapath.md). Any listener on the
 * proxy address can now receive such a forged handshake, where before only
 * the proxy's could; the forgery is no easier. Selected pods cannot dial
 * the proxy address on another port at all (connect4 refuses it);
 * unselected ones and node processes can, and match only keys of their own
 * address (TestPrivilegedOtherPortsOnTheProxyAddressClaimNothing).
 */
static __always_inline int is_proxy_sk_addr(const struct proxy_config *cfg, const __be32 a[4])
{
	return is_proxy_addr(cfg, a, is_v4mapped(a));
}

/* Client side: the key of a connection from this socket to the proxy. */
static __always_inline int client_tuple(const struct bpf_sock_ops *skops,
					const struct sk_view *v,
					const struct proxy_config *cfg,
					struct tuple_key *key)
{
	if (!is_proxy_sk_addr(cfg, v->remote))
		return 0;
	__builtin_memcpy(key->client, v->local, sizeof(key->client));
	__builtin_memcpy(key->proxy, v->remote, sizeof(key->proxy));
	key->client_seq = skops->snd_una;
	return 1;
}

/* The key layouts 1-3 used for the same connection (the ports). */
static __always_inline void tuple_key_v3(const struct sk_view *v, int client_side,
					 struct tuple_key_v3 *key)
{
	if (client_side) {
		__builtin_memcpy(key->client, v->local, sizeof(key->client));
		__builtin_memcpy(key->proxy, v->remote, sizeof(key->proxy));
		key->client_port = v->local_port;
		key->proxy_port = v->remote_port;
	} else {
		__builtin_memcpy(key->client, v->remote, sizeof(key->client));
		__builtin_memcpy(key->proxy, v->local, sizeof(key->proxy));
		key->client_port = v->remote_port;
		key->proxy_port = v->local_port;
	}
}

static __always_inline void on_active_established(struct bpf_sock_ops *skops,
						  struct bpf_sock *sk,
						  const struct sk_view *v,
						  const struct proxy_config *cfg)
{
	struct tuple_key key = {};
	struct tuple_key_v3 old = {};
	struct orig_dst *dst;
	__u64 cookie;
	int cleared;

	if (!client_tuple(skops, v, cfg, &key))
		return;
	dst = sk ? bpf_sk_storage_get(&redirects, sk, 0, 0) : NULL;
	if (!dst) {
		/* Redirected by the previous release's connect4 (layouts 1-4). */
		cookie = bpf_get_socket_cookie(skops);
		dst = bpf_map_lookup_elem(&orig_dsts, &cookie);
	}
	if (!dst) {
		/*
		 * A connection straight to the proxy (not redirected). It owns
		 * this key now, so whatever an older connection left under it
		 * is stale: drop it before the proxy could claim it, under
		 * either key.
		 */
		tuple_key_v3(v, 1, &old);
		cleared = !bpf_map_delete_elem(&pending_tuples, &key);
		cleared += !bpf_map_delete_elem(&pending_tuples, &old);
		if (cleared)
			count(COUNTER_STALE_CLEARED);
		return;
	}
	if (bpf_map_update_elem(&pending_tuples, &key, dst, BPF_ANY)) {
		count(COUNTER_PUBLISH_FAILED);
		return;
	}
	/*
	 * A published entry needs the CLOSE callback to be deleted should the
	 * proxy never claim it; only these sockets ask for state callbacks
	 * (each one is a callback at every state change after this).
	 */
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
	count(COUNTER_PUBLISHED);
}

static __always_inline void on_passive_established(struct bpf_sock_ops *skops,
						   struct bpf_sock *sk,
						   const struct sk_view *v,
						   const struct proxy_config *cfg)
{
	struct tuple_key key = {};
	struct tuple_key_v3 old = {};
	struct orig_dst *dst, *slot;
	void *found = &key;

	if (!is_proxy_sk_addr(cfg, v->local))
		return;
	__builtin_memcpy(key.client, v->remote, sizeof(key.client));
	__builtin_memcpy(key.proxy, v->local, sizeof(key.proxy));
	key.client_seq = skops->rcv_nxt;

	dst = bpf_map_lookup_elem(&pending_tuples, &key);
	if (!dst && legacy_port_keys) {
		/*
		 * Published by the previous release's programs just before an
		 * upgrade switched them (layouts 1-3 keyed by the ports). After
		 * the switch no program writes this key; the only misses that
		 * get here are connections to the proxy that were never
		 * redirected, whose client side cleared this key.
		 */
		tuple_key_v3(v, 0, &old);
		dst = bpf_map_lookup_elem(&pending_tuples, &old);
		found = &old;
	}
	if (!dst) {
		count(COUNTER_CLAIM_MISSED);
		return;
	}
	if (!sk)
		return;
	slot = bpf_sk_storage_get(&claimed, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (slot)
		*slot = *dst;
	bpf_map_delete_elem(&pending_tuples, found);
	if (slot)
		count(COUNTER_CLAIMED);
	else
		count(COUNTER_PUBLISH_FAILED);
}

static __always_inline void on_close(const struct bpf_sock_ops *skops,
				     const struct sk_view *v,
				     const struct proxy_config *cfg)
{
	struct tuple_key key = {};

	/* Closed before the proxy claimed it (aborted, or never accepted). */
	if (client_tuple(skops, v, cfg, &key))
		bpf_map_delete_elem(&pending_tuples, &key);
}

SEC("sockops")
int sl_sockops(struct bpf_sock_ops *skops)
{
	__u32 family = skops->family, op = skops->op;
	struct bpf_sock *sk = skops->sk;
	struct proxy_config *cfg;
	struct sk_view v = {};

	if (family != AF_INET && family != AF_INET6)
		return 1;
	/*
	 * The kernel calls this program for every TCP event of every socket
	 * below the attach cgroup (about nine per connection); all but these
	 * three return here, before any map is touched.
	 */
	if (op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB &&
	    op != BPF_SOCK_OPS_STATE_CB)
		return 1;
	cfg = get_config();
	if (!cfg)
		return 1;

	switch (op) {
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		read_view(skops, family, &v);
		on_active_established(skops, sk, &v, cfg);
		break;
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		read_view(skops, family, &v);
		on_passive_established(skops, sk, &v, cfg);
		break;
	case BPF_SOCK_OPS_STATE_CB:
		if (skops->args[1] == BPF_TCP_CLOSE) {
			read_view(skops, family, &v);
			on_close(skops, &v, cfg);
		}
		break;
	}
	return 1;
}

/*
 * Enforce mode allows only the sockets the hooks above account for: TCP
 * (and MPTCP, whose subflows are TCP and redirected) and UDP/UDP-Lite (whose
 * connect and sendmsg are checked). Ping sockets (which container runtimes
 * allow pods by default), SCTP and raw sockets are refused at socket().
 */
SEC("cgroup/sock_create")
int sl_sock_create(struct bpf_sock *sk)
{
	__u32 type = sk->type, protocol = sk->protocol;
	struct workload *w;

	if (type == SOCK_STREAM && (protocol == IPPROTO_TCP || protocol == IPPROTO_MPTCP))
		return 1;
	if (type == SOCK_DGRAM && (protocol == IPPROTO_UDP || protocol == IPPROTO_UDPLITE))
		return 1;
	w = current_workload();
	if (!w || !(w->flags & WORKLOAD_ENFORCE))
		return 1;
	struct conn c = { .ctx = sk, .protocol = protocol };
	return deny_non_tcp(&c, w);
}

struct sockaddr_in_ {
	__u16 sin_family;
	__be16 sin_port;
	__be32 sin_addr;
	__u8 zero[8];
};

struct sockaddr_in6_ {
	__u16 sin6_family;
	__be16 sin6_port;
	__be32 sin6_flowinfo;
	__be32 sin6_addr[4];
	__u32 sin6_scope_id;
};

/*
 * Answer SO_ORIGINAL_DST for proxy sockets that claimed an entry. Every other
 * call is left exactly as the kernel answered it: this hook sees every
 * getsockopt in the cgroup, and rewriting lengths of calls that are not ours
 * breaks unrelated programs (iptables reads large buffers this way).
 *
 * The hook runs after the protocol handler whatever that returned (ENOENT when
 * nf_conntrack is not loaded); setting retval to 0 overrides it.
 */
SEC("cgroup/getsockopt")
int sl_getsockopt(struct bpf_sockopt *ctx)
{
	struct orig_dst *dst;
	__u8 *optval, *end;

	if (ctx->optname != SO_ORIGINAL_DST)
		return 1;
	if (ctx->level != SOL_IP && ctx->level != SOL_IPV6)
		return 1;
	if (!ctx->sk)
		return 1;
	dst = bpf_sk_storage_get(&claimed, ctx->sk, 0, 0);
	if (!dst) {
		count(COUNTER_ORIG_DST_UNKNOWN);
		return 1;
	}

	optval = ctx->optval;
	end = ctx->optval_end;
	if (ctx->level == SOL_IP) {
		struct sockaddr_in_ *sin = (void *)optval;

		if (dst->family != AF_INET || (void *)(sin + 1) > (void *)end)
			return 1;
		sin->sin_family = AF_INET;
		sin->sin_port = dst->port;
		sin->sin_addr = dst->addr[0];
		__builtin_memset(sin->zero, 0, sizeof(sin->zero));
		ctx->optlen = sizeof(*sin);
	} else {
		struct sockaddr_in6_ *sin6 = (void *)optval;

		if ((void *)(sin6 + 1) > (void *)end)
			return 1;
		sin6->sin6_family = AF_INET6;
		sin6->sin6_port = dst->port;
		sin6->sin6_flowinfo = 0;
		sin6->sin6_scope_id = 0;
		if (dst->family == AF_INET) {
			sin6->sin6_addr[0] = 0;
			sin6->sin6_addr[1] = 0;
			sin6->sin6_addr[2] = bpf_htonl(0x0000ffff);
			sin6->sin6_addr[3] = dst->addr[0];
		} else {
			sin6->sin6_addr[0] = dst->addr[0];
			sin6->sin6_addr[1] = dst->addr[1];
			sin6->sin6_addr[2] = dst->addr[2];
			sin6->sin6_addr[3] = dst->addr[3];
		}
		ctx->optlen = sizeof(*sin6);
	}
	ctx->retval = 0;
	count(COUNTER_ORIG_DST_ANSWERED);
	return 1;
}

/*
 * Transparency: a redirected socket's peer is its original destination.
 * Only a socket whose peer is the proxy's address can have one; every other
 * getpeername returns before touching a map.
 */
static __always_inline struct orig_dst *redirected_to(struct bpf_sock_addr *ctx)
{
	struct orig_dst *dst = bpf_sk_storage_get(&redirects, ctx->sk, 0, 0);
	__u64 cookie;

	if (dst)
		return dst;
	/* Redirected by the previous release's connect4 (layouts 1-4). */
	cookie = bpf_get_socket_cookie(ctx);
	return bpf_map_lookup_elem(&orig_dsts, &cookie);
}

SEC("cgroup/getpeername4")
int sl_getpeername4(struct bpf_sock_addr *ctx)
{
	__be32 peer = ctx->user_ip4;
	struct proxy_config *cfg;
	struct orig_dst *dst;

	cfg = get_config();
	if (!cfg || !cfg->addr4 || peer != cfg->addr4)
		return 1;
	dst = redirected_to(ctx);
	if (!dst || dst->family != AF_INET)
		return 1;
	ctx->user_ip4 = dst->addr[0];
	ctx->user_port = dst->port;
	count(COUNTER_PEERNAME_REWRITES);
	return 1;
}

SEC("cgroup/getpeername6")
int sl_getpeername6(struct bpf_sock_addr *ctx)
{
	struct proxy_config *cfg;
	struct orig_dst *dst;
	__be32 peer[4];

	peer[0] = ctx->user_ip6[0];
	peer[1] = ctx->user_ip6[1];
	peer[2] = ctx->user_ip6[2];
	peer[3] = ctx->user_ip6[3];
	cfg = get_config();
	if (!cfg || !is_proxy_addr(cfg, peer, is_v4mapped(peer)))
		return 1;
	dst = redirected_to(ctx);
	if (!dst)
		return 1;
	if (dst->family == AF_INET) {
		/* AF_INET6 socket that connected to a v4-mapped address. */
		ctx->user_ip6[0] = 0;
		ctx->user_ip6[1] = 0;
		ctx->user_ip6[2] = bpf_htonl(0x0000ffff);
		ctx->user_ip6[3] = dst->addr[0];
	} else {
		ctx->user_ip6[0] = dst->addr[0];
		ctx->user_ip6[1] = dst->addr[1];
		ctx->user_ip6[2] = dst->addr[2];
		ctx->user_ip6[3] = dst->addr[3];
	}
	ctx->user_port = dst->port;
	count(COUNTER_PEERNAME_REWRITES);
	return 1;
}
