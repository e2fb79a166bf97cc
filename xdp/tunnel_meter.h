/* xdpflow tunnels (XDPFLOW_TUNNELS): keep the outer addresses and segment id beside the inner flow.
 * The slot's tunnel_ext holds the last decapsulated packet's (the key's segment keeps inner flows of
 * different segments apart, so they differ only when several tunnel endpoints carry one inner flow).
 * Counted here, so for packets that found a slot: tunnel_decapsulated, tunnel_malformed. */
#ifndef XDPFLOW_TUNNEL_METER_H
#define XDPFLOW_TUNNEL_METER_H

static __always_inline void tunnel_meter(struct run *r, __u32 si, int fresh, const struct flow_key *key,
					 const struct parsed *p)
{
	if (p->tun_malformed)
		r->st->tunnel_malformed += p->packets;
	struct tunnel_ext *t = tunnel_ext_at(si);
	if (!t)
		return;
	if (p->tun.type != XDPFLOW_TUNNEL_NONE) {
		r->st->tunnel_decapsulated += p->packets;
		__builtin_memcpy(t, &p->tun, sizeof(*t));
	} else if (fresh) {
		__builtin_memset(t, 0, sizeof(*t));
	}
}

#endif
