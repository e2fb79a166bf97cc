"""xdpflow's user-space pipeline: drain -> merge -> flow table -> IPFIX -> transport."""
