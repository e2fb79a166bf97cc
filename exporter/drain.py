"""Flip the active page and read the idle one, exactly, where it lies.

The kernel programs count every packet into a slot of the active page and into that page's slot
of the stats map (xdp/flow.c). `Pages.flip()` makes the other page active and returns after an
RCU grace period (Datapath.flip), by which time every program that used the old page has
finished (XDP runs in softirq under RCU). The old page then has no writer: its slot count, its
slots and its counters cover exactly the same packets, so per scan observed = drained + lost
holds exactly. The flip also reads the clock (jiffies and the coarse monotonic clock together),
which closes the old page's interval and opens the new one's: the page's `TimeBase`.

Reading a page costs no syscall per flow: `Drained.windows()` yields the page's slots as numpy
views of mappings of the kernel's slot array, a window (16K slots, 1.4 MiB) at a time, so the
process never maps more than a window of it; the consumer (the compiled flow table, or
merge.to_records for the numpy path) reads each before the next. `release()` then frees the
page's slots for its next turn, before the flip that makes it active again.

Measured on the 2-vCPU test machine (kernel 6.18): the flip syscall takes the length of one
grace period (see the benchmark, tools/); no extra sleep is needed because the kernel itself
waits.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from exporter.merge import TimeBase, merge, to_records
from exporter.records import FLOW_RECORD, Records
from xdp.layout import EXTENSIONS, FLOW_SLOT
from xdp.loader import SLOT_WINDOW, ClockReading, Datapath


@dataclass
class Drained:
    """A page just made idle: its slots (read them with windows()), counters and time base."""

    datapath: Datapath
    page: int
    slots: int                      # slots the programs took in the interval
    flip_seconds: float
    stats: dict[str, int]           # the page's kernel counters for the same interval
    timebase: TimeBase
    window: int = SLOT_WINDOW

    def windows(self) -> Iterator[npt.NDArray[np.void]]:
        """The page's slots (FLOW_SLOT), a window at a time: use each before asking for the next."""
        return self.datapath.read_slots(self.page, self.slots, self.window)

    def ext_windows(self, feature: str) -> Iterator[npt.NDArray[np.void]]:
        """The page's entries of extension `feature` (xdp.layout.EXTENSIONS), in the windows of
        windows(): entry i belongs to slot i."""
        return self.datapath.read_ext(feature, self.page, self.slots, self.window)

    def records(self, offset_ns: int) -> Records:
        """Every slot as a FLOW_RECORD (times in epoch ms), unmerged: one per slot."""
        parts = [to_records(w, self.timebase, offset_ns) for w in self.windows()]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=FLOW_RECORD)

    def release(self) -> None:
        """The page's slots are read: free them for the page's next turn."""
        self.datapath.reset_slots(self.page)


@dataclass
class Merged:
    """A drained page as merged flow records (one per flow that held packets)."""

    records: Records                # (flows,) FLOW_RECORD
    entries: int                    # slots read
    page: int
    flip_seconds: float
    stats: dict[str, int]           # the page's kernel counters for the same interval
    slots: npt.NDArray[np.void] | None = None   # (entries,) FLOW_SLOT, the page's slots, when asked for
    timebase: TimeBase | None = None
    exts: dict[str, npt.NDArray[np.void]] = field(default_factory=dict)  # feature -> (entries,) its entries, with slots


@dataclass
class Pages:
    datapath: Datapath
    window: int = SLOT_WINDOW
    _opened: dict[int, ClockReading] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._opened[self.datapath.active] = self.datapath.read_clock()

    @property
    def active(self) -> int:
        return self.datapath.active

    def flip(self) -> Drained:
        """Make the other page active; the one that was active, ready to read."""
        t0 = time.perf_counter()
        idle = self.datapath.active
        now = self.datapath.flip()
        seconds = time.perf_counter() - t0
        opened = self._opened.get(idle, now)
        self._opened[self.datapath.active] = now
        base = TimeBase(opened.jiffies, opened.coarse_ns, now.jiffies, now.coarse_ns)
        return Drained(self.datapath, idle, self.datapath.slot_count(idle), seconds,
                       self.datapath.take_page_stats(idle), base, self.window)

    def flip_and_merge(self, offset_ns: int, keep_slots: bool = False) -> Merged:
        """Flip, then read the idle page into merged records (the numpy path: biflows, dump, tests);
        `keep_slots`: a copy of the page's raw slots too (tests look at them)."""
        d = self.flip()
        try:
            slots = None
            exts = {}
            if keep_slots:
                parts = [w.copy() for w in d.windows()]
                slots = np.concatenate(parts) if parts else np.zeros(0, dtype=FLOW_SLOT)
                for f in d.datapath.features:
                    got = [w.copy() for w in d.ext_windows(f)]
                    exts[f] = np.concatenate(got) if got else np.zeros(0, dtype=EXTENSIONS[f])
                records = merge(to_records(slots, d.timebase, offset_ns))
            else:
                records = merge(d.records(offset_ns))
        finally:
            d.release()
        return Merged(records, d.slots, d.page, d.flip_seconds, d.stats, slots, d.timebase, exts)

    def merge_all(self, offset_ns: int) -> list[Merged]:
        """Shutdown: read the page just written, then the other (both idle after two flips)."""
        return [self.flip_and_merge(offset_ns), self.flip_and_merge(offset_ns)]
