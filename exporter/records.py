"""The flow record: what merge produces, the flow table keeps and the encoder sends.

One numpy structured dtype, so every stage works on whole arrays. The first
48 bytes are exactly a FLOW_KEY (see xdp/layout.py), so `key_view()`
gives a fixed-width byte string per record to sort, search and join on.
Times are epoch milliseconds (IEs 152/153).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from xdp.layout import FLOW_KEY

# flowDirection (IE 61): the hook that metered a flow (flow.h XDPFLOW_INGRESS / XDPFLOW_EGRESS)
INGRESS = 0
EGRESS = 1

# flowEndReason (IE 136)
END_IDLE = 1
END_ACTIVE = 2
END_OF_FLOW = 3
END_FORCED = 4
END_LACK_OF_RESOURCES = 5

TCP_FIN = 0x01
TCP_RST = 0x04

FLOW_RECORD = np.dtype([
    *FLOW_KEY.descr,
    ("packets", "<u8"),       # IE 2 packetDeltaCount
    ("octets", "<u8"),        # IE 1 octetDeltaCount
    ("first_ms", "<u8"),      # IE 152 flowStartMilliseconds
    ("last_ms", "<u8"),       # IE 153 flowEndMilliseconds
    ("tcp_flags", "<u2"),     # IE 6 tcpControlBits
    ("tos", "u1"),            # IE 5 ipClassOfService
    ("min_ttl", "u1"),        # IE 52 minimumTTL
    ("max_ttl", "u1"),        # IE 53 maximumTTL
    ("end_reason", "u1"),     # IE 136 flowEndReason (0 while the flow is active)
    ("first_flags", "u1"),    # TCP flags of the first packet (not exported: a biflow's initiator sends a bare SYN)
])

# biflowDirection (IE 239, RFC 5103 section 5.3)
BIFLOW_ARBITRARY = 0
BIFLOW_INITIATOR = 1

_FORMATS = {name: FLOW_RECORD[name].str for name in FLOW_RECORD.names or ()}
# The value fields of one direction: FLOW_RECORD names them as is, BIFLOW_RECORD's reverse side with "r_".
DIRECTION_FIELDS = ("packets", "octets", "first_ms", "last_ms", "tcp_flags", "tos", "min_ttl", "max_ttl",
                    "first_flags")

# RFC 5103: a biflow record. The key is the forward (initiator's) key as the biflow table pairs it
# (exporter/biflow.py); the interfaces each direction was metered on follow; then the forward
# direction's values under FLOW_RECORD's names, so the uniflow columns serve the forward half, and
# the reverse direction's values, exported as the RFC 5103 reverse elements (enterprise 29305).
BIFLOW_RECORD = np.dtype([
    *FLOW_KEY.descr,
    ("fwd_ifindex", "<u4"),   # IE 10 ingressInterface / 14 egressInterface: where the forward side was metered
    ("rev_ifindex", "<u4"),   # 29305/10 reverseIngressInterface / 29305/14 reverseEgressInterface
    ("fwd_direction", "u1"),  # IE 61 flowDirection: the hook that metered the forward side
    ("rev_direction", "u1"),  # ... and the reverse side
    *[(n, _FORMATS[n]) for n in (*DIRECTION_FIELDS, "end_reason")],
    *[(f"r_{n}", _FORMATS[n]) for n in DIRECTION_FIELDS],
    ("biflow_direction", "u1"),  # IE 239 biflowDirection
])

KEY_SIZE = FLOW_KEY.itemsize
KEY_VIEW = np.dtype(f"V{KEY_SIZE}")

Records = npt.NDArray[np.void]


def key_view(records: Records) -> npt.NDArray[np.void]:
    """One opaque KEY_SIZE-byte value per record (a view, no copy when contiguous)."""
    raw = np.ascontiguousarray(records).view(np.uint8).reshape(len(records), FLOW_RECORD.itemsize)
    return np.ascontiguousarray(raw[:, :KEY_SIZE]).view(KEY_VIEW).reshape(len(records))


# -- keys: hashing, ordering, comparing (the flow table's join and the merge both rest on them) ------

_WORDS = -(-KEY_SIZE // 8)
_MIX = np.uint64(0x9E3779B97F4A7C15)
_FIN_1 = np.uint64(0xBF58476D1CE4E5B9)
_FIN_2 = np.uint64(0x94D049BB133111EB)

U8 = npt.NDArray[np.uint8]
U64 = npt.NDArray[np.uint64]


def key_hash(key_bytes: U8) -> U64:
    """64-bit hash of each (n, KEY_SIZE) row of key bytes: word-wise multiply-xor, splitmix64 finish."""
    padded = np.zeros((len(key_bytes), _WORDS * 8), dtype=np.uint8)
    padded[:, :KEY_SIZE] = key_bytes
    words = padded.view("<u8")
    h = np.full(len(key_bytes), _WORDS, dtype=np.uint64)
    for i in range(_WORDS):
        h ^= words[:, i]
        h *= _MIX
        h ^= h >> np.uint64(32)
    h ^= h >> np.uint64(30)
    h *= _FIN_1
    h ^= h >> np.uint64(27)
    h *= _FIN_2
    h ^= h >> np.uint64(31)
    return h


def as_keys(key_bytes: U8) -> npt.NDArray[np.void]:
    return np.ascontiguousarray(key_bytes).view(KEY_VIEW).reshape(len(key_bytes))


def less(a: U8, b: U8) -> npt.NDArray[np.bool_]:
    """Row-wise a < b comparing key bytes lexicographically."""
    differ = a != b
    first = differ.argmax(axis=1)
    rows = np.arange(len(a))
    return differ.any(axis=1) & (a[rows, first] < b[rows, first])


def order_by_hash(hashes: U64, key_bytes: U8) -> npt.NDArray[np.intp]:
    """Permutation sorting by (hash, key bytes), stable for equal keys."""
    # An unstable integer sort is ~25% cheaper; only runs of equal hashes need the stable byte-wise fix-up.
    order = np.argsort(hashes)
    sorted_h = hashes[order]
    same = sorted_h[1:] == sorted_h[:-1]
    if same.any():
        in_run = np.zeros(len(order), dtype=bool)
        in_run[1:] = same
        in_run[:-1] |= same
        at = np.flatnonzero(in_run)
        run = np.cumsum(np.concatenate([[True], ~same]))[at]
        members = order[at]
        by_input = np.argsort(members, kind="stable")
        by_key = by_input[np.argsort(as_keys(key_bytes[members[by_input]]), kind="stable")]
        order[at] = members[by_key[np.argsort(run[by_key], kind="stable")]]
    return order


def same_keys(a: U8, b: U8) -> npt.NDArray[np.bool_]:
    """Row-wise equality of (n, KEY_SIZE) key bytes, compared as 32-bit words."""
    words = KEY_SIZE // 4
    return (np.ascontiguousarray(a).view("<u4").reshape(-1, words)
            == np.ascontiguousarray(b).view("<u4").reshape(-1, words)).all(axis=1)


def key_order(records: Records) -> npt.NDArray[np.intp]:
    """Permutation putting equal keys next to each other (by key hash, then key bytes)."""
    raw = np.ascontiguousarray(records).view(np.uint8).reshape(len(records), records.dtype.itemsize)[:, :KEY_SIZE]
    return order_by_hash(key_hash(raw), raw)
