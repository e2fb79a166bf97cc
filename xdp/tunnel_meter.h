/* xdpflow tunnels (XDPFLOW_TUNNELS): keep the outer addresses and segment id beside the inner flow. */
#ifndef XDPFLOW_TUNNEL_METER_H
#define XDPFLOW_TUNNEL_METER_H

static __always_inline void tunnel_meter(struct run *r, __u32 si, int fresh, const struct flow_key *key,
					 const struct parsed *p)
{
	struct tunnel_ext *t = tunnel_ext_at(si);
	if (!t)
		return;
	if (fresh)
		__builtin_memset(t, 0, sizeof(*t));
}

#endif
