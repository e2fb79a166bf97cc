"""UDP transport against loopback: stable source port, errors counted never raised; endpoint parsing and
the sender factory for every scheme. TCP and TLS live in test_transport_tcp.py."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator

import pytest
from structlog.testing import capture_logs

from exporter.transport import (
    Endpoint,
    EndpointError,
    StreamOptions,
    TcpSender,
    TlsSender,
    UdpSender,
    make_sender,
    parse_endpoint,
)


@pytest.fixture(autouse=True)
def _quiet_logs() -> Iterator[None]:
    """Keep log events in memory: an in-process CLI test earlier in the session may have left structlog
    printing to a captured stderr that is closed by now."""
    with capture_logs():
        yield


def drain(sock: socket.socket, quiet: float) -> list[bytes]:
    """Every datagram until none came for `quiet` seconds."""
    sock.settimeout(quiet)
    got = []
    with contextlib.suppress(TimeoutError):
        while True:
            got.append(sock.recv(100))
    return got


@pytest.mark.parametrize(("text", "expected"), [
    ("127.0.0.1:4739", Endpoint("udp", "127.0.0.1", 4739)),
    ("collector.example", Endpoint("udp", "collector.example", 4739)),
    ("[::1]:2055", Endpoint("udp", "::1", 2055)),
    ("udp://10.0.0.1:9995", Endpoint("udp", "10.0.0.1", 9995)),
    ("tcp://10.0.0.1:9995", Endpoint("tcp", "10.0.0.1", 9995)),
    ("tcp://collector.example", Endpoint("tcp", "collector.example", 4739)),
    ("TCP://[2001:db8::1]", Endpoint("tcp", "2001:db8::1", 4739)),
    ("tls://collector.example", Endpoint("tls", "collector.example", 4740)),
    ("tls://[::1]:4739", Endpoint("tls", "::1", 4739)),
])
def test_parse_endpoint(text: str, expected: Endpoint) -> None:
    assert parse_endpoint(text) == expected


@pytest.mark.parametrize("text", ["", "127.0.0.1:99999", "127.0.0.1:x", "sctp://h:1", "udp://:4739",
                                  "udp://h:1/path", "tcp://:1", "tls://h:70000", "dtls://h:1", "tcp://h:1?x=1"])
def test_bad_endpoints_are_one_line_errors(text: str) -> None:
    with pytest.raises(EndpointError) as e:
        parse_endpoint(text)
    assert "\n" not in str(e.value)


def test_unsupported_scheme_names_the_supported_ones() -> None:
    with pytest.raises(EndpointError, match=r"'sctp' is not supported \(use udp, tcp, tls\)"):
        parse_endpoint("sctp://h:1")


def test_explicit_default_port_applies_to_every_scheme() -> None:
    assert parse_endpoint("tls://h", default_port=9000).port == 9000
    assert parse_endpoint("h", default_port=2055).port == 2055


def test_endpoint_str_round_trips() -> None:
    for ep in (Endpoint("udp", "::1", 4739), Endpoint("udp", "127.0.0.1", 1), Endpoint("tcp", "::1", 4739),
               Endpoint("tls", "collector.example", 4740)):
        assert parse_endpoint(str(ep)) == ep


def test_make_sender_picks_the_transport() -> None:
    opts = StreamOptions(queue_messages=5)
    udp = make_sender(parse_endpoint("udp://h:1"), options=opts)
    tcp = make_sender(parse_endpoint("tcp://h:1"), options=opts)
    tls = make_sender(parse_endpoint("tls://h:1"), options=opts)
    assert type(udp) is UdpSender
    assert type(tcp) is TcpSender and tcp.options.queue_messages == 5
    assert type(tls) is TlsSender and tls.options.queue_messages == 5


def test_udp_sender_counts_records_sent_and_failed() -> None:
    handed_back: list[bytes] = []

    async def go() -> UdpSender:
        rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        rx.bind(("127.0.0.1", 0))
        sender = await UdpSender(parse_endpoint(f"127.0.0.1:{rx.getsockname()[1]}"),
                                 on_not_sent=handed_back.extend).open()
        sender.send([b"a" * 20, b"b" * 30], [3, 4])
        sender.send([b"t" * 10])  # a templates-only message: no records
        with pytest.raises(ValueError, match="2 messages but 1 record counts"):
            sender.send([b"x", b"y"], [1])
        with pytest.raises(ValueError, match="2 messages but 1 tags"):
            sender.send([b"x", b"y"], [1, 1], [b"x"])
        await sender.close()
        sender.send([b"c" * 5, b"d" * 5], [5, 6], [b"c" * 5, b"d" * 5])  # each message its own tag
        rx.close()
        return sender

    s = asyncio.run(go()).stats
    assert (s.messages, s.octets, s.records, s.connections) == (3, 60, 7, 1)
    assert (s.messages_failed, s.records_failed, s.records_not_sent) == (2, 11, 11)
    assert handed_back == [b"c" * 5, b"d" * 5]


def test_udp_sender_hands_back_the_tags_of_failed_messages_only() -> None:
    """While the collector refuses, each batch starts with templates of the sender's own: a failure is
    reported by the tag of the caller's message it hit, and the templates have none."""
    lost: list[str] = []

    async def go() -> UdpSender[str]:
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        sender = await UdpSender(parse_endpoint(f"127.0.0.1:{port}"), on_not_sent=lost.extend,
                                 on_connect=lambda _: b"templates").open()
        for _ in range(100):   # until the ICMP refusal of a datagram has been seen
            sender.send([b"probe"], [1], ["probe"])
            await asyncio.sleep(0.01)
            if not sender.connected:
                break
        assert not sender.connected
        before = sender.stats.template_messages
        sender.send([b"small", b"x" * 70_000], [1, 2], ["small", "too big"])   # EMSGSIZE: over any datagram
        assert sender.stats.template_messages == before + 1
        await sender.close()
        return sender

    s = asyncio.run(go()).stats
    assert "too big" in lost and "small" not in lost and "templates" not in lost
    assert set(lost) <= {"probe", "too big"}
    assert s.records_failed >= 2


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


class _Moving(UdpSender):
    """A UdpSender whose name resolves to whatever the test says (an OSError: it does not resolve)."""

    answers: list[object]

    async def _resolve(self) -> list[tuple[int, tuple[object, ...]]]:
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, OSError):
            raise answer
        return [(socket.AF_INET, (answer, self.endpoint.port))]


def test_udp_sender_follows_a_collector_name_that_moves() -> None:
    """Same socket, same source port, new address; a name that stops resolving keeps the last address."""
    async def go() -> tuple[list[tuple[str, int, bytes]], list[str], int]:
        one = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        one.bind(("127.0.0.1", 0))
        port = one.getsockname()[1]
        two = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        two.bind(("127.0.0.2", port))
        for s in (one, two):
            s.settimeout(2)
        with capture_logs() as logs:
            sender = _Moving(Endpoint("udp", "collector.test", port), resolve_every=3600)
            sender.answers = ["127.0.0.1"]
            await sender.open()
            assert sender._resolver is not None, "a name is followed"
            sender.send([b"a"])
            sender.answers = ["127.0.0.2"]
            await sender.resolve_again()
            sender.send([b"b"])
            sender.answers = [OSError("Name or service not known")]
            await sender.resolve_again()
            await sender.resolve_again()
            sender.send([b"c"])
            sender.answers = ["127.0.0.2"]
            await sender.resolve_again()
            await sender.close()
        got = []
        for rx, name in ((one, "127.0.0.1"), (two, "127.0.0.2")):
            rx.settimeout(0.2)
            with contextlib.suppress(TimeoutError):
                while True:
                    d, (_, sport) = rx.recvfrom(100)
                    got.append((name, sport, d))
            rx.close()
        return got, [e["event"] for e in logs], sender.stats.send_errors

    got, events, errors = asyncio.run(go())
    assert [(name, d) for name, _, d in got] == [("127.0.0.1", b"a"), ("127.0.0.2", b"b"), ("127.0.0.2", b"c")]
    assert len({sport for _, sport, _ in got}) == 1, "the source port changed with the address"
    assert events == ["collector address changed", "collector name no longer resolves, sending to its last address",
                      "collector name resolves again"]
    assert errors == 0


def test_a_collector_name_that_moves_gets_the_templates_first() -> None:
    """The new address may be another collector: it knows none of our templates."""
    async def go() -> list[bytes]:
        one = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        one.bind(("127.0.0.1", 0))
        port = one.getsockname()[1]
        two = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        two.bind(("127.0.0.2", port))
        sender = _Moving(Endpoint("udp", "collector.test", port), resolve_every=3600, on_connect=lambda _first: b"T")
        sender.answers = ["127.0.0.1"]
        await sender.open()
        sender.send([b"a"])
        sender.answers = ["127.0.0.2"]
        await sender.resolve_again()
        sender.send([b"b"])
        await sender.close()
        got = drain(two, 0.3)
        one.close()
        two.close()
        return got

    assert asyncio.run(go()) == [b"T", b"b"]


def test_a_refusal_of_an_earlier_datagram_does_not_fail_the_current_one() -> None:
    """ECONNREFUSED on a connected UDP socket answers an earlier datagram: the one being sent is sent
    again, and reaches a collector that has come up meanwhile."""
    async def go() -> tuple[list[bytes], int, int, int]:
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        lost: list[str] = []
        sender = await UdpSender(parse_endpoint(f"127.0.0.1:{port}"), on_not_sent=lost.extend).open()
        sender.send([b"into the void"], [1], ["void"])   # nobody listens: ICMP port unreachable comes back
        rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        rx.bind(("127.0.0.1", port))                      # the collector comes up before the next send
        sender.send([b"delivered"], [2], ["delivered"])   # the kernel reports the old refusal here
        got = drain(rx, 0.5)
        rx.close()
        await sender.close()
        return got, sender.stats.refusals, sender.stats.records_failed, len(lost)

    got, refusals, failed, lost = asyncio.run(go())
    assert got == [b"delivered"]
    assert refusals == 1 and failed == 0 and lost == 0


def test_udp_sender_does_not_follow_an_address() -> None:
    async def go() -> bool:
        sender = await UdpSender(parse_endpoint("127.0.0.1:4739")).open()
        followed = sender._resolver is not None
        await sender.close()
        return followed

    assert asyncio.run(go()) is False
