"""Filter rules: syntax, one-line errors, compilation to the kernel's tables, config keys.

The compiled tables are held to the documented semantics (`filters.evaluate`, rule by rule) on
hypothesis-generated rule lists and packets through `filters.lookup`, which follows flow.c's
select_packet step by step; tests/kernel/test_filters.py holds the kernel to the same reference.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter import cli, service
from exporter import config as configmod
from tests.strategies import rules_st
from xdp import filters
from xdp.filters import FilterError, Packet, mapped

ROOT = Path(__file__).resolve().parents[2]
FLOW_H = ROOT / "xdp" / "flow.h"


# -- flow.h and filters.py agree ------------------------------------------------------------------

def test_constants_match_flow_h() -> None:
    text = FLOW_H.read_text()

    def value(name: str) -> int:
        m = re.search(rf"#define\s+XDPFLOW_{name}\s+(?:\((\d+)u\s*<<\s*(\d+)\)|(\d+))", text)
        assert m, name
        return int(m.group(1)) << int(m.group(2)) if m.group(1) else int(m.group(3))

    for name, mine in [("MAX_SLOTS", filters.MAX_SLOTS), ("COUNTER_SLOTS", filters.COUNTER_SLOTS),
                       ("MAX_PREFIXES", filters.MAX_PREFIXES), ("PORT_SLOTS", filters.PORT_SLOTS),
                       ("NO_PORT", filters.NO_PORT), ("VLAN_SLOTS", filters.VLAN_SLOTS),
                       ("PROTO_SLOTS", filters.PROTO_SLOTS), ("IFINDEX_SLOTS", filters.IFINDEX_SLOTS),
                       ("MAX_IFACES", filters.MAX_IFACES), ("SEL_SRC", filters.SEL_SRC),
                       ("SEL_DST", filters.SEL_DST), ("SEL_PROTO", filters.SEL_PROTO),
                       ("SEL_SPORT", filters.SEL_SPORT), ("SEL_DPORT", filters.SEL_DPORT),
                       ("SEL_VLAN", filters.SEL_VLAN), ("SEL_IFACE", filters.SEL_IFACE),
                       ("FILTER", filters.FILTER), ("SAMPLE", filters.SAMPLE)]:
        assert value(name) == mine, name
    assert filters.NO_MATCH_SLOT == filters.MAX_SLOTS == filters.COUNTER_SLOTS - 1


# -- syntax ---------------------------------------------------------------------------------------

V4 = ipaddress.IPv6Network


def test_examples_from_the_docs_parse() -> None:
    r = filters.parse_rule("exclude dst 10.0.0.0/8")
    assert r.action == "exclude" and r.dst == (V4("::ffff:10.0.0.0/104"),) and r.src is None
    r = filters.parse_rule("include proto tcp dport 443")
    assert r.proto == {6} and r.dport == ((443, 443),) and r.sport is None
    r = filters.parse_rule("exclude src fd00::/8 vlan 100")
    assert r.src == (V4("fd00::/8"),) and r.vlan == ((100, 100),)
    assert filters.parse_rule("exclude iface eth1").iface == ("eth1",)
    assert filters.parse_rule("include sport 1000-2000").sport == ((1000, 2000),)
    r = filters.parse_rule("  EXCLUDE  net 192.0.2.0/24 , 2001:db8::/32   Port 22,53-54 ")
    assert r.text == "EXCLUDE net 192.0.2.0/24,2001:db8::/32 Port 22,53-54"
    assert r.net == (V4("::ffff:192.0.2.0/120"), V4("2001:db8::/32")) and r.port == ((22, 22), (53, 54))
    assert r.slots == 4
    assert filters.parse_rule("exclude all").slots == 1
    assert filters.parse_rule("include proto icmpv6,ipv6-icmp,17").proto == {58, 17}
    assert filters.parse_rule("exclude src 192.0.2.1,2001:db8::1").src == (V4("::ffff:192.0.2.1/128"),
                                                                          V4("2001:db8::1/128"))
    assert filters.parse_rule("exclude iface veth*,7").iface == ("veth*", "7")


BAD_RULES = {
    "": "empty rule",
    "   ": "empty rule",
    "exclde dst 10.0.0.0/8": 'starts with "exclde" (did you mean exclude?)',
    "drop dst 10.0.0.0/8": "starts with include or exclude",
    "exclude dts 10.0.0.0/8": 'unknown selector "dts" (did you mean dst?)',
    "exclude dst 10.0.0.1/8": "host bits set; the network is 10.0.0.0/8",
    "exclude dst 10.0.0.0/33": "prefix length must be 0..32",
    "exclude src fd00::/129": "prefix length must be 0..128",
    "exclude dst ten.0.0.0/8": "is not an IPv4 or IPv6 address",
    "include proto tpc": 'unknown protocol "tpc" (did you mean tcp?)',
    "include proto 256": "protocol number 256 is out of range",
    "include dport 70000": "port 70000 is out of range",
    "include dport 2000-1000": "starts above its end",
    "include sport -5": "is not a port or a range",
    "include sport 80-": "is not a port or a range",
    "include vlan 4096": "VLAN id 4096 is out of range",
    "exclude dst": "dst needs a value",
    "exclude dst proto tcp": "dst needs a value",
    "exclude dst 10.0.0.0/8 dst 11.0.0.0/8": "dst given twice",
    "exclude dst 10.0.0.0/8,,11.0.0.0/8": "empty item",
    "exclude net 10.0.0.0/8 src 11.0.0.0/8": "net means src or dst",
    "exclude port 22 dport 23": "port means sport or dport",
    "exclude proto icmp dport 22": "TCP, UDP and SCTP packets only",
    "exclude src 10.0.0.0/8 dst fd00::/8": "no packet can match",
    "exclude all dst 10.0.0.0/8": '"all" matches every packet',
    "exclude iface a/b": "is not an interface name",
    "exclude iface 0": "interface index 0 is out of range",
}


@pytest.mark.parametrize("rule", BAD_RULES)
def test_bad_rule_is_one_clear_line(rule: str) -> None:
    with pytest.raises(FilterError) as e:
        filters.parse_rule(rule)
    assert BAD_RULES[rule] in e.value.problem
    assert "\n" not in str(e.value)


def test_error_names_the_rule() -> None:
    _, errors = filters.check_rules(["exclude dst 10.0.0.0/8", "exclude dts 1.2.3.4", "include proto tpc"])
    assert [e.index for e in errors] == [1, 2]
    assert str(errors[0]).startswith('filter rule 2 "exclude dts 1.2.3.4": unknown selector "dts"')


def test_control_characters_never_reach_the_error_line() -> None:
    with pytest.raises(FilterError) as e:
        filters.parse_rule("exclude dst 10.0.0.0/8\u2028x\x1b")
    assert "\u2028" not in str(e.value) and "\x1b" not in str(e.value)


def test_slot_and_prefix_limits() -> None:
    _, errors = filters.check_rules([f"exclude dport {p}" for p in range(65)])
    assert len(errors) == 1 and "65 match slots, at most 64" in errors[0].problem
    _, errors = filters.check_rules([f"exclude net 10.{p}.0.0/16 port {p}" for p in range(17)])
    assert "68 match slots" in errors[0].problem
    assert not filters.check_rules([f"exclude dport {p}" for p in range(64)])[1]
    many = ",".join(f"10.{i >> 8}.{i & 255}.0/24" for i in range(filters.MAX_PREFIXES))
    _, errors = filters.check_rules([f"exclude dst {many}"])
    assert "16384 distinct dst prefixes, at most 16383" in errors[0].problem


# -- compilation ----------------------------------------------------------------------------------

def pkt(src: str = "198.18.0.1", dst: str = "198.19.0.1", proto: int = 6, sport: int | None = 40000,
        dport: int | None = 443, vlan: int = 0, ifindex: int = 1) -> Packet:
    if proto not in filters.PORT_PROTOCOLS:
        sport = dport = None
    return Packet(mapped(src), mapped(dst), proto, sport, dport, vlan, ifindex)


def decide(rules: list[str], p: Packet, links: dict[str, int] | None = None) -> tuple[int | None, bool]:
    parsed = filters.parse_rules(rules)
    tb = filters.compile_rules(parsed, links or {})
    want = filters.evaluate(parsed, p, links or {})
    assert filters.lookup(tb, p) == want
    return want


def test_no_rules_compiles_to_nothing() -> None:
    tb = filters.compile_rules([])
    assert tb.flags == 0 and not tb.slot_rule


def test_first_match_wins_and_default() -> None:
    rules = ["exclude dst 10.0.0.0/8", "include dst 10.1.0.0/16", "include proto udp"]
    assert decide(rules, pkt(dst="10.1.2.3")) == (0, True)
    assert decide(rules, pkt(dst="11.1.2.3", proto=17)) == (2, False)
    assert decide(rules, pkt(dst="11.1.2.3")) == (None, True)  # an include rule exists: default exclude
    assert decide(["exclude dst 10.0.0.0/8"], pkt()) == (None, False)
    assert decide(["include dst 10.1.0.0/16", "exclude dst 10.0.0.0/8"], pkt(dst="10.1.0.1")) == (0, False)


def test_nested_prefixes_keep_every_rule() -> None:
    """The LPM trie returns the longest prefix only: shorter prefixes' rules must ride along."""
    rules = ["exclude dst 10.1.2.0/24 proto udp", "include dst 10.0.0.0/8 dport 443", "exclude dst 10.1.0.0/16",
             "exclude dst ::/0 dport 80"]
    assert decide(rules, pkt(dst="10.1.2.3")) == (1, False)
    assert decide(rules, pkt(dst="10.1.2.3", proto=17, dport=53)) == (0, True)
    assert decide(rules, pkt(dst="10.1.2.3", dport=22)) == (2, True)
    assert decide(rules, pkt(dst="10.9.2.3", dport=80)) == (3, True)
    assert decide(rules, pkt(dst="fd00::1", dport=80)) == (3, True)


def test_ipv4_cidrs_never_match_ipv6_and_back() -> None:
    assert decide(["exclude src 0.0.0.0/0"], pkt(src="fd00::1", dst="fd00::2")) == (None, False)
    assert decide(["exclude src 0.0.0.0/0"], pkt()) == (0, True)
    assert decide(["exclude src ::/0"], pkt()) == (0, True)
    assert decide(["exclude src fd00::/8"], pkt()) == (None, False)
    assert decide(["exclude src ::ffff:0:0/96"], pkt()) == (0, True)


def test_ports_need_a_port_protocol() -> None:
    rules = ["exclude dport 0-65535", "exclude sport 0"]
    assert decide(rules, pkt(proto=1)) == (None, False)
    assert decide(rules, pkt(proto=17, dport=9)) == (0, True)
    assert decide(["exclude port 53"], pkt(proto=17, sport=53, dport=9)) == (0, True)
    assert decide(["exclude port 53"], pkt(proto=17, sport=9, dport=53)) == (0, True)
    assert decide(["exclude port 53"], pkt(proto=58)) == (None, False)


def test_net_and_port_take_either_direction() -> None:
    rules = ["include proto udp", "exclude net 192.0.2.0/24 port 22"]
    assert decide(rules, pkt(src="192.0.2.9", dport=22)) == (1, True)
    assert decide(rules, pkt(dst="192.0.2.9", sport=22)) == (1, True)
    assert decide(rules, pkt(dst="192.0.2.9", sport=23)) == (None, True)
    assert filters.compile_rules(filters.parse_rules(rules)).slot_rule == (0, 1, 1, 1, 1)


def test_iface_names_globs_and_indexes() -> None:
    links = {"lo": 1, "eth0": 2, "veth1": 7, "veth2": 9000}
    rules = ["exclude iface veth*", "include iface eth0,5", "exclude iface gone0"]
    parsed = filters.parse_rules(rules)
    tb = filters.compile_rules(parsed, links)
    assert tb.unresolved == ("gone0",)
    assert tb.iface_resolved == {"veth*": (7, 9000), "eth0": (2,), "5": (5,), "gone0": ()}
    assert decide(rules, pkt(ifindex=9000), links) == (0, True)
    assert decide(rules, pkt(ifindex=7), links) == (0, True)
    assert decide(rules, pkt(ifindex=2), links) == (1, False)
    assert decide(rules, pkt(ifindex=5), links) == (1, False)
    assert decide(rules, pkt(ifindex=1), links) == (None, True)
    assert filters.uses_iface_names(parsed) and not filters.uses_iface_names(filters.parse_rules(["exclude iface 3"]))


def test_vlan() -> None:
    rules = ["exclude vlan 0", "include vlan 100-200"]
    assert decide(rules, pkt()) == (0, True)
    assert decide(rules, pkt(vlan=150)) == (1, False)
    assert decide(rules, pkt(vlan=201)) == (None, True)


def test_sample_threshold() -> None:
    assert filters.sample_threshold(2) == 1 << 31
    assert filters.sample_threshold(1) == (1 << 32) - 1
    for n in (3, 10, 100, 1000, 4095, 1 << 20, (1 << 32) - 1):
        assert abs(filters.sample_threshold(n) / (1 << 32) - 1 / n) <= 2 ** -33
    with pytest.raises(ValueError):
        filters.sample_threshold(0)


# -- hypothesis: compiled tables == the documented semantics ---------------------------------------

ADDRS = ["10.1.2.3", "10.1.2.4", "10.1.3.1", "10.200.0.1", "11.0.0.1", "192.0.2.7", "fd00:1::1", "fd00:2::1",
         "2001:db8::5", "fe80::1"]
@st.composite
def packets_st(draw: st.DrawFn) -> Packet:
    proto = draw(st.sampled_from([6, 17, 1, 58, 132, 47]))
    ports = proto in filters.PORT_PROTOCOLS and draw(st.booleans() | st.just(True))
    return Packet(mapped(draw(st.sampled_from(ADDRS))), mapped(draw(st.sampled_from(ADDRS))), proto,
                  draw(st.integers(0, 70)) if ports else None, draw(st.integers(0, 70)) if ports else None,
                  draw(st.sampled_from([0, 1, 5, 7, 4095])), draw(st.sampled_from([1, 2, 3, 7, 5000])))


LINKS = {"lo": 1, "eth0": 2, "eth1": 5000}


@settings(max_examples=int(os.environ.get("XDPFLOW_FUZZ_EXAMPLES", "300")), deadline=None)
@given(texts=st.lists(rules_st(), min_size=1, max_size=8), packets=st.lists(packets_st(), min_size=1, max_size=10))
def test_tables_agree_with_the_rules(texts: list[str], packets: list[Packet]) -> None:
    rules, errors = filters.check_rules(texts)
    if errors:
        return  # e.g. an IPv4 src with an IPv6 dst: refused, nothing to compile
    tb = filters.compile_rules(rules, LINKS)
    for p in packets:
        assert filters.lookup(tb, p) == filters.evaluate(rules, p, LINKS), (texts, p)


# -- config: key, flag, environment, errors ---------------------------------------------------------

@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    for name in list(os.environ):
        if name.startswith("XDPFLOW_"):
            monkeypatch.delenv(name)
    monkeypatch.setattr(configmod, "DEFAULT_PATH", str(tmp_path / "absent.toml"))
    saved = structlog.get_config()
    try:
        yield
    finally:
        # cli.main points structlog at this test's captured stderr, which pytest closes afterwards.
        structlog.configure(**saved)


def load(flags: dict[str, Any] | None = None, env: dict[str, str] | None = None, path: str | None = None,
         **kw: Any) -> configmod.Loaded:
    kw.setdefault("system", False)
    kw.setdefault("need_interfaces", False)
    return configmod.resolve(flags, config_path=path, environ=env or {}, **kw)


def test_config_defaults_and_sources(tmp_path: Path) -> None:
    cfg = load().config
    assert cfg.filters == () and cfg.sampling == 1
    path = tmp_path / "x.toml"
    path.write_text('filters = ["exclude dst 10.0.0.0/8,192.168.0.0/16", "include  proto tcp"]\nsampling = 100\n')
    cfg = load(path=str(path)).config
    assert cfg.filters == ("exclude dst 10.0.0.0/8,192.168.0.0/16", "include proto tcp") and cfg.sampling == 100
    env = {"XDPFLOW_FILTERS": "exclude dst 10.0.0.0/8, 11.0.0.0/8; include proto udp;", "XDPFLOW_SAMPLING": "8"}
    cfg = load(path=str(path), env=env).config
    assert cfg.filters == ("exclude dst 10.0.0.0/8,11.0.0.0/8", "include proto udp") and cfg.sampling == 8
    args = cli.build_parser().parse_args(["run", "-i", "lo", "--filter", "exclude dport 22,23",
                                          "--filter", "include proto tcp", "--sampling", "4"])
    cfg = configmod.from_args(args, environ={}, system=False).config
    assert cfg.filters == ("exclude dport 22,23", "include proto tcp") and cfg.sampling == 4


@pytest.mark.parametrize(("toml", "key", "fragment"), [
    ('filters = ["exclude dst 10.0.0.0/8", "exclude dts 1.2.3.4"]', "filters[1]", 'unknown selector "dts"'),
    ('filters = "exclude dst 10.0.0.1/8"', "filters[0]", "host bits set"),
    ("filters = 5", "filters", "list of filter rules"),
    ('filters = [5]', "filters[0]", "a rule is a string"),
    ('filters = ["exclude iface nosuchif0"]', "filters[0]", "no such interface"),
    ("sampling = 0", "sampling", "integer 1..4294967295"),
    ('sampling = "10"', "sampling", "a TOML number"),
    ("sampling = 4294967296", "sampling", "integer 1..4294967295"),
])
def test_bad_config_is_one_line_exit_2(toml: str, key: str, fragment: str, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "x.toml"
    path.write_text(f'interfaces = ["lo"]\n{toml}\n')

    def refuse(*a: object, **k: object) -> int:
        raise AssertionError("the service must not start on a bad config")

    monkeypatch.setattr(service, "run", refuse)
    rc = cli.main(["run", "--config", str(path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f"xdpflow: error: {key} "), err
    assert fragment in err[0], err


def test_bad_filter_flag_names_the_flag(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service, "run", lambda *a, **k: 0)
    rc = cli.main(["run", "-i", "lo", "--filter", "include proto tcp", "--filter", "exclude dport 99999"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0] == ('xdpflow: error: filters[1] = "exclude dport 99999" (from --filter): '
                      "port 99999 is out of range; allowed 0..65535")


@settings(max_examples=300, deadline=None)
@given(st.recursive(st.one_of(st.text(max_size=30), st.integers(), st.floats(), st.booleans(),
                              st.from_regex(r"\A(in|ex)clude( (src|dst|port|proto|vlan|iface) [ -~]{0,12}){0,3}\Z")),
                    lambda inner: st.lists(inner, max_size=4), max_leaves=8), st.booleans())
def test_any_filters_value_is_rules_or_one_line_errors(value: object, text: bool) -> None:
    parse = configmod.FIELDS["filters"].metadata["parse"]
    try:
        parsed = parse(value, text)
    except configmod.Invalid as e:
        for suffix, _item, allowed in e.items:
            assert allowed and not set(allowed) & {"\n", "\r", "\u2028", "\x85"}, allowed
            assert suffix == "" or re.fullmatch(r"\[\d+\]", suffix)
        return
    assert isinstance(parsed, tuple) and all(isinstance(r, str) for r in parsed)
    filters.compile_rules(filters.parse_rules(parsed), {})  # whatever config accepts compiles
