/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Copyright The sluice Authors. */

/*
 * Types and maps shared by the sluice datapath programs. The Go side gets
 * mirrors of the structs below from bpf2go (-type), never hand-written ones.
 */
#ifndef __SLUICE_H
#define __SLUICE_H

#include <linux/types.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define AF_INET 2
#define AF_INET6 10
#define SOCK_STREAM 1
#define SOCK_DGRAM 2
#define IPPROTO_TCP 6
#define IPPROTO_UDP 17
#define IPPROTO_UDPLITE 136
#define IPPROTO_MPTCP 262
#define SOL_IP 0
#define SOL_IPV6 41
/* SO_ORIGINAL_DST (linux/netfilter_ipv4.h) and IP6T_SO_ORIGINAL_DST share 80. */
#define SO_ORIGINAL_DST 80

/*
 * The datapath matches the cgroup of the task calling connect() and its
 * ancestors at absolute levels 1..MAX_ANCESTOR_LEVEL (level 0 is the root,
 * never matched). Kubelet pod cgroups live at levels 2-3 and containers one
 * below, so 16 leaves ample room for nested runtimes.
 */
#define MAX_ANCESTOR_LEVEL 16

/* Upper bounds of the maps; see docs/datapath.md for what exhaustion does. */
#define MAX_WORKLOADS 16384
#define MAX_INFLIGHT 65536
#define MAX_EXCLUSIONS 16384
#define MAX_EXCLUDED_PORTS 1024
#define MAX_RESOLVERS 64
#define MAX_NEVER_DIAL 4096
#define MAX_METADATA_GRANTS 4096
/*
 * Slots of the global counter array: more than the counters in use, so that
 * a later version adding counters can reuse the pinned map (an array's size
 * is part of its pinned identity).
 */
#define COUNTER_SLOTS 64

/* Bits of proxy_config.added (an enum, so that the Go side is generated). */
enum proxy_added {
	PROXY_ADDED_V4 = 1U << 0,
	PROXY_ADDED_V6 = 1U << 1,
};

/* Bits of workload.flags. */
enum workload_flag {
	WORKLOAD_FAIL_CLOSED = 1U << 0,
	/*
	 * Enforce mode: besides TCP through the proxy, the workload may only
	 * send DNS to the configured resolvers; every other non-TCP socket
	 * (UDP, QUIC, ping, SCTP, MPTCP) is refused at connect() and sendmsg().
	 */
	WORKLOAD_ENFORCE = 1U << 1,
	/*
	 * The proxy has not yet accepted a configuration with this workload's
	 * addresses: until it has, its connections get what its fail mode says
	 * (direct, or EPERM), never a listener that does not know them.
	 */
	WORKLOAD_AWAITING_PROXY = 1U << 2,
};

/*
 * Classes of the never-dial set (values of never_dial_v4/v6): destinations a
 * selected workload's connection is never redirected to, because the proxy
 * runs in the node's network namespace and would reach the node itself
 * (its loopback, its own addresses, link-local services) on the pod's behalf.
 */
enum dst_class {
	DST_NODE_LOCAL = 1, /* refused unless excluded (then direct) */
	DST_METADATA = 2,   /* cloud metadata: direct if granted or audit, else refused */
	/*
	 * Link-local (169.254/16, fe80::/10): excluded by default, so audit
	 * pods reach it directly; enforce pods only where granted (or a
	 * resolver), since the node routes it to node and cloud services
	 * (the VPC resolver, pod-identity agents).
	 */
	DST_LINK_LOCAL = 3,
};

/*
 * A metadata or other link-local address (v4-mapped for IPv4) and port (0:
 * any) that a workload's policy names exactly; enforce-mode workloads reach
 * only these of them, directly from the pod.
 */
struct metadata_key {
	__u32 workload_id;
	__be16 port;
	__u16 _pad;
	__be32 addr[4];
};

/*
 * The version of the pinned layout (the maps' names and definitions), in the
 * single entry of the layout map. The agent writes it once the pins are
 * installed or migrated (agent/datapath/layout.go says how versions change);
 * no program reads it. Pins without it are layout 1.
 */
struct layout_info {
	__u32 version;
	__u32 _pad;
};

/* Selected workload: key is a cgroup v2 id. */
struct workload {
	__u32 id;    /* stable id the agent assigns, keys wl_counters */
	__u32 flags; /* WORKLOAD_* */
};

/* Proxy address and readiness; one entry, written by the agent. */
struct proxy_config {
	__be32 addr4;    /* 0: no IPv4 proxy */
	__be32 addr6[4]; /* all zero: no IPv6 proxy */
	__be16 port;
	__u8 ready; /* the proxy answers /ready; see fail modes */
	/*
	 * PROXY_ADDED_*: sluice put that address on the node (it was not
	 * there before), so uninstall removes it and nothing else. The
	 * programs never read it; it lives here to share the pins' lifetime.
	 */
	__u8 added;
	/*
	 * Readiness lease: ready only holds until this bpf_ktime_get_ns()
	 * (CLOCK_MONOTONIC) deadline, which the agent renews while the proxy
	 * answers. Should the agent and the proxy both disappear, the workloads
	 * fall back to their fail mode instead of dialing a closed port. 0: no
	 * lease, ready holds until cleared.
	 */
	__u64 ready_until;
};

/* A DNS resolver workloads in enforce mode may reach; IPv4 v4-mapped. */
struct resolver_key {
	__be32 addr[4];
	__be16 port;
	__u16 _pad;
};

/*
 * An original destination. IPv4 lives in addr[0] (network order) with the
 * rest zero; family says which.
 */
struct orig_dst {
	__be32 addr[4];
	__be16 port;
	__u16 family;
	__u32 workload_id;
};

/*
 * A connection between a client and the proxy, as both ends see it: the two
 * addresses and the client's first sequence number after its SYN (its ISN
 * + 1: snd_una when its handshake completes, rcv_nxt when the proxy's
 * does). Not the client's port: NAT on the node (kube-proxy's conntrack
 * resolving a clash with another connection's tuple) may move the port
 * between the two ends, and never the sequence number. IPv4 addresses are
 * stored v4-mapped (::ffff:a.b.c.d) so that an AF_INET6 client talking to
 * an AF_INET listener (or the reverse) produces the same key on both ends.
 */
struct tuple_key {
	__be32 client[4];
	__be32 proxy[4];
	__u32 client_seq;
};

/*
 * The same map's key as layouts 1-3 wrote it (client and proxy ports, host
 * order, where client_seq is now). Only read, for the entries the previous
 * release's programs published in the instant before an upgrade switched
 * them: see on_passive_established.
 */
struct tuple_key_v3 {
	__be32 client[4];
	__be32 proxy[4];
	__u16 client_port;
	__u16 proxy_port;
};

struct lpm_v4_key {
	__u32 prefixlen;
	__be32 addr;
};

struct lpm_v6_key {
	__u32 prefixlen;
	__be32 addr[4];
};

struct workload_stats {
	__u64 redirected;
	__u64 failed_closed;
	__u64 denied; /* enforce mode: non-TCP socket refused */
	__u64 node_local; /* never-dial destination refused (any mode) */
	__u64 metadata; /* connects to a metadata address, direct or refused */
};

/*
 * Indexes of the global per-CPU counters. The Go side derives each counter's
 * name from this enum (COUNTER_CLAIMED: "claimed", the metric's kind label),
 * so a name here is part of the metrics' interface.
 */
enum counter {
	COUNTER_REDIRECTED_IPV4 = 0, /* connect rewritten to the IPv4 proxy */
	COUNTER_REDIRECTED_IPV6,    /* connect rewritten to the IPv6 proxy */
	COUNTER_EXCLUDED,           /* selected, destination excluded */
	COUNTER_PROXY_DIRECT,       /* selected, destination is the proxy itself */
	COUNTER_FAILED_CLOSED,      /* proxy not ready, connect refused */
	COUNTER_BYPASS_NOT_READY,   /* proxy not ready, fail-open: went direct */
	COUNTER_ORIG_STORE_FAILED,  /* could not remember the original dst: connect refused */
	COUNTER_PUBLISHED,          /* 4-tuple published at ACTIVE_ESTABLISHED */
	COUNTER_PUBLISH_FAILED,     /* 4-tuple map update failed */
	COUNTER_CLAIMED,            /* proxy socket claimed its entry */
	COUNTER_CLAIM_MISSED,       /* socket accepted on the proxy address (any port) with no entry */
	COUNTER_STALE_CLEARED,      /* unredirected connection cleared an old entry */
	COUNTER_ORIG_DST_ANSWERED,  /* SO_ORIGINAL_DST answered */
	COUNTER_ORIG_DST_UNKNOWN,   /* SO_ORIGINAL_DST asked on an unknown socket */
	COUNTER_PEERNAME_REWRITES,  /* getpeername answered the original dst */
	COUNTER_DNS_ALLOWED,        /* selected, DNS to a configured resolver: direct */
	COUNTER_DENIED_NON_TCP,     /* enforce, non-TCP connect/sendmsg refused */
	COUNTER_LEASE_EXPIRED,      /* ready flag set but its lease ran out */
	COUNTER_NODE_LOCAL_REFUSED, /* never-dial destination, not excluded: refused */
	COUNTER_PROXY_PORT_REFUSED, /* the proxy address on another port: refused */
	COUNTER_METADATA_DIRECT,    /* metadata address, audit or granted: direct */
	COUNTER_METADATA_REFUSED,   /* metadata address, enforce, not granted: refused */
	COUNTER_FLOW_EVENTS_DROPPED,  /* flow event lost: the flows ring buffer was full */
	COUNTER_MAX,
};

/*
 * What the datapath decided about a selected workload's connection (or
 * socket, or datagram) that does not reach the proxy: values of
 * flow_event.decision. Redirected connections are the proxy's to log (its
 * access log); these are the ones only the datapath sees.
 */
enum flow_decision {
	FLOW_DIRECT_NOT_READY = 1,  /* fail-open, proxy not ready or not yet told of the pod: direct */
	FLOW_REFUSED_NOT_READY = 2, /* fail-closed, same: refused */
	FLOW_REFUSED_NON_TCP = 3,   /* enforce: a non-TCP socket, connect or datagram refused */
	FLOW_REFUSED_NODE_LOCAL = 4, /* never-dial destination: refused */
	FLOW_REFUSED_PROXY_PORT = 5, /* the proxy address on another port: refused */
	FLOW_DIRECT_METADATA = 6,   /* metadata address, audit or granted: direct */
	FLOW_REFUSED_METADATA = 7,  /* metadata address, enforce, not granted: refused */
	FLOW_REFUSED_STORE_FAILED = 8, /* no socket storage for the original destination: refused */
};

/* Capacity of the flows ring buffer: 16384 events of 64 bytes (header included). */
#define FLOW_RING_BYTES (1 << 20)

/* One decision, written to the flows ring buffer (FLOW_* decision). */
struct flow_event {
	__u64 time_ns;   /* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
	__u64 cookie;    /* the socket's cookie */
	__u64 cgroup_id; /* the calling task's cgroup */
	__be32 addr[4];  /* destination, v4-mapped when IPv4; zero at socket() */
	__be16 port;     /* destination port, network order */
	__u8 v4;
	__u8 protocol;   /* IPPROTO_* of the socket */
	__u8 decision;   /* enum flow_decision */
	__u8 _pad[3];
	__u32 workload_id;
};

#endif /* __SLUICE_H */
