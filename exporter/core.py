"""The compiled core (exporter/_core.c) behind typed Python: the flow table of the hot path.

`CoreTable` has FlowTable's interface (update, expire_all, flows, len, timeouts) and folds a
drained page's slots straight from the kernel's mapping (`fold_page`), so a scan costs no
numpy pass and no copy per record. FlowTable (exporter/flowtable.py) stays the reference:
tests/unit/test_core.py holds the two equal, record for record.

`available()` says whether the extension was built (`pip install .` builds it; setup.py). Where
it was not, the service falls back to the numpy path and says so.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from exporter.flowtable import timeout_ms
from exporter.records import END_FORCED, FLOW_RECORD, Records

if TYPE_CHECKING:
    from exporter.drain import Drained

_core: Any
try:
    from exporter import _core
except ImportError as e:  # not built: the service uses the numpy path
    _core = None
    IMPORT_ERROR = str(e)
else:
    IMPORT_ERROR = ""


def available() -> bool:
    return _core is not None


def module() -> Any:
    if _core is None:
        raise RuntimeError(f"the compiled core is not built ({IMPORT_ERROR}): `pip install .` builds it")
    return _core


CHUNK = 16_384   # flows handed out at a time by the streamed expiry (1.4 MiB of FLOW_RECORDs, ~1.5 MB of datagrams)


def _records(buf: Any) -> Records:
    """FLOW_RECORDs in a Block the table handed out, read in place (writable, like any array)."""
    return np.frombuffer(buf, dtype=FLOW_RECORD)


class CoreTable:
    """Flows held between scans, in C; see exporter/_core.c for the theory of operation."""

    def __init__(self, active_timeout_s: float = 60, idle_timeout_s: float = 15, capacity: int | None = None) -> None:
        if capacity is not None and (isinstance(capacity, bool) or capacity <= 0):
            raise ValueError(f"capacity must be a positive integer or None, got {capacity!r}")
        self.capacity = capacity
        self._t = module().Table(timeout_ms("active_timeout_s", active_timeout_s),
                                 timeout_ms("idle_timeout_s", idle_timeout_s), capacity or 0)

    @property
    def active_ms(self) -> int:
        return int(self._t.active_ms)

    @active_ms.setter
    def active_ms(self, ms: int) -> None:
        self._t.active_ms = ms

    @property
    def idle_ms(self) -> int:
        return int(self._t.idle_ms)

    @idle_ms.setter
    def idle_ms(self, ms: int) -> None:
        self._t.idle_ms = ms

    def __len__(self) -> int:
        return len(self._t)

    def packets_held(self) -> int:
        return int(self._t.totals()[0])

    def octets_held(self) -> int:
        return int(self._t.totals()[1])

    def flows(self) -> Records:
        """A copy of the live flows, in table (insertion) order."""
        return _records(self._t.flows())

    def fold_page(self, drained: Drained, offset_ns: int) -> tuple[int, int, int]:
        """Fold every slot of a drained page in; (slots folded, packets, octets) they held."""
        base = drained.timebase
        folded = packets = octets = 0
        for window in drained.windows():
            n, p, o = self._t.fold_slots(window, base.start_jiffies, base.start_ns, base.slope, offset_ns)
            folded, packets, octets = folded + n, packets + p, octets + o
        return folded, packets, octets

    def fold(self, records: Records) -> None:
        if records.dtype != FLOW_RECORD or records.ndim != 1:
            raise TypeError(f"fold() wants a 1-d FLOW_RECORD array, got {records.dtype} with shape {records.shape}")
        self._t.fold_records(np.ascontiguousarray(records))

    def expire(self, now_ms: int) -> Records:
        return _records(self._t.expire(int(now_ms)))

    def expire_chunks(self, now_ms: int, chunk: int = CHUNK) -> Iterator[Records]:
        """The flows that end at `now_ms`, `chunk` at a time, all in one buffer: use each array before
        asking for the next (it is overwritten). Flows leave the table once handed out; if the
        iteration stops early, those not handed out stay (and end next time)."""
        self._t.expire_start(int(now_ms))
        return self._handed_out(chunk)

    def expire_all_chunks(self, reason: int = END_FORCED, chunk: int = CHUNK) -> Iterator[Records]:
        """Every flow, ended with `reason`, `chunk` at a time (see expire_chunks)."""
        self._t.expire_all_start(reason)
        return self._handed_out(chunk)

    def _handed_out(self, chunk: int) -> Iterator[Records]:
        try:
            buf = module().block(chunk * FLOW_RECORD.itemsize)
            while k := self._t.take(buf):
                yield np.frombuffer(buf, dtype=FLOW_RECORD, count=k)
        finally:
            self._t.expire_finish()

    def update(self, records: Records, now_ms: int) -> Records:
        """FlowTable.update: fold one scan's records in, then return the flows that end at `now_ms`."""
        if len(records):
            self.fold(records)
        return self.expire(now_ms)

    def expire_all(self, reason: int = END_FORCED) -> Records:
        return _records(self._t.expire_all(reason))
