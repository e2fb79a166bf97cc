"""Which interfaces to meter, as they come and go.

Interfaces are named exactly (`eth0`) or by glob (`veth*`). A netlink
listener (pyroute2, RTNLGRP_LINK) in a daemon thread wakes the service on
every link change; the service then reconciles: attach to matching
interfaces that appeared, release those that disappeared. The same
reconcile runs at start and on SIGHUP, so there is one code path.
"""

from __future__ import annotations

import fnmatch
import socket
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import structlog

log = structlog.get_logger("xdpflow.interfaces")

def present() -> dict[str, int]:
    """Interfaces of this network namespace: name -> ifindex."""
    return {name: idx for idx, name in socket.if_nameindex()}


def alias(ifname: str) -> str:
    """The link's alias (`ip link set IF alias TEXT`, SNMP ifAlias), "" when it has none or it can't be read."""
    try:
        with open(f"/sys/class/net/{ifname}/ifalias", "rb") as f:
            raw = f.read().strip()[:256]  # IFALIASZ: the kernel holds no more
    except OSError:
        return ""
    return raw.decode("utf-8", "ignore")


def matching(patterns: Iterable[str], links: dict[str, int]) -> dict[str, int]:
    pats = list(patterns)
    return {name: idx for name, idx in links.items()
            if name != "lo" or "lo" in pats
            if any(fnmatch.fnmatchcase(name, p) for p in pats)}


@dataclass
class LinkWatcher:
    """Calls `on_change()` (from its own thread) after any link appears, changes or goes."""

    on_change: Callable[[], None]
    _stop: threading.Event | None = None

    def start(self) -> LinkWatcher:
        self._stop = threading.Event()
        stop = self._stop

        def loop() -> None:
            # pyroute2 runs its own asyncio loop: build it in this thread, never in the service's loop.
            from pyroute2 import IPRoute

            ipr = IPRoute()
            try:
                ipr.bind(groups=1)  # RTMGRP_LINK
                while not stop.is_set():
                    msgs = ipr.get()
                    if stop.is_set():
                        break
                    if any(m.get("event") in ("RTM_NEWLINK", "RTM_DELLINK") for m in msgs):
                        self.on_change()
            except Exception as e:  # the socket closed under us at shutdown, or netlink failed
                if not stop.is_set():
                    log.warning("link monitor stopped; interfaces are rechecked every scan", error=str(e))
            finally:
                ipr.close()

        threading.Thread(target=loop, name="xdpflow-links", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._stop is not None:
            self._stop.set()
