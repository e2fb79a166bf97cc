/* xdpflow DNS (XDPFLOW_DNS): the DNS header and first question of port-53 flows. */
#ifndef XDPFLOW_DNS_H
#define XDPFLOW_DNS_H

static __always_inline void dns_meter(struct run *r, __u32 si, int fresh, const struct flow_key *key,
				      const struct parsed *p)
{
	struct dns_ext *d = dns_ext_at(si);
	if (!d)
		return;
	if (fresh)
		__builtin_memset(d, 0, sizeof(*d));
}

#endif
