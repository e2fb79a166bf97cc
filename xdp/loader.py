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
`configure()` installs filter rules and the sampling rate as map contents (the rule set not
in use is written by xdp.rules, then the control slot switched to it after a fence; never a
recompile). `attach()` and `attach_egress()` bind the programs to interfaces through xdp.attach
(XDP and TCX bpf_links, which the kernel closes when the process dies, SIGKILL included, or a
clsact filter where the kernel has no TCX) and keep the attachments, so `close()` detaches
everywhere before it closes the descriptors. Use Datapath as a context manager so every exit
path detaches.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import structlog

from xdp import bpfsys, filters
from xdp import compile as xcompile
from xdp.attach import Attachment, EgressAttachment, attach_egress, attach_xdp, detach_egress, detach_xdp
from xdp.compile import CLOCK_PROG, EGRESS_PROG, XDP_PROG
from xdp.errors import LoaderError
from xdp.layout import (
    CLOCK,
    CONTROL,
    EXTENSIONS,
    FLOW_CACHE_ENTRY,
    FLOW_KEY,
    FLOW_REF,
    FLOW_SLOT,
    FLOW_STATS,
    SLOT_ALLOC,
)
from xdp.rules import RuleCount, RuleSet, RuleSets
from xdp.sizing import DEFAULT_MAX_ENTRIES, DEFAULT_MEMORY_BUDGET, human_bytes

log = structlog.get_logger("xdpflow.loader")

PAGES = 2
# Filter tables are preallocated arrays (two rule sets each): ports dominate, about 2 MiB.
FILTER_TABLE_BYTES = 2 * 8 * (2 * filters.PORT_SLOTS + filters.VLAN_SLOTS + filters.PROTO_SLOTS
                              + filters.IFINDEX_SLOTS)


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


def map_memory_bytes(max_entries: int, cpus: int | None = None, features: Sequence[str] = ()) -> int:
    """Kernel memory of the flow maps: the LRU flow map (key, element overhead, one flow_ref per
    possible CPU), two pages of max_entries slots, the per-CPU cache, and two pages of entries for
    each extension compiled in. What the kernel really charges, give or take the allocators' rounding."""
    cpus = possible_cpus() if cpus is None else cpus
    lru = max_entries * (FLOW_KEY.itemsize + HTAB_ELEM_OVERHEAD + 8 + cpus * FLOW_REF.itemsize)
    slots = PAGES * max_entries * FLOW_SLOT.itemsize
    cache = cpus * (1 << CACHE_BITS) * FLOW_CACHE_ENTRY.itemsize
    ext = sum(PAGES * max_entries * EXTENSIONS[f].itemsize for f in set(features))
    return lru + slots + cache + ext


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
    _owned: list[int] = field(default_factory=list)  # every descriptor load() received: close() closes them
    _egress_error: str = ""         # why the egress program did not load, said when it is asked for
    _gen: int = 1                   # control.gen: flips + 1; the active page is gen & 1
    _set: int = 0                   # rule set index the control slot names (when _config is on)
    _config: int = 0                # control.config: 0 (nothing to select) or 1 + _set
    rules: RuleSets = field(init=False)  # the rule sets' tables (load() gives it their maps)
    _ctl_lock: threading.Lock = field(default_factory=threading.Lock)
    load_seconds: float = 0.0       # compile + load in the child process
    features: tuple[str, ...] = ()  # extensions compiled in (xdp/compile.py FEATURES), sorted
    ext_fds: dict[str, int] = field(default_factory=dict)  # feature -> its per-slot array

    def __post_init__(self) -> None:
        self.rules = RuleSets({}, self.cpus)
        xcompile.feature_flags(self.features)   # an unknown name fails here, before any compile
        self.features = tuple(sorted(set(self.features)))

    @property
    def memory_bytes(self) -> int:
        return map_memory_bytes(self.max_entries, self.cpus, self.features)

    @property
    def active_set(self) -> RuleSet:
        return self.rules.sets[self._set]

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
            got = xcompile.load(self.max_entries, features=self.features)
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
            self.ext_fds = {f: fds[xcompile.FEATURES[f][1]] for f in self.features}
            self.rules.fds = {name: fds[name] for name in ("rule_sets", "src_prefixes", "dst_prefixes", "proto_masks",
                                                      "sport_masks", "dport_masks", "vlan_masks", "iface_masks",
                                                      "iface_masks_high", "rule_hits")}
            bpfsys.map_update(self.fence_fd, ctypes.c_uint32(0), ctypes.c_uint32(self.clock_fd))
            with self._ctl_lock:
                self._write_control()
        except BaseException:
            self._close_fds()
            raise
        log.info("program loaded", seconds=round(self.load_seconds, 2), headers=got.headers,
                 extensions=",".join(self.features) or "none",
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
        return self._windows(self.slots_fd, FLOW_SLOT, page, count, window)

    def read_ext(self, feature: str, page: int, count: int,
                 window: int = SLOT_WINDOW) -> Iterator[npt.NDArray[np.void]]:
        """The entries of extension `feature` for slots 0..count-1 of idle `page`, in the same windows
        as read_slots() (entry i belongs to slot i)."""
        return self._windows(self.ext_fds[feature], EXTENSIONS[feature], page, count, window)

    def _windows(self, fd: int, dtype: np.dtype[np.void], page: int, count: int,
                 window: int) -> Iterator[npt.NDArray[np.void]]:
        if page == self.active:
            raise ValueError("refusing to read the active page: flip first")
        size = dtype.itemsize
        for first in range(0, count, window):
            n = min(window, count - first)
            start = (page * self.max_entries + first) * size
            offset = start - start % mmap.ALLOCATIONGRANULARITY
            mm = mmap.mmap(fd, start + n * size - offset, mmap.MAP_SHARED, mmap.PROT_READ, offset=offset)
            yield np.frombuffer(mm, dtype=dtype, count=n, offset=start - offset)
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
            self.rules.write(nxt, tables, sampling)
            self._set = nxt
            self._config = 1 + nxt if (tables.flags & filters.FILTER or sampling > 1) else 0
            self._write_control()
            self._fence()
            self.rules.retire(old)
        log.debug("selection configured", rules=len(tables.rules), match_slots=len(tables.slot_rule),
                  flags=hex(tables.flags), sampling=sampling, rule_set=nxt)

    def rule_counters(self) -> list[RuleCount]:
        """Per-rule packets and octets since load for the rules in force, in rule order, then "(no match)"."""
        with self._ctl_lock:
            return self.rules.counters(self._set if self._config else None)

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
        """Attach the XDP program to `ifname` (xdp.attach.attach_xdp); close() detaches it."""
        att = attach_xdp(self.prog_fd, ifname, mode)
        self.attachments.append(att)
        return att

    def detach(self, att: Attachment) -> None:
        detach_xdp(att)
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
        """Meter what `ifname` sends with the TC program (xdp.attach.attach_egress); close() detaches it."""
        att = attach_egress(self.load_egress, ifname, method, {e.ifindex for e in self.egress_attachments})
        self.egress_attachments.append(att)
        return att

    def detach_egress(self, att: EgressAttachment) -> None:
        detach_egress(att)
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
        self.rules.fds = {}
        self.prog_fd = self.egress_prog_fd = self.clock_prog_fd = self.control_fd = self.stats_fd = -1
        self.flows_fd = self.slots_fd = self.slot_alloc_fd = self.fence_fd = self.clock_fd = -1
        self.ext_fds = {}

    def __enter__(self) -> Datapath:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
