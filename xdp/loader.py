"""Load xdp/flow.c, own its maps, attach it to interfaces, detach.

Lifecycle: `Datapath.load()` checks the kernel memory budget, has a child
process compile and load the program (xdp.compile: bcc, kernel headers from
xdp.headers) and hand over the file descriptors of the programs and every
map, then sets the control slot to gen 1 (page 1 active) with no rule set.
`flip()` makes the other page active and returns once no program still
writes the old one, with a clock reading for the drain (see flow.c);
`read_slots()` then hands out the old page's slots, read through mappings of
the slot array a window at a time, and `reset_slots()` frees the page. bcc and its
LLVM are never imported here: everything after the load is bpf(2) on those
descriptors (xdp.bpfsys), and `close()` closes them, which frees the programs
and maps (a process that dies frees them the same way).
`configure()` installs filter rules and the sampling rate as map contents (a
second rule set, switched to atomically; never a recompile). `attach()`
binds it to interfaces with a bpf_link (BPF_LINK_CREATE) and reads back,
through pyroute2 netlink, the mode the kernel actually gave. A bpf_link lives
as long as its file descriptor: `detach()` closes it, and if the process dies
in any way (SIGKILL included) the kernel closes it and detaches the program,
so no attachment outlives xdpflow and a restart never finds a stale one. The
kernel also refuses a link on an interface that already has an XDP program,
so a program xdpflow did not attach is never touched. Use Datapath as a
context manager so every exit path detaches.

Egress (optional): `attach_egress()` attaches the TC program of the same
source (xdpflow_egress, sharing every map with the XDP program, loaded with
it by load(): ~40 ms of verifier) at an interface's egress hook. Where the
kernel has TCX (>= 6.6) that is a bpf_link too (BPF_LINK_CREATE,
BPF_TCX_EGRESS), appended after the hook's other programs and gone with its
fd, SIGKILL included. Older kernels get a clsact qdisc and a cls_bpf filter
(pyroute2) instead: a filter is not tied to the process, so
`detach_egress()` deletes it (and the clsact qdisc if xdpflow added it), and
after a SIGKILL it stays until removed by hand: `tc filter del dev IF egress
pref 49152` (EGRESS_TC_PREF), or `tc qdisc del dev IF clsact` when nothing
else uses that qdisc. A restart refuses an interface that still carries such
a filter, naming that command.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import structlog

from xdp import bpfsys, filters
from xdp import compile as xcompile
from xdp.compile import CLOCK_PROG, EGRESS_PROG, XDP_PROG
from xdp.layout import (
    CLOCK,
    CONTROL,
    FLOW_CACHE_ENTRY,
    FLOW_KEY,
    FLOW_REF,
    FLOW_SLOT,
    FLOW_STATS,
    PREFIX_KEY,
    RULE_COUNTER,
    RULE_SET,
    SLOT_ALLOC,
)
from xdp.sizing import DEFAULT_MAX_ENTRIES, DEFAULT_MEMORY_BUDGET

log = structlog.get_logger("xdpflow.loader")

XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
MODE_FLAGS = {"generic": XDP_FLAGS_SKB_MODE, "native": XDP_FLAGS_DRV_MODE}
# IFLA_XDP_ATTACHED: pyroute2 decodes it to a name on some versions, an int on others.
ATTACHED_NAMES: dict[int | str, str] = {1: "native", 2: "generic", 3: "offload", 4: "multi",
                                        "xdp": "native", "xdpdrv": "native", "xdpgeneric": "generic",
                                        "xdpoffload": "offload", "xdpmulti": "multi", "none": ""}

EGRESS_METHODS = ("auto", "tcx", "tc")
EGRESS_TC_PREF = 49152               # cls_bpf filter priority of the clsact fallback (tc's "pref")
EGRESS_TC_HANDLE = 1
TC_H_CLSACT_EGRESS = 0xFFFFFFF3      # parent "ffff:fff3": the egress hook of the clsact qdisc
TC_H_CLSACT_INGRESS = 0xFFFFFFF2
ARPHRD_ETHER = 1
ARPHRD_LOOPBACK = 772

PAGES = 2
# Filter tables are preallocated arrays (two rule sets each): ports dominate, about 2 MiB.
FILTER_TABLE_BYTES = 2 * 8 * (2 * filters.PORT_SLOTS + filters.VLAN_SLOTS + filters.PROTO_SLOTS
                              + filters.IFINDEX_SLOTS)


class LoaderError(RuntimeError):
    """A one-line, operator-facing failure (bad mode, budget, headers, privileges)."""


def possible_cpus() -> int:
    """Number of possible CPUs: per-CPU maps size every value by it."""
    with open("/sys/devices/system/cpu/possible", encoding="ascii") as f:
        spec = f.read().strip()
    total = 0
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        total += (int(hi) if hi else int(lo)) - int(lo) + 1
    return total


CACHE_BITS = 12                      # flow.h XDPFLOW_CACHE_BITS: per-CPU cache lines in front of the flow map
HTAB_ELEM_OVERHEAD = 48              # struct htab_elem's own fields (hash node, LRU node, hash), per entry


def map_memory_bytes(max_entries: int, cpus: int | None = None) -> int:
    """Kernel memory of the flow maps: the LRU flow map (key, element overhead, one flow_ref per
    possible CPU), two pages of max_entries slots, and the per-CPU cache. What the kernel really
    charges, give or take the allocators' rounding."""
    cpus = possible_cpus() if cpus is None else cpus
    lru = max_entries * (FLOW_KEY.itemsize + HTAB_ELEM_OVERHEAD + 8 + cpus * FLOW_REF.itemsize)
    slots = PAGES * max_entries * FLOW_SLOT.itemsize
    cache = cpus * (1 << CACHE_BITS) * FLOW_CACHE_ENTRY.itemsize
    return lru + slots + cache


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{int(value)} B"
        value /= 1024
    return f"{value:.1f} GiB"


@dataclass
class Attachment:
    ifname: str
    ifindex: int
    mode: str          # what the kernel reports: native or generic
    link_fd: int       # the bpf_link; closing it detaches


@dataclass
class EgressAttachment:
    ifname: str
    ifindex: int
    method: str                  # "tcx" (bpf_link) or "tc" (clsact + cls_bpf filter)
    link_fd: int = -1            # tcx: the bpf_link; closing it detaches
    added_qdisc: bool = False    # tc: xdpflow added the clsact qdisc (and removes it on detach)
    netns_fd: int = -1           # tc: the network namespace attached in (ifindex is only valid there)


@dataclass(frozen=True)
class RuleCount:
    """Packets and octets a filter rule decided, since load (rule "(no match)": no rule matched)."""

    rule: str
    action: str
    packets: int
    octets: int


NO_MATCH = "(no match)"


@dataclass
class _RuleSet:
    """What user space wrote into one rule set's slots of the kernel tables."""

    tables: filters.Tables = field(default_factory=filters.Tables)
    sampling: int = 1
    src_keys: list[bytes] = field(default_factory=list)
    dst_keys: list[bytes] = field(default_factory=list)
    iface_keys: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class ClockReading:
    """jiffies and CLOCK_MONOTONIC_COARSE (ns) read together in the kernel (struct xdpflow_clock)."""

    jiffies: int
    coarse_ns: int


SLOT_WINDOW = 16_384                 # slots mapped at a time when a page is read (1.4 MiB)


@dataclass
class Datapath:
    """The compiled program, its flow map, its two pages of slots, its counters and its rule sets."""

    max_entries: int = DEFAULT_MAX_ENTRIES
    memory_budget: int = DEFAULT_MEMORY_BUDGET
    prog_fd: int = -1
    clock_prog_fd: int = -1
    flows_fd: int = -1
    slots_fd: int = -1
    slot_alloc_fd: int = -1
    fence_fd: int = -1
    clock_fd: int = -1
    control_fd: int = -1
    stats_fd: int = -1
    _retired: dict[str, int] = field(default_factory=dict)
    cpus: int = field(default_factory=possible_cpus)
    attachments: list[Attachment] = field(default_factory=list)
    egress_prog_fd: int = -1        # the TC program (loaded with the XDP one); -1: not loaded
    egress_attachments: list[EgressAttachment] = field(default_factory=list)
    _fds: dict[str, int] = field(default_factory=dict)
    _owned: list[int] = field(default_factory=list)  # every descriptor load() received: close() closes them
    _egress_error: str = ""         # why the egress program did not load, said when it is asked for
    _gen: int = 1                   # control.gen: flips + 1; the active page is gen & 1
    _set: int = 0                   # rule set index the control slot names (when _config is on)
    _config: int = 0                # control.config: 0 (nothing to select) or 1 + _set
    _sets: list[_RuleSet] = field(default_factory=lambda: [_RuleSet(), _RuleSet()])
    _rule_totals: dict[tuple[str, str], tuple[int, int]] = field(default_factory=dict)
    _ctl_lock: threading.Lock = field(default_factory=threading.Lock)
    load_seconds: float = 0.0       # compile + load in the child process

    @property
    def memory_bytes(self) -> int:
        return map_memory_bytes(self.max_entries, self.cpus)

    @property
    def active_set(self) -> _RuleSet:
        return self._sets[self._set]

    @property
    def tables(self) -> filters.Tables:
        """The filter rules in force (compiled)."""
        return self.active_set.tables

    @property
    def sampling(self) -> int:
        return self.active_set.sampling

    @property
    def sampling_probability(self) -> float:
        """The chance a packet is metered (1.0 without sampling): what the sampler really does."""
        return filters.sampling_probability(self.sampling)

    def load(self) -> Datapath:
        need = self.memory_bytes
        if need > self.memory_budget:
            raise LoaderError(
                f"flow maps need {human_bytes(need)} of kernel memory ({self.max_entries} entries, "
                f"{self.cpus} CPUs), above the budget of {human_bytes(self.memory_budget)}: "
                f"lower --max-entries or raise --max-kernel-memory")
        if self._owned:
            raise LoaderError("this datapath is already loaded: close() it first")
        log.info("compiling and loading the XDP program", max_entries=self.max_entries,
                 kernel_memory=human_bytes(need))
        t0 = time.monotonic()
        try:
            got = xcompile.load(self.max_entries)
        except xcompile.CompileError as e:
            raise LoaderError(str(e)) from None
        self.load_seconds = time.monotonic() - t0
        fds = got.fds
        self._owned = list(fds.values())
        try:
            self.prog_fd = fds[XDP_PROG]
            self.clock_prog_fd = fds[CLOCK_PROG]
            self.egress_prog_fd = fds.get(EGRESS_PROG, -1)
            self._egress_error = got.egress_error or ""
            self.flows_fd = fds["flows"]
            self.slots_fd = fds["slots"]
            self.slot_alloc_fd = fds["slot_alloc"]
            self.fence_fd = fds["fence"]
            self.clock_fd = fds["clock"]
            self.control_fd = fds["control"]
            self.stats_fd = fds["stats"]
            self._fds = {name: fds[name] for name in ("rule_sets", "src_prefixes", "dst_prefixes", "proto_masks",
                                                      "sport_masks", "dport_masks", "vlan_masks", "iface_masks",
                                                      "iface_masks_high", "rule_hits")}
            bpfsys.map_update(self.fence_fd, ctypes.c_uint32(0), ctypes.c_uint32(self.clock_fd))
            with self._ctl_lock:
                self._write_control()
        except BaseException:
            self._close_fds()
            raise
        log.info("program loaded", seconds=round(self.load_seconds, 2), headers=got.headers,
                 max_entries=self.max_entries, kernel_memory=human_bytes(need),
                 filter_tables=human_bytes(FILTER_TABLE_BYTES), egress=self.egress_prog_fd >= 0)
        return self

    @property
    def active(self) -> int:
        """The page programs write now."""
        return self._gen & 1

    def _write_control(self) -> None:
        ctl = np.zeros(1, dtype=CONTROL)
        ctl["gen"], ctl["config"] = self._gen, self._config
        bpfsys.map_update(self.control_fd, ctypes.c_uint32(0), ctl)

    def _fence(self) -> None:
        """Return once no program that read the control slot before this call is still running.

        The fence is a rewrite of the slot of the array-of-maps `fence` with the
        fd it already holds: for map-in-map updates the kernel runs
        synchronize_rcu() before the syscall returns (maybe_wait_bpf_programs),
        and XDP and TC programs run inside an RCU read-side section.
        """
        bpfsys.map_update(self.fence_fd, ctypes.c_uint32(0), ctypes.c_uint32(self.clock_fd))

    def read_clock(self) -> ClockReading:
        """jiffies and the coarse monotonic clock, read by the kernel in one run (retried across a tick)."""
        out = np.zeros(1, dtype=CLOCK)
        for _ in range(8):
            bpfsys.prog_test_run(self.clock_prog_fd, bytes(64))
            bpfsys.map_lookup(self.clock_fd, ctypes.c_uint32(0), out)
            if out["jiffies"][0] == out["jiffies_after"][0]:
                break
        return ClockReading(int(out["jiffies"][0]), int(out["coarse_ns"][0]))

    def flip(self) -> ClockReading:
        """Make the other page active; return once no program still writes the old one, with the clock then.

        The reading closes the old page's interval and opens the new one's (merge.TimeBase).
        """
        with self._ctl_lock:
            self._gen = (self._gen + 1) & 0xFFFFFFFF or 2  # gen 0 marks never-written refs: skip it on wrap
            self._write_control()
            self._fence()
        return self.read_clock()

    def slot_count(self, page: int) -> int:
        """Slots taken in `page` (idle: no program writes it)."""
        out = np.zeros(1, dtype=SLOT_ALLOC)
        bpfsys.map_lookup(self.slot_alloc_fd, ctypes.c_uint32(page), out)
        return min(int(out["next"][0]), self.max_entries)

    def read_slots(self, page: int, count: int, window: int = SLOT_WINDOW) -> Iterator[npt.NDArray[np.void]]:
        """Slots 0..count-1 of idle `page` (FLOW_SLOT), `window` at a time, read in place through a mapping.

        Each array is a view of a mapping of the slot array: use it before asking for the next one
        (the mapping goes with its last reference, so the process never holds more than a window).
        """
        if page == self.active:
            raise ValueError("refusing to read the active page: flip first")
        size = FLOW_SLOT.itemsize
        for first in range(0, count, window):
            n = min(window, count - first)
            start = (page * self.max_entries + first) * size
            offset = start - start % mmap.ALLOCATIONGRANULARITY
            mm = mmap.mmap(self.slots_fd, start + n * size - offset, mmap.MAP_SHARED, mmap.PROT_READ,
                           offset=offset)
            yield np.frombuffer(mm, dtype=FLOW_SLOT, count=n, offset=start - offset)
            del mm

    def reset_slots(self, page: int) -> None:
        """Free every slot of idle `page` for its next turn (programs start again at slot 0)."""
        bpfsys.map_update(self.slot_alloc_fd, ctypes.c_uint32(page), np.zeros(1, dtype=SLOT_ALLOC))

    # -- filters and sampling --------------------------------------------

    def configure(self, tables: filters.Tables | None = None, sampling: int = 1) -> None:
        """Put `tables` (compiled filter rules) and 1-in-`sampling` sampling in force.

        The rule set not in use is rewritten, the control slot switched to it,
        and after the fence (no program still judges packets by the old set)
        the old set's per-rule counters are folded into the totals. Attached
        interfaces, flow pages and their counters are untouched.
        """
        tables = tables or filters.Tables()
        if not 1 <= sampling <= 0xFFFFFFFF:
            raise LoaderError(f"sampling must be 1..4294967295, got {sampling}")
        with self._ctl_lock:
            old, nxt = self._set, self._set ^ 1
            self._write_set(nxt, tables, sampling)
            self._set = nxt
            self._config = 1 + nxt if (tables.flags & filters.FILTER or sampling > 1) else 0
            self._write_control()
            self._fence()
            self._retire_counters(old)
        log.debug("selection configured", rules=len(tables.rules), match_slots=len(tables.slot_rule),
                  flags=hex(tables.flags), sampling=sampling, rule_set=nxt)

    def _write_set(self, index: int, tables: filters.Tables, sampling: int) -> None:
        """Fill rule set `index` (not in use: no program reads it) with `tables`."""
        rs = self._sets[index]
        fds = self._fds
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

    def _set_counters(self, index: int) -> npt.NDArray[np.void]:
        """(counter slots, cpus) RULE_COUNTER of rule set `index`."""
        out = np.zeros((filters.COUNTER_SLOTS, self.cpus), dtype=RULE_COUNTER)
        base = index * filters.COUNTER_SLOTS
        for slot in range(filters.COUNTER_SLOTS):
            bpfsys.map_lookup(self._fds["rule_hits"], ctypes.c_uint32(base + slot), out[slot])
        return out

    def _set_counts(self, index: int) -> dict[tuple[str, str], tuple[int, int]]:
        """Rule set `index`'s counters by (rule text, action), summed over CPUs and a rule's slots."""
        rs = self._sets[index]
        tables = rs.tables
        if not tables.rules:
            return {}
        per_slot = self._set_counters(index)
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

    def _retire_counters(self, index: int) -> None:
        """Fold rule set `index`'s counters (no program uses it any more) into the totals; zero them."""
        for key, (p, o) in self._set_counts(index).items():
            p0, o0 = self._rule_totals.get(key, (0, 0))
            self._rule_totals[key] = (p0 + p, o0 + o)
        zero = np.zeros(self.cpus, dtype=RULE_COUNTER)
        base = index * filters.COUNTER_SLOTS
        for slot in range(filters.COUNTER_SLOTS):
            bpfsys.map_update(self._fds["rule_hits"], ctypes.c_uint32(base + slot), zero)

    def rule_counters(self) -> list[RuleCount]:
        """Per-rule packets and octets since load for the rules in force, in rule order, then "(no match)".

        A rule keeps its totals across reloads as long as its text and action
        stay the same.
        """
        with self._ctl_lock:
            live = self._set_counts(self._set) if self._config else {}
        out = []
        for (rule, action), (p, o) in live.items():
            p0, o0 = self._rule_totals.get((rule, action), (0, 0))
            out.append(RuleCount(rule, action, p + p0, o + o0))
        return out

    def _page_stats(self, page: int) -> np.ndarray:
        per_cpu = np.zeros(self.cpus, dtype=FLOW_STATS)
        bpfsys.map_lookup(self.stats_fd, ctypes.c_uint32(page), per_cpu)
        return per_cpu

    def take_page_stats(self, page: int) -> dict[str, int]:
        """Counters of an idle page since it was last taken, summed over CPUs; resets them.

        Only for a page no program writes (after flip() made the other one active):
        the read and the reset then see no concurrent increment.
        """
        per_cpu = self._page_stats(page)
        bpfsys.map_update(self.stats_fd, ctypes.c_uint32(page), np.zeros(self.cpus, dtype=FLOW_STATS))
        taken = {name: int(per_cpu[name].sum()) for name in FLOW_STATS.names or ()}
        for k, v in taken.items():
            self._retired[k] = self._retired.get(k, 0) + v
        return taken

    def read_stats(self) -> dict[str, int]:
        """Cumulative counters (struct flow_stats) since load, summed over CPUs and pages."""
        total = dict(self._retired)
        for page in (0, 1):
            per_cpu = self._page_stats(page)
            for name in FLOW_STATS.names or ():
                total[name] = total.get(name, 0) + int(per_cpu[name].sum())
        return total

    # -- attach / detach -------------------------------------------------

    def attach(self, ifname: str, mode: str = "auto") -> Attachment:
        if mode not in ("auto", "native", "generic"):
            raise LoaderError(f"unknown XDP mode {mode!r}: use auto, native or generic")
        ifindex = _ifindex(ifname)
        with netlink() as ipr:
            current = attached_mode(ipr, ifindex)
            if current is not None:
                raise LoaderError(f"{ifname} already has an XDP program attached ({current} mode); "
                                  "xdpflow will not replace a program it did not attach")
            tries = ["native", "generic"] if mode == "auto" else [mode]
            last: OSError | None = None
            for m in tries:
                try:
                    link_fd = bpfsys.xdp_link_create(self.prog_fd, ifindex, MODE_FLAGS[m])
                except OSError as e:
                    last = e
                    continue
                got = attached_mode(ipr, ifindex) or m
                att = Attachment(ifname, ifindex, got, link_fd)
                self.attachments.append(att)
                log.debug("attached", interface=ifname, ifindex=ifindex, mode=got)
                return att
        assert last is not None
        if last.errno == errno.EPERM:
            raise LoaderError("attaching XDP needs root or CAP_NET_ADMIN + CAP_BPF")
        if last.errno in (errno.EBUSY, errno.EEXIST):
            raise LoaderError(f"{ifname} already has an XDP program attached; "
                              "xdpflow will not replace a program it did not attach")
        raise LoaderError(f"could not attach to {ifname} in {mode} mode: {os.strerror(last.errno or 0)}")

    def detach(self, att: Attachment) -> None:
        try:
            os.close(att.link_fd)
        except OSError as e:
            log.debug("detach skipped", interface=att.ifname, reason=str(e))
        if att in self.attachments:
            self.attachments.remove(att)

    def detach_all(self) -> None:
        for att in list(self.attachments):
            self.detach(att)
        for eg in list(self.egress_attachments):
            self.detach_egress(eg)

    # -- egress (TC) -----------------------------------------------------

    def load_egress(self) -> int:
        """The TC egress program's fd (same maps as the XDP program; load() loaded it)."""
        if self.egress_prog_fd >= 0:
            return self.egress_prog_fd
        if not self._owned:
            raise LoaderError("load() the datapath before its egress program")
        raise LoaderError(self._egress_error or f"the egress program {EGRESS_PROG} is not loaded")

    def attach_egress(self, ifname: str, method: str = "auto") -> EgressAttachment:
        """Meter what `ifname` sends (direction 1, ifindex = `ifname`'s) with the TC program.

        method "tcx": a TCX bpf_link (kernel >= 6.6); "tc": a clsact qdisc and
        cls_bpf filter; "auto": TCX where the kernel has it, else tc. Other
        programs at the hook keep running: the program is appended and always
        returns TC_ACT_UNSPEC (no verdict of its own).
        """
        if method not in EGRESS_METHODS:
            raise LoaderError(f"unknown egress method {method!r}: use auto, tcx or tc")
        ifindex = _ifindex(ifname)
        if any(e.ifindex == ifindex for e in self.egress_attachments):
            raise LoaderError(f"{ifname} egress is already metered by this process")
        kind = _link_type(ifindex)
        if kind not in (ARPHRD_ETHER, ARPHRD_LOOPBACK):
            raise LoaderError(f"{ifname} is not an Ethernet interface (link type {kind}): "
                              "egress metering parses Ethernet frames")
        prog_fd = self.load_egress()
        att: EgressAttachment | None = None
        if method in ("auto", "tcx"):
            try:
                att = EgressAttachment(ifname, ifindex, "tcx",
                                       link_fd=bpfsys.tcx_link_create(prog_fd, ifindex, bpfsys.BPF_TCX_EGRESS))
            except OSError as e:
                if e.errno == errno.EPERM:
                    raise LoaderError("attaching at egress needs root or CAP_NET_ADMIN + CAP_BPF") from None
                # EINVAL: a kernel before TCX (6.6) does not know the attach type.
                if method == "tcx" or e.errno != errno.EINVAL:
                    raise LoaderError(f"could not attach to {ifname} egress with TCX: "
                                      f"{os.strerror(e.errno or 0)}") from None
                log.debug("no TCX in this kernel, using clsact + cls_bpf", interface=ifname)
        if att is None:
            att = self._attach_egress_tc(ifname, ifindex, prog_fd)
            att.netns_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        self.egress_attachments.append(att)
        log.debug("attached at egress", interface=ifname, ifindex=ifindex, method=att.method)
        return att

    def _attach_egress_tc(self, ifname: str, ifindex: int, prog_fd: int) -> EgressAttachment:
        from pyroute2.netlink.exceptions import NetlinkError

        with netlink() as ipr:
            added = False
            try:
                ipr.tc("add", "clsact", index=ifindex)
                added = True
            except NetlinkError as e:
                if e.code != errno.EEXIST:
                    raise LoaderError(f"could not add a clsact qdisc to {ifname}: {os.strerror(e.code)}") from None
            if not added and _tc_egress_filter(ipr, ifindex):
                raise LoaderError(
                    f"{ifname} egress already has a filter at pref {EGRESS_TC_PREF} (a previous xdpflow that did "
                    f"not exit cleanly?): remove it with `tc filter del dev {ifname} egress pref {EGRESS_TC_PREF}`")
            try:
                ipr.tc("add-filter", "bpf", index=ifindex, handle=EGRESS_TC_HANDLE, fd=prog_fd, name=EGRESS_PROG,
                       parent=TC_H_CLSACT_EGRESS, prio=EGRESS_TC_PREF, direct_action=True)
            except NetlinkError as e:
                if added:
                    _del_clsact(ipr, ifindex)
                raise LoaderError(f"could not add the egress filter to {ifname}: {os.strerror(e.code)}") from None
        return EgressAttachment(ifname, ifindex, "tc", added_qdisc=added)

    def detach_egress(self, att: EgressAttachment) -> None:
        if att.method == "tcx":
            try:
                os.close(att.link_fd)
            except OSError as e:
                log.debug("egress detach skipped", interface=att.ifname, reason=str(e))
        else:
            try:
                with thread_in_netns(att.netns_fd):
                    _detach_egress_tc(att)
            finally:
                if att.netns_fd >= 0:
                    os.close(att.netns_fd)
                    att.netns_fd = -1
        if att in self.egress_attachments:
            self.egress_attachments.remove(att)

    def close(self) -> None:
        """Detach everywhere, then close every descriptor load() received: the kernel frees programs and maps."""
        self.detach_all()
        self._close_fds()

    def _close_fds(self) -> None:
        for fd in self._owned:
            try:
                os.close(fd)
            except OSError as e:
                log.debug("descriptor already closed", fd=fd, reason=str(e))
        self._owned = []
        self._fds = {}
        self.prog_fd = self.egress_prog_fd = self.clock_prog_fd = self.control_fd = self.stats_fd = -1
        self.flows_fd = self.slots_fd = self.slot_alloc_fd = self.fence_fd = self.clock_fd = -1

    def __enter__(self) -> Datapath:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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


@contextmanager
def netlink() -> Iterator[Any]:
    """An rtnetlink socket (pyroute2 IPRoute) of this network namespace, closed afterwards."""
    from pyroute2 import IPRoute

    ipr = IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


def _ifindex(ifname: str) -> int:
    try:
        return socket.if_nametoindex(ifname)
    except OSError:
        raise LoaderError(f"no interface named {ifname}") from None


def _link_type(ifindex: int) -> int:
    """ARPHRD_* type of an interface of this network namespace (1: Ethernet), over netlink."""
    with netlink() as ipr:
        links = ipr.link("get", index=ifindex)
    return int(links[0]["ifi_type"]) if links else ARPHRD_ETHER


def _tc_egress_filter(ipr: Any, ifindex: int) -> bool:
    """Whether the clsact egress hook of `ifindex` has a filter at EGRESS_TC_PREF."""
    for msg in ipr.get_filters(index=ifindex, parent=TC_H_CLSACT_EGRESS):
        if (msg["info"] >> 16) == EGRESS_TC_PREF:
            return True
    return False


def _del_clsact(ipr: Any, ifindex: int) -> None:
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        ipr.tc("del", "clsact", index=ifindex)
    except NetlinkError as e:
        log.debug("clsact qdisc not removed", ifindex=ifindex, reason=os.strerror(e.code))


_CLONE_NEWNET = 0x40000000


def setns(fd: int) -> None:
    """Move the calling thread into the network namespace of `fd` (an open nsfs file)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, _CLONE_NEWNET) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"setns: {os.strerror(e)}")


@contextmanager
def thread_in_netns(fd: int) -> Iterator[None]:
    """The calling thread in the network namespace of `fd` (an open nsfs file) for the body; -1: stay."""
    if fd < 0 or os.fstat(fd).st_ino == os.stat("/proc/thread-self/ns/net").st_ino:
        yield
        return
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        setns(fd)
        try:
            yield
        finally:
            setns(home)
    finally:
        os.close(home)


def _detach_egress_tc(att: EgressAttachment) -> None:
    """Delete the cls_bpf filter; and the clsact qdisc when xdpflow added it and it holds nothing else."""
    from pyroute2.netlink.exceptions import NetlinkError

    with netlink() as ipr:
        try:
            ipr.tc("del-filter", "bpf", index=att.ifindex, handle=EGRESS_TC_HANDLE, parent=TC_H_CLSACT_EGRESS,
                   prio=EGRESS_TC_PREF)
        except NetlinkError as e:  # ENODEV: the interface is gone, and its qdisc with it
            log.debug("egress filter not removed", interface=att.ifname, reason=os.strerror(e.code))
            return
        if att.added_qdisc:
            others = [m for parent in (TC_H_CLSACT_EGRESS, TC_H_CLSACT_INGRESS)
                      for m in ipr.get_filters(index=att.ifindex, parent=parent)]
            if not others:
                _del_clsact(ipr, att.ifindex)


def attached_mode(ipr: Any, ifindex: int) -> str | None:
    """The mode of the XDP program attached to `ifindex` ("native", "generic", ...), None if none."""
    links = ipr.link("get", index=ifindex)
    xdp = links[0].get_attr("IFLA_XDP") if links else None
    if xdp is None:
        return None
    attached = xdp.get_attr("IFLA_XDP_ATTACHED")
    name = ATTACHED_NAMES.get(attached, str(attached)) if attached else ""
    return name or None
