"""Flip the active flow page and drain the idle one, exactly.

The kernel program writes into whichever page the active-page index names,
and counts into that page's slot of the stats map. `Pages.flip()` switches
the index and returns after an RCU grace period (see Datapath.set_active), by
which time every program that used the old page has finished (XDP runs in
softirq under RCU). The old page then has no writer: `drain()` reads and
deletes it with BPF_MAP_LOOKUP_AND_DELETE_BATCH into preallocated buffers
viewed as numpy structured arrays, each entry exactly once, and the page's
counters cover exactly the same packets, so per scan
observed = drained + lost holds exactly.

The buffers hold one chunk (64K entries), not the page: the kernel resumes a
batch walk from a bucket token, so a page is read chunk by chunk and
`flip_and_merge()` folds each chunk's per-CPU values (merge.py) before
reading the next. Memory then stays O(chunk x CPUs) for the raw values and
O(flows) only for merged records (87 bytes each), where whole-page buffers
would need max_entries x CPUs x 40 bytes (2.5 GB for 1M entries on 64 CPUs).

Measured on the 2-vCPU test machine (kernel 6.18): the flip syscall takes the
length of one grace period, see `flip()`'s return value and the benchmark
(tools/); no extra sleep is needed because the kernel itself waits.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from exporter.layout import FLOW_KEY, FLOW_VALUE
from exporter.merge import merge
from exporter.records import FLOW_RECORD, Records
from xdp import bpfsys
from xdp.loader import Datapath


@dataclass
class Drained:
    keys: npt.NDArray[np.void]      # (n,) FLOW_KEY
    values: npt.NDArray[np.void]    # (n, cpus) FLOW_VALUE
    page: int
    flip_seconds: float
    stats: dict[str, int]           # the page's kernel counters for the same interval


@dataclass
class Merged:
    """A drained page as merged flow records (one per entry that held packets)."""

    records: Records                # (flows,) FLOW_RECORD
    entries: int                    # map entries read
    page: int
    flip_seconds: float
    stats: dict[str, int]           # the page's kernel counters for the same interval


CHUNK = 65_536


@dataclass
class Pages:
    datapath: Datapath
    active: int = 0
    chunk: int = CHUNK
    first_flags: bool = True  # merge each flow's first-packet TCP flags (only biflows need them)
    _keys: npt.NDArray[np.void] = field(init=False)
    _values: npt.NDArray[np.void] = field(init=False)

    def __post_init__(self) -> None:
        n, cpus = min(self.datapath.max_entries, self.chunk), self.datapath.cpus
        self._keys = np.zeros(n, dtype=FLOW_KEY)
        self._values = np.zeros((n, cpus), dtype=FLOW_VALUE)

    def flip(self) -> float:
        """Make the other page active; return how long the kernel's wait took."""
        t0 = time.perf_counter()
        self.active ^= 1
        self.datapath.set_active(self.active)
        return time.perf_counter() - t0

    def chunks(self, page: int) -> Iterator[tuple[npt.NDArray[np.void], npt.NDArray[np.void]]]:
        """Read and delete every entry of `page` (which must not be active), a chunk at a time.

        Each chunk is a view of the shared buffers: use it before asking for the next.
        """
        if page == self.active:
            raise ValueError("refusing to drain the active page: flip first")
        fd = self.datapath.page_fds[page]
        for n in bpfsys.map_batch_chunks(fd, self._keys, self._values, delete=True):
            yield self._keys[:n], self._values[:n]

    def drain(self, page: int) -> tuple[npt.NDArray[np.void], npt.NDArray[np.void]]:
        """Every entry of `page` as (keys, per-CPU values) copies (tests and `xdpflow dump`)."""
        parts = [(k.copy(), v.copy()) for k, v in self.chunks(page)]
        if not parts:
            return self._keys[:0].copy(), self._values[:0].copy()
        return np.concatenate([k for k, _ in parts]), np.concatenate([v for _, v in parts])

    def flip_and_merge(self, offset_ns: int) -> Merged:
        """Flip, then drain the idle page chunk by chunk into merged records."""
        wait = self.flip()
        idle = self.active ^ 1
        parts: list[Records] = []
        entries = 0
        for keys, values in self.chunks(idle):
            entries += len(keys)
            parts.append(merge(keys, values, offset_ns, self.first_flags))
        records = np.concatenate(parts) if parts else np.zeros(0, dtype=FLOW_RECORD)
        return Merged(records, entries, idle, wait, self.datapath.take_page_stats(idle))

    def merge_all(self, offset_ns: int) -> list[Merged]:
        """Shutdown: drain the page just written, then the other (both idle after two flips)."""
        return [self.flip_and_merge(offset_ns), self.flip_and_merge(offset_ns)]

    def flip_and_drain(self) -> Drained:
        wait = self.flip()
        idle = self.active ^ 1
        keys, values = self.drain(idle)
        return Drained(keys, values, idle, wait, self.datapath.take_page_stats(idle))
