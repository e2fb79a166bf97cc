"""Wait for `xdpflow run` / `xdpflow dump` to be metering: its --ready-file (exporter/readiness.py).

One helper for the demo, the benchmarks, the soak and the tests, instead of sleeps that guess how
long a compile, a load and an attach take on this machine.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


class NotReady(RuntimeError):
    """The process exited, or the timeout passed, before its ready file appeared."""


def wait_ready(path: Path, alive: Callable[[], bool], timeout: float, tail: Callable[[], Sequence[str]] = lambda: (),
               poll: Callable[[], object] | None = None) -> dict[str, Any]:
    """The ready file's JSON once it appears.

    `alive` says whether the process still runs; `tail` gives its last log lines for the error;
    `poll` (optional) is called between checks instead of sleeping (a log reader's step).
    """
    deadline = time.monotonic() + timeout
    t0 = time.monotonic()
    while not path.exists():
        if not alive():
            raise NotReady(f"exited before it was ready; last log lines: {list(tail())[-5:]}")
        if time.monotonic() > deadline:
            raise NotReady(f"not ready after {time.monotonic() - t0:.0f} s; last log lines: {list(tail())[-5:]}")
        if poll is not None:
            poll()
        else:
            time.sleep(0.05)
    info: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return info
