"""numpy mirror of xdp/flow.h: the kernel's structs as structured dtypes.

The drain reads raw map memory (the mapped slot array, map values) through
these dtypes; nothing else in user space knows a byte offset. Nested structs
(a slot's key and value) are nested dtypes. tests/unit/test_layout.py compiles flow.h and
checks every size and offset against these definitions.
"""

from __future__ import annotations

import numpy as np

FLOW_KEY = np.dtype([
    ("src_addr", "u1", (16,)),
    ("dst_addr", "u1", (16,)),
    ("src_port", "<u2"),
    ("dst_port", "<u2"),
    ("ifindex", "<u4"),
    ("vlan_id", "<u2"),
    ("protocol", "u1"),
    ("ip_version", "u1"),
    ("direction", "u1"),     # IE 61 flowDirection: INGRESS (XDP) or EGRESS (TC)
    ("segment", "u1", (3,)),  # tunnels: low 24 bits of the VNI / GRE key (little-endian); 0: not tunnelled
])

# flow_key.direction (XDPFLOW_INGRESS / XDPFLOW_EGRESS in flow.h): ifindex is
# IE 10 ingressInterface for INGRESS, IE 14 egressInterface for EGRESS.
INGRESS = 0
EGRESS = 1

FLOW_VALUE = np.dtype([
    ("packets", "<u8"),
    ("octets", "<u8"),
    ("first_seen", "<u8"),   # jiffies
    ("last_seen", "<u8"),
    ("tcp_flags", "<u2"),
    ("tos", "u1"),
    ("min_ttl", "u1"),
    ("max_ttl", "u1"),
    ("first_flags", "u1"),
    ("pad", "u1", (2,)),
])

FLOW_SLOT = np.dtype([
    ("key", FLOW_KEY),
    ("value", FLOW_VALUE),
])

FLOW_REF = np.dtype([
    ("slot", "<u4"),
    ("gen", "<u4"),
])

NO_SLOT = 0xFFFFFFFF   # flow_ref.slot when the page had no free slot (XDPFLOW_NO_SLOT)

FLOW_CACHE_ENTRY = np.dtype([
    ("key", FLOW_KEY),
    ("slot", "<u4"),
    ("gen", "<u4"),
    ("pad", "<u8"),
])

SLOT_ALLOC = np.dtype([
    ("next", "<u8"),
])

CLOCK = np.dtype([
    ("jiffies", "<u8"),
    ("coarse_ns", "<u8"),
    ("jiffies_after", "<u8"),
])

FLOW_STATS = np.dtype([
    ("frames", "<u8"),
    ("packets", "<u8"),
    ("octets", "<u8"),
    ("flows_created", "<u8"),
    ("parse_failures", "<u8"),
    ("non_ip", "<u8"),
    ("insert_failures", "<u8"),
    ("insert_failure_octets", "<u8"),
    ("filtered", "<u8"),
    ("filtered_octets", "<u8"),
    ("sampled_out", "<u8"),
    ("sampled_out_octets", "<u8"),
    ("flows_denied", "<u8"),
    ("parse_failure_octets", "<u8"),
    ("tunnel_decapsulated", "<u8"),
    ("tunnel_malformed", "<u8"),
    ("dns_messages", "<u8"),
    ("dns_malformed", "<u8"),
    ("dns_responses_timed", "<u8"),
    ("tcp_rtt_samples", "<u8"),
    ("tcp_retransmissions", "<u8"),
    ("ext_state_full", "<u8"),
])

# Extensions (flow.h): one entry per slot, in arrays indexed like the slots.
TUNNEL_NONE, TUNNEL_VXLAN, TUNNEL_GENEVE, TUNNEL_GRE, TUNNEL_GRE_KEY = range(5)

TUNNEL_EXT = np.dtype([
    ("outer_src", "u1", (16,)),
    ("outer_dst", "u1", (16,)),
    ("tunnel_id", "<u4"),
    ("type", "u1"),
    ("outer_ip_version", "u1"),
    ("pad", "u1", (2,)),
])

DNS_NAME = 64
DNS_EXT = np.dtype([
    ("id", "<u2"),
    ("flags", "<u2"),
    ("qtype", "<u2"),
    ("qcount", "<u2"),
    ("name_len", "u1"),
    ("present", "u1"),
    ("pad", "u1", (2,)),
    ("response_us", "<u4"),
    ("qname", "u1", (DNS_NAME,)),
])

TCP_EXT = np.dtype([
    ("server_delay_us", "<u4"),
    ("client_delay_us", "<u4"),
    ("rtt_min_us", "<u4"),
    ("rtt_samples", "<u4"),
    ("rtt_sum_us", "<u8"),
    ("retransmissions", "<u4"),
    ("pad", "<u4"),
])

# feature name (xdp/compile.py FEATURES) -> the dtype of its per-slot entries
EXTENSIONS = {"tunnels": TUNNEL_EXT, "dns": DNS_EXT, "tcp_rtt": TCP_EXT}

CONTROL = np.dtype([
    ("gen", "<u4"),          # page = gen & 1
    ("config", "<u4"),
])

RULE_SET = np.dtype([
    ("slots", "<u8"),
    ("exclude", "<u8"),
    ("iface_any", "<u8"),
    ("src_any", "<u8"),
    ("dst_any", "<u8"),
    ("flags", "<u4"),
    ("default_exclude", "<u4"),
    ("sample_threshold", "<u4"),
    ("sample_interval", "<u4"),
])

PREFIX_KEY = np.dtype([
    ("prefixlen", "<u4"),
    ("set", "u1"),
    ("pad", "u1", (3,)),
    ("addr", "u1", (16,)),
])

RULE_COUNTER = np.dtype([
    ("packets", "<u8"),
    ("octets", "<u8"),
])

# C struct name -> dtype, for the layout test.
STRUCTS = {"flow_key": FLOW_KEY, "flow_value": FLOW_VALUE, "flow_slot": FLOW_SLOT, "flow_ref": FLOW_REF,
           "flow_cache_entry": FLOW_CACHE_ENTRY, "slot_alloc": SLOT_ALLOC, "xdpflow_clock": CLOCK,
           "flow_stats": FLOW_STATS, "xdpflow_ctl": CONTROL, "rule_set": RULE_SET, "prefix_key": PREFIX_KEY,
           "rule_counter": RULE_COUNTER, "tunnel_ext": TUNNEL_EXT, "dns_ext": DNS_EXT, "tcp_ext": TCP_EXT}
