"""Biflows (RFC 5103): both directions of a conversation in one record.

Theory of operation. The kernel meters uniflows; `BiflowTable` is the flow
table (exporter/flowtable.py) holding BIFLOW_RECORDs keyed by the
initiator's key, and `update()` takes a scan's merged uniflows. Before they
are folded in, each uniflow is given a side, with array passes:

1. Pairing key. Uniflow keys are normalised so that the two directions of a
   conversation meet: with ingress metering only, the interface is left out
   (a gateway sees A->B enter one interface and B->A enter the other); with
   egress metering the interface stays and the hook is left out (an
   interface sees A->B leave and B->A come in). The reversed key swaps
   addresses and ports; for ICMP it keeps the ports and maps request types
   to reply types (echo 8/0, ICMPv6 128/129, ...), so a ping pairs with its
   replies.
2. Held conversations: a uniflow whose reversed key the table holds is that
   biflow's reverse side; one whose own key it holds, its forward side.
3. New conversations: two uniflows of the scan that are each other's
   reverse form a pair. The initiator is the side whose first packet came
   first; when both started within the same millisecond, a side whose
   first packet was a bare TCP SYN, an ICMP request, or (for lack of
   better) the side with the higher source port, as clients use ephemeral
   ports. biflowDirection says how sure that is: 1 (initiator) when time,
   SYN or ICMP type decided, 0 (arbitrary) otherwise. A uniflow without a
   partner starts a biflow of its own as the forward side, biflowDirection
   1 if its first packet opened the conversation (bare SYN, ICMP request),
   else 0, raised to 1 when its reverse side shows up later, after it.
4. Fold: forward and reverse values accumulate separately (sums, min/max,
   OR of TCP flags, ToS of the earliest packet), and expiry reads the
   conversation as a whole: idle when both sides are, ended by a FIN or RST
   from either side.

A side with no packets holds neutral values while in the table (first time
at the top of its range, so min() folds ignore it) and is exported as
zeros.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from exporter.flowtable import U8, FlowTable, RecordKind, fold_direction
from exporter.records import (
    BIFLOW_ARBITRARY,
    BIFLOW_INITIATOR,
    BIFLOW_RECORD,
    DIRECTION_FIELDS,
    END_FORCED,
    FLOW_RECORD,
    KEY_SIZE,
    Records,
    key_hash,
    less,
    same_keys,
)
from xdp.layout import FLOW_KEY

TCP_SYN = 0x02
TCP_ACK = 0x10
_NO_TIME = np.iinfo(np.uint64).max
# ICMP types that answer each other; a type not listed pairs with itself.
_ICMP4_PAIRS = ((8, 0), (13, 14), (15, 16), (17, 18))
_ICMP6_PAIRS = ((128, 129),)


def _type_map(pairs: tuple[tuple[int, int], ...]) -> tuple[npt.NDArray[np.uint16], npt.NDArray[np.bool_]]:
    partner = np.arange(256, dtype=np.uint16)
    request = np.zeros(256, dtype=bool)
    for req, rep in pairs:
        partner[req], partner[rep] = rep, req
        request[req] = True
    return partner, request


_ICMP4_PARTNER, _ICMP4_REQUEST = _type_map(_ICMP4_PAIRS)
_ICMP6_PARTNER, _ICMP6_REQUEST = _type_map(_ICMP6_PAIRS)


def _fold_biflow(cur: Records, scan: Records) -> None:
    # A lone forward side becomes the initiator once its reverse answers after it.
    answered = ((cur["r_packets"] == 0) & (scan["r_packets"] > 0) & (cur["biflow_direction"] == BIFLOW_ARBITRARY)
                & (cur["first_ms"] < scan["r_first_ms"]))
    no_fwd = cur["packets"] == 0
    no_rev = cur["r_packets"] == 0
    fold_direction(cur, scan)
    fold_direction(cur, scan, "r_")
    cur["fwd_ifindex"][no_fwd] = scan["fwd_ifindex"][no_fwd]
    cur["fwd_direction"][no_fwd] = scan["fwd_direction"][no_fwd]
    cur["rev_ifindex"][no_rev] = scan["rev_ifindex"][no_rev]
    cur["rev_direction"][no_rev] = scan["rev_direction"][no_rev]
    cur["biflow_direction"][answered] = BIFLOW_INITIATOR


BIFLOW = RecordKind(
    BIFLOW_RECORD, _fold_biflow,
    first_ms=lambda t: np.minimum(t["first_ms"], t["r_first_ms"]),
    last_ms=lambda t: np.maximum(t["last_ms"], t["r_last_ms"]),
    tcp_flags=lambda t: t["tcp_flags"] | t["r_tcp_flags"],
)

def pairing_keys(uniflows: Records, per_interface: bool) -> tuple[Records, Records]:
    """(own, reversed) normalised FLOW_KEYs of each uniflow (see step 1 of the module docstring)."""
    own = np.zeros(len(uniflows), dtype=FLOW_KEY)
    for name in FLOW_KEY.names or ():
        own[name] = uniflows[name]
    if not per_interface:
        own["ifindex"] = 0
    else:
        own["direction"] = 0
    rev = own.copy()
    rev["src_addr"], rev["dst_addr"] = own["dst_addr"], own["src_addr"]
    icmp4 = (own["protocol"] == 1) & (own["ip_version"] == 4)
    icmp6 = (own["protocol"] == 58) & (own["ip_version"] == 6)
    icmp = icmp4 | icmp6
    rev["src_port"] = np.where(icmp, own["src_port"], own["dst_port"])
    kind = own["dst_port"] >> 8
    code = own["dst_port"] & 0xFF
    partner = np.where(icmp4, _ICMP4_PARTNER[kind], _ICMP6_PARTNER[kind])
    rev["dst_port"] = np.where(icmp, (partner << 8) | code, own["src_port"])
    return own, rev


def _key_bytes(keys: Records) -> U8:
    return np.ascontiguousarray(keys).view(np.uint8).reshape(len(keys), KEY_SIZE)


def _initiates(first: npt.NDArray[np.uint64], flags: npt.NDArray[np.uint16], u: Records, own: U8,
               i: npt.NDArray[np.intp], j: npt.NDArray[np.intp]) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    """For pairs (i, j) of distinct new keys (`first` ms and first-packet TCP `flags` per key; `u`, `own`: one
    uniflow and its pairing key per key): does i initiate, and was that decided rather than guessed."""
    ti, tj = first[i], first[j]
    tie = ti == tj
    icmp4 = u["protocol"][i] == 1
    icmp6 = u["protocol"][i] == 58
    kind_i, kind_j = u["dst_port"][i] >> 8, u["dst_port"][j] >> 8
    req_i = np.where(icmp4, _ICMP4_REQUEST[kind_i], icmp6 & _ICMP6_REQUEST[kind_i])
    req_j = np.where(icmp4, _ICMP4_REQUEST[kind_j], icmp6 & _ICMP6_REQUEST[kind_j])
    # The flags of each side's first packet: the initiator's is a bare SYN, the answer's SYN+ACK.
    tcp = u["protocol"][i] == 6
    syn_i = tcp & ((flags[i] & (TCP_SYN | TCP_ACK)) == TCP_SYN)
    syn_j = tcp & ((flags[j] & (TCP_SYN | TCP_ACK)) == TCP_SYN)
    sport_i, sport_j = u["src_port"][i], u["src_port"][j]
    guess = np.where(sport_i != sport_j, sport_i > sport_j, less(own[i], own[j]))
    told = np.where(req_i != req_j, req_i, np.where(syn_i != syn_j, syn_i, guess))
    decided = ~tie | (req_i != req_j) | (syn_i != syn_j)
    return np.where(tie, told, ti < tj), decided


def _opens(u: Records, flags: npt.NDArray[np.uint16]) -> npt.NDArray[np.bool_]:
    """Uniflows whose first packet opens a conversation: a bare TCP SYN, an ICMP request."""
    kind = u["dst_port"] >> 8
    syn = (u["protocol"] == 6) & ((flags & (TCP_SYN | TCP_ACK)) == TCP_SYN)
    icmp4 = (u["protocol"] == 1) & _ICMP4_REQUEST[kind]
    icmp6 = (u["protocol"] == 58) & _ICMP6_REQUEST[kind]
    return syn | icmp4 | icmp6


class BiflowTable(FlowTable):
    """A FlowTable of BIFLOW_RECORDs fed with uniflow FLOW_RECORDs; `per_interface` when egress is metered."""

    def __init__(self, active_timeout_s: float = 60, idle_timeout_s: float = 15, capacity: int | None = None,
                 per_interface: bool = False) -> None:
        super().__init__(active_timeout_s, idle_timeout_s, capacity, kind=BIFLOW)
        self.per_interface = per_interface
        self.paired = 0  # uniflows folded as the reverse side of a conversation, since start

    def packets_held(self) -> int:
        t = self._table()
        return int(t["packets"].sum(dtype=np.uint64) + t["r_packets"].sum(dtype=np.uint64))

    def octets_held(self) -> int:
        t = self._table()
        return int(t["octets"].sum(dtype=np.uint64) + t["r_octets"].sum(dtype=np.uint64))

    def flows(self) -> Records:
        return finish(super().flows())

    def update(self, records: Records, now_ms: int) -> Records:
        """Fold one scan's merged uniflows in, then return the biflows that end at `now_ms`."""
        if records.dtype != FLOW_RECORD or records.ndim != 1:
            raise TypeError(f"update() wants a 1-d FLOW_RECORD array, got {records.dtype} with shape {records.shape}")
        return finish(super().update(self.orient(records), now_ms))

    def expire_all(self, reason: int = END_FORCED) -> Records:
        return finish(super().expire_all(reason))

    def orient(self, u: Records) -> Records:
        """The uniflows as BIFLOW_RECORD rows, each on its side of its conversation (steps 1 to 3)."""
        n = len(u)
        own_k, rev_k = pairing_keys(u, self.per_interface)
        own, rev = _key_bytes(own_k), _key_bytes(rev_k)
        h_own, h_rev = key_hash(own), key_hash(rev)
        symmetric = same_keys(own, rev)
        fwd_held, _ = self.find(own, h_own)
        rev_held, _ = self.find(rev, h_rev)
        reverse = rev_held & ~symmetric & ~fwd_held
        initiator = np.zeros(n, dtype=np.uint8)

        new = np.flatnonzero(~fwd_held & ~reverse & ~symmetric)
        if len(new):
            # Decide per distinct key (a key may repeat in a scan), so all uniflows of a key take one side.
            _, first_of, inv = np.unique(np.ascontiguousarray(own[new]).view(f"V{KEY_SIZE}").ravel(),
                                         return_index=True, return_inverse=True)
            inv = inv.ravel()
            keys = new[first_of]
            first = np.full(len(keys), _NO_TIME, dtype=np.uint64)
            np.minimum.at(first, inv, u["first_ms"][new])
            # A key repeated in the scan: the first flags of its first uniflow stand for it (repeats are rare).
            flags = u["first_flags"][keys].astype(np.uint16)
            h = h_own[keys]
            order = np.argsort(h, kind="stable")
            at = np.minimum(np.searchsorted(h[order], h_rev[keys]), len(keys) - 1)
            cand = order[at]
            paired = (h[cand] == h_rev[keys]) & same_keys(own[keys[cand]], rev[keys])
            i, j = np.flatnonzero(paired), cand[paired]
            starts, decided = _initiates(first, flags, u[keys], own[keys], i, j)
            key_reverse = np.zeros(len(keys), dtype=bool)
            key_reverse[i[~starts]] = True
            # Alone in the scan, a side still opens its conversation if its first packet says so.
            key_initiator = np.where(_opens(u[keys], flags), BIFLOW_INITIATOR, BIFLOW_ARBITRARY).astype(np.uint8)
            key_initiator[i] = np.where(decided, BIFLOW_INITIATOR, BIFLOW_ARBITRARY)
            reverse[new] = key_reverse[inv]
            initiator[new] = key_initiator[inv]

        rows = np.zeros(n, dtype=BIFLOW_RECORD)
        key = np.where(reverse[:, None], rev, own)
        _key_bytes_into(rows, key)
        fwd = ~reverse
        for name in DIRECTION_FIELDS:
            rows[name][fwd] = u[name][fwd]
            rows[f"r_{name}"][reverse] = u[name][reverse]
        rows["first_ms"][reverse] = _NO_TIME
        rows["min_ttl"][reverse] = 0xFF
        rows["r_first_ms"][fwd] = _NO_TIME
        rows["r_min_ttl"][fwd] = 0xFF
        rows["fwd_ifindex"][fwd] = u["ifindex"][fwd]
        rows["rev_ifindex"][reverse] = u["ifindex"][reverse]
        rows["fwd_direction"][fwd] = u["direction"][fwd]
        rows["rev_direction"][reverse] = u["direction"][reverse]
        rows["biflow_direction"] = initiator
        self.paired += int(np.count_nonzero(reverse))
        return rows


def _key_bytes_into(rows: Records, key: U8) -> None:
    raw = rows.view(np.uint8).reshape(len(rows), BIFLOW_RECORD.itemsize)
    raw[:, :KEY_SIZE] = key


def finish(records: Records) -> Records:
    """Biflows leaving the table: a side without packets reads as zeros."""
    for p in ("", "r_"):
        empty = records[p + "packets"] == 0
        records[p + "first_ms"][empty] = 0
        records[p + "min_ttl"][empty] = 0
    return records


def split_one_sided(records: Records) -> tuple[Records, Records]:
    """Exported biflows as (those with both sides, the others as uniflow FLOW_RECORDs).

    A biflow whose reverse (or forward) side saw no packet is a uniflow: sent under the
    uniflow templates it carries no reverse fields at all, rather than zeros that a collector
    reads as a reverse flow at 1970-01-01.
    """
    fwd_only = records["r_packets"] == 0
    rev_only = (records["packets"] == 0) & ~fwd_only
    if not (fwd_only.any() or rev_only.any()):
        return records, np.zeros(0, dtype=FLOW_RECORD)
    both = records[~(fwd_only | rev_only)]
    fwd, rev = records[fwd_only], records[rev_only]
    uni = np.zeros(len(fwd) + len(rev), dtype=FLOW_RECORD)
    head, tail = uni[:len(fwd)], uni[len(fwd):]
    for part, src, prefix in ((head, fwd, ""), (tail, rev, "r_")):
        for name in FLOW_KEY.names or ():
            part[name] = src[name]
        for name in DIRECTION_FIELDS:
            part[name] = src[prefix + name]
        part["end_reason"] = src["end_reason"]
    head["ifindex"], head["direction"] = fwd["fwd_ifindex"], fwd["fwd_direction"]
    tail["ifindex"], tail["direction"] = rev["rev_ifindex"], rev["rev_direction"]
    # The reverse side's own key: the biflow key reversed as pairing_keys() reverses a uniflow's.
    _, reversed_keys = pairing_keys(tail, per_interface=True)
    for name in ("src_addr", "dst_addr", "src_port", "dst_port"):
        tail[name] = reversed_keys[name]
    return both, uni
