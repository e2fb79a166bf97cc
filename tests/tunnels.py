"""Tunnel records for tests: one of each technology and family pair, as exporter/tunnels.py builds them."""

from __future__ import annotations

import ipaddress

import numpy as np

from exporter.records import FLOW_RECORD, Records
from exporter.tunnels import tunnel_records
from xdp.layout import TUNNEL_EXT, TUNNEL_GENEVE, TUNNEL_GRE, TUNNEL_GRE_KEY, TUNNEL_VXLAN


def mapped(addr: str) -> bytes:
    a = ipaddress.ip_address(addr)
    return a.packed if a.version == 6 else bytes(10) + b"\xff\xff" + a.packed


def tunnel_batch() -> Records:
    """VXLAN (IPv4 in IPv4), GRE with key (IPv4 in IPv6), Geneve (IPv6 in IPv4), GRE (IPv6 in IPv6)."""
    r = np.zeros(4, dtype=FLOW_RECORD)
    r["ip_version"] = [4, 4, 6, 6]
    r["src_addr"][0] = np.frombuffer(mapped("198.19.0.1"), dtype=np.uint8)
    r["src_addr"][2] = np.frombuffer(mapped("fd00:7::1"), dtype=np.uint8)
    r["protocol"] = 17
    r["packets"] = [1, 2, 3, 4]
    r["octets"] = [100, 200, 300, 400]
    e = np.zeros(4, dtype=TUNNEL_EXT)
    e["type"] = [TUNNEL_VXLAN, TUNNEL_GRE_KEY, TUNNEL_GENEVE, TUNNEL_GRE]
    e["tunnel_id"] = [4242, 7, 77, 0]
    e["outer_ip_version"] = [4, 6, 4, 6]
    for i, (src, dst) in enumerate([("198.18.0.1", "198.18.0.2"), ("fd00::1", "fd00::2"),
                                    ("198.18.1.1", "198.18.1.2"), ("fd00::3", "fd00::4")]):
        e["outer_src"][i] = np.frombuffer(mapped(src), dtype=np.uint8)
        e["outer_dst"][i] = np.frombuffer(mapped(dst), dtype=np.uint8)
    return tunnel_records(r, e)
