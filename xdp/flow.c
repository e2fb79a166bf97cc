/* xdpflow: XDP flow metering.
 *
 * Theory of operation. For every frame: parse Ethernet, up to two VLAN tags,
 * IPv4 or IPv6 (skipping a bounded chain of extension headers) and the ports
 * of TCP, UDP and SCTP (or ICMP type/code); build a struct flow_key and add
 * the packet to page `control.page` of two per-CPU LRU flow maps ("pages"),
 * counting it in that page's slot of `stats`. The slot is read once per run,
 * so a packet's flow entry and its counters always land in the same page.
 * Every scan the exporter writes the other index into `control.page`, then
 * rewrites a slot of the array-of-maps `pages` with the fd it already holds:
 * a map-in-map update makes the kernel wait an RCU grace period
 * (synchronize_rcu) before returning, and XDP programs run under RCU, so
 * afterwards no program that read the old index is still running. The old
 * page and its counters then have no writer and are drained exactly.
 *
 * The program never drops or modifies a packet: every path returns XDP_PASS.
 * Frames it can't parse are counted (parse_failures) and passed; so are
 * frames that are not IP (non_ip).
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

#ifndef XDPFLOW_MAX_ENTRIES
#define XDPFLOW_MAX_ENTRIES 500000
#endif

BPF_TABLE("lru_percpu_hash", struct flow_key, struct flow_value, flows0, XDPFLOW_MAX_ENTRIES);
BPF_TABLE("lru_percpu_hash", struct flow_key, struct flow_value, flows1, XDPFLOW_MAX_ENTRIES);
BPF_ARRAY_OF_MAPS(pages, "flows0", 2);       /* slot i -> flows<i>, set once at load */
BPF_ARRAY(control, struct xdpflow_ctl, 1);   /* active page, rule set in force */
BPF_PERCPU_ARRAY(stats, struct flow_stats, 2); /* counters of each page */

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
	__u32 octets;
	__u16 tcp_flags;
	__u8 tos;
	__u8 ttl;
	__u8 has_ports;  /* TCP, UDP or SCTP header read (port selectors apply) */
};

static __always_inline __u16 rd16(const __u8 *p)
{
	return ((__u16)p[0] << 8) | p[1];
}

/* True when n bytes at p run past the IP packet (end) or the frame
 * (data_end). end <= data_end always holds; the second test is for the
 * verifier, which bounds packet reads only against data_end. */
#define PAST(p, n, end, data_end) \
	((const void *)((p) + (n)) > (end) || (const void *)((p) + (n)) > (data_end))

static __always_inline int parse_l4(struct flow_key *key, struct parsed *out,
				    const __u8 *l4, const void *end, const void *data_end,
				    __u8 icmp_proto)
{
	__u8 proto = key->protocol;

	if (proto == 6) {
		if (PAST(l4, 20, end, data_end))
			return FAIL;
		key->src_port = rd16(l4);
		key->dst_port = rd16(l4 + 2);
		out->tcp_flags = rd16(l4 + 12) & 0x01FF;
		out->has_ports = 1;
	} else if (proto == 17) {
		if (PAST(l4, 8, end, data_end))
			return FAIL;
		key->src_port = rd16(l4);
		key->dst_port = rd16(l4 + 2);
		out->has_ports = 1;
	} else if (proto == 132) {
		if (PAST(l4, 12, end, data_end))
			return FAIL;
		key->src_port = rd16(l4);
		key->dst_port = rd16(l4 + 2);
		out->has_ports = 1;
	} else if (proto == icmp_proto) {
		if (PAST(l4, 4, end, data_end))
			return FAIL;
		key->dst_port = rd16(l4);  /* type << 8 | code */
	}
	return OK;
}

static __always_inline int parse_ipv4(struct flow_key *key, struct parsed *out,
				      const __u8 *ip, const void *data_end)
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
	if ((const void *)(ip + tot) > data_end)
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

	if (rd16(ip + 6) & 0x1FFF)
		return OK;  /* non-first fragment: no transport header */
	return parse_l4(key, out, ip + hlen, end, data_end, 1);
}

static __always_inline int parse_ipv6(struct flow_key *key, struct parsed *out,
				      const __u8 *ip, const void *data_end)
{
	if ((const void *)(ip + 40) > data_end)
		return FAIL;
	if ((ip[0] >> 4) != 6)
		return FAIL;
	__u32 tot = 40 + (__u32)rd16(ip + 4);
	if ((const void *)(ip + tot) > data_end)
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
	return parse_l4(key, out, cur, end, data_end, 58);
}

static __always_inline int parse(struct xdp_md *ctx, struct flow_key *key, struct parsed *out)
{
	const void *data = (const void *)(long)ctx->data;
	const void *data_end = (const void *)(long)ctx->data_end;
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
	if (proto == ETH_P_IP_)
		return parse_ipv4(key, out, cur, data_end);
	if (proto == ETH_P_IPV6_)
		return parse_ipv6(key, out, cur, data_end);
	if (proto == ETH_P_8021Q_ || proto == ETH_P_8021AD_)
		return FAIL;  /* VLAN stack deeper than we follow */
	return NOT_IP;
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
			c->packets++;
			c->octets += p->octets;
		}
		if (exclude) {
			st->filtered++;
			st->filtered_octets += p->octets;
			return SKIP;
		}
	}
	if ((f & XDPFLOW_SAMPLE) && bpf_get_prandom_u32() >= rs->sample_threshold) {
		st->sampled_out++;
		st->sampled_out_octets += p->octets;
		return SKIP;
	}
	return METER;
}

int xdpflow(struct xdp_md *ctx)
{
	__u32 zero = 0;
	struct xdpflow_ctl *ctl = control.lookup(&zero);
	if (!ctl)
		return XDP_PASS;
	__u32 idx = ctl->page & 1;
	__u32 config = ctl->config;
	struct flow_stats *st = stats.lookup(&idx);
	if (!st)
		return XDP_PASS;
	st->frames++;

	struct flow_key key = {};
	struct parsed p = {};
	int rc = parse(ctx, &key, &p);
	if (rc == FAIL) {
		st->parse_failures++;
		return XDP_PASS;
	}
	if (rc == NOT_IP) {
		st->non_ip++;
		return XDP_PASS;
	}
	key.ifindex = ctx->ingress_ifindex;
	if (config && select_packet((config - 1) & 1, &key, &p, st) == SKIP)
		return XDP_PASS;
	st->packets++;
	st->octets += p.octets;

	void *page = pages.lookup(&idx);
	if (!page)
		goto lost;

	__u64 now = bpf_ktime_get_coarse_ns();
	struct flow_value *v = bpf_map_lookup_elem(page, &key);
	if (!v) {
		struct flow_value nv = {};
		nv.packets = 1;
		nv.octets = p.octets;
		nv.first_seen_ns = now;
		nv.last_seen_ns = now;
		nv.tcp_flags = p.tcp_flags;
		nv.tos = p.tos;
		nv.min_ttl = p.ttl;
		nv.max_ttl = p.ttl;
		long err = bpf_map_update_elem(page, &key, &nv, BPF_NOEXIST);
		if (err == 0) {
			st->flows_created++;
			return XDP_PASS;
		}
		if (err != -17 /* EEXIST: another CPU inserted the key first */)
			goto lost;
		v = bpf_map_lookup_elem(page, &key);
		if (!v)
			goto lost;
	}
	if (v->packets == 0) {
		/* This CPU's slot of an entry another CPU created. */
		v->first_seen_ns = now;
		v->tos = p.tos;
		v->min_ttl = p.ttl;
	}
	v->packets++;
	v->octets += p.octets;
	v->last_seen_ns = now;
	v->tcp_flags |= p.tcp_flags;
	if (p.ttl < v->min_ttl)
		v->min_ttl = p.ttl;
	if (p.ttl > v->max_ttl)
		v->max_ttl = p.ttl;
	return XDP_PASS;

lost:
	st->insert_failures++;
	st->insert_failure_octets += p.octets;
	return XDP_PASS;
}
