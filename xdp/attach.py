"""Attach the loaded programs to interfaces and detach them: XDP links, TCX links or clsact filters.

XDP: `attach_xdp()` creates a bpf_link (BPF_LINK_CREATE) in the mode asked for (auto: native,
then generic) and reads back over rtnetlink (pyroute2) the mode the kernel gave; closing the
link's fd detaches, and so does the process's death. The kernel refuses a link where another XDP
program is attached, and xdpflow checks first, so a program it did not attach is never touched.

Egress: `attach_egress()` appends the TC program at the egress hook, with a TCX bpf_link where the
kernel has TCX (>= 6.6, gone with its fd) or a clsact qdisc and a cls_bpf filter at EGRESS_TC_PREF
otherwise (not tied to the process: `detach_egress()` deletes it, in the network namespace it was
added in, and the qdisc when xdpflow added it and nothing else uses it). After a SIGKILL such a
filter stays until removed by hand (`tc filter del dev IF egress pref 49152`, or `tc qdisc del dev
IF clsact` when nothing else uses the qdisc); a restart refuses the interface, naming that command.

Also here: the rtnetlink socket (`netlink()`), and moving the calling thread between network
namespaces (`setns()`, `thread_in_netns()`) for tests, tools and the egress fallback.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import structlog

from xdp import bpfsys
from xdp.compile import EGRESS_PROG
from xdp.errors import LoaderError

log = structlog.get_logger("xdpflow.loader")

XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
MODE_FLAGS = {"generic": XDP_FLAGS_SKB_MODE, "native": XDP_FLAGS_DRV_MODE}
# IFLA_XDP_ATTACHED: pyroute2 decodes it to a name on some versions, an int on others.
ATTACHED_NAMES: dict[int | str, str] = {1: "native", 2: "generic", 3: "offload", 4: "multi",
                                        "xdp": "native", "xdpdrv": "native", "xdpgeneric": "generic",
                                        "xdpoffload": "offload", "xdpmulti": "multi", "none": ""}

EGRESS_METHODS = ("auto", "tcx", "tc")
EGRESS_TC_PREF = 49152               # cls_bpf filter priority of the clsact fallback (tc's "pref")
EGRESS_TC_HANDLE = 1
TC_H_CLSACT_EGRESS = 0xFFFFFFF3      # parent "ffff:fff3": the egress hook of the clsact qdisc
TC_H_CLSACT_INGRESS = 0xFFFFFFF2
ARPHRD_ETHER = 1
ARPHRD_LOOPBACK = 772


@dataclass
class Attachment:
    ifname: str
    ifindex: int
    mode: str          # what the kernel reports: native or generic
    link_fd: int       # the bpf_link; closing it detaches


@dataclass
class EgressAttachment:
    ifname: str
    ifindex: int
    method: str                  # "tcx" (bpf_link) or "tc" (clsact + cls_bpf filter)
    link_fd: int = -1            # tcx: the bpf_link; closing it detaches
    added_qdisc: bool = False    # tc: xdpflow added the clsact qdisc (and removes it on detach)
    netns_fd: int = -1           # tc: the network namespace attached in (ifindex is only valid there)


def attach_xdp(prog_fd: int, ifname: str, mode: str = "auto") -> Attachment:
    """Attach the XDP program `prog_fd` to `ifname` with a bpf_link; the mode is what the kernel reports."""
    if mode not in ("auto", "native", "generic"):
        raise LoaderError(f"unknown XDP mode {mode!r}: use auto, native or generic")
    ifindex = ifindex_of(ifname)
    with netlink() as ipr:
        current = attached_mode(ipr, ifindex)
        if current is not None:
            raise LoaderError(f"{ifname} already has an XDP program attached ({current} mode); "
                              "xdpflow will not replace a program it did not attach")
        tries = ["native", "generic"] if mode == "auto" else [mode]
        last: OSError | None = None
        for m in tries:
            try:
                link_fd = bpfsys.xdp_link_create(prog_fd, ifindex, MODE_FLAGS[m])
            except OSError as e:
                last = e
                continue
            got = attached_mode(ipr, ifindex) or m
            att = Attachment(ifname, ifindex, got, link_fd)
            log.debug("attached", interface=ifname, ifindex=ifindex, mode=got)
            return att
    assert last is not None
    if last.errno == errno.EPERM:
        raise LoaderError("attaching XDP needs root or CAP_NET_ADMIN + CAP_BPF")
    if last.errno in (errno.EBUSY, errno.EEXIST):
        raise LoaderError(f"{ifname} already has an XDP program attached; "
                          "xdpflow will not replace a program it did not attach")
    raise LoaderError(f"could not attach to {ifname} in {mode} mode: {os.strerror(last.errno or 0)}")


def detach_xdp(att: Attachment) -> None:
    """Close the bpf_link: the kernel detaches the program."""
    try:
        os.close(att.link_fd)
    except OSError as e:
        log.debug("detach skipped", interface=att.ifname, reason=str(e))


def attach_egress(egress_prog: Callable[[], int], ifname: str, method: str = "auto",
                  metered: Collection[int] = ()) -> EgressAttachment:
    """Meter what `ifname` sends (direction 1, ifindex = `ifname`'s) with the TC program.

    method "tcx": a TCX bpf_link (kernel >= 6.6); "tc": a clsact qdisc and
    cls_bpf filter; "auto": TCX where the kernel has it, else tc. Other
    programs at the hook keep running: the program is appended and always
    returns TC_ACT_UNSPEC (no verdict of its own). `egress_prog` gives the program's fd (or raises
    why it is not loaded); `metered`: the ifindexes this process meters at egress already.
    """
    if method not in EGRESS_METHODS:
        raise LoaderError(f"unknown egress method {method!r}: use auto, tcx or tc")
    ifindex = ifindex_of(ifname)
    if ifindex in metered:
        raise LoaderError(f"{ifname} egress is already metered by this process")
    kind = _link_type(ifindex)
    if kind not in (ARPHRD_ETHER, ARPHRD_LOOPBACK):
        raise LoaderError(f"{ifname} is not an Ethernet interface (link type {kind}): "
                          "egress metering parses Ethernet frames")
    prog_fd = egress_prog()
    att: EgressAttachment | None = None
    if method in ("auto", "tcx"):
        try:
            att = EgressAttachment(ifname, ifindex, "tcx",
                                   link_fd=bpfsys.tcx_link_create(prog_fd, ifindex, bpfsys.BPF_TCX_EGRESS))
        except OSError as e:
            if e.errno == errno.EPERM:
                raise LoaderError("attaching at egress needs root or CAP_NET_ADMIN + CAP_BPF") from None
            # EINVAL: a kernel before TCX (6.6) does not know the attach type.
            if method == "tcx" or e.errno != errno.EINVAL:
                raise LoaderError(f"could not attach to {ifname} egress with TCX: "
                                  f"{os.strerror(e.errno or 0)}") from None
            log.debug("no TCX in this kernel, using clsact + cls_bpf", interface=ifname)
    if att is None:
        att = _attach_egress_tc(ifname, ifindex, prog_fd)
        att.netns_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    log.debug("attached at egress", interface=ifname, ifindex=ifindex, method=att.method)
    return att


def _attach_egress_tc(ifname: str, ifindex: int, prog_fd: int) -> EgressAttachment:
    from pyroute2.netlink.exceptions import NetlinkError

    with netlink() as ipr:
        added = False
        try:
            ipr.tc("add", "clsact", index=ifindex)
            added = True
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise LoaderError(f"could not add a clsact qdisc to {ifname}: {os.strerror(e.code)}") from None
        if not added and _tc_egress_filter(ipr, ifindex):
            raise LoaderError(
                f"{ifname} egress already has a filter at pref {EGRESS_TC_PREF} (a previous xdpflow that did "
                f"not exit cleanly?): remove it with `tc filter del dev {ifname} egress pref {EGRESS_TC_PREF}`")
        try:
            ipr.tc("add-filter", "bpf", index=ifindex, handle=EGRESS_TC_HANDLE, fd=prog_fd, name=EGRESS_PROG,
                   parent=TC_H_CLSACT_EGRESS, prio=EGRESS_TC_PREF, direct_action=True)
        except NetlinkError as e:
            if added:
                _del_clsact(ipr, ifindex)
            raise LoaderError(f"could not add the egress filter to {ifname}: {os.strerror(e.code)}") from None
    return EgressAttachment(ifname, ifindex, "tc", added_qdisc=added)


def detach_egress(att: EgressAttachment) -> None:
    """Close the TCX link, or delete the clsact filter (in the namespace it was added in)."""
    if att.method == "tcx":
        try:
            os.close(att.link_fd)
        except OSError as e:
            log.debug("egress detach skipped", interface=att.ifname, reason=str(e))
    else:
        try:
            with thread_in_netns(att.netns_fd):
                _detach_egress_tc(att)
        finally:
            if att.netns_fd >= 0:
                os.close(att.netns_fd)
                att.netns_fd = -1


@contextmanager
def netlink() -> Iterator[Any]:
    """An rtnetlink socket (pyroute2 IPRoute) of this network namespace, closed afterwards."""
    from pyroute2 import IPRoute

    ipr = IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


def ifindex_of(ifname: str) -> int:
    try:
        return socket.if_nametoindex(ifname)
    except OSError:
        raise LoaderError(f"no interface named {ifname}") from None


def _link_type(ifindex: int) -> int:
    """ARPHRD_* type of an interface of this network namespace (1: Ethernet), over netlink."""
    with netlink() as ipr:
        links = ipr.link("get", index=ifindex)
    return int(links[0]["ifi_type"]) if links else ARPHRD_ETHER


def _tc_egress_filter(ipr: Any, ifindex: int) -> bool:
    """Whether the clsact egress hook of `ifindex` has a filter at EGRESS_TC_PREF."""
    for msg in ipr.get_filters(index=ifindex, parent=TC_H_CLSACT_EGRESS):
        if (msg["info"] >> 16) == EGRESS_TC_PREF:
            return True
    return False


def _del_clsact(ipr: Any, ifindex: int) -> None:
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        ipr.tc("del", "clsact", index=ifindex)
    except NetlinkError as e:
        log.debug("clsact qdisc not removed", ifindex=ifindex, reason=os.strerror(e.code))


_CLONE_NEWNET = 0x40000000


def setns(fd: int) -> None:
    """Move the calling thread into the network namespace of `fd` (an open nsfs file)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, _CLONE_NEWNET) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"setns: {os.strerror(e)}")


@contextmanager
def thread_in_netns(fd: int) -> Iterator[None]:
    """The calling thread in the network namespace of `fd` (an open nsfs file) for the body; -1: stay."""
    if fd < 0 or os.fstat(fd).st_ino == os.stat("/proc/thread-self/ns/net").st_ino:
        yield
        return
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        setns(fd)
        try:
            yield
        finally:
            setns(home)
    finally:
        os.close(home)


def _detach_egress_tc(att: EgressAttachment) -> None:
    """Delete the cls_bpf filter; and the clsact qdisc when xdpflow added it and it holds nothing else."""
    from pyroute2.netlink.exceptions import NetlinkError

    with netlink() as ipr:
        try:
            ipr.tc("del-filter", "bpf", index=att.ifindex, handle=EGRESS_TC_HANDLE, parent=TC_H_CLSACT_EGRESS,
                   prio=EGRESS_TC_PREF)
        except NetlinkError as e:  # ENODEV: the interface is gone, and its qdisc with it
            log.debug("egress filter not removed", interface=att.ifname, reason=os.strerror(e.code))
            return
        if att.added_qdisc:
            others = [m for parent in (TC_H_CLSACT_EGRESS, TC_H_CLSACT_INGRESS)
                      for m in ipr.get_filters(index=att.ifindex, parent=parent)]
            if not others:
                _del_clsact(ipr, att.ifindex)


def attached_mode(ipr: Any, ifindex: int) -> str | None:
    """The mode of the XDP program attached to `ifindex` ("native", "generic", ...), None if none."""
    links = ipr.link("get", index=ifindex)
    xdp = links[0].get_attr("IFLA_XDP") if links else None
    if xdp is None:
        return None
    attached = xdp.get_attr("IFLA_XDP_ATTACHED")
    name = ATTACHED_NAMES.get(attached, str(attached)) if attached else ""
    return name or None
