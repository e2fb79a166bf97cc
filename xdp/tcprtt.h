/* xdpflow TCP round trips (XDPFLOW_TCP_RTT): handshake delays, timestamp-echo RTT, retransmissions. */
#ifndef XDPFLOW_TCPRTT_H
#define XDPFLOW_TCPRTT_H

static __always_inline void tcp_meter(struct run *r, __u32 si, int fresh, const struct flow_key *key,
				      const struct parsed *p)
{
	struct tcp_ext *t = tcp_ext_at(si);
	if (!t)
		return;
	if (fresh)
		__builtin_memset(t, 0, sizeof(*t));
}

#endif
