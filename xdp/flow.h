/* xdpflow: the one definition of the kernel/user-space layout.
 *
 * Shared by xdp/flow.c (the XDP program) and mirrored in exporter/layout.py
 * (numpy dtypes); tests/unit/test_layout.py compiles this header and checks
 * that both agree on every size and offset. Every field names the IPFIX
 * information element (IANA id) it feeds.
 *
 * Fixed-size types, explicit padding, no implicit holes: the exporter reads
 * these structs as raw bytes straight out of BPF batch syscalls.
 */
#ifndef XDPFLOW_FLOW_H
#define XDPFLOW_FLOW_H

#include <linux/types.h>

/* Flow key. IPv4 addresses are stored IPv4-mapped (::ffff:a.b.c.d) so one key
 * serves both families; ip_version says which template the record uses.
 * Ports are in host byte order. For ICMP/ICMPv6 the source port is 0 and the
 * destination port holds type << 8 | code (as nfdump and others expect). */
struct flow_key {
	__u8  src_addr[16];  /* IE 8 sourceIPv4Address / IE 27 sourceIPv6Address */
	__u8  dst_addr[16];  /* IE 12 destinationIPv4Address / IE 28 destinationIPv6Address */
	__u16 src_port;      /* IE 7 sourceTransportPort */
	__u16 dst_port;      /* IE 11 destinationTransportPort; IE 32/139 icmpTypeCode */
	__u32 ifindex;       /* IE 10 ingressInterface */
	__u16 vlan_id;       /* IE 58 vlanId (outer tag, 0 when untagged) */
	__u8  protocol;      /* IE 4 protocolIdentifier */
	__u8  ip_version;    /* IE 60 ipVersion (4 or 6) */
};                           /* 44 bytes */

/* Per-CPU flow value. Size is a multiple of 8 (bcc requires it for per-CPU
 * leaves). Timestamps come from bpf_ktime_get_coarse_ns() (CLOCK_MONOTONIC at
 * tick resolution): on the 2-vCPU test VM (PROG_TEST_RUN) the precise clock
 * costs ~30 ns a packet and the coarse one ~13 ns; IPFIX exports
 * milliseconds. bpf_jiffies64() would cost ~2 ns but needs HZ calibration in
 * user space (see docs/benchmarks.md). A slot whose packets is 0 belongs to
 * a CPU that never saw the flow and carries no data. */
struct flow_value {
	__u64 packets;       /* IE 2 packetDeltaCount */
	__u64 octets;        /* IE 1 octetDeltaCount (IP total length: header + payload) */
	__u64 first_seen_ns; /* IE 152 flowStartMilliseconds, after clock conversion */
	__u64 last_seen_ns;  /* IE 153 flowEndMilliseconds, after clock conversion */
	__u16 tcp_flags;     /* IE 6 tcpControlBits: OR over packets, 9 bits (NS..FIN) */
	__u8  tos;           /* IE 5 ipClassOfService of the flow's first packet */
	__u8  min_ttl;       /* IE 52 minimumTTL (IPv6: hop limit) */
	__u8  max_ttl;       /* IE 53 maximumTTL */
	__u8  pad[3];        /* always zero */
};                           /* 40 bytes */

/* Per-CPU counters (one slot of a per-CPU array). The ground truth for loss
 * accounting: every frame the program sees lands in exactly one of
 * metered, parse_failures or non_ip; every metered packet is either in a flow
 * map or in insert_failures. */
struct flow_stats {
	__u64 frames;               /* every frame the program ran on */
	__u64 packets;              /* IP packets metered (observed): IE 163-ish totals */
	__u64 octets;               /* IP octets metered (sum of IP total length) */
	__u64 flows_created;        /* successful inserts of a new key into a page */
	__u64 parse_failures;       /* malformed or truncated frames, passed untouched */
	__u64 non_ip;               /* frames that are not IPv4/IPv6 (ARP, LLDP...) */
	__u64 insert_failures;      /* metered packets no page could hold */
	__u64 insert_failure_octets;/* their octets */
};                                  /* 64 bytes */

#define XDPFLOW_VLAN_MAX_DEPTH 2   /* 802.1Q / 802.1ad tags parsed */
#define XDPFLOW_IPV6_MAX_EXT   6   /* IPv6 extension headers skipped before giving up */

#endif /* XDPFLOW_FLOW_H */
