/* xdpflow: flow metering at XDP ingress and, optionally, TC egress.
 *
 * Theory of operation. For every frame: parse Ethernet, up to two VLAN tags,
 * IPv4 or IPv6 (skipping a bounded chain of extension headers) and the ports
 * of TCP, UDP and SCTP (or ICMP type/code); build a struct flow_key and add
 * the packet to this CPU's slot for the flow in the active page, counting it
 * in that page's slot of `stats` (flow.h: struct flow_slot, flow_ref, and the
 * per-CPU cache in front of the flow map). The control slot is read once per
 * run, so a packet's slot and its counters always land in the same page.
 *
 * The per-CPU LRU flow map `flows` maps a key to this CPU's slot; the slots
 * themselves live in the mmap-able array `slots`, two pages of max_entries,
 * so user space reads a drained page where it lies instead of walking a hash
 * table (whose per-CPU values sit in random cache lines: >= 550 ns an entry
 * on the test VM, whatever reads them). A slot belongs to one CPU and one
 * scan interval: the CPU that meters a flow first in a page takes the page's
 * next free slot (a spin-locked counter, once per flow, CPU and interval),
 * writes key and packet, and only it adds to the slot afterwards.
 *
 * Every scan the exporter increments `control.gen` (page = gen & 1), then
 * rewrites the slot of the array-of-maps `fence` with the fd it already holds:
 * a map-in-map update makes the kernel wait an RCU grace period
 * (synchronize_rcu) before returning, and XDP and TC programs run under RCU,
 * so afterwards no program that read the old gen is still running. The old
 * page, its slot count and its counters then have no writer and are drained
 * exactly; refs and cache lines of the old gen are stale from then on, so no
 * hash map entry is ever deleted (the LRU reuses stale ones).
 *
 * Two programs share everything above (maps, key layout, filters, sampling,
 * counters) through one inline parse and one inline meter():
 * - xdpflow (XDP) on the interface a packet enters: direction 0 (ingress),
 *   ifindex = ingress_ifindex. Every path returns XDP_PASS.
 * - xdpflow_egress (TC, sched_cls, attached at egress with a TCX bpf_link or
 *   a clsact/cls_bpf filter) on the interface a packet leaves: direction 1
 *   (egress), ifindex = the skb's device. Every path returns TC_ACT_UNSPEC:
 *   "no opinion", so the packet goes on to the next program of the egress
 *   chain and leaves when none is left. Not TC_ACT_OK: that ends a TCX chain
 *   (and a cls_bpf filter list), so a policy program attached after this one
 *   would silently stop running. Neither program drops or modifies a packet.
 * Frames they can't parse are counted (parse_failures) and passed; so are
 * frames that are not IP (non_ip).
 *
 * De-duplication rule: each packet is counted at most once per direction:
 * ingress by the XDP program of the interface it entered, egress by the TC
 * program of the interface it left. On a gateway with both hooks on both
 * interfaces a forwarded packet yields one ingress record (direction 0,
 * ifindex = the interface it came in on) and one egress record (direction 1,
 * ifindex = the interface it went out of); a collector sums one direction to
 * count each packet once. Host-originated packets appear only as egress,
 * host-terminated ones only as ingress. (A packet sent back out of the
 * interface it came in on is still one record per direction.)
 *
 * Egress specifics (the skb, not an XDP buffer):
 * - The frame length is skb->len; direct packet access reaches only the
 *   linear part. A frame whose headers lie beyond the linear part fails the
 *   first parse; then, and only then, the first XDPFLOW_TC_PULL bytes are
 *   pulled into the linear part (bpf_skb_pull_data) and the frame parsed
 *   again. Locally built and forwarded packets keep their headers linear, so
 *   the pull is rare. Headers past XDPFLOW_TC_PULL are a parse failure.
 * - GSO: an skb leaving as gso_segs > 1 segments (TSO, GRO-merged forwarded
 *   traffic) counts gso_segs packets, and octets = its IP total length +
 *   (gso_segs - 1) x its IP + transport header length (each segment repeats
 *   the headers): the segments' IP total lengths, exact for TCP and UDP
 *   (tunnelled GSO: inner headers past the first segment are not counted).
 *   Sampling keeps or skips the skb as a whole. BIG TCP super-packets (GSO
 *   beyond 64 KiB, opt-in; IPv4 total length 0, IPv6 payload length 0) are
 *   parse failures.
 * - A VLAN tag held in the skb's metadata (vlan_present: set by a VLAN device
 *   above the interface, not in the packet bytes yet) is the outer tag: its
 *   VID is the key's vlan_id; tags in the bytes are inner ones.
 *
 * Selection (xdp/filters.py compiles the rules; flow.h explains the tables).
 * The control slot also names the rule set in force; 0 means none, and the
 * packet goes straight to metering (one compare on the hot path). Otherwise
 * IP packets go through the set's filter, then its sampler: an excluded
 * packet counts in its rule's slot of rule_hits and in filtered; a packet the
 * sampler skips counts in sampled_out; neither touches a flow map. The
 * sampler is random (bpf_get_prandom_u32() below round(2^32 / N)), not
 * every Nth packet: a count-based sampler locks onto periodic traffic (N
 * flows sent round robin would see one flow sampled and the others never).
 * Counters are not scaled; the exporter sends samplingInterval = N.
 *
 * Parsing rules (tests/kernel/refparser.py implements the same rules in
 * Python and the differential fuzz test holds the two equal):
 * - Ethernet needs 14 bytes. Up to XDPFLOW_VLAN_MAX_DEPTH tags of 0x8100 or
 *   0x88a8, 4 bytes each; the outer tag's VID is the key's vlan_id. A deeper
 *   stack is a parse failure.
 * - IPv4: 20 bytes, version 4, IHL >= 5, the header within the frame,
 *   total length >= header and within the frame. Octets = total length.
 *   A non-first fragment (offset != 0) is metered with ports 0.
 * - IPv6: 40 bytes, version 6, 40 + payload length within the frame; octets
 *   = 40 + payload length. Hop-by-hop (0), routing (43), destination options
 *   (60) and fragment (44) headers are skipped, at most XDPFLOW_IPV6_MAX_EXT of
 *   them, each within the packet; a longer chain is a parse failure. A
 *   non-first fragment stops the walk and is metered with ports 0.
 * - Transport headers must lie within the IP packet: TCP 20 bytes (ports,
 *   flags), UDP 8, SCTP 12 (ports), ICMP over IPv4 / ICMPv6 over IPv6 4
 *   (type, code). Any other protocol is metered with ports 0.
 */
#include <uapi/linux/bpf.h>
#include "flow.h"

#define TC_ACT_UNSPEC_ (-1)       /* TCX_NEXT: no verdict, the next program decides */
#define XDPFLOW_TC_PULL 512       /* bytes pulled when headers are past an skb's linear part */

#ifndef XDPFLOW_MAX_ENTRIES
#define XDPFLOW_MAX_ENTRIES 500000
#endif

#define XDPFLOW_CACHE_ENTRIES (1u << XDPFLOW_CACHE_BITS)

/* The flow map: key -> this CPU's slot (struct flow_ref). */
BPF_TABLE("lru_percpu_hash", struct flow_key, struct flow_ref, flows, XDPFLOW_MAX_ENTRIES);
/* Two pages of slots; user space maps this array and reads drained pages in place. */
BPF_F_TABLE("array", u32, struct flow_slot, slots, 2 * XDPFLOW_MAX_ENTRIES, BPF_F_MMAPABLE);
BPF_ARRAY(slot_alloc, struct slot_alloc, 2);   /* next free slot of each page */
BPF_PERCPU_ARRAY(flow_cache, struct flow_cache_entry, XDPFLOW_CACHE_ENTRIES);
BPF_ARRAY(control, struct xdpflow_ctl, 1);     /* gen (so the active page), rule set in force */
BPF_PERCPU_ARRAY(stats, struct flow_stats, 2); /* counters of each page */
BPF_ARRAY(clock, struct xdpflow_clock, 1);     /* written by xdpflow_clock */
/* Only for its update: rewriting a slot of an array-of-maps makes the kernel wait an RCU grace
 * period before the syscall returns (the flip's fence, see xdp/loader.py). */
BPF_ARRAY_OF_MAPS(fence, "clock", 1);

/* Extensions (flow.h: struct tunnel_ext, dns_ext, tcp_ext): one entry per slot when compiled in. */
#if defined(XDPFLOW_TUNNELS) || defined(XDPFLOW_DNS) || defined(XDPFLOW_TCP_RTT)
#define XDPFLOW_EXT 1
#endif
#ifdef XDPFLOW_TUNNELS
#define TUNNEL_EXTS (2 * XDPFLOW_MAX_ENTRIES)
#else
#define TUNNEL_EXTS 1
#endif
#ifdef XDPFLOW_DNS
#define DNS_EXTS (2 * XDPFLOW_MAX_ENTRIES)
#else
#define DNS_EXTS 1
#endif
#ifdef XDPFLOW_TCP_RTT
#define TCP_EXTS (2 * XDPFLOW_MAX_ENTRIES)
#else
#define TCP_EXTS 1
#endif
BPF_F_TABLE("array", u32, struct tunnel_ext, tunnel_exts, TUNNEL_EXTS, BPF_F_MMAPABLE);
BPF_F_TABLE("array", u32, struct dns_ext, dns_exts, DNS_EXTS, BPF_F_MMAPABLE);
BPF_F_TABLE("array", u32, struct tcp_ext, tcp_exts, TCP_EXTS, BPF_F_MMAPABLE);

/* Rule sets and their tables, two of each (index: set, or set * slots + value). */
BPF_ARRAY(rule_sets, struct rule_set, 2);
BPF_LPM_TRIE(src_prefixes, struct prefix_key, __u64, 2 * XDPFLOW_MAX_PREFIXES);
BPF_LPM_TRIE(dst_prefixes, struct prefix_key, __u64, 2 * XDPFLOW_MAX_PREFIXES);
BPF_ARRAY(proto_masks, __u64, 2 * XDPFLOW_PROTO_SLOTS);
BPF_ARRAY(sport_masks, __u64, 2 * XDPFLOW_PORT_SLOTS);
BPF_ARRAY(dport_masks, __u64, 2 * XDPFLOW_PORT_SLOTS);
BPF_ARRAY(vlan_masks, __u64, 2 * XDPFLOW_VLAN_SLOTS);
BPF_ARRAY(iface_masks, __u64, 2 * XDPFLOW_IFINDEX_SLOTS);
BPF_HASH(iface_masks_high, __u64, __u64, 2 * XDPFLOW_MAX_IFACES); /* set << 32 | ifindex */
BPF_PERCPU_ARRAY(rule_hits, struct rule_counter, 2 * XDPFLOW_COUNTER_SLOTS);

#define ETH_HLEN_ 14
#define ETH_P_IP_ 0x0800
#define ETH_P_IPV6_ 0x86DD
#define ETH_P_8021Q_ 0x8100
#define ETH_P_8021AD_ 0x88A8

#define OK 0
#define FAIL 1
#define NOT_IP 2

#define METER 0
#define SKIP 1

struct parsed {
	__u32 octets;     /* IP total length; for GSO the segments' sum (meter()) */
	__u32 packets;    /* frames on the wire: 1, or gso_segs at egress */
	__u16 hdr_len;    /* IP + transport header bytes (GSO octets) */
	__u16 tcp_flags;
	__u8 tos;
	__u8 ttl;
	__u8 has_ports;  /* TCP, UDP or SCTP header read (port selectors apply) */
#ifdef XDPFLOW_EXT
	const __u8 *l4;  /* the transport header (the inner packet's when decapsulated); 0: none read */
	const void *end; /* the end of its IP packet */
#endif
#ifdef XDPFLOW_TUNNELS
	struct tunnel_ext tun;  /* type XDPFLOW_TUNNEL_NONE: not decapsulated */
	__u8 tun_malformed;     /* a tunnel header was found but the inner packet did not parse */
#endif
};

static __always_inline __u16 rd16(const __u8 *p)
{
	return ((__u16)p[0] << 8) | p[1];
}

/* True when n bytes at p run past the IP packet (end) or the readable bytes
 * (data_end). At XDP end <= data_end always holds and the second test is for
 * the verifier, which bounds packet reads only against data_end; at TC egress
 * the IP packet may go on past the linear part, and running past data_end
 * before end is what makes the egress program pull the headers in. */
#define PAST(p, n, end, data_end) \
	((const void *)((p) + (n)) > (end) || (const void *)((p) + (n)) > (data_end))

/* The transport header at l4; l3_len: IP header bytes before it. */
static __always_inline int parse_l4(struct flow_key *key, struct parsed *out,
				    const __u8 *l4, const void *end, const void *data_end,
				    __u8 icmp_proto, __u32 l3_len)
{
	__u8 proto = key->protocol;

	out->hdr_len = l3_len;
#ifdef XDPFLOW_EXT
	out->l4 = l4;
	out->end = end;
#endif
	if (proto == 6) {
		if (PAST(l4, 20, end, data_end))
			return FAIL;
		key->src_port = rd16(l4);
		key->dst_port = rd16(l4 + 2);
		out->tcp_flags = rd16(l4 + 12) & 0x01FF;
		out->has_ports = 1;
		out->hdr_len = l3_len + (l4[12] >> 4) * 4;
	} else if (proto == 17) {
		if (PAST(l4, 8, end, data_end))
			return FAIL;
		key->src_port = rd16(l4);
		key->dst_port = rd16(l4 + 2);
		out->has_ports = 1;
		out->hdr_len = l3_len + 8;
	} else if (proto == 132) {
		if (PAST(l4, 12, end, data_end))
			return FAIL;
		key->src_port = rd16(l4);
		key->dst_port = rd16(l4 + 2);
		out->has_ports = 1;
		out->hdr_len = l3_len + 12;
	} else if (proto == icmp_proto) {
		if (PAST(l4, 4, end, data_end))
			return FAIL;
		key->dst_port = rd16(l4);  /* type << 8 | code */
	}
	return OK;
}

/* ip: the IPv4 header; room: bytes of the frame from ip on (readable or not). */
static __always_inline int parse_ipv4(struct flow_key *key, struct parsed *out,
				      const __u8 *ip, const void *data_end, __u32 room)
{
	if ((const void *)(ip + 20) > data_end)
		return FAIL;
	if ((ip[0] >> 4) != 4)
		return FAIL;
	__u32 hlen = (ip[0] & 0x0F) * 4;
	if (hlen < 20)
		return FAIL;
	__u32 tot = rd16(ip + 2);
	if (tot < hlen)
		return FAIL;
	if (tot > room)
		return FAIL;
	const void *end = ip + tot;

	key->ip_version = 4;
	key->protocol = ip[9];
	key->src_addr[10] = 0xFF;
	key->src_addr[11] = 0xFF;
	key->dst_addr[10] = 0xFF;
	key->dst_addr[11] = 0xFF;
	__builtin_memcpy(&key->src_addr[12], ip + 12, 4);
	__builtin_memcpy(&key->dst_addr[12], ip + 16, 4);
	out->octets = tot;
	out->tos = ip[1];
	out->ttl = ip[8];

	if (rd16(ip + 6) & 0x1FFF) {
		out->hdr_len = hlen;
		return OK;  /* non-first fragment: no transport header */
	}
	return parse_l4(key, out, ip + hlen, end, data_end, 1, hlen);
}

static __always_inline int parse_ipv6(struct flow_key *key, struct parsed *out,
				      const __u8 *ip, const void *data_end, __u32 room)
{
	if ((const void *)(ip + 40) > data_end)
		return FAIL;
	if ((ip[0] >> 4) != 6)
		return FAIL;
	__u32 tot = 40 + (__u32)rd16(ip + 4);
	if (tot > room)
		return FAIL;
	const void *end = ip + tot;

	key->ip_version = 6;
	__builtin_memcpy(key->src_addr, ip + 8, 16);
	__builtin_memcpy(key->dst_addr, ip + 24, 16);
	out->octets = tot;
	out->tos = (__u8)(((ip[0] & 0x0F) << 4) | (ip[1] >> 4));
	out->ttl = ip[7];

	__u8 nh = ip[6];
	const __u8 *cur = ip + 40;

#pragma unroll
	for (int i = 0; i < XDPFLOW_IPV6_MAX_EXT; i++) {
		if (nh == 0 || nh == 43 || nh == 60) {
			if (PAST(cur, 2, end, data_end))
				return FAIL;
			nh = cur[0];
			cur += ((__u32)cur[1] + 1) * 8;
		} else if (nh == 44) {
			if (PAST(cur, 8, end, data_end))
				return FAIL;
			nh = cur[0];
			__u16 frag = rd16(cur + 2) & 0xFFF8;
			cur += 8;
			if (frag) {
				key->protocol = nh;
				out->hdr_len = cur - ip;
				return OK;  /* non-first fragment */
			}
		} else {
			break;
		}
	}
	if (nh == 0 || nh == 43 || nh == 60 || nh == 44)
		return FAIL;  /* chain longer than we follow */
	if ((const void *)cur > end)
		return FAIL;
	key->protocol = nh;
	return parse_l4(key, out, cur, end, data_end, 58, cur - ip);
}

#ifdef XDPFLOW_TUNNELS
struct tunnel_scratch {
	__u32 off;   /* the inner packet's offset in the frame */
	__u32 room;  /* the outer packet's bytes from there on */
};
BPF_PERCPU_ARRAY(tunnel_scratch, struct tunnel_scratch, 1);
/* bcc rewrites map calls only in this file: the header reaches its map through this accessor. */
static __always_inline struct tunnel_scratch *tunnel_scratch_at(void)
{
	__u32 zero = 0;
	return tunnel_scratch.lookup(&zero);
}
#include "tunnel.h"   /* decapsulate(): uses parse_ipv4/parse_ipv6 above, called by both programs after parse() */
#endif

/* Parse the frame at data: data_end bounds the bytes the program can read,
 * frame_len is the whole frame's length (XDP: data_end - data; TC: skb->len). */
static __always_inline int parse(const void *data, const void *data_end, __u32 frame_len,
				 struct flow_key *key, struct parsed *out)
{
	const __u8 *cur = data;

	if ((const void *)(cur + ETH_HLEN_) > data_end)
		return FAIL;
	__u16 proto = rd16(cur + 12);
	cur += ETH_HLEN_;

#pragma unroll
	for (int i = 0; i < XDPFLOW_VLAN_MAX_DEPTH; i++) {
		if (proto != ETH_P_8021Q_ && proto != ETH_P_8021AD_)
			break;
		if ((const void *)(cur + 4) > data_end)
			return FAIL;
		if (i == 0)
			key->vlan_id = rd16(cur) & 0x0FFF;
		proto = rd16(cur + 2);
		cur += 4;
	}
	/* cur <= data_end <= data + frame_len: no underflow. */
	__u32 room = frame_len - (__u32)(cur - (const __u8 *)data);
	out->octets = room;  /* what a parse failure ignores; an IP header read replaces it */
	int rc;
	if (proto == ETH_P_IP_)
		rc = parse_ipv4(key, out, cur, data_end, room);
	else if (proto == ETH_P_IPV6_)
		rc = parse_ipv6(key, out, cur, data_end, room);
	else if (proto == ETH_P_8021Q_ || proto == ETH_P_8021AD_)
		return FAIL;  /* VLAN stack deeper than we follow */
	else
		return NOT_IP;
	return rc;
}

/* Index of the single set bit of x. */
static __always_inline __u32 bit_index(__u64 x)
{
	__u32 n = 0;
	if (x & 0xFFFFFFFF00000000ULL)
		n += 32;
	if (x & 0xFFFF0000FFFF0000ULL)
		n += 16;
	if (x & 0xFF00FF00FF00FF00ULL)
		n += 8;
	if (x & 0xF0F0F0F0F0F0F0F0ULL)
		n += 4;
	if (x & 0xCCCCCCCCCCCCCCCCULL)
		n += 2;
	if (x & 0xAAAAAAAAAAAAAAAAULL)
		n += 1;
	return n;
}

/* Filter, then sample: METER, or SKIP after counting the packet where it went. */
static __always_inline int select_packet(__u32 set, const struct flow_key *key, const struct parsed *p,
					 struct flow_stats *st)
{
	struct rule_set *rs = rule_sets.lookup(&set);
	if (!rs)
		return METER;
	__u32 f = rs->flags;
	if (f & XDPFLOW_FILTER) {
		__u64 m = rs->slots;
		/* Cheap array and hash lookups first; the tries only while a slot is left. */
		/* bcc rewrites map.lookup() only where a map is named, hence no helper. */
		__u32 i;
		__u64 *v;
		if (f & XDPFLOW_SEL_IFACE) {
			/* Two lookups that must stay two call sites: the verifier inlines an
			 * array lookup only where the call sees one map (a shared call
			 * costs ~15 ns), hence the different fallbacks. */
			if (key->ifindex < XDPFLOW_IFINDEX_SLOTS) {
				i = set * XDPFLOW_IFINDEX_SLOTS + key->ifindex;
				v = iface_masks.lookup(&i);
				m &= v ? *v : 0;
			} else {
				__u64 ik = ((__u64)set << 32) | key->ifindex;
				v = iface_masks_high.lookup(&ik);
				m &= v ? *v : rs->iface_any;
			}
		}
		if (f & XDPFLOW_SEL_PROTO) {
			i = set * XDPFLOW_PROTO_SLOTS + key->protocol;
			v = proto_masks.lookup(&i);
			m &= v ? *v : 0;
		}
		if (f & XDPFLOW_SEL_VLAN) {
			i = set * XDPFLOW_VLAN_SLOTS + (key->vlan_id & 0x0FFF);
			v = vlan_masks.lookup(&i);
			m &= v ? *v : 0;
		}
		if (f & XDPFLOW_SEL_SPORT) {
			i = set * XDPFLOW_PORT_SLOTS + (p->has_ports ? key->src_port : XDPFLOW_NO_PORT);
			v = sport_masks.lookup(&i);
			m &= v ? *v : 0;
		}
		if (f & XDPFLOW_SEL_DPORT) {
			i = set * XDPFLOW_PORT_SLOTS + (p->has_ports ? key->dst_port : XDPFLOW_NO_PORT);
			v = dport_masks.lookup(&i);
			m &= v ? *v : 0;
		}
		if (f & (XDPFLOW_SEL_SRC | XDPFLOW_SEL_DST)) {
			/* The tries cost most: skip what cannot change the first match. A
			 * candidate without address constraints ends the search, so the
			 * slots above it do not matter; a trie is asked only while a
			 * remaining candidate has a constraint in its direction. */
			__u64 sure = m & rs->src_any & rs->dst_any;
			if (sure)
				m &= (sure & -sure) * 2 - 1;
			struct prefix_key pk = {};
			pk.prefixlen = 32 + 128;
			pk.set = set;
			if (m & ~rs->src_any) {
				__builtin_memcpy(pk.addr, key->src_addr, 16);
				v = src_prefixes.lookup(&pk);
				m &= v ? *v : rs->src_any;
			}
			if (m & ~rs->dst_any) {
				__builtin_memcpy(pk.addr, key->dst_addr, 16);
				v = dst_prefixes.lookup(&pk);
				m &= v ? *v : rs->dst_any;
			}
		}

		__u32 slot = XDPFLOW_MAX_SLOTS;
		int exclude = rs->default_exclude != 0;
		if (m) {
			__u64 first = m & -m;  /* lowest slot: the first matching rule */
			slot = bit_index(first);
			exclude = (first & rs->exclude) != 0;
		}
		__u32 ci = set * XDPFLOW_COUNTER_SLOTS + slot;
		struct rule_counter *c = rule_hits.lookup(&ci);
		if (c) {
			c->packets += p->packets;
			c->octets += p->octets;
		}
		if (exclude) {
			st->filtered += p->packets;
			st->filtered_octets += p->octets;
			return SKIP;
		}
	}
	if ((f & XDPFLOW_SAMPLE) && bpf_get_prandom_u32() >= rs->sample_threshold) {
		st->sampled_out += p->packets;
		st->sampled_out_octets += p->octets;
		return SKIP;
	}
	return METER;
}

/* What a run reads once: the gen (so the page, and its stats slot) to write, the rule set in force. */
struct run {
	struct flow_stats *st;
	__u32 gen;
	__u32 page;
	__u32 config;
};

static __always_inline int begin(struct run *r)
{
	__u32 zero = 0;
	struct xdpflow_ctl *ctl = control.lookup(&zero);
	if (!ctl)
		return 0;
	r->gen = ctl->gen;
	r->page = r->gen & 1;
	r->config = ctl->config;
	r->st = stats.lookup(&r->page);
	return r->st != 0;
}

/* Count a frame the parse did not meter (rc FAIL or NOT_IP); segs: the frames on the wire it stands for. */
static __always_inline void not_metered(struct flow_stats *st, int rc, __u32 segs, const struct parsed *p)
{
	if (rc == FAIL) {
		st->parse_failures += segs;
		st->parse_failure_octets += p->octets;
	} else {
		st->non_ip += segs;
	}
}

/* The cache line a key maps to: a multiplicative hash over its 12 words. */
static __always_inline __u32 cache_index(const struct flow_key *key)
{
	const __u32 *w = (const __u32 *)key;
	__u32 h = 0;
#pragma unroll
	for (int i = 0; i < (int)(sizeof(*key) / 4); i++)
		h = (h ^ w[i]) * 0x9E3779B1u;
	return h >> (32 - XDPFLOW_CACHE_BITS);
}

/* Both keys 8-byte aligned: six 64-bit compares. */
static __always_inline int same_key(const struct flow_key *a, const struct flow_key *b)
{
	const __u64 *x = (const __u64 *)a, *y = (const __u64 *)b;
	return ((x[0] ^ y[0]) | (x[1] ^ y[1]) | (x[2] ^ y[2]) | (x[3] ^ y[3]) | (x[4] ^ y[4]) |
		(x[5] ^ y[5])) == 0;
}

static __always_inline void add(struct flow_value *v, const struct parsed *p, __u32 segs, __u64 now)
{
	v->packets += segs;
	v->octets += p->octets;
	v->last_seen = now;
	v->tcp_flags |= p->tcp_flags;
	if (p->ttl < v->min_ttl)
		v->min_ttl = p->ttl;
	if (p->ttl > v->max_ttl)
		v->max_ttl = p->ttl;
}

/* The next free slot of `page`, or XDPFLOW_NO_SLOT when the page is full. One atomic add, no lock:
 * no helper call (a lock and an unlock are two), and CPUs taking slots at once only share the
 * cache line. */
static __always_inline __u32 take_slot(__u32 page)
{
	struct slot_alloc *a = slot_alloc.lookup(&page);
	if (!a)
		return XDPFLOW_NO_SLOT;
	__u64 slot = __sync_fetch_and_add(&a->next, 1);
	return slot < XDPFLOW_MAX_ENTRIES ? (__u32)slot : XDPFLOW_NO_SLOT;
}

#ifdef XDPFLOW_EXT
/* bcc rewrites map calls (map.lookup()) only in this file, not in the headers it includes: every map
 * an extension uses is reached through an accessor here. Each feature's block: its accessors, then
 * its header. */
#ifdef XDPFLOW_TUNNELS
static __always_inline struct tunnel_ext *tunnel_ext_at(__u32 si) { return tunnel_exts.lookup(&si); }
#include "tunnel_meter.h"
#endif
#ifdef XDPFLOW_DNS
static __always_inline struct dns_ext *dns_ext_at(__u32 si) { return dns_exts.lookup(&si); }
#endif
#ifdef XDPFLOW_TCP_RTT
static __always_inline struct tcp_ext *tcp_ext_at(__u32 si) { return tcp_exts.lookup(&si); }
#endif
#ifdef XDPFLOW_DNS
#include "dns.h"
#endif
#ifdef XDPFLOW_TCP_RTT
#include "tcprtt.h"
#endif
/* The extensions' part of metering a packet into slot si of the active page (fresh: the slot was just
 * taken, so its extension entries hold a previous interval's data and must be initialised). */
static __always_inline void extend(struct run *r, __u32 si, int fresh, const struct flow_key *key,
				   const struct parsed *p)
{
#ifdef XDPFLOW_TUNNELS
	tunnel_meter(r, si, fresh, key, p);
#endif
#ifdef XDPFLOW_DNS
	dns_meter(r, si, fresh, key, p);
#endif
#ifdef XDPFLOW_TCP_RTT
	tcp_meter(r, si, fresh, key, p);
#endif
}
#define EXTEND(si, fresh) extend(r, si, fresh, key, p)
#else
#define EXTEND(si, fresh) do { } while (0)
#endif

/* Meter a parsed IP packet seen on `ifindex` in `direction`; segs: the frames
 * on the wire it stands for (1 but for GSO at egress).
 *
 * Hit path: the per-CPU cache names the flow's slot in the active page; add to it. Otherwise
 * the flow map does (a ref of the current gen); otherwise the flow is new to this CPU in this
 * page: take a slot, write the key and this packet into it, and point the ref at it. Either
 * way the cache line is rewritten for the key. Only the CPU that took a slot writes it. */
static __always_inline void meter(struct run *r, struct flow_key *key, struct parsed *p, __u32 ifindex,
				  __u8 direction, __u32 segs)
{
	struct flow_stats *st = r->st;
	key->ifindex = ifindex;
	key->direction = direction;
	p->packets = segs;
	if (segs > 1)
		p->octets += (segs - 1) * p->hdr_len;  /* each segment repeats the headers */
	if (r->config && select_packet((r->config - 1) & 1, key, p, st) == SKIP)
		return;
	st->packets += segs;
	st->octets += p->octets;

	__u64 now = bpf_jiffies64();
	__u32 gen = r->gen;
	__u32 base = r->page * XDPFLOW_MAX_ENTRIES;
	__u32 ci = cache_index(key);
	struct flow_cache_entry *ce = flow_cache.lookup(&ci);
	__u32 slot;
	__u32 si;
	struct flow_slot *s;
	if (ce && ce->gen == gen && same_key(&ce->key, key)) {
		slot = ce->slot;
		if (slot >= XDPFLOW_MAX_ENTRIES)
			goto lost;
		si = base + slot;
		s = slots.lookup(&si);
		if (!s)
			goto lost;
		add(&s->value, p, segs, now);
		EXTEND(si, 0);
		return;
	}

	struct flow_ref *ref = flows.lookup(key);
	if (ref && ref->gen == gen) {
		slot = ref->slot;
		if (slot < XDPFLOW_MAX_ENTRIES) {
			si = base + slot;
			s = slots.lookup(&si);
			if (s) {
				add(&s->value, p, segs, now);
				EXTEND(si, 0);
			}
		}
	} else {
		slot = take_slot(r->page);
		if (slot < XDPFLOW_MAX_ENTRIES) {
			si = base + slot;
			s = slots.lookup(&si);
			if (s) {
				__builtin_memcpy(&s->key, key, sizeof(*key));
				s->value.packets = segs;
				s->value.octets = p->octets;
				s->value.first_seen = now;
				s->value.last_seen = now;
				s->value.tcp_flags = p->tcp_flags;
				s->value.tos = p->tos;
				s->value.min_ttl = p->ttl;
				s->value.max_ttl = p->ttl;
				s->value.first_flags = (__u8)p->tcp_flags;
				s->value.pad[0] = 0;
				s->value.pad[1] = 0;
				st->flows_created++;
				EXTEND(si, 1);
			}
		} else {
			st->flows_denied++;
		}
		if (ref) {
			ref->slot = slot;
			ref->gen = gen;
		} else {
			struct flow_ref nr = {.slot = slot, .gen = gen};
			/* BPF_ANY from a program sets this CPU's value only (an insert zeroes the others').
			 * A failure costs nothing counted: the slot holds the packet, and the next packet
			 * finds the cache line below. */
			flows.update(key, &nr);
		}
	}
	if (ce) {
		__builtin_memcpy(&ce->key, key, sizeof(*key));
		ce->slot = slot;
		ce->gen = gen;
	}
	if (slot < XDPFLOW_MAX_ENTRIES)
		return;

lost:
	st->insert_failures += segs;
	st->insert_failure_octets += p->octets;
}

/* Clock readings for user space (struct xdpflow_clock): run through BPF_PROG_TEST_RUN at each
 * flip, never attached. */
int xdpflow_clock(struct xdp_md *ctx)
{
	__u32 zero = 0;
	struct xdpflow_clock *c = clock.lookup(&zero);
	if (c) {
		c->jiffies = bpf_jiffies64();
		c->coarse_ns = bpf_ktime_get_coarse_ns();
		c->jiffies_after = bpf_jiffies64();
	}
	return XDP_PASS;
}

/* Ingress: every frame the interface receives, before the stack sees it. */
int xdpflow(struct xdp_md *ctx)
{
	struct run r;
	if (!begin(&r))
		return XDP_PASS;
	r.st->frames++;

	const void *data = (const void *)(long)ctx->data;
	const void *data_end = (const void *)(long)ctx->data_end;
	struct flow_key key __attribute__((aligned(8))) = {};
	struct parsed p = {};
	int rc = parse(data, data_end, (__u32)(data_end - data), &key, &p);
	if (rc != OK) {
		not_metered(r.st, rc, 1, &p);
		return XDP_PASS;
	}
#ifdef XDPFLOW_TUNNELS
	decapsulate(&key, &p, data, data_end);
#endif
	meter(&r, &key, &p, ctx->ingress_ifindex, XDPFLOW_INGRESS, 1);
	return XDP_PASS;
}

/* Egress: every skb the interface sends (locally built or forwarded). */
int xdpflow_egress(struct __sk_buff *skb)
{
	struct run r;
	if (!begin(&r))
		return TC_ACT_UNSPEC_;
	__u32 segs = 1;
	if (skb->gso_size && skb->gso_segs > 1)
		segs = skb->gso_segs;
	r.st->frames += segs;

	const void *data = (const void *)(long)skb->data;
	const void *data_end = (const void *)(long)skb->data_end;
	__u32 len = skb->len;
	struct flow_key key __attribute__((aligned(8))) = {};
	struct parsed p = {};
	int rc = parse(data, data_end, len, &key, &p);
	__u32 linear = (__u32)(data_end - data);
	if (rc == FAIL && linear < len && linear < XDPFLOW_TC_PULL) {
		/* Maybe only the headers' place is the problem: make them linear, parse again. */
		if (bpf_skb_pull_data(skb, len < XDPFLOW_TC_PULL ? len : XDPFLOW_TC_PULL) == 0) {
			data = (const void *)(long)skb->data;
			data_end = (const void *)(long)skb->data_end;
			__builtin_memset(&key, 0, sizeof(key));
			__builtin_memset(&p, 0, sizeof(p));
			rc = parse(data, data_end, len, &key, &p);
		}
	}
	if (rc != OK) {
		not_metered(r.st, rc, segs, &p);
		return TC_ACT_UNSPEC_;
	}
#ifdef XDPFLOW_TUNNELS
	decapsulate(&key, &p, data, data_end);  /* once, after either parse: the verifier walks it once per path */
#endif
	if (skb->vlan_present)
		key.vlan_id = skb->vlan_tci & 0x0FFF;  /* the outer tag, not yet in the bytes */
	meter(&r, &key, &p, skb->ifindex, XDPFLOW_EGRESS, segs);
	return TC_ACT_UNSPEC_;
}
