"""In-kernel filters: BPF_PROG_TEST_RUN rule matrix, a differential fuzz, and `xdpflow run --filter` end to end.

PROG_TEST_RUN part: every frame runs once through the loaded program under a rule list. Per frame:
XDP_PASS, the frame unchanged, and the counters the reference (`xdp.filters.evaluate`, the rules
read one by one) predicts: an excluded packet moves `filtered` and its rule's counter, an included
one `packets` and its rule's counter (or the "(no match)" counter). Per rule list: the page is
drained and holds flows of the included packets only, with exact counts. Frames arrive on the
loopback device of the test's namespace (ifindex 1), which is what the iface selectors see.

End to end: trafgen in a generator namespace, `xdpflow run --filter ...` on the observer's veth
end, the built-in collector: excluded flows never reach it, included ones arrive exact, and the
per-rule counters show in the stop log and the Prometheus endpoint. A SIGHUP with new rules keeps
the same XDP program (prog id) and loses no packet of a flow that runs across the reload.
"""

from __future__ import annotations

import ctypes
import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import structlog
import structlog.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from exporter.drain import Pages
from tests.conftest import ROOT, JsonCollector, Proc, xdp_prog_id, xdpflow_cmd
from tests.kernel import frames as fr
from tests.strategies import rules_st
from tools import trafgen
from tools.netns import VethPair, in_netns
from tools.packets import TCP, UDP, Flow
from xdp import bpfsys, filters
from xdp.layout import CONTROL
from xdp.loader import Datapath
from xdp.rules import NO_MATCH

pytestmark = pytest.mark.kernel

XDP_PASS = 2
LO = 1
FUZZ_EXAMPLES = int(os.environ.get("XDPFLOW_FUZZ_EXAMPLES", "150"))


# -- frames with known selector fields ------------------------------------------------------------

@dataclass(frozen=True)
class P:
    """A packet to send: the fields the selectors look at."""

    src: str = "198.18.0.1"
    dst: str = "198.19.0.1"
    proto: int = 6
    sport: int = 40000
    dport: int = 443
    vlan: int | None = None
    fragment: bool = False   # a non-first fragment: no ports

    @property
    def has_ports(self) -> bool:
        return self.proto in filters.PORT_PROTOCOLS and not self.fragment

    def l4(self) -> bytes:
        if self.fragment:
            return bytes(24)
        if self.proto == 6:
            return fr.tcp(self.sport, self.dport)
        if self.proto == 17:
            return fr.udp(self.sport, self.dport)
        if self.proto == 132:
            return fr.sctp(self.sport, self.dport)
        if self.proto in (1, 58):
            return fr.icmp(8 if self.proto == 1 else 128, 0)
        return bytes(8)

    def frame(self) -> bytes:
        s, d = ipaddress.ip_address(self.src), ipaddress.ip_address(self.dst)
        vlans = [fr.vlan(self.vlan)] if self.vlan is not None else []
        if s.version == 4:
            ip = fr.ipv4(self.proto, self.l4(), src=s.packed, dst=d.packed, frag_offset=185 if self.fragment else 0)
            return fr.ethernet(fr.ETH_P_IP, ip, vlans=vlans)
        if self.fragment:
            nh, body = fr.ext_chain([fr.Ext(fr.PROTO_FRAGMENT, frag_offset=185)], self.proto, self.l4())
        else:
            nh, body = self.proto, self.l4()
        return fr.ethernet(fr.ETH_P_IPV6, fr.ipv6(nh, body, src=s.packed, dst=d.packed), vlans=vlans)

    @property
    def octets(self) -> int:
        return len(self.frame()) - 14 - (4 if self.vlan is not None else 0)

    def packet(self, ifindex: int = LO) -> filters.Packet:
        return filters.Packet(filters.mapped(self.src), filters.mapped(self.dst), self.proto,
                              self.sport if self.has_ports else None, self.dport if self.has_ports else None,
                              self.vlan or 0, ifindex)


# -- harness --------------------------------------------------------------------------------------

@dataclass
class Harness:
    dp: Datapath
    pages: Pages


@pytest.fixture(scope="module")
def h() -> Iterator[Harness]:
    if os.geteuid() != 0:
        pytest.skip("BPF_PROG_TEST_RUN needs root")
    d = Datapath(max_entries=4096).load()
    try:
        yield Harness(d, Pages(d))
    finally:
        d.close()


def counts(dp: Datapath) -> dict[tuple[str, str], tuple[int, int]]:
    return {(c.rule, c.action): (c.packets, c.octets) for c in dp.rule_counters()}


def run_rules(h: Harness, rules: list[str], packets: list[P],
              expect: list[tuple[int | None, bool]] | None = None) -> list[tuple[int | None, bool]]:
    """Configure `rules`, run every packet once and check it; drain and check the flows. Returns the verdicts."""
    dp = h.dp
    parsed = filters.parse_rules(rules)
    tables = filters.compile_rules(parsed)
    links = filters.interfaces_now()
    h.pages.flip_and_merge(0)  # start from an empty page
    dp.configure(tables, 1)
    verdicts = []
    included = [0, 0]
    base = dp.read_stats()
    for i, p in enumerate(packets):
        frame = p.frame()
        want = filters.evaluate(parsed, p.packet(), links)
        if expect is not None:
            assert want == expect[i], f"reference disagrees with the test: {p} -> {want}, test says {expect[i]}"
        verdicts.append(want)
        before, before_rules = dp.read_stats(), counts(dp)
        r = bpfsys.prog_test_run(dp.prog_fd, frame)
        assert r.retval == XDP_PASS and r.data_out == frame, p
        after, after_rules = dp.read_stats(), counts(dp)
        delta = {k: after[k] - before[k] for k in after if after[k] != before[k]}
        rule, excluded = want
        octets = p.octets
        if excluded:
            assert delta == {"frames": 1, "filtered": 1, "filtered_octets": octets}, (rules, p, want, delta)
        else:
            assert delta.pop("packets") == 1 and delta.pop("octets") == octets, (rules, p, want, delta)
            assert delta.pop("flows_created", 0) in (0, 1) and delta == {"frames": 1}, (rules, p, want, delta)
            included[0] += 1
            included[1] += octets
        label = (NO_MATCH, tables.default_action()) if rule is None else (parsed[rule].text, parsed[rule].action)
        moved = {}
        for k, (pk, ok) in after_rules.items():
            p0, o0 = before_rules.get(k, (0, 0))
            if (pk, ok) != (p0, o0):
                moved[k] = (pk - p0, ok - o0)
        assert moved == ({label: (1, octets)} if parsed else {}), (rules, p, want, moved)
    d = h.pages.flip_and_merge(0)
    recs = d.records
    # Excluded packets made no entry: the page holds exactly the included packets.
    assert [int(recs["packets"].sum()), int(recs["octets"].sum())] == included
    assert d.stats["packets"] == included[0] and d.stats["flows_created"] == len(recs)
    end = dp.read_stats()
    moved_total = {k: end[k] - base[k] for k in end}
    assert moved_total["frames"] == moved_total["packets"] + moved_total["filtered"] == len(packets)
    return verdicts


# -- the rule matrix --------------------------------------------------------------------------------



def P6(**kw: Any) -> P:
    """An IPv6 packet (fd00::1 -> fd00::2)."""
    return P(src="fd00::1", dst="fd00::2", **kw)


MATRIX: dict[str, tuple[list[str], list[tuple[P, tuple[int | None, bool]]]]] = {
    "dst v4 cidr": (["exclude dst 10.0.0.0/8"], [
        (P(dst="10.1.2.3"), (0, True)), (P(dst="11.0.0.1"), (None, False)), (P(dst="9.255.255.255"), (None, False)),
        (P(src="10.1.2.3"), (None, False)), (P6(), (None, False))]),
    "src v6 cidr with vlan": (["exclude src fd00::/8 vlan 100"], [
        (P6(vlan=100), (0, True)), (P6(), (None, False)), (P6(vlan=101), (None, False)),
        (P(src="fe80::1", dst="fd00::2", vlan=100), (None, False)), (P(vlan=100), (None, False))]),
    "include proto tcp dport 443": (["include proto tcp dport 443"], [
        (P(), (0, False)), (P(dport=444), (None, True)), (P(proto=17), (None, True)), (P(proto=1), (None, True)),
        (P6(), (0, False))]),
    "sport range, both ends": (["include sport 1000-2000"], [
        (P(sport=999), (None, True)), (P(sport=1000), (0, False)), (P(sport=2000), (0, False)),
        (P(sport=2001), (None, True)), (P(proto=17, sport=1500), (0, False)), (P(proto=132, sport=1500), (0, False))]),
    "ports never match ICMP or fragments": (["exclude dport 0-65535", "exclude sport 0-65535"], [
        (P(proto=1), (None, False)), (P6(proto=58), (None, False)), (P(fragment=True), (None, False)),
        (P6(fragment=True), (None, False)), (P(proto=47), (None, False)), (P(proto=17), (0, True))]),
    "port and net: either direction": (["exclude net 192.0.2.0/24,2001:db8::/32 port 22,53"], [
        (P(src="192.0.2.1", dport=22), (0, True)), (P(dst="192.0.2.1", sport=53), (0, True)),
        (P(dst="192.0.2.1", sport=54), (None, False)), (P(src="2001:db8::1", dst="fd00::1", dport=53), (0, True)),
        (P(dport=22), (None, False))]),
    "first match wins": (["include dst 10.1.0.0/16", "exclude dst 10.0.0.0/8", "include proto udp"], [
        (P(dst="10.1.0.1"), (0, False)), (P(dst="10.2.0.1"), (1, True)), (P(dst="10.2.0.1", proto=17), (1, True)),
        (P(proto=17), (2, False)), (P(), (None, True))]),
    "nested prefixes": (["exclude dst 10.1.2.0/24 proto udp", "include dst 10.0.0.0/8 dport 443",
                         "exclude dst 10.1.0.0/16", "exclude dst ::/0 dport 80"], [
        (P(dst="10.1.2.3"), (1, False)), (P(dst="10.1.2.3", proto=17, dport=53), (0, True)),
        (P(dst="10.1.2.3", dport=22), (2, True)), (P(dst="10.9.9.9", dport=80), (3, True)),
        (P6(dport=80), (3, True)), (P(dst="10.9.9.9", dport=22), (None, True))]),
    "families": (["exclude src 0.0.0.0/0 proto udp", "exclude src ::/0 proto sctp", "exclude src ::ffff:0:0/96"], [
        (P(proto=17), (0, True)), (P6(proto=17), (None, False)), (P6(proto=132), (1, True)),
        (P(proto=132), (1, True)), (P(), (2, True)), (P6(), (None, False))]),
    "vlan": (["include vlan 0", "exclude vlan 5-9,4095"], [
        (P(), (0, False)), (P(vlan=0), (0, False)), (P(vlan=5), (1, True)), (P(vlan=4095), (1, True)),
        (P(vlan=10), (None, True))]),
    "iface": (["exclude iface lo proto udp", "exclude iface 1 dport 22", "include iface 2,lo*", "exclude all"], [
        (P(proto=17), (0, True)), (P(dport=22), (1, True)), (P(), (2, False))]),
    "iface elsewhere": (["exclude iface 4000", "exclude iface 5000"], [(P(), (None, False))]),
    "exclude all": (["exclude all"], [(P(), (0, True)), (P6(), (0, True)), (P(proto=1), (0, True))]),
    "bare addresses": (["exclude dst 198.19.0.1,fd00::2"], [
        (P(), (0, True)), (P(dst="198.19.0.2"), (None, False)), (P6(), (0, True))]),
    "protocols by number": (["include proto 47,sctp"], [
        (P(proto=47), (0, False)), (P(proto=132), (0, False)), (P(), (None, True))]),
}


@pytest.mark.parametrize("case", MATRIX)
def test_rule_matrix(h: Harness, case: str) -> None:
    rules, rows = MATRIX[case]
    run_rules(h, rules, [p for p, _ in rows], [v for _, v in rows])


def control(dp: Datapath) -> tuple[int, int]:
    ctl = np.zeros(1, dtype=CONTROL)
    assert bpfsys.map_lookup(dp.control_fd, ctypes.c_uint32(0), ctl)
    return int(ctl["gen"][0]) & 1, int(ctl["config"][0])   # (active page, rule set in force)


def test_no_rules_is_the_fast_path(h: Harness) -> None:
    """No rules and no sampling: the control slot says 0 and the program goes straight to metering."""
    run_rules(h, ["exclude all"], [P()])
    assert control(h.dp)[1] in (1, 2)
    run_rules(h, [], [P(), P6(), P(proto=1)], [(None, False)] * 3)
    assert control(h.dp) == (h.pages.active, 0)
    assert h.dp.rule_counters() == []


def test_a_thousand_cidrs(h: Harness) -> None:
    """1000 CIDRs over a few rules: many share one match slot; the LPM tries hold them all."""
    tens = ",".join(f"10.{i // 256}.{i % 256}.0/24" for i in range(600))
    v6 = ",".join(f"2001:db8:{i:x}::/48" for i in range(300))
    hosts = ",".join(f"192.0.2.{i}" for i in range(1, 101))
    rules = [f"exclude dst {tens}", f"exclude src {v6}", f"include dst {hosts} dport 443", "include proto udp"]
    tables = filters.compile_rules(filters.parse_rules(rules))
    assert len(tables.dst) == 701 and len(tables.src) == 301 and len(tables.slot_rule) == 4
    packets = [P(dst="10.0.0.9"), P(dst="10.2.87.1"), P(dst="10.2.88.1"), P(src="2001:db8:12b::1", dst="fd00::1"),
               P(src="2001:db8:12c::1", dst="fd00::1"), P(dst="192.0.2.100"), P(dst="192.0.2.101"),
               P(dst="192.0.2.100", dport=80), P(dst="192.0.2.101", proto=17)]
    got = run_rules(h, rules, packets)
    assert got == [(0, True), (0, True), (None, True), (1, True), (None, True), (2, False), (None, True),
                   (None, True), (3, False)]


def test_counters_survive_a_rule_change(h: Harness) -> None:
    """A rule that stays keeps its totals across a reload; the old set's counts are retired, not lost."""
    a = ["exclude dst 10.0.0.0/8", "exclude proto udp"]
    run_rules(h, a, [P(dst="10.0.0.1"), P(dst="10.0.0.2"), P(proto=17)])
    before = counts(h.dp)
    run_rules(h, ["exclude proto icmp", "exclude dst 10.0.0.0/8"], [P(dst="10.0.0.3"), P(proto=1)])
    after = counts(h.dp)
    ten = ("exclude dst 10.0.0.0/8", "exclude")
    assert after[ten][0] == before[ten][0] + 1
    assert ("exclude proto udp", "exclude") not in after
    assert after[("exclude proto icmp", "exclude")][0] >= 1


# -- differential fuzz: the kernel against the reference, rule list by rule list ----------------------

ADDR4 = ["10.1.2.3", "10.1.2.4", "10.1.3.1", "10.200.0.1", "11.0.0.1", "192.0.2.7"]
ADDR6 = ["fd00:1::1", "fd00:2::1", "2001:db8::5", "fe80::1", "::ffff:10.1.2.3"]


@st.composite
def packet_specs(draw: st.DrawFn) -> P:
    addrs = draw(st.sampled_from([ADDR4, ADDR6]))
    proto = draw(st.sampled_from([6, 17, 132, 47, 1 if addrs is ADDR4 else 58]))
    return P(draw(st.sampled_from(addrs)), draw(st.sampled_from(addrs)), proto, draw(st.integers(0, 70)),
             draw(st.integers(0, 70)), draw(st.sampled_from([None, 0, 1, 5, 7, 4095])),
             draw(st.booleans()) and draw(st.booleans()))


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                          HealthCheck.too_slow])
@given(texts=st.lists(rules_st(), min_size=1, max_size=8), packets=st.lists(packet_specs(), min_size=1, max_size=12))
def test_kernel_agrees_with_the_reference(h: Harness, texts: list[str], packets: list[P]) -> None:
    _, errors = filters.check_rules(texts)
    if errors:
        return
    run_rules(h, texts, packets)


# -- end to end -------------------------------------------------------------------------------------

COLLECTOR_PORT = 4739
METRICS_PORT = 9477
FETCH = "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())"


def scrape(netns: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    res = subprocess.run(in_netns(netns, [sys.executable, "-c", FETCH, f"http://127.0.0.1:{METRICS_PORT}/metrics"]),
                         capture_output=True, text=True, timeout=30, check=False)
    assert res.returncode == 0, res.stderr[-400:]
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(res.stdout) for s in fam.samples}


KEEP_TCP = Flow("keep-tcp", "198.18.0.1", "198.19.0.1", TCP, 40001, 443, tcp_flags=0x10, count=40)
KEEP_UDP = Flow("keep-udp", "198.18.0.2", "198.19.0.2", UDP, 5353, 5353, count=30)
KEEP_V6 = Flow("keep-v6", "fd00::1", "fd00::2", UDP, 6000, 7000, count=20)
DROP_NET = Flow("drop-net", "198.18.0.3", "198.51.100.7", TCP, 40003, 443, tcp_flags=0x10, count=50)
DROP_DNS = Flow("drop-dns", "198.18.0.4", "198.19.0.4", UDP, 40004, 53, count=25)
DROP_V6 = Flow("drop-v6", "fd00:bad::1", "fd00::2", UDP, 6001, 7001, count=15)
E2E_RULES = ["exclude dst 198.51.100.0/24", "exclude proto udp dport 53", "exclude src fd00:bad::/32"]


def test_run_with_filters_end_to_end(veth: VethPair, xdpflow_proc: Any, collector: JsonCollector) -> None:
    args = [a for r in E2E_RULES for a in ("--filter", r)]
    p = xdpflow_proc(veth.obs, "run", "--interface", veth.obs_if, "--collector", f"127.0.0.1:{COLLECTOR_PORT}",
                     "--scan-interval", "0.25", "--idle-timeout", "1", "--active-timeout", "30",
                     "--max-entries", "4096", "--metrics", f"127.0.0.1:{METRICS_PORT}", "--log-level", "debug", *args)
    started = p.wait_ready()
    assert started["filters"] == E2E_RULES and started["sampling"] == 1
    keep, drop = [KEEP_TCP, KEEP_UDP, KEEP_V6], [DROP_NET, DROP_DNS, DROP_V6]
    trafgen.send_flows(veth.gen, veth.gen_if, keep + drop)
    collector.wait_for("the included flows", lambda: all(collector.packets_of(f) == f.count for f in keep))
    samples = scrape(veth.obs)
    for i, (rule, fl) in enumerate(zip(E2E_RULES, drop, strict=True)):
        labels = (("action", "exclude"), ("index", str(i)), ("rule", rule))
        assert samples[("xdpflow_filter_rule_packets_total", labels)] == fl.count
        assert samples[("xdpflow_filter_rule_octets_total", labels)] == fl.count * fl.octets_per_packet
    assert samples[("xdpflow_filter_rule_packets_total", (("action", "include"), ("index", "3"),
                                                          ("rule", NO_MATCH)))] == sum(f.count for f in keep)
    assert samples[("xdpflow_kernel_filtered_total", ())] == sum(f.count for f in drop)
    assert samples[("xdpflow_kernel_packets_total", ())] == sum(f.count for f in keep)
    rc, _ = p.stop()
    assert rc == 0, p.logs[-10:]
    stopped = p.events("stopped")[0]
    assert stopped["observed_packets"] == sum(f.count for f in keep) and stopped["ignored_packets"] == 0
    assert stopped["filtered_packets"] == sum(f.count for f in drop)
    assert stopped["rules"] == [["exclude", r, f.count] for r, f in zip(E2E_RULES, drop, strict=True)] + \
        [["include", NO_MATCH, sum(f.count for f in keep)]]
    for fl in drop:
        assert collector.packets_of(fl) == 0, fl.name
    assert sum(r["packetDeltaCount"] for r in collector.flows()) == sum(f.count for f in keep)
    scans = p.events("scan")
    assert sum(s.get("kernel_filtered", 0) for s in scans) == sum(f.count for f in drop)


def test_bad_filter_flag_exits_2_with_one_line(veth: VethPair) -> None:
    cmd = xdpflow_cmd("run", "-i", veth.obs_if, "--filter", "exclude dst 10.0.0.1/8")
    res = subprocess.run(in_netns(veth.obs, cmd), capture_output=True, text=True, timeout=60, cwd=ROOT, check=False,
                         env=dict(os.environ, PYTHONPATH=ROOT))
    assert res.returncode == 2
    assert res.stderr.strip() == ('xdpflow: error: filters[0] = "exclude dst 10.0.0.1/8" (from --filter): '
                                  '"10.0.0.1/8" has host bits set; the network is 10.0.0.0/8')


def write_config(path: Path, veth: VethPair, filters_: list[str]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"interfaces = [{json.dumps(veth.obs_if)}]\ncollectors = [\"udp://127.0.0.1:{COLLECTOR_PORT}\"]\n"
                   "scan_interval = 0.25\nidle_timeout = 30.0\nactive_timeout = 60.0\nmax_entries = 4096\n"
                   f"filters = {json.dumps(filters_)}\n")
    os.replace(tmp, path)


def hup(p: Proc, count: int) -> dict[str, Any]:
    p.popen.send_signal(signal.SIGHUP)
    failed = "reload failed, keeping the running configuration"
    deadline = time.monotonic() + 20
    while len(p.events("reloaded")) + len(p.events(failed)) < count:
        assert time.monotonic() < deadline and p.popen.poll() is None, p.logs[-20:]
        p._take(0.1)
    return (p.events("reloaded") + p.events(failed))[-1]


def test_sighup_changes_rules_without_reattaching_or_losing_flows(
        veth: VethPair, xdpflow_proc: Any, collector: JsonCollector, tmp_path: Path) -> None:
    conf = tmp_path / "xdpflow.toml"
    write_config(conf, veth, ["exclude proto udp"])
    p = xdpflow_proc(veth.obs, "run", "--config", str(conf), "--log-level", "debug")
    p.wait_ready()
    prog = xdp_prog_id(veth.obs, veth.obs_if)
    long_tcp = Flow("long", "198.18.0.1", "198.19.0.1", TCP, 40001, 443, tcp_flags=0x10, count=30)
    udp = Flow("udp", "198.18.0.2", "198.19.0.2", UDP, 5000, 5001, count=20)
    trafgen.send_flows(veth.gen, veth.gen_if, [long_tcp, udp])
    p.wait_for("scan", count=len(p.events("scan")) + 3)

    # New rules: UDP now metered, TCP excluded; the TCP flow's first 30 packets are already counted.
    write_config(conf, veth, ["exclude proto tcp dport 443"])
    reloaded = hup(p, 1)
    assert reloaded["event"] == "reloaded" and "filters" in reloaded["changed"], reloaded
    assert xdp_prog_id(veth.obs, veth.obs_if) == prog, "a rule change must not re-attach"
    trafgen.send_flows(veth.gen, veth.gen_if, [long_tcp, udp])

    # Back to no rules: the long TCP flow goes on in the same flow, nothing lost across two reloads.
    write_config(conf, veth, [])
    assert hup(p, 2)["event"] == "reloaded"
    assert xdp_prog_id(veth.obs, veth.obs_if) == prog
    trafgen.send_flows(veth.gen, veth.gen_if, [long_tcp])

    # A bad rule is refused with one line naming it; the running rules stay.
    write_config(conf, veth, ["exclude dts 1.2.3.4"])
    refused = hup(p, 3)
    assert refused["event"] == "reload failed, keeping the running configuration"
    assert 'filters[0] = "exclude dts 1.2.3.4"' in refused["error"] and 'unknown selector "dts"' in refused["error"]
    assert xdp_prog_id(veth.obs, veth.obs_if) == prog
    trafgen.send_flows(veth.gen, veth.gen_if, [udp])
    p.wait_for("scan", count=len(p.events("scan")) + 3)
    rc, _ = p.stop()
    assert rc == 0
    stopped = p.events("stopped")[0]
    assert stopped["ignored_packets"] == 0
    assert collector.packets_of(long_tcp) == 2 * long_tcp.count  # first and third rounds; the second excluded
    assert collector.packets_of(udp) == 2 * udp.count             # second and fourth rounds; the first excluded
    assert stopped["filtered_packets"] == long_tcp.count + udp.count
    assert stopped["observed_packets"] == 2 * long_tcp.count + 2 * udp.count
    long_records = [r for r in collector.flows() if r.get("sourceTransportPort") == long_tcp.sport]
    assert len(long_records) == 1, "the long flow spans the reloads: one record, not one per rule set"


def test_interface_rules_follow_links_as_they_come_and_go(h: Harness) -> None:
    """iface names are resolved when rules are applied and again whenever links change (reconcile)."""
    from exporter import attachments
    from exporter.config import Config
    from exporter.service import Exporter

    ex = Exporter(Config(interfaces=(), collectors=(), filters=("exclude iface ghost*",)), datapath=h.dp)
    h.dp.configure(filters.compile_rules(filters.parse_rules(ex.cfg.filters), {"lo": LO}), 1)
    frame = P().frame()
    before = h.dp.read_stats()["filtered"]
    bpfsys.prog_test_run(h.dp.prog_fd, frame)
    assert h.dp.read_stats()["filtered"] == before, "no ghost* interface yet: the rule matches nothing"
    with structlog.testing.capture_logs() as logs:
        attachments.refresh_iface_rules(h.dp, {"lo": LO, "ghost0": LO})  # as if a matching link appeared
    assert "filter interfaces changed" in [e["event"] for e in logs]
    assert h.dp.tables.iface_resolved == {"ghost*": (LO,)}
    bpfsys.prog_test_run(h.dp.prog_fd, frame)
    assert h.dp.read_stats()["filtered"] == before + 1
    with structlog.testing.capture_logs():
        attachments.refresh_iface_rules(h.dp, {"lo": LO})
    bpfsys.prog_test_run(h.dp.prog_fd, frame)
    assert h.dp.read_stats()["filtered"] == before + 1
    h.dp.configure(None, 1)
