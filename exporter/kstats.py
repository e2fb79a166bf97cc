"""The kernel's own drop counters, read beside xdpflow's: who dropped what.

xdpflow's program returns XDP_PASS for every frame, so it never drops one;
its own losses are metering losses (parse failures, insert failures, LRU
evictions), counted in its stats map. Frames can still be lost on the way in,
and the kernel counts where:

- the NIC, before any XDP: no free receive descriptor (`rx_missed_errors`),
  FIFO overrun (`rx_fifo_errors`, `rx_over_errors`), bad frames (`rx_errors`);
- the driver, at the native XDP hook: some drivers count the frames their XDP
  program ran on (ethtool `*xdp_packets`: veth, virtio_net) and its XDP_DROP
  verdicts (`*xdp_drops`, `*xdp_drop`: also mlx5); with xdpflow attached the
  drops stay 0;
- the stack: a full per-CPU backlog (RPS, netif_rx) drops and counts it in
  the device's `rx_dropped` and in /proc/net/softnet_stat `dropped`; NAPI
  running out of budget counts `time_squeeze` (work deferred, not lost).
  Native XDP runs before the stack, so these frames were metered; generic XDP
  runs when the stack takes the frame off the backlog, so they were not;
- veth: a frame its peer cannot take (ring or backlog full, MTU) is counted in
  the sending end's `tx_dropped`; refusals in the forward path (MTU, peer down)
  also in the receiving end's `rx_dropped`.

Interface counters come from netlink (RTM_GETLINK, IFLA_STATS64), which
answers for the namespace of the calling thread, unlike /sys/class/net (the
namespace of the sysfs mount); driver counters from the ETHTOOL_GSTATS ioctl.
Both are keyed by the attachment's ifindex and name: an interface that went
(or whose index now names another one) is reported gone and forgotten, and
its last interval is lost with it. softnet_stat is machine-wide, per CPU,
32-bit hex that wraps. Everything is reported as deltas since the previous
scan; nothing is written.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import math
import re
import socket
import struct
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import structlog

from xdp.attach import netlink

log = structlog.get_logger("xdpflow.kstats")

# Receive-side drops before or around the XDP hook, and transmit drops: what the warning reports.
DROP_FIELDS = ("rx_dropped", "rx_missed_errors", "rx_fifo_errors", "rx_over_errors", "tx_dropped")
DROP_WARNING_INTERVAL = 60.0
SOFTNET_PATH = "/proc/net/softnet_stat"
_U32 = 1 << 32


@dataclass(frozen=True)
class NetdevCounters:
    """One interface's counters (IFLA_STATS64), with the driver's XDP counters where it has them."""

    rx_packets: int = 0
    rx_dropped: int = 0         # the stack or driver dropped a received frame (backlog full, forward refused)
    rx_missed_errors: int = 0   # the NIC had no descriptor for it: lost before XDP
    rx_fifo_errors: int = 0     # NIC FIFO overrun: lost before XDP
    rx_over_errors: int = 0     # receive ring overflow: lost before XDP
    rx_errors: int = 0          # every bad frame (CRC, length, ...; drivers include fifo/over here)
    tx_packets: int = 0
    tx_dropped: int = 0         # veth: frames the peer could not take
    tx_errors: int = 0
    xdp_packets: int = 0        # driver (ethtool): frames the native XDP program ran on; 0 if not counted
    xdp_drops: int = 0          # driver (ethtool): XDP_DROP verdicts; xdpflow never returns it

    def since(self, before: NetdevCounters) -> NetdevCounters:
        """Delta to `before`; a counter that went backwards restarted from zero (driver reset)."""
        return NetdevCounters(**{f.name: _grown(getattr(self, f.name), getattr(before, f.name))
                                 for f in fields(self)})

    def __add__(self, other: NetdevCounters) -> NetdevCounters:
        return NetdevCounters(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def nonzero(self) -> dict[str, int]:
        return {f.name: v for f in fields(self) if (v := getattr(self, f.name))}

    def drops(self) -> dict[str, int]:
        return {k: v for k in DROP_FIELDS if (v := getattr(self, k))}


def _grown(now: int, before: int) -> int:
    return now - before if now >= before else now


@dataclass(frozen=True)
class SoftnetCpu:
    """One CPU's line of /proc/net/softnet_stat (or its delta)."""

    cpu: int
    processed: int = 0          # frames taken off this CPU's backlog / NAPI
    dropped: int = 0            # dropped: this CPU's backlog was full (netdev_max_backlog)
    time_squeeze: int = 0       # NAPI stopped with work left (budget or time): deferred, not lost


def parse_softnet(text: str) -> tuple[SoftnetCpu, ...]:
    """The per-CPU lines: hex columns processed, dropped, time_squeeze, ...; the 13th, where present, is the CPU."""
    out = []
    for n, line in enumerate(text.splitlines()):
        cols = line.split()
        if len(cols) < 3:
            continue
        try:
            v = [int(c, 16) for c in cols]
        except ValueError:
            continue
        out.append(SoftnetCpu(cpu=v[12] if len(v) >= 13 else n, processed=v[0], dropped=v[1], time_squeeze=v[2]))
    return tuple(out)


def softnet_delta(now: tuple[SoftnetCpu, ...], before: tuple[SoftnetCpu, ...]) -> tuple[SoftnetCpu, ...]:
    """Per-CPU deltas modulo 2**32 (the columns are 32-bit); a CPU that just came online is a baseline."""
    prev = {c.cpu: c for c in before}
    return tuple(SoftnetCpu(c.cpu, (c.processed - p.processed) % _U32, (c.dropped - p.dropped) % _U32,
                            (c.time_squeeze - p.time_squeeze) % _U32)
                 for c in now if (p := prev.get(c.cpu)) is not None)


def read_softnet(path: str = SOFTNET_PATH) -> tuple[SoftnetCpu, ...]:
    try:
        with open(path, encoding="ascii") as f:
            return parse_softnet(f.read())
    except OSError:
        return ()


# -- driver counters (ETHTOOL_GSTATS) ------------------------------------------------------------

SIOCETHTOOL = 0x8946
ETHTOOL_GSTRINGS = 0x1B
ETHTOOL_GSTATS = 0x1D
ETHTOOL_GSSET_INFO = 0x37
ETH_SS_STATS = 1
ETH_GSTRING_LEN = 32
# The kernel writes as many names/values as the driver has *now*, whatever we asked for: leave room
# for queues added between asking for the count and reading.
_SLACK = 64
_IFREQ = struct.Struct("16sP16x")
_XDP_PACKETS = re.compile(r"(^|_)xdp_packets$")
_XDP_DROPS = re.compile(r"(^|_)xdp_drops?$")


def _ethtool(sock: socket.socket, ifname: str, buf: ctypes.Array[ctypes.c_char]) -> None:
    req = _IFREQ.pack(ifname.encode(), ctypes.addressof(buf))
    fcntl.ioctl(sock, SIOCETHTOOL, req)


def _stats_count(sock: socket.socket, ifname: str) -> int:
    buf = ctypes.create_string_buffer(struct.pack("=IIQI", ETHTOOL_GSSET_INFO, 0, 1 << ETH_SS_STATS, 0))
    _ethtool(sock, ifname, buf)
    _, _, mask, count = struct.unpack_from("=IIQI", buf)
    return count if mask & (1 << ETH_SS_STATS) else 0


def _stat_names(sock: socket.socket, ifname: str, count: int) -> list[str]:
    buf = ctypes.create_string_buffer(12 + (count + _SLACK) * ETH_GSTRING_LEN)
    struct.pack_into("=III", buf, 0, ETHTOOL_GSTRINGS, ETH_SS_STATS, count)
    _ethtool(sock, ifname, buf)
    n = min(struct.unpack_from("=I", buf, 8)[0], count + _SLACK)
    raw = buf.raw[12: 12 + n * ETH_GSTRING_LEN]
    return [raw[i: i + ETH_GSTRING_LEN].split(b"\0", 1)[0].decode(errors="replace")
            for i in range(0, len(raw), ETH_GSTRING_LEN)]


def _stat_values(sock: socket.socket, ifname: str, count: int) -> list[int]:
    buf = ctypes.create_string_buffer(8 + (count + _SLACK) * 8)
    struct.pack_into("=II", buf, 0, ETHTOOL_GSTATS, count)
    _ethtool(sock, ifname, buf)
    n = min(struct.unpack_from("=I", buf, 4)[0], count + _SLACK)
    return list(struct.unpack_from(f"={n}Q", buf, 8))


def _pick(stats: Mapping[str, int], pattern: re.Pattern[str]) -> int:
    """Sum a counter over queues; where the driver also gives a total (a name without digits), take that."""
    hits = {k: v for k, v in stats.items() if pattern.search(k) and not k.startswith("tx")}
    totals = [v for k, v in hits.items() if not any(c.isdigit() for c in k)]
    return sum(totals) if totals else sum(hits.values())


@dataclass
class _Ethtool:
    """ETHTOOL_GSTATS for the interfaces we track; names are re-read when the driver's count changes."""

    sock: socket.socket | None = None
    names: dict[str, list[str]] = field(default_factory=dict)
    unsupported: set[str] = field(default_factory=set)

    def xdp(self, ifname: str) -> tuple[int, int]:
        """(xdp_packets, xdp_drops) as the driver counts them; (0, 0) if it has no such counters."""
        if ifname in self.unsupported:
            return 0, 0
        if self.sock is None:
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # in this thread's namespace
        try:
            count = _stats_count(self.sock, ifname)
            if count == 0:
                self.unsupported.add(ifname)
                return 0, 0
            names = self.names.get(ifname)
            if names is None or len(names) != count:
                names = self.names[ifname] = _stat_names(self.sock, ifname, count)
            values = _stat_values(self.sock, ifname, count)
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL):
                self.unsupported.add(ifname)
            return 0, 0
        if len(values) != len(names):  # the driver changed between two calls: read again next scan
            self.names.pop(ifname, None)
            return 0, 0
        stats = dict(zip(names, values, strict=True))
        return _pick(stats, _XDP_PACKETS), _pick(stats, _XDP_DROPS)

    def forget(self, ifname: str) -> None:
        self.names.pop(ifname, None)
        self.unsupported.discard(ifname)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


# -- interface counters (netlink) ----------------------------------------------------------------

_NETDEV_NETLINK = tuple(f.name for f in fields(NetdevCounters) if not f.name.startswith("xdp_"))


def _netlink_reader() -> Callable[[list[tuple[str, int]]], dict[tuple[str, int], dict[str, int] | None]]:
    def read(links: list[tuple[str, int]]) -> dict[tuple[str, int], dict[str, int] | None]:
        from pyroute2.netlink.exceptions import NetlinkError

        out: dict[tuple[str, int], dict[str, int] | None] = {}
        with netlink() as ipr:  # only in worker threads: pyroute2 runs an asyncio loop of its own
            for ifname, ifindex in links:
                try:
                    msg = ipr.link("get", index=ifindex)[0]
                except NetlinkError as e:
                    if e.code not in (errno.ENODEV, errno.ENOENT):
                        raise
                    out[(ifname, ifindex)] = None
                    continue
                stats = msg.get_attr("IFLA_STATS64")
                if msg.get_attr("IFLA_IFNAME") != ifname or stats is None:
                    out[(ifname, ifindex)] = None  # the index names another interface now
                    continue
                out[(ifname, ifindex)] = {k: int(stats.get(k, 0)) for k in _NETDEV_NETLINK}
        return out

    return read


# -- per scan -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class KernelDelta:
    """What the kernel counted between two scans: per attached interface and per CPU."""

    interfaces: Mapping[str, NetdevCounters] = field(default_factory=dict)
    softnet: tuple[SoftnetCpu, ...] = ()
    gone: tuple[str, ...] = ()      # vanished since the last scan: their last interval is not in here
    released: tuple[str, ...] = ()  # no longer tracked (gone, or detached): their series can go

    @property
    def softnet_dropped(self) -> int:
        return sum(c.dropped for c in self.softnet)

    @property
    def softnet_time_squeeze(self) -> int:
        return sum(c.time_squeeze for c in self.softnet)

    def drops(self) -> dict[str, dict[str, int]]:
        """Nonzero drop counters per interface: the kernel's or the driver's, never xdpflow's."""
        return {name: d for name, c in self.interfaces.items() if (d := c.drops())}

    def log_fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "netdev": {name: c.nonzero() for name, c in self.interfaces.items()},
            "softnet_dropped": self.softnet_dropped,
            "softnet_time_squeeze": self.softnet_time_squeeze,
        }
        if self.gone:
            out["netdev_gone"] = list(self.gone)
        return out


NetdevReader = Callable[[list[tuple[str, int]]], dict[tuple[str, int], dict[str, int] | None]]
XdpReader = Callable[[str], tuple[int, int]]


@dataclass
class KernelStats:
    """Baselines per tracked interface and per CPU; `scan()` turns them into deltas.

    `sync()` follows the attachments: a new interface gets its baseline there, so its first
    delta starts at attach time; a released one gets a last reading, kept for the next scan.
    Thread-safe: sync() runs where interfaces are reconciled, scan() in the scan's worker thread.
    """

    read_netdev: NetdevReader = field(default_factory=_netlink_reader)
    read_xdp: XdpReader | None = None
    read_softnet: Callable[[], tuple[SoftnetCpu, ...]] = read_softnet
    _last: dict[tuple[str, int], NetdevCounters] = field(default_factory=dict)
    _pending: dict[str, NetdevCounters] = field(default_factory=dict)
    _gone: list[str] = field(default_factory=list)
    _released: list[str] = field(default_factory=list)
    _softnet: tuple[SoftnetCpu, ...] | None = None
    _ethtool: _Ethtool = field(default_factory=_Ethtool)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _failed: bool = False

    def _read(self, links: list[tuple[str, int]]) -> dict[tuple[str, int], NetdevCounters | None]:
        """Counters per link, None for a link that is gone; {} if netlink failed (nothing is known)."""
        if not links:
            return {}
        try:
            raw_stats = self.read_netdev(links)
        except Exception as e:  # counters are an aid: never let them stop a scan or an attach
            if not self._failed:
                log.warning("interface counters unavailable", error=str(e))
            self._failed = True
            return {}
        self._failed = False
        xdp = self.read_xdp or self._ethtool.xdp
        out: dict[tuple[str, int], NetdevCounters | None] = {}
        for key, raw in raw_stats.items():
            if raw is None:
                out[key] = None
                continue
            packets, drops = xdp(key[0])
            out[key] = NetdevCounters(**raw, xdp_packets=packets, xdp_drops=drops)
        return out

    def sync(self, attached: Mapping[str, int]) -> None:
        """Track exactly the interfaces in `attached` (name -> ifindex)."""
        want = set(attached.items())
        with self._lock:
            new = sorted(want - self._last.keys())
            old = sorted(self._last.keys() - want)
            if not new and not old:
                return
            now = self._read(new + old)
            for key in new:
                if (counters := now.get(key)) is not None:
                    self._last[key] = counters  # else: unreadable yet, next sync tries again
            for key in old:
                before = self._last.pop(key)
                self._ethtool.forget(key[0])
                self._released.append(key[0])
                if key not in now:
                    continue  # unreadable: its last interval is unknown
                last = now[key]
                if last is None:
                    self._gone.append(key[0])
                else:
                    self._add_pending(key[0], last.since(before))

    def _add_pending(self, name: str, delta: NetdevCounters) -> None:
        prev = self._pending.get(name)
        self._pending[name] = delta if prev is None else prev + delta

    def scan(self) -> KernelDelta:
        """Deltas since the previous scan (or since attach) for every tracked interface, and per CPU."""
        with self._lock:
            now = self._read(sorted(self._last))
            per_if = dict(self._pending)
            self._pending.clear()
            for key, counters in now.items():  # a key missing from `now`: unreadable, keeps its baseline
                if counters is None:
                    del self._last[key]
                    self._ethtool.forget(key[0])
                    self._gone.append(key[0])
                    self._released.append(key[0])
                    continue
                delta = counters.since(self._last[key])
                self._last[key] = counters
                per_if[key[0]] = per_if[key[0]] + delta if key[0] in per_if else delta
            cpus = self.read_softnet()
            soft = softnet_delta(cpus, self._softnet) if self._softnet is not None else ()
            self._softnet = cpus
            gone, released = tuple(self._gone), tuple(self._released)
            self._gone.clear()
            self._released.clear()
        # A name both released and tracked again (re-created interface) keeps its series.
        tracked = {k[0] for k in self._last}
        return KernelDelta(per_if, soft, gone, tuple(n for n in released if n not in tracked))

    def close(self) -> None:
        with self._lock:
            self._ethtool.close()


@dataclass
class DropWarning:
    """At most one warning a minute that the kernel (or driver) dropped packets on an attached interface."""

    interval: float = DROP_WARNING_INTERVAL
    clock: Callable[[], float] = time.monotonic
    _last: float = -math.inf
    _dropped: dict[str, dict[str, int]] = field(default_factory=dict)
    _softnet_dropped: int = 0

    def note(self, delta: KernelDelta) -> bool:
        """Add this scan's drops; warn if a minute has passed since the last warning. True if it warned."""
        drops = delta.drops()
        self._softnet_dropped += delta.softnet_dropped
        if not drops and not self._dropped:
            return False
        for name, d in drops.items():
            acc = self._dropped.setdefault(name, {})
            for k, v in d.items():
                acc[k] = acc.get(k, 0) + v
        now = self.clock()
        if now - self._last < self.interval:
            return False
        log.warning("kernel dropped packets on an attached interface: the kernel or driver dropped them, not xdpflow",
                    dropped=self._dropped, softnet_dropped=self._softnet_dropped,
                    hint="xdpflow passes every packet; see 'Who dropped what' in docs/operations.md")
        self._last = now
        self._dropped = {}
        self._softnet_dropped = 0
        return True
