"""numpy mirror of xdp/flow.h: the kernel's structs as structured dtypes.

The drain reads raw map memory into arrays of these dtypes; nothing else in
user space knows a byte offset. tests/unit/test_layout.py compiles flow.h and
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
    ("pad", "u1", (3,)),
])

# flow_key.direction (XDPFLOW_INGRESS / XDPFLOW_EGRESS in flow.h): ifindex is
# IE 10 ingressInterface for INGRESS, IE 14 egressInterface for EGRESS.
INGRESS = 0
EGRESS = 1

FLOW_VALUE = np.dtype([
    ("packets", "<u8"),
    ("octets", "<u8"),
    ("first_seen_ns", "<u8"),
    ("last_seen_ns", "<u8"),
    ("tcp_flags", "<u2"),
    ("tos", "u1"),
    ("min_ttl", "u1"),
    ("max_ttl", "u1"),
    ("first_flags", "u1"),
    ("pad", "u1", (2,)),
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
])

CONTROL = np.dtype([
    ("page", "<u4"),
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
STRUCTS = {"flow_key": FLOW_KEY, "flow_value": FLOW_VALUE, "flow_stats": FLOW_STATS, "xdpflow_ctl": CONTROL,
           "rule_set": RULE_SET, "prefix_key": PREFIX_KEY, "rule_counter": RULE_COUNTER}
