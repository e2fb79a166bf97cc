/* xdpflow tunnels (XDPFLOW_TUNNELS): decapsulate VXLAN, Geneve and GRE. Included by flow.c before parse().
 *
 * Once the outer packet parsed (its transport header read, so a first fragment), a tunnel is:
 * - VXLAN (RFC 7348): UDP to port 4789, an 8-byte header with the I flag (0x08) set; VNI = bytes
 *   4..6; an Ethernet frame follows.
 * - Geneve (RFC 8926): UDP to port 6081, an 8-byte header of version 0 and (b0 & 0x3f) * 4 bytes of
 *   options; VNI = bytes 4..6; the protocol type says what follows: 0x6558 Ethernet, 0x0800 IPv4,
 *   0x86DD IPv6.
 * - GRE (RFC 2784, key: RFC 2890): IP protocol 47, version 0, routing bit clear; 4 bytes, plus 4 for
 *   each of the C, K and S flags (the key sits after the checksum word); protocol 0x0800, 0x86DD
 *   or 0x6558 (Ethernet).
 * An inner Ethernet frame needs its 14 bytes and must carry IPv4 or IPv6 (no inner VLAN tags). The
 * inner packet must start within the outer one and before byte XDPFLOW_TUNNEL_MAX_OFF of the frame,
 * and parse by the outer rules within the outer packet; then the flow key is the
 * inner packet's (its addresses, ports, protocol, version; the key's segment: the id's low 24 bits),
 * and so are tos, ttl and TCP flags. The outer VLAN tag stays in the key; octets and the header length
 * (GSO) stay the outer packet's: what crossed the wire.
 * Not a tunnel (metered as today, nothing counted): another port or protocol, GRE of another version,
 * with routing or carrying another protocol, VXLAN/Geneve whose inner frame is not IP (ARP across an
 * overlay is normal traffic). Malformed (metered as the outer flow, counted: tunnel_malformed): a
 * truncated tunnel header, VXLAN without the I flag, a Geneve version other than 0, an inner Ethernet
 * header or IP packet that does not fit or parse.
 */
#ifndef XDPFLOW_TUNNEL_H
#define XDPFLOW_TUNNEL_H

#define VXLAN_PORT_ 4789
#define GENEVE_PORT_ 6081
#define ETH_P_TEB_ 0x6558   /* transparent Ethernet bridging */
#define XDPFLOW_TUNNEL_MAX_OFF 1024  /* the inner packet starts within the frame's first KiB (a power of 2) */

/* Parse the inner IP packet at ip (ethertype proto) into key/out; room: the outer packet's bytes from ip on. */
static __always_inline int parse_inner(struct flow_key *key, struct parsed *out, const __u8 *ip, __u16 proto,
				       __u32 room, const void *data_end)
{
	__builtin_memset(key->src_addr, 0, 32);  /* IPv4 writes 6 of the 16 bytes */
	key->src_port = 0;
	key->dst_port = 0;
	out->tcp_flags = 0;
	out->has_ports = 0;
	out->l4 = 0;
	if (proto == ETH_P_IP_)
		return parse_ipv4(key, out, ip, data_end, room);
	return parse_ipv6(key, out, ip, data_end, room);
}

/* Called by both programs once parse() returned OK (key and out hold the outer flow). */
static __always_inline void decapsulate(struct flow_key *key, struct parsed *out, const void *data,
					const void *data_end)
{
	const __u8 *l4 = out->l4;
	const void *end = out->end;
	if (!l4)
		return;
	__u8 type;
	__u32 id = 0;
	const __u8 *inner;
	__u16 proto;
	if (key->protocol == 17 && (key->dst_port == VXLAN_PORT_ || key->dst_port == GENEVE_PORT_)) {
		const __u8 *h = l4 + 8;
		if (PAST(h, 8, end, data_end))
			goto malformed;
		id = ((__u32)h[4] << 16) | ((__u32)h[5] << 8) | h[6];
		if (key->dst_port == VXLAN_PORT_) {
			if (!(h[0] & 0x08))
				goto malformed;
			type = XDPFLOW_TUNNEL_VXLAN;
			inner = h + 8;
			proto = ETH_P_TEB_;
		} else {
			if (h[0] >> 6)
				goto malformed;
			type = XDPFLOW_TUNNEL_GENEVE;
			inner = h + 8 + (h[0] & 0x3F) * 4;
			proto = rd16(h + 2);
		}
	} else if (key->protocol == 47) {
		if (PAST(l4, 4, end, data_end))
			goto malformed;
		__u8 f = l4[0];
		if ((l4[1] & 0x07) || (f & 0x40))
			return;  /* another version (PPTP's is 1), or source routing: not ours */
		proto = rd16(l4 + 2);
		const __u8 *opt = l4 + 4;
		if (f & 0x80)
			opt += 4;  /* checksum and reserved */
		type = XDPFLOW_TUNNEL_GRE;
		if (f & 0x20) {
			if (PAST(opt, 4, end, data_end))
				goto malformed;
			id = ((__u32)opt[0] << 24) | ((__u32)opt[1] << 16) | ((__u32)opt[2] << 8) | opt[3];
			type = XDPFLOW_TUNNEL_GRE_KEY;
			opt += 4;
		}
		if (f & 0x10)
			opt += 4;  /* sequence number */
		inner = opt;
	} else {
		return;
	}
	if (proto == ETH_P_TEB_) {
		if (PAST(inner, ETH_HLEN_, end, data_end))
			goto malformed;
		proto = rd16(inner + 12);
		inner += ETH_HLEN_;
	}
	if (proto != ETH_P_IP_ && proto != ETH_P_IPV6_)
		return;
	if ((const void *)inner > end)
		goto malformed;
	/* The inner packet's offset and room go through a map value, which the verifier takes as any
	 * number: it then walks the inner parse once for all outer paths, not once per path (which
	 * took the XDP program from 10K to 690K instructions and the egress one past the 1M limit). */
	struct tunnel_scratch *scratch = tunnel_scratch_at();
	if (!scratch)
		return;
	scratch->off = (__u32)(inner - (const __u8 *)data);
	scratch->room = (__u32)((const __u8 *)end - inner);
	__u32 ioff = scratch->off, room = scratch->room;
	if (ioff >= XDPFLOW_TUNNEL_MAX_OFF)
		goto malformed;
	inner = (const __u8 *)data + (ioff & (XDPFLOW_TUNNEL_MAX_OFF - 1));  /* the mask bounds it for the verifier */

	struct flow_key outer;
	__builtin_memcpy(&outer, key, sizeof(outer));
	__u32 octets = out->octets;
	__u16 hdr_len = out->hdr_len, tcp_flags = out->tcp_flags;
	__u8 tos = out->tos, ttl = out->ttl, has_ports = out->has_ports;
	if (parse_inner(key, out, inner, proto, room, data_end) != OK) {
		__builtin_memcpy(key, &outer, sizeof(outer));
		out->octets = octets;
		out->hdr_len = hdr_len;
		out->tcp_flags = tcp_flags;
		out->tos = tos;
		out->ttl = ttl;
		out->has_ports = has_ports;
		out->l4 = l4;
		out->end = end;
		goto malformed;
	}
	out->octets = octets;
	out->hdr_len = hdr_len;
	__builtin_memcpy(out->tun.outer_src, outer.src_addr, 16);
	__builtin_memcpy(out->tun.outer_dst, outer.dst_addr, 16);
	out->tun.tunnel_id = id;
	out->tun.type = type;
	out->tun.outer_ip_version = outer.ip_version;
	key->segment[0] = (__u8)id;
	key->segment[1] = (__u8)(id >> 8);
	key->segment[2] = (__u8)(id >> 16);
	return;
malformed:
	out->tun_malformed = 1;
}

#endif
