/* xdpflow: the one definition of the kernel/user-space layout.
 *
 * Shared by xdp/flow.c (the XDP ingress and TC egress programs) and mirrored in xdp/layout.py
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
 * destination port holds type << 8 | code (as nfdump and others expect).
 *
 * direction says which hook metered the packet, and with it what ifindex is:
 * 0, the XDP program on the interface the packet entered (ifindex feeds IE 10
 * ingressInterface); 1, the TC egress program on the interface it left
 * (ifindex feeds IE 14 egressInterface). A packet is counted at most once per
 * direction (xdp/flow.c explains the rule for gateways), so the same 5-tuple
 * seen both ways is two flows that differ in direction and ifindex. */
struct flow_key {
	__u8  src_addr[16];  /* IE 8 sourceIPv4Address / IE 27 sourceIPv6Address */
	__u8  dst_addr[16];  /* IE 12 destinationIPv4Address / IE 28 destinationIPv6Address */
	__u16 src_port;      /* IE 7 sourceTransportPort */
	__u16 dst_port;      /* IE 11 destinationTransportPort; IE 32/139 icmpTypeCode */
	__u32 ifindex;       /* direction 0: IE 10 ingressInterface; 1: IE 14 egressInterface */
	__u16 vlan_id;       /* IE 58 vlanId (outer tag, 0 when untagged) */
	__u8  protocol;      /* IE 4 protocolIdentifier */
	__u8  ip_version;    /* IE 60 ipVersion (4 or 6) */
	__u8  direction;     /* IE 61 flowDirection: XDPFLOW_INGRESS (0) or XDPFLOW_EGRESS (1) */
	__u8  segment[3];    /* tunnels (XDPFLOW_TUNNELS): the low 24 bits of the VNI or GRE key, little-endian,
	                      * so the inner flows of two segments stay apart (struct tunnel_ext has the
	                      * whole id); 0 when the packet was not decapsulated */
};                           /* 48 bytes */

#define XDPFLOW_INGRESS 0    /* metered by the XDP program (flow.c: xdpflow) */
#define XDPFLOW_EGRESS  1    /* metered by the TC egress program (flow.c: xdpflow_egress) */

/* A flow's counters for one scan interval on one CPU: the value of a slot (below). Size is a
 * multiple of 8. Times are jiffies (bpf_jiffies64(): the tick counter, ~2 ns a read where the
 * coarse clock costs ~19 ns on the 2-vCPU test VM); user space converts them with two
 * (jiffies, CLOCK_MONOTONIC_COARSE) samples taken at the flips that open and close the page
 * (struct xdpflow_clock), so IPFIX milliseconds keep the tick's resolution (4 ms at HZ=250). */
struct flow_value {
	__u64 packets;       /* IE 2 packetDeltaCount */
	__u64 octets;        /* IE 1 octetDeltaCount (IP total length: header + payload) */
	__u64 first_seen;    /* IE 152 flowStartMilliseconds, after clock conversion (jiffies) */
	__u64 last_seen;     /* IE 153 flowEndMilliseconds, after clock conversion (jiffies) */
	__u16 tcp_flags;     /* IE 6 tcpControlBits: OR over packets, 9 bits (NS..FIN) */
	__u8  tos;           /* IE 5 ipClassOfService of the flow's first packet */
	__u8  min_ttl;       /* IE 52 minimumTTL (IPv6: hop limit) */
	__u8  max_ttl;       /* IE 53 maximumTTL */
	__u8  first_flags;   /* TCP flags (low 8 bits) of the slot's first packet: not exported, tells
	                      * a biflow's initiator (bare SYN) from its answer (SYN+ACK) */
	__u8  pad[2];        /* always zero */
};                           /* 40 bytes */

/* One element of the mmap-able array `slots`: a flow's key and its counters for one CPU and one
 * scan interval. The array holds two pages of XDPFLOW_MAX_ENTRIES slots (page p: index
 * p * XDPFLOW_MAX_ENTRIES + slot); a CPU takes the next free slot of the active page for a flow
 * the first time it meters the flow in that page, writes the key and the first packet, and
 * afterwards only adds to it. User space reads a drained page's slots 0..slot_alloc.next - 1
 * straight from its mapping and merges the slots of equal keys (one per CPU that saw the flow). */
struct flow_slot {
	struct flow_key   key;
	struct flow_value value;
};                           /* 88 bytes */

/* Per-CPU value of the LRU flow map `flows`: where this CPU counts the flow. A ref is current
 * when gen is the control slot's gen; an older one points into a page already drained, and the
 * next packet takes a fresh slot. slot XDPFLOW_NO_SLOT: the page had no free slot for the flow
 * this interval (its packets count as insert_failures, without asking again). */
struct flow_ref {
	__u32 slot;
	__u32 gen;
};                           /* 8 bytes */

#define XDPFLOW_NO_SLOT 0xFFFFFFFFu

/* Per-CPU direct-mapped cache in front of `flows` (array `flow_cache`, indexed by a multiplicative
 * hash of the key): a hit finds the slot with array lookups the verifier inlines and one key
 * compare, no hash-map helper call (jhash over 48 bytes, bucket walk, LRU reference bit: ~50 ns
 * of the hit path on the test VM). Valid only while gen is current, so a flip empties it. */
struct flow_cache_entry {
	struct flow_key key;
	__u32 slot;
	__u32 gen;
	__u64 pad;           /* always zero: one 64-byte line per entry */
};                           /* 64 bytes */

#ifndef XDPFLOW_CACHE_BITS
#define XDPFLOW_CACHE_BITS 12   /* 4096 entries per CPU (256 KiB) */
#endif

/* Slot allocator of one page (array `slot_alloc`, index = page): the next free slot, taken with
 * one atomic fetch-and-add by whichever CPU meters a flow new to it (once per flow, CPU and scan
 * interval); a value at or past XDPFLOW_MAX_ENTRIES means the page is full (the counter goes on
 * counting; 64 bits never wrap). User space reads `next` once the page is drained (the slots
 * taken: min(next, XDPFLOW_MAX_ENTRIES)) and sets it back to 0 before the page is active again. */
struct slot_alloc {
	__u64 next;
};                           /* 8 bytes */

/* Two clock readings taken together by the program xdpflow_clock (run by user space through
 * BPF_PROG_TEST_RUN at every flip): jiffies, CLOCK_MONOTONIC_COARSE, jiffies again (when the
 * two jiffies differ a tick fell between the reads, and user space reads again). */
struct xdpflow_clock {
	__u64 jiffies;
	__u64 coarse_ns;
	__u64 jiffies_after;
};                           /* 24 bytes */

/* Per-CPU counters (one slot of a per-CPU array), shared by both programs:
 * ingress and egress packets count in the same slots. The ground truth for
 * loss accounting: every frame the programs see lands in exactly one of
 * packets (metered), filtered, sampled_out, parse_failures or non_ip; every
 * metered packet is either in a flow map or in insert_failures. Filtered and
 * sampled out packets are selected out before metering: they are not
 * "observed" in the exporter's accounting (exported + ignored = observed =
 * packets). Counts are of frames on the wire: a GSO packet the egress program
 * sees (one skb leaving as gso_segs frames) counts gso_segs times, its octets
 * as the sum of the segments' IP total lengths (flow.c). */
struct flow_stats {
	__u64 frames;               /* every frame the programs ran on (GSO: each segment) */
	__u64 packets;              /* IP packets metered (observed): IE 163-ish totals */
	__u64 octets;               /* IP octets metered (sum of IP total length) */
	__u64 flows_created;        /* slots taken: a flow new to this CPU in this page */
	__u64 parse_failures;       /* malformed or truncated frames, passed untouched */
	__u64 non_ip;               /* frames that are not IPv4/IPv6 (ARP, LLDP...) */
	__u64 insert_failures;      /* metered packets no slot could hold (the page's slots ran out) */
	__u64 insert_failure_octets;/* their octets */
	__u64 filtered;             /* IP packets a filter rule excluded, passed unmetered */
	__u64 filtered_octets;      /* their octets */
	__u64 sampled_out;          /* IP packets the sampler skipped, passed unmetered */
	__u64 sampled_out_octets;   /* their octets */
	__u64 flows_denied;         /* flows (per CPU) that found no free slot: flows_created + this
	                             * is how many slots the interval needed */
	__u64 parse_failure_octets; /* octets of the parse failures from the network header on (the IP
	                             * total length once it was read): ignoredOctetTotalCount, IE 165 */
	/* Extensions (below; zero while a feature is not compiled in). Each packet they count is also
	 * metered as above: these say what the extension made of it. */
	__u64 tunnel_decapsulated;  /* packets metered as their inner flow */
	__u64 tunnel_malformed;     /* tunnel packets whose inner headers did not parse: metered as the outer flow */
	__u64 dns_messages;         /* DNS headers read (queries and responses) */
	__u64 dns_malformed;        /* port-53 packets whose DNS header or question did not parse */
	__u64 dns_responses_timed;  /* responses matched to their query (dns_ext.response_us) */
	__u64 tcp_rtt_samples;      /* RTT samples taken (handshake or timestamp echo) */
	__u64 tcp_retransmissions;  /* TCP segments seen again (tcp_ext.retransmissions) */
	__u64 ext_state_full;       /* an extension's pending-state map was full: a sample not taken */
};                                  /* 176 bytes */

/* Run-time configuration: slot 0 of the array `control`, read once per run. gen counts the
 * flips; the active page is gen & 1 (gen starts at 1, so a zeroed ref or cache entry is never
 * current).
 * config 0 is the fast path (no filter, no sampling): one compare. Otherwise
 * config - 1 names the rule set (0 or 1) in force. User space fills the other
 * set, points config at it, waits an RCU grace period (no program still uses
 * the old set) and only then touches the old one, so every packet is judged by
 * exactly one complete rule set and a change needs no recompile or re-attach.
 * Each field is an aligned 32-bit word, read and written whole: a reader never sees a torn value. */
struct xdpflow_ctl {
	__u32 gen;       /* flips so far + 1; page (slots and stats slot) programs write: gen & 1 */
	__u32 config;    /* 0: no filter, no sampling; else 1 + rule set index */
};                       /* 8 bytes */

/* Rule sets (array `rule_sets`, one per index). Filter rules are compiled to
 * match slots, one bit each (a rule using `net` or `port` takes two, both
 * four). Every selector dimension has a table giving, for a packet's value,
 * the slots that accept it (a slot without a constraint on the dimension
 * accepts every value). A packet's matches are the AND over the dimensions in
 * use (flags); the lowest set bit is the first matching rule. */
#define XDPFLOW_MAX_SLOTS     64      /* match slots per rule set (one u64 mask) */
#define XDPFLOW_COUNTER_SLOTS 65      /* per-set counters: a slot each, then "no rule matched" */
#define XDPFLOW_MAX_PREFIXES  16384   /* distinct CIDRs (with ::/0) per direction and rule set */
#define XDPFLOW_PORT_SLOTS    65537   /* port tables: ports 0..65535, then "packet has no ports" */
#define XDPFLOW_NO_PORT       65536
#define XDPFLOW_VLAN_SLOTS    4096
#define XDPFLOW_PROTO_SLOTS   256
#define XDPFLOW_IFINDEX_SLOTS 4096    /* iface_masks: ifindex 0..4095 by array, higher ones by hash */
#define XDPFLOW_MAX_IFACES    1024    /* iface_masks_high entries per rule set */

#define XDPFLOW_SEL_SRC    (1u << 0)  /* src_prefixes */
#define XDPFLOW_SEL_DST    (1u << 1)  /* dst_prefixes */
#define XDPFLOW_SEL_PROTO  (1u << 2)  /* proto_masks */
#define XDPFLOW_SEL_SPORT  (1u << 3)  /* sport_masks */
#define XDPFLOW_SEL_DPORT  (1u << 4)  /* dport_masks */
#define XDPFLOW_SEL_VLAN   (1u << 5)  /* vlan_masks */
#define XDPFLOW_SEL_IFACE  (1u << 6)  /* iface_masks, iface_masks_high */
#define XDPFLOW_FILTER     (1u << 8)  /* the set has rules */
#define XDPFLOW_SAMPLE     (1u << 9)  /* sample 1 in sample_interval */

struct rule_set {
	__u64 slots;            /* bit i: match slot i exists */
	__u64 exclude;          /* bit i: slot i belongs to an exclude rule */
	__u64 iface_any;        /* slots accepting an interface no iface selector names */
	__u64 src_any;          /* slots without a src constraint (no src lookup can remove them) */
	__u64 dst_any;          /* slots without a dst constraint */
	__u32 flags;            /* XDPFLOW_SEL_* | XDPFLOW_FILTER | XDPFLOW_SAMPLE */
	__u32 default_exclude;  /* 1: a packet no rule matches is excluded (an include rule exists) */
	__u32 sample_threshold; /* meter when bpf_get_prandom_u32() < this: round(2^32 / N) */
	__u32 sample_interval;  /* N, IE 34 samplingInterval (for user space and dumps) */
};                              /* 56 bytes */

/* Key of the LPM tries src_prefixes / dst_prefixes: the rule set index, then
 * the address (IPv4-mapped for IPv4), so one trie serves both sets and both
 * families. prefixlen counts from set: 32 + CIDR length (IPv4: 32 + 96 + n). */
struct prefix_key {
	__u32 prefixlen;
	__u8  set;               /* rule set index */
	__u8  pad[3];            /* always zero */
	__u8  addr[16];
};                               /* 24 bytes */

/* Per-CPU hits of a rule set's match slots (array `rule_hits`, index
 * set * XDPFLOW_COUNTER_SLOTS + slot; slot XDPFLOW_MAX_SLOTS: no rule matched). */
struct rule_counter {
	__u64 packets;
	__u64 octets;
};                               /* 16 bytes */

/* Extensions (issue 14), each compiled in by its flag: XDPFLOW_TUNNELS, XDPFLOW_DNS, XDPFLOW_TCP_RTT
 * (xdp/compile.py sets them from the settings; a change needs a reload of the program). Each keeps one
 * struct per slot in its own mmap-able array (tunnel_exts, dns_exts, tcp_exts), indexed like `slots`
 * (page * XDPFLOW_MAX_ENTRIES + slot): only the CPU that owns the slot writes it, it is initialised
 * when the slot is taken, and the drain reads it with the slot. A feature compiled out keeps an array of
 * one entry that no code touches, so its hit path is today's. */

/* Tunnels: VXLAN (UDP 4789), Geneve (UDP 6081), GRE (IP protocol 47, with or without key). The flow
 * key is the inner packet's; the outer packet's addresses and the segment id are kept here (the last
 * packet's). Octets stay the outer packet's IP total length (what crossed the wire). */
#define XDPFLOW_TUNNEL_NONE   0
#define XDPFLOW_TUNNEL_VXLAN  1
#define XDPFLOW_TUNNEL_GENEVE 2
#define XDPFLOW_TUNNEL_GRE    3   /* GRE without key */
#define XDPFLOW_TUNNEL_GRE_KEY 4  /* GRE with key: tunnel_id is the key */
struct tunnel_ext {
	__u8  outer_src[16];     /* outer source address (IPv4-mapped for IPv4) */
	__u8  outer_dst[16];     /* outer destination address */
	__u32 tunnel_id;         /* VXLAN/Geneve VNI (24 bits): IE 351 layer2SegmentId; GRE key: IE 296 greKey */
	__u8  type;              /* XDPFLOW_TUNNEL_* (0: this flow was not tunnelled) */
	__u8  outer_ip_version;  /* 4 or 6 */
	__u8  pad[2];            /* always zero */
};                               /* 40 bytes */

/* DNS (UDP or TCP port 53, the DNS header within the first segment): the header and the first
 * question of the slot's first DNS message, and the response time of a response matched to its
 * query. Enterprise IEs: exporter/ipfix/templates.py says which. */
#define XDPFLOW_DNS_NAME 64
struct dns_ext {
	__u16 id;                /* transaction id */
	__u16 flags;             /* the header's flags word: QR, opcode, AA, TC, RD, RA, Z, rcode (low 4 bits) */
	__u16 qtype;             /* QTYPE of the first question (0: none read) */
	__u16 qcount;            /* QDCOUNT */
	__u8  name_len;          /* octets of qname used (0: no name read) */
	__u8  present;           /* 1: a DNS header was read into this entry */
	__u8  pad[2];            /* always zero */
	__u32 response_us;       /* response seen minus query seen, microseconds (0: not matched) */
	__u8  qname[XDPFLOW_DNS_NAME]; /* first question's name, dotted ("www.example.com"), not terminated */
};                               /* 80 bytes */

/* TCP round trips (passive, transit traffic both ways of which cross the hooks). Handshake: SYN seen
 * to SYN-ACK seen is the server side's delay, SYN-ACK seen to the client's ACK the client side's; both
 * land in the slot of the packet that completes them. Timestamps: a TSval first seen in one direction,
 * echoed in a TSecr of the other, is a round trip from the observation point to this flow's source
 * and back (the echoing packet's slot gets it). */
struct tcp_ext {
	__u32 server_delay_us;   /* SYN -> SYN-ACK (0: not seen) */
	__u32 client_delay_us;   /* SYN-ACK -> ACK (0: not seen) */
	__u32 rtt_min_us;        /* least timestamp-echo round trip (0: no sample) */
	__u32 rtt_samples;       /* timestamp-echo samples */
	__u64 rtt_sum_us;        /* their sum (mean = sum / samples) */
	__u32 retransmissions;   /* segments whose sequence range was seen before */
	__u32 pad;               /* always zero */
};                               /* 32 bytes */

#define XDPFLOW_VLAN_MAX_DEPTH 2   /* 802.1Q / 802.1ad tags parsed */
#define XDPFLOW_IPV6_MAX_EXT   6   /* IPv6 extension headers skipped before giving up */

#endif /* XDPFLOW_FLOW_H */
