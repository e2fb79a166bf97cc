"""The one address grammar (exporter/address.py): each reader's tolerances, and the same refusals for all."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from exporter.address import Address, AddressError, PortRangeError, parse_address
from exporter.transport import DEFAULT_PORTS, SCHEMES

ENDPOINT = {"schemes": SCHEMES, "default_scheme": "udp", "default_port": DEFAULT_PORTS}
METRICS = {"default_host": "127.0.0.1", "bare_port": True}


@pytest.mark.parametrize(("text", "kw", "expected"), [
    ("127.0.0.1:4739", {}, Address("127.0.0.1", 4739)),
    (" [::1]:0 ", {"min_port": 0}, Address("::1", 0)),
    ("[fe80::1%eth0]:9", {}, Address("fe80::1%eth0", 9)),
    ("9477", METRICS, Address("127.0.0.1", 9477)),
    (":9100", METRICS, Address("127.0.0.1", 9100)),
    ("[::1]:9100", METRICS, Address("::1", 9100)),
    ("collector.example", ENDPOINT, Address("collector.example", 4739, "udp")),
    ("TLS://[2001:db8::1]", ENDPOINT, Address("2001:db8::1", 4740, "tls")),
    ("tcp://h:1/", ENDPOINT, Address("h", 1, "tcp")),
    ("h:1/", ENDPOINT, Address("h", 1, "udp")),
    ("tcp://h:", ENDPOINT, Address("h", 4739, "tcp")),
    ("h", {**ENDPOINT, "default_port": 2055}, Address("h", 2055, "udp")),
    ("tcp://127.0.0.1:4739", {"schemes": ("udp", "tcp")}, Address("127.0.0.1", 4739, "tcp")),
])
def test_each_reader_leaves_out_what_it_may(text: str, kw: dict[str, object], expected: Address) -> None:
    assert parse_address(text, **kw) == expected


@pytest.mark.parametrize(("text", "kw", "problem"), [
    ("", {}, "empty address"),
    ("localhost", {}, "expected HOST:PORT"),
    ("9477", {}, "expected HOST:PORT"),
    ("h:", {}, "expected HOST:PORT"),
    (":4739", {}, "no host"),
    ("::1:4739", {}, "write an IPv6 address in brackets"),
    ("[::1", ENDPOINT, "IPv6"),
    ("[]:1", {}, "not an IPv6 address"),
    ("[1]:1", {}, "not an IPv6 address"),
    ("[1.2.3.4]:1", {}, "not an IPv6 address"),
    ("[:]:1", {}, "not an IPv6 address"),
    ("[.]:1", {}, "not an IPv6 address"),
    ("[::1]x", {}, "expected [IPv6]:PORT"),
    ("h:ipfix", ENDPOINT, "port 'ipfix' is not a number"),
    ("h:-1", {}, "is not a number"),
    ("h:1/", {}, "unexpected path or query"),
    ("udp://h:1/path", ENDPOINT, "unexpected path or query"),
    ("tcp://h:1?x=1", ENDPOINT, "unexpected path or query"),
    ("sctp://h:1", ENDPOINT, "transport 'sctp' is not supported (use udp, tcp, tls)"),
    ("udp://h:1", {}, "expected HOST:PORT, not a URL"),
    ("h:1", {"schemes": ("udp", "tcp")}, "no scheme"),
    ("ho$t:1", {}, "not a host name"),
])
def test_refusals_say_what_is_wrong(text: str, kw: dict[str, object], problem: str) -> None:
    with pytest.raises(AddressError) as e:
        parse_address(text, **kw)
    assert problem in str(e.value)


@pytest.mark.parametrize(("text", "kw"), [("h:0", {}), ("h:65536", {}), ("sctp://h:70000", ENDPOINT)])
def test_a_port_out_of_range_is_its_own_error_and_comes_first(text: str, kw: dict[str, object]) -> None:
    with pytest.raises(PortRangeError, match=r"out of range; allowed 1\.\.65535"):
        parse_address(text, **kw)


@given(st.sampled_from(["127.0.0.1", "::1", "fd00::2", "collector.example"]), st.integers(1, 65535),
       st.sampled_from(["", *SCHEMES]))
def test_str_round_trips(host: str, port: int, scheme: str) -> None:
    a = Address(host, port, scheme)
    assert parse_address(str(a), **(ENDPOINT if scheme else {})) == a


def test_a_collector_host_is_one_spelling_but_its_zone_keeps_its_case() -> None:
    """Host names are case-insensitive (one Endpoint per collector); an IPv6 zone names an interface."""
    from exporter.transport import parse_endpoint

    assert parse_endpoint("UDP://Collector.Example:4739").host == "collector.example"
    assert parse_endpoint("[FE80::1%Eth0]:9").host == "fe80::1%Eth0"
