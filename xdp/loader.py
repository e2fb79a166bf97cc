"""Compile xdp/flow.c with bcc, own its maps, attach it to interfaces, detach.

Lifecycle: `Datapath.load()` compiles (kernel headers from xdp.headers), checks
the kernel memory budget, points the active-page slot at page 0. `attach()`
binds it to interfaces with a bpf_link (BPF_LINK_CREATE) and reads back,
through pyroute2 netlink, the mode the kernel actually gave. A bpf_link lives
as long as its file descriptor: `detach()` closes it, and if the process dies
in any way (SIGKILL included) the kernel closes it and detaches the program,
so no attachment outlives xdpflow and a restart never finds a stale one. The
kernel also refuses a link on an interface that already has an XDP program,
so a program xdpflow did not attach is never touched. Use Datapath as a
context manager so every exit path detaches.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import structlog

from exporter.layout import FLOW_KEY, FLOW_STATS, FLOW_VALUE
from xdp import bpfsys, headers

log = structlog.get_logger("xdpflow.loader")

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "flow.c")

XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
MODE_FLAGS = {"generic": XDP_FLAGS_SKB_MODE, "native": XDP_FLAGS_DRV_MODE}
# IFLA_XDP_ATTACHED: pyroute2 decodes it to a name on some versions, an int on others.
ATTACHED_NAMES: dict[int | str, str] = {1: "native", 2: "generic", 3: "offload", 4: "multi",
                                        "xdp": "native", "xdpdrv": "native", "xdpgeneric": "generic",
                                        "xdpoffload": "offload", "xdpmulti": "multi", "none": ""}

DEFAULT_MAX_ENTRIES = 500_000
DEFAULT_MEMORY_BUDGET = 1 << 30
PAGES = 2


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


def map_memory_bytes(max_entries: int, cpus: int | None = None) -> int:
    """Kernel memory of both flow pages: entries x possible CPUs x value size x 2.

    Key storage and hash overhead add roughly (key + 48 bytes) x entries per page;
    it is included so the figure is what the kernel really charges, give or take.
    """
    cpus = possible_cpus() if cpus is None else cpus
    per_entry = cpus * FLOW_VALUE.itemsize + FLOW_KEY.itemsize + 48
    return PAGES * max_entries * per_entry


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
class Datapath:
    """The compiled program, its two flow pages and its counters."""

    max_entries: int = DEFAULT_MAX_ENTRIES
    memory_budget: int = DEFAULT_MEMORY_BUDGET
    bpf: Any = None
    prog_fd: int = -1
    page_fds: tuple[int, int] = (-1, -1)
    pages_fd: int = -1
    active_fd: int = -1
    stats_fd: int = -1
    _retired: dict[str, int] = field(default_factory=dict)
    cpus: int = field(default_factory=possible_cpus)
    attachments: list[Attachment] = field(default_factory=list)

    @property
    def memory_bytes(self) -> int:
        return map_memory_bytes(self.max_entries, self.cpus)

    def load(self) -> Datapath:
        if self.max_entries < 1:
            raise LoaderError(f"max_entries must be at least 1, got {self.max_entries}")
        need = self.memory_bytes
        if need > self.memory_budget:
            raise LoaderError(
                f"flow maps need {human_bytes(need)} of kernel memory ({self.max_entries} entries x "
                f"{self.cpus} CPUs x 2 pages), above the budget of {human_bytes(self.memory_budget)}: "
                f"lower --max-entries or raise --max-kernel-memory")
        try:
            found = headers.find()
        except headers.HeadersNotFound as e:
            raise LoaderError(str(e)) from None
        try:
            from bcc import BPF
        except ImportError:
            raise LoaderError("the bcc Python module is missing: apt-get install python3-bpfcc "
                              "(and run `make venv` to link it into .venv)") from None
        cflags = [f"-I{HERE}", f"-DXDPFLOW_MAX_ENTRIES={self.max_entries}", "-w", *found.cflags]
        try:
            with found.applied():
                self.bpf = _quiet_compile(BPF, SOURCE, cflags)
            fn = self.bpf.load_func(b"xdpflow", BPF.XDP)
        except Exception as e:  # bcc raises bare Exception for every failure
            msg = str(e)
            if "privileges" in msg or "Operation not permitted" in msg:
                raise LoaderError("loading BPF needs root or CAP_BPF + CAP_NET_ADMIN + CAP_PERFMON") from None
            raise LoaderError(f"could not compile or load xdp/flow.c with {found.description}: {msg}") from None
        self.prog_fd = fn.fd
        self.page_fds = (self.bpf[b"flows0"].map_fd, self.bpf[b"flows1"].map_fd)
        self.pages_fd = self.bpf[b"pages"].map_fd
        self.active_fd = self.bpf[b"active_page"].map_fd
        self.stats_fd = self.bpf[b"stats"].map_fd
        for i, fd in enumerate(self.page_fds):
            bpfsys.map_update(self.pages_fd, ctypes.c_uint32(i), ctypes.c_uint32(fd))
        self.set_active(0)
        log.debug("program loaded", headers=found.description, max_entries=self.max_entries,
                  kernel_memory=human_bytes(need))
        return self

    def set_active(self, page: int) -> None:
        """Make programs write page `page`; return once none still writes the other.

        The index is a plain array slot. The fence is a rewrite of a slot of the
        array-of-maps `pages` with the fd it already holds: for map-in-map
        updates the kernel runs synchronize_rcu() before the syscall returns
        (maybe_wait_bpf_programs), and XDP programs run inside an RCU read-side
        section, so every program that read the old index has finished.
        """
        bpfsys.map_update(self.active_fd, ctypes.c_uint32(0), ctypes.c_uint32(page))
        bpfsys.map_update(self.pages_fd, ctypes.c_uint32(page), ctypes.c_uint32(self.page_fds[page]))

    def _page_stats(self, page: int) -> np.ndarray:
        per_cpu = np.zeros(self.cpus, dtype=FLOW_STATS)
        bpfsys.map_lookup(self.stats_fd, ctypes.c_uint32(page), per_cpu)
        return per_cpu

    def take_page_stats(self, page: int) -> dict[str, int]:
        """Counters of an idle page since it was last taken, summed over CPUs; resets them.

        Only for a page no program writes (after set_active to the other one):
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
        with _ipr() as ipr:
            current = _attached_mode(ipr, ifindex)
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
                got = _attached_mode(ipr, ifindex) or m
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

    def close(self) -> None:
        self.detach_all()
        if self.bpf is not None:
            self.bpf.cleanup()
            self.bpf = None

    def __enter__(self) -> Datapath:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _quiet_compile(bpf_cls: Any, source: str, cflags: list[str]) -> Any:
    """Compile with bcc, keeping clang's stderr chatter out unless it fails."""
    import tempfile

    saved = os.dup(2)
    with tempfile.TemporaryFile() as err:
        os.dup2(err.fileno(), 2)
        try:
            return bpf_cls(src_file=source.encode(), cflags=cflags)
        except Exception as e:
            os.dup2(saved, 2)
            err.seek(0)
            detail = err.read().decode(errors="replace").strip().splitlines()
            first = next((ln for ln in detail if "error" in ln), detail[0] if detail else "")
            raise RuntimeError(f"{e}: {first}") from None
        finally:
            os.dup2(saved, 2)
            os.close(saved)


@contextmanager
def _ipr() -> Iterator[Any]:
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


def _attached_mode(ipr: Any, ifindex: int) -> str | None:
    links = ipr.link("get", index=ifindex)
    xdp = links[0].get_attr("IFLA_XDP") if links else None
    if xdp is None:
        return None
    attached = xdp.get_attr("IFLA_XDP_ATTACHED")
    name = ATTACHED_NAMES.get(attached, str(attached)) if attached else ""
    return name or None
