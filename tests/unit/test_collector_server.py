"""The built-in collector end to end on loopback: in-process asyncio server and the CLI.

Datagrams are written by the `ipfix` package's MessageBuffer (an encoder we did not write) or by
hand, sent from a real UDP socket, and checked as the collector's API, JSON/text output and log
lines present them. The CLI is driven in-process for argument errors and as a subprocess for
signals and stdout/stderr separation.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import queue
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine
from ipaddress import IPv4Address
from typing import Any

import ipfix.ie
import ipfix.message
import ipfix.template
import pytest

from collectors.cli import main
from collectors.decoder import default_registry
from collectors.server import Collector, format_exporter, parse_listen, record_json, record_text

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXPORT_TIME = 1_700_000_000
default_registry()

FLOW_T = ipfix.template.from_ielist(
    256,
    ipfix.ie.spec_list(
        ["sourceIPv4Address", "destinationIPv4Address", "octetDeltaCount", "packetDeltaCount[4]", "interfaceName"]
    ),
)
OPT_T = ipfix.template.from_ielist(
    257, ipfix.ie.spec_list(["observationDomainId", "ignoredPacketTotalCount", "samplingInterval"])
)
OPT_T.scopecount = 1


def flow(i: int) -> dict[str, Any]:
    return {
        "sourceIPv4Address": IPv4Address("10.0.0.1") + i,
        "destinationIPv4Address": IPv4Address("192.0.2.7"),
        "octetDeltaCount": 1000 + i,
        "packetDeltaCount": 1 + i,
        "interfaceName": f"veth {i}",
    }


def ipfix_stream(odid: int = 3) -> list[bytes]:
    """Three messages from one MessageBuffer: templates + 2 flows + options, 1 flow, 2 flows."""
    mb = ipfix.message.MessageBuffer()
    out = []
    for n, (recs, opts) in enumerate([([flow(0), flow(1)], True), ([flow(2)], False), ([flow(3), flow(4)], False)]):
        mb.begin_export(odid)
        if n == 0:
            mb.add_template(FLOW_T)
            mb.add_template(OPT_T)
        mb.export_ensure_set(256)
        for r in recs:
            mb.export_namedict(r)
        if opts:
            mb.export_ensure_set(257)
            mb.export_namedict({"observationDomainId": odid, "ignoredPacketTotalCount": 5, "samplingInterval": 1})
        mb.export_epoch = EXPORT_TIME
        mb.auto_export_time = False
        out.append(mb.to_bytes())
    return out


def hand_message(seq: int, *sets: bytes, odid: int = 1) -> bytes:
    body = b"".join(sets)
    return struct.pack("!HHIII", 10, 16 + len(body), EXPORT_TIME, seq, odid) + body


def hand_set(set_id: int, body: bytes) -> bytes:
    return struct.pack("!HH", set_id, 4 + len(body)) + body


T_SRC = hand_set(2, struct.pack("!HHHH", 300, 1, 8, 4))  # template 300: sourceIPv4Address


def src_set(*addrs: str) -> bytes:
    return hand_set(300, b"".join(IPv4Address(a).packed for a in addrs))


class ListLog:
    """Stands in for a structlog logger; keeps (level, event, fields)."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def _add(self, level: str, event: str, **kw: Any) -> None:
        self.lines.append((level, event, kw))

    def debug(self, event: str, **kw: Any) -> None:
        self._add("debug", event, **kw)

    def info(self, event: str, **kw: Any) -> None:
        self._add("info", event, **kw)

    def warning(self, event: str, **kw: Any) -> None:
        self._add("warning", event, **kw)

    def error(self, event: str, **kw: Any) -> None:
        self._add("error", event, **kw)

    def exception(self, event: str, **kw: Any) -> None:
        self._add("exception", event, **kw)

    def events(self, event: str) -> list[dict[str, Any]]:
        return [kw for _, e, kw in self.lines if e == event]


def arun(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 10))


def strict_json(line: str) -> Any:
    def reject(const: str) -> Any:
        raise ValueError(f"not JSON: {const}")

    return json.loads(line, parse_constant=reject)


# --- in-process collector ----------------------------------------------------------------------


def test_records_arrive_and_json_lines_carry_iana_names() -> None:
    out = io.StringIO()
    log = ListLog()

    async def scenario() -> tuple[Collector, str, int]:
        async with Collector(("127.0.0.1", 0), json_lines=True, output=out, log=log) as c:
            assert c.port != 0 and c.address[0] == "127.0.0.1"
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                for m in ipfix_stream():
                    s.sendto(m, ("127.0.0.1", c.port))
                assert await c.wait_for_records(6, timeout=5)
                return c, f"127.0.0.1:{s.getsockname()[1]}", c.port

    c, exporter, port = arun(scenario())
    assert c.counters()["datagrams"] == 3
    assert (c.stats.messages, c.stats.records, c.stats.options_records) == (3, 6, 1)
    assert (c.stats.malformed, c.stats.gaps, c.stats.unknown_template_sets, c.internal_errors) == (0, 0, 0, 0)
    assert [r.fields["octetDeltaCount"] for r in c.records if not r.is_options] == [1000, 1001, 1002, 1003, 1004]

    objs = [strict_json(line) for line in out.getvalue().splitlines()]
    assert len(objs) == 6
    flows = [o for o in objs if not o["_options"]]
    assert flows[0] == {
        "_exporter": exporter,
        "_odid": 3,
        "_template_id": 256,
        "_options": False,
        "_export_time": EXPORT_TIME,
        "_sequence": 0,
        "sourceIPv4Address": "10.0.0.1",
        "destinationIPv4Address": "192.0.2.7",
        "octetDeltaCount": 1000,
        "packetDeltaCount": 1,
        "interfaceName": "veth 0",
    }
    assert [o["_sequence"] for o in flows] == [0, 0, 3, 4, 4]
    (opt,) = [o for o in objs if o["_options"]]
    assert opt["_scope"] == "observationDomainId" and opt["ignoredPacketTotalCount"] == 5
    (listening,) = log.events("listening")
    assert listening["address"] == f"127.0.0.1:{port}" and listening["rcvbuf"] > 0
    assert not log.events("sequence gap") and not log.events("malformed input")


def test_text_lines_and_ipv6_listener() -> None:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback")
    out = io.StringIO()

    async def scenario() -> Collector:
        async with Collector(("::1", 0), output=out, log=ListLog()) as c:
            with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
                s.sendto(ipfix_stream()[0], ("::1", c.port))
                assert await c.wait_for_records(3)
            return c

    c = arun(scenario())
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    exporter = c.records[0].exporter
    assert exporter.startswith("[::1]:")
    assert lines[0] == (
        f"{exporter} odid=3 tid=256 sourceIPv4Address=10.0.0.1 destinationIPv4Address=192.0.2.7 "
        'octetDeltaCount=1000 packetDeltaCount=1 interfaceName="veth 0"'
    )
    assert (
        lines[2]
        == f"{exporter} odid=3 tid=257 options observationDomainId=3 ignoredPacketTotalCount=5 samplingInterval=1"
    )


def test_gaps_malformed_and_unknown_templates_are_counted_and_logged() -> None:
    log = ListLog()

    async def scenario() -> Collector:
        async with Collector(("127.0.0.1", 0), log=log) as c:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                send = [
                    hand_message(0, src_set("1.1.1.1")),  # no template yet
                    hand_message(1, T_SRC, src_set("1.1.1.1", "1.1.1.2")),
                    b"\x00\x0a\x00",  # truncated
                    hand_message(10, src_set("1.1.1.3")),  # 3 expected: 7 lost
                    hand_message(11, src_set("1.1.1.4")),
                ]
                for d in send:
                    s.sendto(d, ("127.0.0.1", c.port))
                assert await c.wait_until(lambda c: c.datagrams == len(send), timeout=5)
            return c

    c = arun(scenario())
    counters = c.counters()
    assert {k: counters[k] for k in ("records", "malformed", "gaps", "lost_records", "unknown_template_sets")} == {
        "records": 4,
        "malformed": 1,
        "gaps": 1,
        "lost_records": 7,
        "unknown_template_sets": 1,
    }
    (gap,) = log.events("sequence gap")
    assert (gap["expected"], gap["received"], gap["delta"], gap["odid"]) == (3, 10, 7, 1)
    (bad,) = log.events("malformed input")
    assert bad["reason"] == "truncated header"
    assert len(log.events("data set without template")) == 1
    assert [g.delta for g in c.gaps] == [7]


def test_gap_line_on_real_stderr_logger(capsys: pytest.CaptureFixture[str]) -> None:
    async def scenario() -> None:
        async with Collector(("127.0.0.1", 0)) as c:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.sendto(hand_message(0, T_SRC, src_set("1.1.1.1")), ("127.0.0.1", c.port))
                s.sendto(hand_message(5, src_set("1.1.1.2")), ("127.0.0.1", c.port))
                assert await c.wait_for_records(2)

    arun(scenario())
    err = capsys.readouterr().err.splitlines()
    gaps = [j for j in map(json.loads, err) if j["event"] == "sequence gap"]  # not a tty: JSON lines
    assert len(gaps) == 1 and gaps[0]["expected"] == 1 and gaps[0]["received"] == 5
    assert gaps[0]["level"] == "warning"


def test_stop_after_records_and_non_finite_floats_stay_valid_json() -> None:
    out = io.StringIO()
    t = hand_set(2, struct.pack("!HHHH", 300, 1, 311, 8))  # samplingProbability float64

    async def scenario() -> Collector:
        async with Collector(("127.0.0.1", 0), json_lines=True, output=out, log=ListLog(), stop_after_records=2) as c:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.sendto(hand_message(0, t, hand_set(300, struct.pack("!d", float("nan")))), ("127.0.0.1", c.port))
                s.sendto(hand_message(1, hand_set(300, struct.pack("!d", float("-inf")))), ("127.0.0.1", c.port))
            await asyncio.wait_for(c.done.wait(), 5)
            return c

    arun(scenario())
    assert [strict_json(line)["samplingProbability"] for line in out.getvalue().splitlines()] == ["nan", "-inf"]


def test_kernel_drops_are_visible_when_the_loop_falls_behind() -> None:
    raw = hand_message(0, T_SRC, src_set(*["1.1.1.1"] * 300))

    async def scenario() -> tuple[Collector, dict[str, int]]:
        async with Collector(("127.0.0.1", 0), log=ListLog(), rcvbuf=4096) as c:
            assert c.counters()["socket_drops"] == 0
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                for _ in range(200):  # the loop does not run in between: the socket buffer overflows
                    s.sendto(raw, ("127.0.0.1", c.port))
            await asyncio.sleep(0.2)
            return c, c.counters()

    c, counters = arun(scenario())
    assert counters["socket_drops"] > 0
    assert counters["datagrams"] + counters["socket_drops"] == 200
    assert "socket_drops" not in c.counters()  # closed


def test_helpers() -> None:
    assert parse_listen("127.0.0.1:4739") == ("127.0.0.1", 4739)
    assert parse_listen("[::1]:0") == ("::1", 0)
    assert parse_listen("localhost:9995") == ("localhost", 9995)
    for bad in ("4739", "127.0.0.1", "::1:4739", "[::1]", "host:99999", "host:-1", ":4739", "[]:1"):
        with pytest.raises(ValueError):
            parse_listen(bad)
    assert format_exporter(("::1", 5, 0, 0)) == "[::1]:5" and format_exporter(("10.0.0.1", 7)) == "10.0.0.1:7"
    rec = Collector(log=ListLog()).decoder.feed(hand_message(0, T_SRC, src_set("1.2.3.4")), "e").records[0]
    assert strict_json(record_json(rec))["sourceIPv4Address"] == "1.2.3.4"
    assert record_text(rec) == "e odid=1 tid=300 sourceIPv4Address=1.2.3.4"


def one_field(tid: int, n: int = 1) -> bytes:
    return struct.pack("!HH", tid, n) + struct.pack("!HH", 8, 4) * n


def test_each_decoder_limit_is_counted_and_logged_once() -> None:
    log = ListLog()
    now = [0.0]
    probe = Collector(log=ListLog())
    probe.decoder.feed(hand_message(0, hand_set(2, one_field(300))), "probe")
    unit = probe.decoder.template_bytes

    async def scenario() -> tuple[Collector, str]:
        async with Collector(
            ("127.0.0.1", 0),
            log=log,
            max_sessions=2,
            max_templates_per_session=2,
            max_template_fields=3,
            max_template_bytes=3 * unit,
            template_lifetime=10,
            clock=lambda: now[0],
        ) as c:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                steps = [
                    (0, hand_message(0, hand_set(2, b"".join(one_field(t) for t in (300, 301, 302, 303))))),
                    (0, hand_message(0, hand_set(2, one_field(310, 4) + one_field(311, 4)))),
                    (0, hand_message(0, hand_set(2, struct.pack("!HHHH", 300, 0, 301, 0)))),  # UDP: not withdrawn
                    (0, hand_message(0, hand_set(2, b"".join(one_field(t) for t in (300, 301, 302))), odid=2)),
                    (0, hand_message(0, hand_set(2, one_field(300)), odid=3)),  # pushes session 1 out
                    (100, hand_message(0, odid=3)),  # sessions 2 and 3 see their templates expire
                    (100, hand_message(0, odid=4)),  # pushes session 2 out
                ]
                for n, (t, d) in enumerate(steps, 1):
                    now[0] = t
                    s.sendto(d, ("127.0.0.1", c.port))
                    assert await c.wait_until(lambda c, n=n: c.datagrams == n, timeout=5)
                return c, f"127.0.0.1:{s.getsockname()[1]}"

    c, exporter = arun(scenario())
    want = {
        "templates_refused_session": 2,
        "templates_refused_fields": 2,
        "withdrawals_ignored": 2,
        "templates_refused_budget": 2,
        "sessions_evicted": 2,
        "templates_expired": 2,
        "templates_refused": 6,
        "template_bytes": 0,
    }
    summary = c.summary()
    assert {k: summary[k] for k in want} == want and summary["malformed"] == 0
    hits = log.events("decoder limit hit")
    assert sorted(h["limit"] for h in hits) == [
        "max_sessions",
        "max_template_bytes",
        "max_template_fields",
        "max_templates_per_session",
        "template_lifetime",
        "withdrawals",
    ]
    assert all(h["exporter"] == exporter and h["dropped"] for h in hits)
    by_limit = {h["limit"]: h for h in hits}
    assert by_limit["max_templates_per_session"]["setting"] == 2 and by_limit["max_template_fields"]["odid"] == 1
    assert "302" in by_limit["max_templates_per_session"]["dropped"] and by_limit["template_lifetime"]["odid"] == 2
    assert by_limit["max_sessions"]["odid"] == 1
    assert by_limit["max_template_bytes"]["counter"] == "templates_refused_budget"


# --- CLI ---------------------------------------------------------------------------------------

BAD_LISTEN = ["nonsense", "127.0.0.1", "127.0.0.1:http", "127.0.0.1:70000", "::1:4739", "[::1"]


@pytest.mark.parametrize("value", BAD_LISTEN)
def test_cli_bad_listen_is_one_line_and_exit_2(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["collect", "--listen", value, "--exit-after-seconds", "1"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("xdpflow collect: error: ") and value in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("option", "value"), [("--template-lifetime", "-1"), ("--template-lifetime", "inf"), ("--max-template-bytes", "0")]
)
def test_cli_bad_limits_are_one_line_and_exit_2(option: str, value: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["collect", "--listen", "127.0.0.1:0", option, value, "--exit-after-seconds", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"xdpflow collect: error: {option} ")


def test_cli_port_in_use_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        listen = f"127.0.0.1:{taken.getsockname()[1]}"
        assert main(["collect", "--listen", listen, "--exit-after-seconds", "1"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [f"xdpflow collect: error: cannot listen on {listen}: Address already in use"]


def test_cli_in_process_exits_after_seconds_with_summary(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["collect", "--listen", "127.0.0.1:0", "--exit-after-seconds", "0.2", "--log-format", "json"])
    assert code == 0
    out, err = capsys.readouterr()
    logs = [json.loads(line) for line in err.splitlines()]
    assert [entry["event"] for entry in logs] == ["listening", "summary"]
    assert logs[1]["records"] == 0 and logs[1]["malformed"] == 0 and out == ""


class Spawned:
    """`python -m collectors.cli ...` with its stdout and stderr lines read by threads."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "collectors.cli", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=dict(os.environ, PYTHONPATH=ROOT),
        )
        self.out: queue.Queue[str] = queue.Queue()
        self.err: queue.Queue[str] = queue.Queue()
        for stream, q in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            threading.Thread(target=self._pump, args=(stream, q), daemon=True).start()

    @staticmethod
    def _pump(stream: Any, q: queue.Queue[str]) -> None:
        for line in stream:
            q.put(line)

    def line(self, q: queue.Queue[str], timeout: float = 10) -> str:
        return q.get(timeout=timeout)

    def finish(self, timeout: float = 10) -> tuple[int, list[str], list[str]]:
        rc = self.proc.wait(timeout=timeout)
        rest_out: list[str] = []
        rest_err: list[str] = []
        for q, rest in ((self.out, rest_out), (self.err, rest_err)):
            while True:
                try:
                    rest.append(q.get(timeout=0.5))
                except queue.Empty:
                    break
        return rc, rest_out, rest_err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_cli_subprocess_json_output_and_clean_exit_on_signal(sig: signal.Signals) -> None:
    p = Spawned("collect", "--listen", "127.0.0.1:0", "--json", "--log-format", "json")
    try:
        listening = json.loads(p.line(p.err))
        assert listening["event"] == "listening"
        host, port = parse_listen(listening["address"])
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for m in ipfix_stream(odid=9):
                s.sendto(m, (host, port))
            lines = [strict_json(p.line(p.out)) for _ in range(6)]
        assert sum(1 for o in lines if o["_options"]) == 1
        assert {o["_odid"] for o in lines} == {9}
        assert [o["octetDeltaCount"] for o in lines if not o["_options"]] == [1000, 1001, 1002, 1003, 1004]
        p.proc.send_signal(sig)
        rc, out, err = p.finish()
    finally:
        p.kill()
    assert rc == 0 and out == []
    summary = json.loads(err[-1])
    assert summary["event"] == "summary" and summary["records"] == 6 and summary["gaps"] == 0
    assert summary["socket_drops"] == 0
    assert not any("Traceback" in line for line in err)


def test_cli_subprocess_exit_after_records_and_bad_listen() -> None:
    p = Spawned("collect", "--listen", "127.0.0.1:0", "--exit-after-records", "2", "--log-format", "console")
    try:
        first = p.line(p.err)
        assert "listening" in first
        found = re.search(r"address=127\.0\.0\.1:(\d+)", first)
        assert found, first
        port = int(found.group(1))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(hand_message(0, T_SRC, src_set("1.1.1.1", "2.2.2.2")), ("127.0.0.1", port))
            rc, out, err = p.finish()
    finally:
        p.kill()
    assert rc == 0
    assert [line.split(" odid=")[1] for line in out] == [
        "1 tid=300 sourceIPv4Address=1.1.1.1\n",
        "1 tid=300 sourceIPv4Address=2.2.2.2\n",
    ]
    assert "summary" in err[-1] and "records=2" in err[-1]

    bad = subprocess.run(
        [sys.executable, "-m", "collectors.cli", "collect", "--listen", "localhost"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=10,
        check=False,
    )
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.splitlines() == ["xdpflow collect: error: bad --listen 'localhost': expected HOST:PORT"]


def test_cli_loses_no_output_when_a_signal_interrupts_a_write_to_a_full_pipe() -> None:
    """Under python -u a write a signal interrupts returns short; every record line must still arrive whole."""
    from exporter.ipfix import Encoder
    from tools.synthetic import random_records

    proc = subprocess.Popen([sys.executable, "-u", "-m", "collectors.cli", "collect", "--listen", "127.0.0.1:0",
                             "--json", "--log-format", "json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    try:
        assert proc.stderr is not None and proc.stdout is not None
        host, port = parse_listen(json.loads(proc.stderr.readline())["address"])
        msgs = Encoder(mtu=9000).encode(random_records(3000, seed=3), 1_700_000_000.0)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            # Nobody reads stdout yet: the pipe fills and the collector blocks in a write.
            for m in msgs:
                s.sendto(m, (host, port))
                time.sleep(0.002)
        time.sleep(0.5)
        for _ in range(20):  # signals that interrupt the blocked write (SIGWINCH: no effect but EINTR)
            proc.send_signal(signal.SIGWINCH)
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = out.decode().splitlines()
    records = [json.loads(line) for line in lines]  # a truncated line would not parse
    summary = json.loads(err.decode().splitlines()[-1])
    assert summary["event"] == "summary"
    assert len(records) == summary["records"] > 1000
