"""Throw-away test topologies: network namespaces joined by veth pairs.

`VethPair` creates a generator namespace and an observer namespace with one
veth end in each, addressed from 198.18.0.0/15 (the benchmarking range). The
XDP program is attached on the observer's end; traffic is generated in the
other namespace, so no generated frame can reach the machine's real network.
IPv6 is disabled on both ends so the kernel's own router/neighbour
solicitations do not mix with the generated flows (the generated IPv6 frames
use fd00::/8 addresses and need no configured address). Leaving the context
deletes both namespaces, which destroys the veth pair and any XDP program on
it, whatever happened inside.

`Router` is a gateway topology: namespaces a, router and b, with veth pairs
a <-> router and router <-> b, IPv4 (198.18.0.0/15) and IPv6 (fd00::/8) on
every end, forwarding on in the router only, a and b routing through it.

`inside(netns)` moves the calling thread into a namespace for the length of a
`with` block (setns(2) on the thread, restored after): sockets, netlink
handles and interface lookups made there belong to that namespace and keep
belonging to it afterwards. That is how a test process loads the datapath
once and attaches it in a namespace, or sends from one namespace and
receives in another, without a subprocess.

`netns_read` reads small sysfs and procfs files as a namespace sees them (one
`ip netns exec` for all of them); `link_counters` reads an interface's
statistics that way.
"""

from __future__ import annotations

import itertools
import os
import secrets
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import TracebackType


def ip(*args: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = ["ip", *(["-n", netns] if netns else []), *args]
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


def in_netns(netns: str, cmd: Sequence[str]) -> list[str]:
    return ["ip", "netns", "exec", netns, *cmd]


_counter = itertools.count()
# Random, not the pid: namespaces are visible across pid namespaces, so pids can collide.
_TOKEN = secrets.token_hex(3)
_created: set[str] = set()


@dataclass
class VethPair:
    """gen:<gen_if> <-> obs:<obs_if>; unique names per process and instance."""

    tag: str = ""
    gen: str = ""
    obs: str = ""
    gen_if: str = ""
    obs_if: str = ""

    def __post_init__(self) -> None:
        tag = self.tag or f"{_TOKEN}{next(_counter)}"
        self.gen = self.gen or f"xf{tag}g"
        self.obs = self.obs or f"xf{tag}o"
        self.gen_if = self.gen_if or f"xg{tag}"[:15]
        self.obs_if = self.obs_if or f"xo{tag}"[:15]

    def create(self) -> VethPair:
        try:
            for ns in (self.gen, self.obs):
                subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True, text=True)
                _created.add(ns)
                ip("link", "set", "lo", "up", netns=ns)
                # Interfaces created later in the namespace (hotplug tests) stay quiet too.
                sysctl(ns, "net.ipv6.conf.default.disable_ipv6", "1")
            ip("link", "add", self.gen_if, "netns", self.gen, "type", "veth", "peer", "name", self.obs_if,
               "netns", self.obs)
            for ns, ifname, addr in ((self.gen, self.gen_if, "198.18.255.1/30"),
                                     (self.obs, self.obs_if, "198.18.255.2/30")):
                sysctl(ns, f"net.ipv6.conf.{ifname}.disable_ipv6", "1")
                ip("addr", "add", addr, "dev", ifname, netns=ns)
                ip("link", "set", ifname, "up", netns=ns)
        except BaseException:
            self.destroy()
            raise
        return self

    def destroy(self) -> None:
        for ns in (self.gen, self.obs):
            if ns in _created:
                subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
                _created.discard(ns)

    def obs_ifindex(self) -> int:
        out = ip("-o", "link", "show", self.obs_if, netns=self.obs).stdout
        return int(out.split(":", 1)[0])

    def rx_dropped(self) -> int:
        out = ip("-s", "-o", "link", "show", self.obs_if, netns=self.obs).stdout
        # "RX: bytes packets errors dropped ..." values follow the header on one -o line
        fields = out.split("RX:")[1].split("\\")[1].split()
        return int(fields[3])

    def __enter__(self) -> VethPair:
        return self.create()

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None) -> None:
        self.destroy()


@dataclass
class Router:
    """a:<a_if> <-> router:<ra_if> | router:<rb_if> <-> b:<b_if>; the router forwards between them.

    Addresses: a 198.18.1.2/24 fd00:1::2/64, router 198.18.1.1 fd00:1::1 on ra_if and 198.18.2.1
    fd00:2::1 on rb_if, b 198.18.2.2/24 fd00:2::2/64; a and b have default routes via the router.
    IPv6 addresses skip DAD (usable at once) and nobody sends router solicitations, but the kernel's
    own neighbour discovery and MLD still speak now and then: tests match the flows they make.
    """

    tag: str = ""
    a: str = ""
    router: str = ""
    b: str = ""
    a_if: str = ""
    ra_if: str = ""
    rb_if: str = ""
    b_if: str = ""

    A4, RA4, RB4, B4 = "198.18.1.2", "198.18.1.1", "198.18.2.1", "198.18.2.2"
    A6, RA6, RB6, B6 = "fd00:1::2", "fd00:1::1", "fd00:2::1", "fd00:2::2"

    def __post_init__(self) -> None:
        tag = self.tag or f"{_TOKEN}{next(_counter)}"
        self.a = self.a or f"xf{tag}a"
        self.router = self.router or f"xf{tag}r"
        self.b = self.b or f"xf{tag}b"
        self.a_if = self.a_if or f"xa{tag}"[:15]
        self.ra_if = self.ra_if or f"xra{tag}"[:15]
        self.rb_if = self.rb_if or f"xrb{tag}"[:15]
        self.b_if = self.b_if or f"xb{tag}"[:15]

    @property
    def namespaces(self) -> tuple[str, str, str]:
        return self.a, self.router, self.b

    def create(self) -> Router:
        try:
            for ns in self.namespaces:
                subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True, text=True)
                _created.add(ns)
                ip("link", "set", "lo", "up", netns=ns)
                for conf in ("all", "default"):
                    sysctl(ns, f"net.ipv6.conf.{conf}.accept_dad", "0")
                    sysctl(ns, f"net.ipv6.conf.{conf}.router_solicitations", "0")
                    sysctl(ns, f"net.ipv6.conf.{conf}.accept_ra", "0")
            sysctl(self.router, "net.ipv4.ip_forward", "1")
            sysctl(self.router, "net.ipv6.conf.all.forwarding", "1")
            ip("link", "add", self.a_if, "netns", self.a, "type", "veth", "peer", "name", self.ra_if,
               "netns", self.router)
            ip("link", "add", self.rb_if, "netns", self.router, "type", "veth", "peer", "name", self.b_if,
               "netns", self.b)
            for ns, ifname, v4, v6 in ((self.a, self.a_if, self.A4, self.A6),
                                       (self.router, self.ra_if, self.RA4, self.RA6),
                                       (self.router, self.rb_if, self.RB4, self.RB6),
                                       (self.b, self.b_if, self.B4, self.B6)):
                ip("addr", "add", f"{v4}/24", "dev", ifname, netns=ns)
                ip("-6", "addr", "add", f"{v6}/64", "dev", ifname, "nodad", netns=ns)
                ip("link", "set", ifname, "up", netns=ns)
            for ns, via4, via6 in ((self.a, self.RA4, self.RA6), (self.b, self.RB4, self.RB6)):
                ip("route", "add", "default", "via", via4, netns=ns)
                ip("-6", "route", "add", "default", "via", via6, netns=ns)
        except BaseException:
            self.destroy()
            raise
        return self

    def destroy(self) -> None:
        for ns in self.namespaces:
            if ns in _created:
                subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
                _created.discard(ns)

    def __enter__(self) -> Router:
        return self.create()

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None) -> None:
        self.destroy()


def ifindex(netns: str, ifname: str) -> int:
    """The ifindex of `ifname` in `netns`."""
    out = ip("-o", "link", "show", ifname, netns=netns).stdout
    return int(out.split(":", 1)[0])


@contextmanager
def inside(netns: str) -> Iterator[None]:
    """Run the body with the calling thread in network namespace `netns` (see the module docstring)."""
    from xdp.attach import thread_in_netns

    target = os.open(f"/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        with thread_in_netns(target):
            yield
    finally:
        os.close(target)


def sysctl(netns: str, key: str, value: str) -> None:
    path = "/proc/sys/" + key.replace(".", "/")
    subprocess.run(in_netns(netns, ["sh", "-c", f"echo {value} > {path}"]), check=True, capture_output=True)


def netns_read(netns: str, *paths: str) -> list[str]:
    """Read small files (sysfs, procfs) as seen from inside `netns`, one subprocess."""
    script = "; ".join(f"cat {p}" for p in paths)
    res = subprocess.run(in_netns(netns, ["sh", "-c", script]), capture_output=True, text=True, check=True,
                         timeout=30)
    return res.stdout.splitlines()


def link_counters(netns: str, ifname: str, names: Sequence[str]) -> dict[str, int]:
    """Counters of /sys/class/net/IFNAME/statistics (rx_packets, tx_dropped...) of `ifname` in `netns`."""
    base = f"/sys/class/net/{ifname}/statistics/"
    lines = netns_read(netns, *(base + n for n in names))
    return {n: int(v) for n, v in zip(names, lines, strict=True)}


def leftovers() -> list[str]:
    """Namespaces this process created and did not remove (others' are never touched)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
    present = {line.split()[0] for line in out.splitlines() if line.strip()}
    return sorted(present & _created)


# A script to run in a namespace with a route to B: three ICMP echo requests of 56 data bytes (84-byte IP
# packets, as ping sends) to Router.B4, each answered (shared by the gateway tests).
PING_B4 = f"""
import socket, struct, time
def checksum(b):
    t = sum(struct.unpack(f"!{{len(b) // 2}}H", b))
    t = (t & 0xFFFF) + (t >> 16)
    return ~(t + (t >> 16)) & 0xFFFF
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
s.settimeout(5)
for seq in range(3):
    body = struct.pack("!HH", 0x4242, seq) + bytes(56)
    s.sendto(struct.pack("!BBH", 8, 0, checksum(b"\\x08\\x00\\x00\\x00" + body)) + body, ("{Router.B4}", 0))
    while True:
        reply = s.recv(2048)
        if reply[20] == 0 and struct.unpack_from("!HH", reply, 24) == (0x4242, seq):
            break
    time.sleep(0.2)
"""
