"""Real captures for the parser fuzz: traffic between two throw-away namespaces, recorded with dumpcap.

Generated frames only hold what their author thought of. Frames the kernel builds itself carry what
nobody wrote down: TCP with real options, ECN negotiation, urgent data and FIN/RST; IPv4 options and
fragments; IPv6 extension headers from sticky socket options with the fragment header in the middle
of the chain; neighbour discovery, MLD (hop-by-hop router alert), ARP and ICMP errors quoting the
packet they answer. `record()` makes such traffic inside a tools.netns.VethPair (198.18.255.0/30 and
fd00::/64, nothing leaves the two namespaces, both are deleted on the way out whatever happened),
captures it on the observer's end with dumpcap in classic pcap format and reads it back with
`read_pcap()`, a reader of that format (either byte order, Ethernet link type only).

The two ends are this module run as a program inside each namespace:
`python -m tests.kernel.captures serve|talk`. The server echoes TCP and UDP on PORT; the client talks
to it over IPv4 and IPv6 and sends the odd packets (raw ICMP echo, an unknown IP protocol, UDP to a
closed port, a broadcast). trafgen's standard mix (tools.packets, with its one VLAN-tagged flow) goes
last: the kernel here has no 802.1Q support, so that is the only way a tag reaches the wire.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tools import trafgen
from tools.netns import VethPair, in_netns, ip, sysctl
from tools.packets import standard_mix

ROOT = Path(__file__).resolve().parents[2]

GEN4, OBS4, BCAST4 = "198.18.255.1", "198.18.255.2", "198.18.255.3"  # VethPair's /30
GEN6, OBS6 = "fd00::1", "fd00::2"
PORT = 5001
CLOSED_PORT = 5009
PROTO_EXPERIMENTAL = 253  # RFC 3692: nobody parses it, so it is metered with ports 0
BIG = 4000  # over the 1500 MTU: fragmented (IPv4 and IPv6) by the sending kernel

LINKTYPE_ETHERNET = 1
_MAGICS = {b"\xa1\xb2\xc3\xd4": (">", 1e-6), b"\xd4\xc3\xb2\xa1": ("<", 1e-6),
           b"\xa1\xb2\x3c\x4d": (">", 1e-9), b"\x4d\x3c\xb2\xa1": ("<", 1e-9)}


class CaptureError(RuntimeError):
    pass


# -- pcap ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Frame:
    ts: float
    data: bytes
    orig_len: int  # on the wire; > len(data) only if the snapshot length cut it


def read_pcap(path: Path) -> list[Frame]:
    """Every record of a classic pcap file (not pcapng) with Ethernet link type."""
    raw = path.read_bytes()
    if len(raw) < 24 or raw[:4] not in _MAGICS:
        raise CaptureError(f"{path}: not a classic pcap file (magic {raw[:4].hex()})")
    order, tick = _MAGICS[raw[:4]]
    _major, _minor, _zone, _sigfigs, _snaplen, linktype = struct.unpack_from(order + "HHiIII", raw, 4)
    if linktype & 0x0FFFFFFF != LINKTYPE_ETHERNET:  # the top bits may carry FCS information
        raise CaptureError(f"{path}: link type {linktype}, only Ethernet ({LINKTYPE_ETHERNET}) is read")
    record = struct.Struct(order + "IIII")
    frames = []
    pos = 24
    while pos < len(raw):
        if pos + record.size > len(raw):
            raise CaptureError(f"{path}: record header cut at byte {pos}")
        sec, frac, incl, orig = record.unpack_from(raw, pos)
        pos += record.size
        if pos + incl > len(raw):
            raise CaptureError(f"{path}: record of {incl} bytes cut at byte {pos}")
        frames.append(Frame(sec + frac * tick, raw[pos:pos + incl], orig))
        pos += incl
    return frames


# -- what a frame is, for statistics and coverage checks (lenient: stops where the bytes do) --

_L4 = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6", 132: "sctp"}
_EXT6 = {0: "hbh", 43: "rt", 44: "frag", 60: "dst"}


def kind(frame: bytes) -> str:
    """A short description such as "ipv4 opts udp", "ipv6 hbh frag+ dst udp" or "vlan arp"."""
    parts: list[str] = []
    if len(frame) < 14:
        return "runt"
    ethertype, off = int.from_bytes(frame[12:14]), 14
    while ethertype in (0x8100, 0x88A8) and off + 4 <= len(frame):
        parts.append("vlan")
        ethertype, off = int.from_bytes(frame[off + 2:off + 4]), off + 4
    ip_ = frame[off:]
    if ethertype == 0x0806:
        parts.append("arp")
    elif ethertype == 0x0800 and len(ip_) >= 20:
        parts.append("ipv4")
        if ip_[0] & 0x0F > 5:
            parts.append("opts")
        frag = int.from_bytes(ip_[6:8])
        if frag & 0x1FFF:
            parts.append("frag-later")
        elif frag & 0x2000:
            parts.append("frag-first")
        parts.append(_L4.get(ip_[9], f"proto{ip_[9]}"))
    elif ethertype == 0x86DD and len(ip_) >= 40:
        parts.append("ipv6")
        nh, pos = ip_[6], 40
        while nh in _EXT6 and pos + 8 <= len(ip_):
            later = nh == 44 and int.from_bytes(ip_[pos + 2:pos + 4]) >> 3 != 0
            parts.append(_EXT6[nh] + ("-later" if later else ""))
            nh, pos = ip_[pos], pos + (8 if nh == 44 else (ip_[pos + 1] + 1) * 8)
            if later:
                break
        parts.append(_L4.get(nh, f"proto{nh}"))
    else:
        parts.append(f"ethertype-{ethertype:04x}")
    return " ".join(parts)


# -- recording -----------------------------------------------------------------------

def _program(netns: str, role: str) -> list[str]:
    return in_netns(netns, [sys.executable, "-m", "tests.kernel.captures", role])


def _stop(proc: subprocess.Popen[str] | None, sig: int = signal.SIGTERM) -> str:
    """Stop a child we started (by its own pid) and return its stderr."""
    if proc is None:
        return ""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return err or ""


def _wait_for_line(proc: subprocess.Popen[str], stream: str, needle: str, timeout: float) -> None:
    pipe = proc.stdout if stream == "stdout" else proc.stderr
    assert pipe is not None
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        ready, _, _ = select.select([pipe], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        line = pipe.readline()
        if not line:
            break
        seen.append(line)
        if needle in line:
            return
    raise CaptureError(f"no {needle!r} from {proc.args!r}: {''.join(seen)[-400:]}")


def _enable_ipv6(pair: VethPair) -> None:
    # VethPair keeps IPv6 off; here its chatter (DAD, router solicitation, MLD) is wanted in the capture.
    for ns, ifname, addr in ((pair.gen, pair.gen_if, GEN6), (pair.obs, pair.obs_if, OBS6)):
        sysctl(ns, f"net.ipv6.conf.{ifname}.disable_ipv6", "0")
        ip("addr", "add", f"{addr}/64", "dev", ifname, "nodad", netns=ns)


def record(path: Path, settle: float = 1.5) -> list[Frame]:
    """Make the traffic, capture it on the observer's veth end into `path` (pcap) and read it back."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    dumpcap = server = None
    with VethPair() as pair:
        try:
            for ns, ifname in ((pair.gen, pair.gen_if), (pair.obs, pair.obs_if)):
                # One MSS per skb: frames as a NIC puts them on a wire, not 64 KiB GSO trains.
                ip("link", "set", ifname, "gso_max_size", "1514", "gso_max_segs", "1", netns=ns)
                sysctl(ns, "net.ipv4.tcp_ecn", "1")  # ECE/CWR in the handshake
            dumpcap = subprocess.Popen(
                in_netns(pair.obs, ["dumpcap", "-i", pair.obs_if, "-P", "-w", str(path)]),
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            _wait_for_line(dumpcap, "stderr", "Capturing on", timeout=20)
            _enable_ipv6(pair)
            server = subprocess.Popen(_program(pair.obs, "serve"), cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            _wait_for_line(server, "stdout", "ready", timeout=20)
            talk = subprocess.run(_program(pair.gen, "talk"), cwd=ROOT, env=env, capture_output=True, text=True,
                                  timeout=120, check=False)
            if talk.returncode != 0:
                raise CaptureError(f"client failed ({talk.returncode}): {talk.stderr[-2000:]}")
            mix = standard_mix()
            trafgen.send(pair.gen, pair.gen_if, [flow.frame() for flow in mix], 2 * len(mix))
            time.sleep(settle)  # late replies, router solicitations and MLD reports
        finally:
            server_err = _stop(server)
            dumpcap_err = _stop(dumpcap, signal.SIGINT)
    if server is not None and server.returncode not in (0, -signal.SIGTERM):
        raise CaptureError(f"server failed ({server.returncode}): {server_err[-2000:]}")
    if not path.exists():
        raise CaptureError(f"dumpcap wrote nothing: {dumpcap_err[-400:]}")
    return read_pcap(path)


# -- the two ends (run inside the namespaces) -----------------------------------------------

def _serve() -> None:
    """Echo TCP and UDP on PORT over IPv4 and IPv6 until terminated."""
    listeners, udps = [], []
    for family, addr in ((socket.AF_INET, OBS4), (socket.AF_INET6, OBS6)):
        tcp = socket.socket(family, socket.SOCK_STREAM)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tcp.bind((addr, PORT))
        tcp.listen()
        listeners.append(tcp)
        udp = socket.socket(family, socket.SOCK_DGRAM)
        udp.bind(("" if family == socket.AF_INET else addr, PORT))  # "": the broadcast too
        udps.append(udp)

    def echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    print("ready", flush=True)
    while True:
        ready, _, _ = select.select(listeners + udps, [], [])
        for s in ready:
            if s in listeners:
                conn, _ = s.accept()
                threading.Thread(target=echo, args=(conn,), daemon=True).start()
            else:
                data, peer = s.recvfrom(65536)
                s.sendto(data, peer)


def _icmp4_echo(ident: int, seq: int, payload: bytes) -> bytes:
    body = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + payload
    padded = body + b"\0" * (len(body) % 2)
    total = sum(struct.unpack(f"!{len(padded) // 2}H", padded))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return body[:2] + struct.pack("!H", ~total & 0xFFFF) + body[4:]


def _tcp_conversation(family: int, dst: str, tos: int) -> None:
    """Handshake, a small exchange, urgent data, a bulk transfer both ways, then FIN from each side."""
    with socket.create_connection((dst, PORT), timeout=10) as s:
        if family == socket.AF_INET:
            s.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, tos)
        else:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_TCLASS, tos)
        for message in (b"hello\n", b"!", b"x" * 20000):
            if message == b"!":
                s.send(message, socket.MSG_OOB)
            else:
                s.sendall(message)
                _recv_exactly(s, len(message))
        s.shutdown(socket.SHUT_WR)
        while s.recv(65536):  # the urgent byte is not echoed: the server reads it as ordinary data
            pass


def _recv_exactly(s: socket.socket, n: int) -> None:
    got = 0
    while got < n:
        chunk = s.recv(n - got)
        if not chunk:
            raise CaptureError(f"connection closed after {got} of {n} bytes")
        got += len(chunk)


def _udp_exchange(s: socket.socket, dst: tuple[str, int], sizes: Sequence[int]) -> None:
    s.settimeout(5)
    for size in sizes:
        s.sendto(bytes(i % 251 for i in range(size)), dst)
        s.recvfrom(65536)


def _talk() -> None:
    for family, dst in ((socket.AF_INET, OBS4), (socket.AF_INET6, OBS6)):
        _tcp_conversation(family, dst, tos=0x28)
        try:
            socket.create_connection((dst, CLOSED_PORT), timeout=5).close()
        except ConnectionRefusedError:
            pass  # the RST is what was wanted
        with socket.socket(family, socket.SOCK_DGRAM) as udp:
            _udp_exchange(udp, (dst, PORT), [0, 1, 64, 1472, BIG])
            udp.sendto(b"nobody", (dst, CLOSED_PORT))  # answered with ICMP port unreachable

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        # Record route (7), 11 bytes padded to 12: a real IHL 8 header; the echo comes back without it.
        udp.setsockopt(socket.IPPROTO_IP, socket.IP_OPTIONS, bytes([7, 11, 4]) + bytes(8))
        _udp_exchange(udp, (OBS4, PORT), [10, BIG])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        udp.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 1)
        udp.sendto(b"everyone", (BCAST4, PORT))
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as udp:
        # Sticky extension headers: hop-by-hop (router alert + pad) before the fragment header,
        # destination options after it, so a fragmented datagram has both halves of the chain.
        udp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_HOPOPTS, bytes([0, 0, 5, 2, 0, 0, 1, 0]))
        # 0x1e: RFC 4727's experimental option, "skip if unknown"; Linux drops PadN over 5 bytes.
        udp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_DSTOPTS, bytes([0, 1, 0x1E, 10]) + bytes(10) + bytes([1, 0]))
        _udp_exchange(udp, (OBS6, PORT), [3, BIG])

    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as icmp:
        for seq, (ttl, size) in enumerate(((64, 56), (3, 0), (255, 3000))):
            icmp.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, ttl)
            icmp.sendto(_icmp4_echo(0x1807, seq, bytes(size)), (OBS4, 0))
    with socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6) as icmp6:
        for seq, (hops, size) in enumerate(((64, 56), (1, 0), (255, 3000))):
            icmp6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, hops)
            # The kernel fills in the ICMPv6 checksum on raw ICMPv6 sockets.
            icmp6.sendto(struct.pack("!BBHHH", 128, 0, 0, 0x1807, seq) + bytes(size), (OBS6, 0))
    for family, dst in ((socket.AF_INET, OBS4), (socket.AF_INET6, OBS6)):
        with socket.socket(family, socket.SOCK_RAW, PROTO_EXPERIMENTAL) as raw:
            raw.sendto(b"experiment" * 3, (dst, 0))


def main(argv: Sequence[str]) -> int:
    if list(argv) == ["serve"]:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        _serve()
    elif list(argv) == ["talk"]:
        _talk()
    else:
        print("usage: python -m tests.kernel.captures serve|talk", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
