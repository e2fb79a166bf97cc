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

Measured on the 2-vCPU test machine (kernel 6.18): the flip syscall takes the
length of one grace period, see `flip()`'s return value and the benchmark
(tools/); no extra sleep is needed because the kernel itself waits.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from exporter.layout import FLOW_KEY, FLOW_VALUE
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
class Pages:
    datapath: Datapath
    active: int = 0
    _keys: npt.NDArray[np.void] = field(init=False)
    _values: npt.NDArray[np.void] = field(init=False)

    def __post_init__(self) -> None:
        n, cpus = self.datapath.max_entries, self.datapath.cpus
        self._keys = np.zeros(n, dtype=FLOW_KEY)
        self._values = np.zeros((n, cpus), dtype=FLOW_VALUE)

    def flip(self) -> float:
        """Make the other page active; return how long the kernel's wait took."""
        t0 = time.perf_counter()
        self.active ^= 1
        self.datapath.set_active(self.active)
        return time.perf_counter() - t0

    def drain(self, page: int) -> tuple[npt.NDArray[np.void], npt.NDArray[np.void]]:
        """Read and delete every entry of `page` (which must not be active). Copies out."""
        if page == self.active:
            raise ValueError("refusing to drain the active page: flip first")
        fd = self.datapath.page_fds[page]
        n = bpfsys.map_batch(fd, self._keys, self._values, len(self._keys), delete=True)
        return self._keys[:n].copy(), self._values[:n].copy()

    def flip_and_drain(self) -> Drained:
        wait = self.flip()
        idle = self.active ^ 1
        keys, values = self.drain(idle)
        return Drained(keys, values, idle, wait, self.datapath.take_page_stats(idle))

    def drain_all(self) -> list[Drained]:
        """Shutdown: drain the page just written, then the other (both idle after two flips)."""
        return [self.flip_and_drain(), self.flip_and_drain()]
