"""TC egress metering (xdpflow_egress): same maps and key as XDP ingress, direction 1.

Real traffic through a gateway (tools.netns.Router: a <-> router <-> b): with
XDP ingress and TC egress on both router interfaces, a forwarded packet is one
ingress record on the interface it entered and one egress record on the one it
left; what the router itself sends is egress only, what it receives ingress
only; counters and drained flows agree exactly; the egress program never
drops. The datapath is loaded in this process and attached from inside the
router namespace (tools.netns.inside: setns on this thread); sockets are made
in a and b the same way.

BPF_PROG_TEST_RUN: the egress program parses exactly like the XDP program
(the parser harness, tests/kernel/harness.py, direction EGRESS), GSO skbs count as
their segments, and the verdict is always TC_ACT_UNSPEC.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from exporter.drain import Pages
from tests.conftest import ROOT, xdp_attached
from tests.kernel import frames as fr
from tests.kernel import refparser as ref
from tests.kernel.catalogue import CATALOGUE, FUZZ, MALFORMED, VALID, check_expectation
from tests.kernel.harness import LOOPBACK_IFINDEX, TC_ACT_UNSPEC, Harness
from tools.netns import Router, VethPair, inside, ip
from tools.netns import ifindex as ns_ifindex
from xdp import bpfsys
from xdp.attach import EGRESS_TC_PREF
from xdp.layout import EGRESS, INGRESS
from xdp.loader import Datapath, LoaderError

pytestmark = pytest.mark.kernel

ICMP_ECHO, ICMP_ECHO_REPLY = 8, 0
ICMP6_ECHO, ICMP6_ECHO_REPLY = 128, 129
BTF = "/sys/kernel/btf/vmlinux"


@pytest.fixture
def router() -> Iterator[Router]:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    r = Router()
    try:
        r.create()
        yield r
    finally:
        r.destroy()


# -- helpers --------------------------------------------------------------------------

Where = tuple[int, int]   # (direction, ifindex)


@dataclass(frozen=True)
class Tuple5:
    """What identifies a flow apart from where it was seen (direction, ifindex) and its VLAN."""

    src: str
    dst: str
    protocol: int
    sport: int
    dport: int


def _addr(raw: bytes, version: int) -> str:
    return str(ipaddress.ip_address(raw[12:] if version == 4 else raw))


def drain_all(dp: Datapath) -> dict[Tuple5, dict[Where, dict[str, int]]]:
    """Flip and drain both pages (nothing may still be attached); flows by 5-tuple, then (direction, ifindex).

    Checks every page's own counters against its flows on the way (exact conservation), and that
    every key's direction is 0 or 1 and its pad zero.
    """
    pages = Pages(dp)
    out: dict[Tuple5, dict[Where, dict[str, int]]] = defaultdict(dict)
    drained = 0
    for _ in range(2):
        d = pages.flip_and_merge(0, keep_slots=True)
        assert d.slots is not None
        keys = d.slots["key"]
        assert not keys["segment"].any(), "flow_key.segment is not zero"
        assert set(np.unique(keys["direction"]).tolist()) <= {INGRESS, EGRESS}
        recs = d.records
        assert d.stats["insert_failures"] == 0 and d.stats["parse_failures"] == 0, d.stats
        assert d.stats["packets"] == int(recs["packets"].sum()), d.stats
        assert d.stats["octets"] == int(recs["octets"].sum()), d.stats
        assert d.stats["frames"] == d.stats["packets"] + d.stats["non_ip"], d.stats
        for rec in recs:
            key = ref.FlowKey.from_record(rec)
            t = Tuple5(_addr(key.src_addr, key.ip_version), _addr(key.dst_addr, key.ip_version), key.protocol,
                       key.src_port, key.dst_port)
            where = (key.direction, key.ifindex)
            assert where not in out[t], f"{key} drained twice"
            out[t][where] = {"packets": int(rec["packets"]), "octets": int(rec["octets"]),
                             "tcp_flags": int(rec["tcp_flags"]), "vlan_id": key.vlan_id}
            drained += int(rec["packets"])
    total = dp.read_stats()
    assert total["packets"] == drained, (total, drained)
    return out


def tc(netns: str, *args: str) -> str:
    return subprocess.run(["tc", "-n", netns, *args], capture_output=True, text=True, check=True).stdout


def icmp_echo(type_: int, ident: int, seq: int) -> bytes:
    hdr = struct.pack("!BBHHH", type_, 0, 0, ident, seq) + b"xdpflow-egress"
    return hdr[:2] + struct.pack("!H", fr.inet_checksum(hdr)) + hdr[4:]


def ping(netns: str, dst: str, count: int) -> int:
    """`count` echo requests from `netns` to `dst`, one at a time; the number of replies received."""
    v6 = ":" in dst
    with inside(netns):
        s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_RAW,
                          socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP)
    s.settimeout(2)
    ident = os.getpid() & 0xFFFF
    replies = 0
    with s:
        for seq in range(count):
            # The kernel fills in the ICMPv6 checksum of a raw socket.
            s.sendto(icmp_echo(ICMP6_ECHO if v6 else ICMP_ECHO, ident, seq), (dst, 0))
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline:
                data = s.recv(2048)
                icmp = data if v6 else data[(data[0] & 0x0F) * 4:]  # IPv4 raw sockets include the IP header
                if icmp[0] == (ICMP6_ECHO_REPLY if v6 else ICMP_ECHO_REPLY) and \
                        struct.unpack("!HH", icmp[4:8]) == (ident, seq):
                    replies += 1
                    break
    return replies


def udp_socket(netns: str, addr: str, port: int) -> socket.socket:
    with inside(netns):
        s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE: nothing may drop at the receiver
    s.bind((addr, port))
    s.settimeout(2)
    return s


def exchange(tx: socket.socket, rx: socket.socket, count: int, size: int) -> int:
    """Send `count` datagrams of `size` bytes from tx to rx; how many rx received."""
    dst = rx.getsockname()[:2]
    for i in range(count):
        tx.sendto(bytes([i & 0xFF]) * size, dst)
    got = 0
    try:
        while got < count:
            rx.recv(65536)
            got += 1
    except TimeoutError:
        pass
    return got


def attach_everywhere(dp: Datapath, r: Router) -> tuple[int, int]:
    """XDP ingress and TC egress on both router interfaces; (ra ifindex, rb ifindex)."""
    with inside(r.router):
        for ifname in (r.ra_if, r.rb_if):
            dp.attach(ifname)
            assert dp.attach_egress(ifname).method == "tcx"
    return ns_ifindex(r.router, r.ra_if), ns_ifindex(r.router, r.rb_if)


# -- a gateway ---------------------------------------------------------------------------

def test_gateway_counts_each_packet_once_per_direction(router: Router) -> None:
    r = router
    n4, n6, m, k = 200, 120, 30, 3
    size4, size6 = 100, 60
    a4, b4 = udp_socket(r.a, r.A4, 40000), udp_socket(r.b, r.B4, 5000)
    a6, b6 = udp_socket(r.a, r.A6, 40006), udp_socket(r.b, r.B6, 5006)
    # Resolve every neighbour first, so what follows is the traffic under test and its replies.
    for tx, rx in ((a4, b4), (b4, a4), (a6, b6), (b6, a6)):
        assert exchange(tx, rx, 1, 1) == 1
    for ns, dst in ((r.router, r.A4), (r.router, r.B4), (r.router, r.A6), (r.a, r.RA4)):
        assert ping(ns, dst, 1) == 1

    with Datapath(max_entries=4096).load() as dp:
        ra, rb = attach_everywhere(dp, r)
        assert exchange(a4, b4, n4, size4) == n4, "a packet a -> b was lost: the egress verdict must never drop"
        assert exchange(b4, a4, m, size4) == m
        assert exchange(a6, b6, n6, size6) == n6
        assert exchange(b6, a6, m, size6) == m
        assert ping(r.router, r.A4, k) == k     # the router's own packets: egress only
        assert ping(r.router, r.B4, k) == k
        assert ping(r.router, r.A6, k) == k
        assert ping(r.a, r.RA4, k) == k         # packets to the router: ingress only
        dp.detach_all()
        flows = drain_all(dp)
    for s in (a4, b4, a6, b6):
        s.close()

    def seen(src: str, dst: str, proto: int, sport: int, dport: int) -> dict[Where, int]:
        return {w: v["packets"] for w, v in flows.get(Tuple5(src, dst, proto, sport, dport), {}).items()}

    fwd, rev = {(INGRESS, ra): n4, (EGRESS, rb): n4}, {(INGRESS, rb): m, (EGRESS, ra): m}
    assert seen(r.A4, r.B4, 17, 40000, 5000) == fwd
    assert seen(r.B4, r.A4, 17, 5000, 40000) == rev
    assert seen(r.A6, r.B6, 17, 40006, 5006) == {(INGRESS, ra): n6, (EGRESS, rb): n6}
    assert seen(r.B6, r.A6, 17, 5006, 40006) == rev
    for t, octets in ((Tuple5(r.A4, r.B4, 17, 40000, 5000), n4 * (20 + 8 + size4)),
                      (Tuple5(r.A6, r.B6, 17, 40006, 5006), n6 * (40 + 8 + size6))):
        assert flows[t][(INGRESS, ra)]["octets"] == flows[t][(EGRESS, rb)]["octets"] == octets

    echo, reply, echo6, reply6 = ICMP_ECHO << 8, ICMP_ECHO_REPLY << 8, ICMP6_ECHO << 8, ICMP6_ECHO_REPLY << 8
    assert seen(r.RA4, r.A4, 1, 0, echo) == {(EGRESS, ra): k}
    assert seen(r.A4, r.RA4, 1, 0, reply) == {(INGRESS, ra): k}
    assert seen(r.RB4, r.B4, 1, 0, echo) == {(EGRESS, rb): k}
    assert seen(r.B4, r.RB4, 1, 0, reply) == {(INGRESS, rb): k}
    assert seen(r.RA6, r.A6, 58, 0, echo6) == {(EGRESS, ra): k}
    assert seen(r.A6, r.RA6, 58, 0, reply6) == {(INGRESS, ra): k}
    assert seen(r.A4, r.RA4, 1, 0, echo) == {(INGRESS, ra): k}
    assert seen(r.RA4, r.A4, 1, 0, reply) == {(EGRESS, ra): k}
    # Whatever else the router's interfaces carried (neighbour discovery, MLD) came in or went out of them.
    assert {w for per in flows.values() for w in per} <= {(d, i) for d in (INGRESS, EGRESS) for i in (ra, rb)}


def test_host_originated_tcp_counts_gso_segments(router: Router) -> None:
    """The router sends TCP to b: its skbs leave as GSO super-packets (measured: ~84 skbs for 2,900
    segments). Egress on the router must count what XDP ingress on b sees on the wire: the same packets,
    octets and flags."""
    r = router
    with Datapath(max_entries=4096).load() as dp:
        with inside(r.router):
            dp.attach_egress(r.rb_if)
            client = socket.socket()
        with inside(r.b):
            dp.attach(r.b_if)   # also takes TSO from the router's end: segmentation happens after TC egress
            server = socket.socket()
        server.bind((r.B4, 6000))
        server.listen()
        received = 0

        def serve() -> None:
            nonlocal received
            conn, _ = server.accept()
            with conn:
                while data := conn.recv(1 << 16):
                    received += len(data)

        t = threading.Thread(target=serve)
        t.start()
        client.connect((r.B4, 6000))
        sport = client.getsockname()[1]
        client.sendall(bytes(4 << 20))
        client.close()
        t.join(timeout=30)
        server.close()
        assert received == 4 << 20
        dp.detach_all()
        flows = drain_all(dp)
    per = flows[Tuple5(r.RB4, r.B4, 6, sport, 6000)]
    b_idx, rb = ns_ifindex(r.b, r.b_if), ns_ifindex(r.router, r.rb_if)
    out, wire = per[(EGRESS, rb)], per[(INGRESS, b_idx)]
    assert out == wire, (out, wire)
    assert out["packets"] > (4 << 20) // 1500


# -- the egress hook in detail ---------------------------------------------------------------

def test_tcx_link_attach_type_and_detach(router: Router) -> None:
    with Datapath(max_entries=1024).load() as dp, inside(router.router):
        att = dp.attach_egress(router.ra_if, method="tcx")
        info = bpfsys.link_info(att.link_fd)
        prog = bpfsys.prog_id(dp.egress_prog_fd)
        assert (info.type, info.attach_type, info.ifindex, info.prog_id) == (11, bpfsys.BPF_TCX_EGRESS,
                                                                             att.ifindex, prog)
        assert bpfsys.prog_query(att.ifindex, bpfsys.BPF_TCX_EGRESS) == [prog]
        with pytest.raises(LoaderError, match="already metered"):
            dp.attach_egress(router.ra_if)
        dp.detach_egress(att)
        assert bpfsys.prog_query(att.ifindex, bpfsys.BPF_TCX_EGRESS) == []
        assert dp.egress_attachments == []


def _btf_enum_values(path: str, names: set[str]) -> dict[str, int]:
    """Values of enumerators `names` in a BTF blob (kind ENUM only; enough for enum bpf_attach_type)."""
    with open(path, "rb") as f:
        blob = f.read()
    magic, _, _, hdr_len, type_off, type_len, str_off, _ = struct.unpack_from("<HBBIIIII", blob, 0)
    assert magic == 0xEB9F
    types, strings = hdr_len + type_off, hdr_len + str_off
    extra = {1: 4, 3: 12, 14: 4, 17: 4}                       # INT, ARRAY, VAR, DECL_TAG
    per_member = {4: 12, 5: 12, 6: 8, 13: 8, 15: 12, 19: 12}  # STRUCT, UNION, ENUM, FUNC_PROTO, DATASEC, ENUM64
    out: dict[str, int] = {}
    pos = types
    while pos < types + type_len:
        _, info, _ = struct.unpack_from("<III", blob, pos)
        pos += 12
        kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
        if kind == 6:
            for i in range(vlen):
                name_off, value = struct.unpack_from("<Ii", blob, pos + 8 * i)
                end = blob.index(b"\0", strings + name_off)
                name = blob[strings + name_off:end].decode()
                if name in names:
                    out[name] = value
        pos += extra.get(kind, 0) + per_member.get(kind, 0) * vlen
    return out


def test_attach_type_numbers_match_the_running_kernel() -> None:
    if not os.path.exists(BTF):
        pytest.skip("no kernel BTF")
    want = {"BPF_XDP": bpfsys.BPF_XDP, "BPF_TCX_INGRESS": bpfsys.BPF_TCX_INGRESS,
            "BPF_TCX_EGRESS": bpfsys.BPF_TCX_EGRESS}
    got = _btf_enum_values(BTF, set(want))
    if "BPF_TCX_EGRESS" not in got:
        pytest.skip("kernel without TCX")
    assert got == want


def test_tc_fallback_attaches_meters_and_cleans_up(veth: VethPair) -> None:
    """method "tc": clsact + cls_bpf; detach removes the filter and the qdisc xdpflow added."""
    with Datapath(max_entries=1024).load() as dp:
        with inside(veth.obs):
            att = dp.attach_egress(veth.obs_if, method="tc")
            tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            tx.bind(("198.18.255.2", 41001))
            with Datapath(max_entries=128).load() as other:
                with pytest.raises(LoaderError, match=f"tc filter del dev {veth.obs_if} egress pref"):
                    other.attach_egress(veth.obs_if, method="tc")
        assert (att.method, att.added_qdisc) == ("tc", True)
        shown = tc(veth.obs, "filter", "show", "dev", veth.obs_if, "egress")
        assert f"pref {EGRESS_TC_PREF} bpf" in shown and "xdpflow_egress" in shown and "direct-action" in shown
        for _ in range(10):
            tx.sendto(b"x" * 10, ("198.18.255.1", 7))
        tx.close()
        dp.detach_all()
        flows = drain_all(dp)
        assert tc(veth.obs, "filter", "show", "dev", veth.obs_if, "egress").strip() == ""
        assert "clsact" not in tc(veth.obs, "qdisc", "show", "dev", veth.obs_if)
    got = flows[Tuple5("198.18.255.2", "198.18.255.1", 17, 41001, 7)]
    assert got == {(EGRESS, veth.obs_ifindex()): {"packets": 10, "octets": 10 * 38, "tcp_flags": 0, "vlan_id": 0}}


def test_tc_fallback_keeps_a_clsact_qdisc_it_did_not_add(veth: VethPair) -> None:
    tc(veth.obs, "qdisc", "add", "dev", veth.obs_if, "clsact")
    with Datapath(max_entries=128).load() as dp, inside(veth.obs):
        att = dp.attach_egress(veth.obs_if, method="tc")
        assert not att.added_qdisc
        dp.detach_egress(att)
    assert "clsact" in tc(veth.obs, "qdisc", "show", "dev", veth.obs_if)
    assert tc(veth.obs, "filter", "show", "dev", veth.obs_if, "egress").strip() == ""


def test_refuses_a_non_ethernet_interface(veth: VethPair) -> None:
    ip("tuntap", "add", "dev", "xftun0", "mode", "tun", netns=veth.obs)
    try:
        with Datapath(max_entries=128).load() as dp, inside(veth.obs):
            with pytest.raises(LoaderError, match="not an Ethernet interface"):
                dp.attach_egress("xftun0")
            assert dp.egress_attachments == []
    finally:
        ip("link", "del", "xftun0", netns=veth.obs, check=False)


def test_sigkill_leaves_no_egress_attachment(veth: VethPair) -> None:
    """The TCX link dies with the process, whatever kills it."""
    code = ("import sys, time; sys.path.insert(0, sys.argv[1]);"
            "from xdp.loader import Datapath;"
            "dp = Datapath(max_entries=128).load(); dp.attach(sys.argv[2]); dp.attach_egress(sys.argv[2]);"
            "print('attached', flush=True); time.sleep(60)")
    p = subprocess.Popen(["ip", "netns", "exec", veth.obs, sys.executable, "-c", code, ROOT, veth.obs_if],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert p.stdout is not None
        for line in p.stdout:   # structlog's debug lines come first
            if line.strip() == "attached":
                break
        else:
            p.wait(timeout=10)
            raise AssertionError(f"the attaching process failed: {p.stderr.read() if p.stderr else ''}")
        with inside(veth.obs):
            idx = socket.if_nametoindex(veth.obs_if)
            assert len(bpfsys.prog_query(idx, bpfsys.BPF_TCX_EGRESS)) == 1
            p.send_signal(signal.SIGKILL)
            p.wait(timeout=10)
            deadline = time.monotonic() + 5   # the link is released once the killed process's files are closed
            while bpfsys.prog_query(idx, bpfsys.BPF_TCX_EGRESS) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert bpfsys.prog_query(idx, bpfsys.BPF_TCX_EGRESS) == []
        assert not xdp_attached(veth.obs, veth.obs_if)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=10)


NEIGHBOURS = r"""
#include <uapi/linux/bpf.h>
BPF_ARRAY(after, __u64, 1);

/* Before xdpflow_egress: what a VLAN device does, the tag into the skb's metadata. */
int tag42(struct __sk_buff *skb)
{
	bpf_skb_vlan_push(skb, __builtin_bswap16(0x8100), 42);
	return -1;  /* TCX_NEXT */
}

/* After xdpflow_egress: counts what reaches it. */
int count(struct __sk_buff *skb)
{
	int k = 0;
	__u64 *v = after.lookup(&k);
	if (v)
		__sync_fetch_and_add(v, 1);
	return -1;
}
"""


def test_egress_in_a_tcx_chain_takes_the_metadata_vlan_tag(veth: VethPair) -> None:
    """Programs before and after xdpflow's on the same TCX hook: the one after still sees every packet
    (TC_ACT_UNSPEC passes the verdict on), and a VLAN tag held in the skb's metadata (as a VLAN device
    hands it down; pushed here by the program before) is the key's vlan_id."""
    from bcc import BPF

    from xdp import headers

    found = headers.find()
    with found.applied():
        helpers = BPF(text=NEIGHBOURS.encode(), cflags=["-w", *found.cflags])
    links: list[int] = []
    try:
        tag_fd = helpers.load_func(b"tag42", BPF.SCHED_CLS).fd
        count_fd = helpers.load_func(b"count", BPF.SCHED_CLS).fd
        # The neighbour would never answer a tagged ARP request: no resolution needed.
        ip("neigh", "add", "198.18.255.1", "lladdr", "02:00:00:00:00:99", "dev", veth.obs_if, "nud", "permanent",
           netns=veth.obs)
        with Datapath(max_entries=1024).load() as dp:
            with inside(veth.obs):
                idx = socket.if_nametoindex(veth.obs_if)
                links.append(bpfsys.tcx_link_create(tag_fd, idx))
                dp.attach_egress(veth.obs_if)
                links.append(bpfsys.tcx_link_create(count_fd, idx))
                assert bpfsys.prog_query(idx, bpfsys.BPF_TCX_EGRESS) == [
                    bpfsys.prog_id(tag_fd), bpfsys.prog_id(dp.egress_prog_fd), bpfsys.prog_id(count_fd)]
                tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            tx.bind(("198.18.255.2", 41000))
            for _ in range(5):
                tx.sendto(b"v" * 20, ("198.18.255.1", 9))
            tx.close()
            for fd in links:
                os.close(fd)
            links.clear()
            dp.detach_all()
            frames = dp.read_stats()["frames"]
            flows = drain_all(dp)
        after = helpers[b"after"][ctypes.c_int(0)].value
    finally:
        for fd in links:
            os.close(fd)
        helpers.cleanup()
    got = flows[Tuple5("198.18.255.2", "198.18.255.1", 17, 41000, 9)]
    assert got == {(EGRESS, idx): {"packets": 5, "octets": 5 * 48, "tcp_flags": 0, "vlan_id": 42}}
    assert after == frames >= 5


def test_headers_beyond_the_linear_part_are_pulled(veth: VethPair) -> None:
    """AF_PACKET builds a frame of a page or more with only its Ethernet header (the device's
    hard_header_len) in the skb's linear part: the first parse fails, bpf_skb_pull_data brings the
    headers in, the second parse meters the packet whole (octets = its IP total length). Without the
    pull every one of these would be a parse failure (measured); with it each costs ~0.4 us more."""
    size = 6000
    for ns, ifname in ((veth.obs, veth.obs_if), (veth.gen, veth.gen_if)):
        ip("link", "set", ifname, "mtu", "9000", netns=ns)
    payload = bytes(size - 14 - 28)
    frame = fr.ethernet(fr.ETH_P_IP, fr.ipv4(17, fr.udp(4000, 4001, payload), src=bytes([198, 18, 255, 2]),
                                             dst=bytes([198, 18, 255, 1])))
    n = 20
    with Datapath(max_entries=1024).load() as dp:
        with inside(veth.obs):
            dp.attach_egress(veth.obs_if)
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        with s:
            s.bind((veth.obs_if, 0))
            for _ in range(n):
                s.send(frame)
        dp.detach_all()
        flows = drain_all(dp)   # asserts no parse failure
    got = flows[Tuple5("198.18.255.2", "198.18.255.1", 17, 4000, 4001)]
    assert got == {(EGRESS, veth.obs_ifindex()): {"packets": n, "octets": n * (size - 14), "tcp_flags": 0,
                                                  "vlan_id": 0}}


# -- BPF_PROG_TEST_RUN: the egress program parses like the XDP one ----------------------------

def test_same_frames_same_keys_but_direction(harness: Harness) -> None:
    batch = [f for _, f, _ in CATALOGUE]
    ingress = harness.run(batch)
    egress = harness.run(batch, direction=ref.EGRESS)
    for name_frame, got_in, got_out in zip(CATALOGUE, ingress, egress, strict=True):
        if isinstance(got_in, ref.Metered):
            assert isinstance(got_out, ref.Metered), name_frame[0]
            assert got_in.key.direction == INGRESS and got_out.key.direction == EGRESS
            assert got_out == replace(got_in, key=replace(got_in.key, direction=EGRESS)), name_frame[0]
        else:
            assert got_out is got_in, name_frame[0]


def test_egress_catalogue(harness: Harness) -> None:
    for name, frame, want in CATALOGUE:
        got = harness.run([frame], direction=ref.EGRESS)[0]
        try:
            check_expectation(got, want)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None


@FUZZ
@given(batch=st.lists(st.one_of(VALID, MALFORMED), min_size=1, max_size=12))
def test_fuzz_egress(harness: Harness, batch: list[bytes]) -> None:
    harness.run(batch, direction=ref.EGRESS)


def test_egress_takes_frames_up_to_a_page(harness: Harness) -> None:
    """Jumbo frames a sched_cls test run refuses are checked to move nothing; those it takes parse whole."""
    harness.program(ref.EGRESS)
    big = harness.egress_max
    assert 1514 <= big < 4096, big
    frames = [fr.ethernet(fr.ETH_P_IP, fr.ipv4(17, fr.udp(1, n, bytes(n - 14 - 28)))) for n in (1514, big, big + 1)]
    results = harness.run(frames, direction=ref.EGRESS)
    assert all(isinstance(x, ref.Metered) for x in results)


@pytest.mark.parametrize(("l4", "proto", "headers"), [
    (fr.tcp(5, 6, bytes(1000), options=bytes(12), flags=fr.TCP_ACK | fr.TCP_PSH), 6, 20 + 32),
    (fr.udp(5, 6, bytes(1000)), 17, 20 + 8),
], ids=["tcp-with-options", "udp"])
@pytest.mark.parametrize("segs", [1, 2, 44])
def test_gso_packet_counts_its_segments(harness: Harness, l4: bytes, proto: int, headers: int, segs: int) -> None:
    """gso_segs segments, each with the headers: packets = segs, octets = IP length + (segs - 1) x headers."""
    frame = fr.ethernet(fr.ETH_P_IP, fr.ipv4(proto, l4))
    tot = len(frame) - 14
    prog, verdict = harness.program(ref.EGRESS)
    harness.clean()
    harness.dirty = True
    before = harness.stats()
    ctx = bpfsys.SkbContext(gso_segs=segs, gso_size=1000 if segs > 1 else 0).pack()
    r = bpfsys.prog_test_run(prog, frame, ctx=ctx)
    assert r.retval == verdict and r.data_out == frame
    after = harness.stats()
    octets = tot + (segs - 1) * headers
    assert {k: after[k] - before[k] for k in ("frames", "packets", "octets")} == \
        {"frames": segs, "packets": segs, "octets": octets}
    flows, _ = harness.drain()
    want = ref.parse(frame, LOOPBACK_IFINDEX, ref.EGRESS)
    assert isinstance(want, ref.Metered)
    assert flows[want.key]["packets"] == segs and flows[want.key]["octets"] == octets


def test_gso_segs_without_gso_size_is_one_packet(harness: Harness) -> None:
    """gso_segs is only meaningful on a GSO skb (gso_size set): a stale count must not multiply."""
    frame = fr.ethernet(fr.ETH_P_IP, fr.ipv4(17, fr.udp(7, 8, bytes(100))))
    prog, _ = harness.program(ref.EGRESS)
    harness.clean()
    harness.dirty = True
    before = harness.stats()
    bpfsys.prog_test_run(prog, frame, ctx=bpfsys.SkbContext(gso_segs=9).pack())
    after = harness.stats()
    assert (after["packets"] - before["packets"], after["octets"] - before["octets"]) == (1, 128)
    harness.drain()


def test_skb_context_ifindex_is_the_key_ifindex(harness: Harness, veth: VethPair) -> None:
    """The egress interface is the skb's device (ifindex), whatever the frame."""
    frame = fr.ethernet(fr.ETH_P_IP, fr.ipv4(17, fr.udp(70, 80, b"z")))
    prog, _ = harness.program(ref.EGRESS)
    harness.clean()
    harness.dirty = True
    with inside(veth.obs):
        idx = socket.if_nametoindex(veth.obs_if)
        bpfsys.prog_test_run(prog, frame, ctx=bpfsys.SkbContext(ifindex=idx).pack())
    flows, _ = harness.drain()
    want = ref.parse(frame, idx, ref.EGRESS)
    assert isinstance(want, ref.Metered) and idx != LOOPBACK_IFINDEX
    assert flows == {want.key: {"packets": 1, "octets": 29, "tcp_flags": 0, "tos": 0, "first_flags": 0, "min_ttl": 64,
                                "max_ttl": 64}}


def test_verdict_constant_is_tcx_next() -> None:
    """TC_ACT_UNSPEC (-1) is TCX_NEXT: the next program of the egress chain still runs."""
    assert TC_ACT_UNSPEC == (-1) & 0xFFFFFFFF


def test_router_forwards_in_the_router_namespace_only(router: Router) -> None:
    def forwarding(ns: str, key: str) -> str:
        out = subprocess.run(["ip", "netns", "exec", ns, "cat", f"/proc/sys/net/{key}"],
                             capture_output=True, text=True, check=True).stdout
        return out.strip()

    for key in ("ipv4/ip_forward", "ipv6/conf/all/forwarding"):
        assert [forwarding(ns, key) for ns in router.namespaces] == ["0", "1", "0"], key
