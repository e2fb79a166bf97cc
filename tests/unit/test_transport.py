"""UDP transport against loopback: stable source port, errors counted never raised, endpoint parsing."""

from __future__ import annotations

import asyncio
import socket

import pytest

from exporter.transport import Endpoint, EndpointError, UdpSender, parse_endpoint


@pytest.mark.parametrize(("text", "expected"), [
    ("127.0.0.1:4739", Endpoint("udp", "127.0.0.1", 4739)),
    ("collector.example", Endpoint("udp", "collector.example", 4739)),
    ("[::1]:2055", Endpoint("udp", "::1", 2055)),
    ("udp://10.0.0.1:9995", Endpoint("udp", "10.0.0.1", 9995)),
])
def test_parse_endpoint(text: str, expected: Endpoint) -> None:
    assert parse_endpoint(text) == expected


@pytest.mark.parametrize("text", ["", "127.0.0.1:99999", "127.0.0.1:x", "sctp://h:1", "udp://:4739",
                                  "udp://h:1/path"])
def test_bad_endpoints_are_one_line_errors(text: str) -> None:
    with pytest.raises(EndpointError) as e:
        parse_endpoint(text)
    assert "\n" not in str(e.value)


def test_endpoint_str_round_trips() -> None:
    for ep in (Endpoint("udp", "::1", 4739), Endpoint("udp", "127.0.0.1", 1)):
        assert parse_endpoint(str(ep)) == ep


def test_udp_sender_delivers_from_one_source_port() -> None:
    async def go() -> tuple[list[tuple[bytes, int]], int]:
        rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        rx.bind(("127.0.0.1", 0))
        rx.settimeout(2)
        sender = await UdpSender(parse_endpoint(f"127.0.0.1:{rx.getsockname()[1]}")).open()
        for i in range(3):
            sender.send([bytes([i]) * 10, bytes([i]) * 20])
            await asyncio.sleep(0.01)
        got = [(d, addr[1]) for d, addr in (rx.recvfrom(100) for _ in range(6))]
        await sender.close()
        rx.close()
        return got, sender.stats.messages

    got, sent = asyncio.run(go())
    assert sent == 6
    assert [len(d) for d, _ in got] == [10, 20] * 3
    assert len({port for _, port in got}) == 1, "source port changed between sends"


def test_closed_port_is_counted_not_raised() -> None:
    async def go() -> tuple[int, int]:
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()  # nothing listens there now: the kernel answers ICMP port unreachable
        sender = await UdpSender(parse_endpoint(f"127.0.0.1:{port}")).open()
        for _ in range(5):
            sender.send([b"x" * 50])
            await asyncio.sleep(0.02)
        await sender.close()
        return sender.stats.send_errors, sender.stats.messages

    errors, messages = asyncio.run(go())
    assert errors >= 1
    assert messages >= 1


def test_unresolvable_host_is_a_clear_error() -> None:
    async def go() -> None:
        await UdpSender(Endpoint("udp", "no-such-host.invalid", 4739)).open()

    with pytest.raises(EndpointError, match="cannot resolve"):
        asyncio.run(go())
