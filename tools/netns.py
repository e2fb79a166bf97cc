"""Throw-away test topologies: network namespaces joined by a veth pair.

`VethPair` creates a generator namespace and an observer namespace with one
veth end in each, addressed from 198.18.0.0/15 (the benchmarking range). The
XDP program is attached on the observer's end; traffic is generated in the
other namespace, so no generated frame can reach the machine's real network.
IPv6 is disabled on both ends so the kernel's own router/neighbour
solicitations do not mix with the generated flows (the generated IPv6 frames
use fd00::/8 addresses and need no configured address). Leaving the context
deletes both namespaces, which destroys the veth pair and any XDP program on
it, whatever happened inside.
"""

from __future__ import annotations

import itertools
import secrets
import subprocess
from collections.abc import Sequence
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


def sysctl(netns: str, key: str, value: str) -> None:
    path = "/proc/sys/" + key.replace(".", "/")
    subprocess.run(in_netns(netns, ["sh", "-c", f"echo {value} > {path}"]), check=True, capture_output=True)


def leftovers() -> list[str]:
    """Namespaces this process created and did not remove (others' are never touched)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
    present = {line.split()[0] for line in out.splitlines() if line.strip()}
    return sorted(present & _created)
