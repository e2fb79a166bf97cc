"""Filter rules and sampling as map contents: the two rule sets of flow.c, written while not in use.

flow.h explains the tables (struct rule_set, the prefix tries, the per-dimension masks, the per-rule
counters). There are two of each, indexed by rule set: `RuleSets.write()` fills the one no program
reads, the datapath points the control slot at it and waits for the fence, then `retire()` folds
the old set's per-rule counters into totals kept here, so a rule that stays across reloads (same
text and action) keeps counting from where it was. The switch itself (control slot, fence) is the
datapath's (xdp/loader.py); this module owns what the sets hold.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from xdp import bpfsys, filters
from xdp.errors import LoaderError
from xdp.layout import PREFIX_KEY, RULE_COUNTER, RULE_SET


@dataclass(frozen=True)
class RuleCount:
    """Packets and octets a filter rule decided, since load (rule "(no match)": no rule matched)."""

    rule: str
    action: str
    packets: int
    octets: int


NO_MATCH = "(no match)"


@dataclass
class RuleSet:
    """What user space wrote into one rule set's slots of the kernel tables."""

    tables: filters.Tables = field(default_factory=filters.Tables)
    sampling: int = 1
    src_keys: list[bytes] = field(default_factory=list)
    dst_keys: list[bytes] = field(default_factory=list)
    iface_keys: list[int] = field(default_factory=list)


@dataclass
class RuleSets:
    """The kernel tables of both rule sets (map name -> fd), what user space wrote into each, and the
    per-rule totals of sets already retired."""

    fds: dict[str, int]
    cpus: int
    sets: list[RuleSet] = field(default_factory=lambda: [RuleSet(), RuleSet()])
    totals: dict[tuple[str, str], tuple[int, int]] = field(default_factory=dict)

    def write(self, index: int, tables: filters.Tables, sampling: int) -> None:
        """Fill rule set `index` (not in use: no program reads it) with `tables`."""
        rs = self.sets[index]
        fds = self.fds
        for name, keys in (("src_prefixes", rs.src_keys), ("dst_prefixes", rs.dst_keys)):
            for k in keys:
                _delete(fds[name], np.frombuffer(k, dtype=np.uint8))
            keys.clear()
        for ik in rs.iface_keys:
            _delete(fds["iface_masks_high"], np.array([ik], dtype=np.uint64))
        rs.iface_keys.clear()

        for name, prefixes, keys in (("src_prefixes", tables.src, rs.src_keys),
                                     ("dst_prefixes", tables.dst, rs.dst_keys)):
            for net, mask in prefixes.items():
                pk = np.zeros(1, dtype=PREFIX_KEY)
                pk["prefixlen"] = 32 + net.prefixlen
                pk["set"] = index
                pk["addr"] = np.frombuffer(net.network_address.packed, dtype=np.uint8)
                bpfsys.map_update(fds[name], pk, np.array([mask], dtype=np.uint64))
                keys.append(pk.tobytes())
        for name, table, width in (("proto_masks", tables.proto, filters.PROTO_SLOTS),
                                   ("sport_masks", tables.sport, filters.PORT_SLOTS),
                                   ("dport_masks", tables.dport, filters.PORT_SLOTS),
                                   ("vlan_masks", tables.vlan, filters.VLAN_SLOTS)):
            if table is not None:
                _write_array(fds[name], index * width, table)
        if tables.flags & filters.SEL_IFACE:
            low = np.full(filters.IFINDEX_SLOTS, tables.iface_any, dtype=np.uint64)
            for ifindex, mask in tables.iface.items():
                if ifindex < filters.IFINDEX_SLOTS:
                    low[ifindex] = mask
                    continue
                ik = index << 32 | ifindex
                bpfsys.map_update(fds["iface_masks_high"], np.array([ik], dtype=np.uint64),
                                  np.array([mask], dtype=np.uint64))
                rs.iface_keys.append(ik)
            _write_array(fds["iface_masks"], index * filters.IFINDEX_SLOTS, low)

        hdr = np.zeros(1, dtype=RULE_SET)
        hdr["slots"], hdr["exclude"], hdr["iface_any"] = tables.slots, tables.exclude, tables.iface_any
        hdr["src_any"], hdr["dst_any"] = tables.src_any, tables.dst_any
        hdr["flags"] = tables.flags | (filters.SAMPLE if sampling > 1 else 0)
        hdr["default_exclude"] = int(tables.default_exclude)
        hdr["sample_threshold"] = filters.sample_threshold(sampling)
        hdr["sample_interval"] = sampling
        bpfsys.map_update(fds["rule_sets"], ctypes.c_uint32(index), hdr)
        rs.tables, rs.sampling = tables, sampling

    def _counters(self, index: int) -> npt.NDArray[np.void]:
        """(counter slots, cpus) RULE_COUNTER of rule set `index`."""
        out = np.zeros((filters.COUNTER_SLOTS, self.cpus), dtype=RULE_COUNTER)
        base = index * filters.COUNTER_SLOTS
        for slot in range(filters.COUNTER_SLOTS):
            bpfsys.map_lookup(self.fds["rule_hits"], ctypes.c_uint32(base + slot), out[slot])
        return out

    def counts(self, index: int) -> dict[tuple[str, str], tuple[int, int]]:
        """Rule set `index`'s counters by (rule text, action), summed over CPUs and a rule's slots."""
        rs = self.sets[index]
        tables = rs.tables
        if not tables.rules:
            return {}
        per_slot = self._counters(index)
        packets = per_slot["packets"].sum(axis=1)
        octets = per_slot["octets"].sum(axis=1)
        out: dict[tuple[str, str], tuple[int, int]] = {}

        def add(key: tuple[str, str], p: int, o: int) -> None:
            p0, o0 = out.get(key, (0, 0))
            out[key] = (p0 + p, o0 + o)

        for r in tables.rules:
            add((r.text, r.action), 0, 0)
        for slot, ri in enumerate(tables.slot_rule):
            r = tables.rules[ri]
            add((r.text, r.action), int(packets[slot]), int(octets[slot]))
        add((NO_MATCH, tables.default_action()), int(packets[filters.NO_MATCH_SLOT]),
            int(octets[filters.NO_MATCH_SLOT]))
        return out

    def retire(self, index: int) -> None:
        """Fold rule set `index`'s counters (no program uses it any more) into the totals; zero them."""
        for key, (p, o) in self.counts(index).items():
            p0, o0 = self.totals.get(key, (0, 0))
            self.totals[key] = (p0 + p, o0 + o)
        zero = np.zeros(self.cpus, dtype=RULE_COUNTER)
        base = index * filters.COUNTER_SLOTS
        for slot in range(filters.COUNTER_SLOTS):
            bpfsys.map_update(self.fds["rule_hits"], ctypes.c_uint32(base + slot), zero)

    def counters(self, live: int | None) -> list[RuleCount]:
        """Per-rule packets and octets since load for the rules in force, in rule order, then "(no match)".

        A rule keeps its totals across reloads as long as its text and action
        stay the same. `live`: the set in force, None when none is (no filter, no sampling).
        """
        counts = self.counts(live) if live is not None else {}
        out = []
        for (rule, action), (p, o) in counts.items():
            p0, o0 = self.totals.get((rule, action), (0, 0))
            out.append(RuleCount(rule, action, p + p0, o + o0))
        return out


def _write_array(fd: int, base: int, values: npt.NDArray[np.uint64]) -> None:
    """Slots base .. base + len(values) of an array map of u64, in one BPF_MAP_UPDATE_BATCH."""
    keys = np.arange(base, base + len(values), dtype=np.uint32)
    vals = np.ascontiguousarray(values, dtype=np.uint64)
    done = bpfsys.map_update_batch(fd, keys, vals, len(vals))
    if done != len(vals):
        raise LoaderError(f"filter table update stopped after {done} of {len(vals)} entries")


def _delete(fd: int, key: npt.NDArray[Any]) -> None:
    """Delete one map entry (already gone is fine)."""
    bpfsys.map_delete(fd, key)
