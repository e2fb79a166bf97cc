"""Soak: churning flows and collector restarts for minutes; exact conservation at the end, RSS flat.

`python -m tools.soak --minutes 10` (what `make soak` runs) builds a veth pair in two throw-away
namespaces, starts two collectors on the observer's loopback (a TCP one that is restarted every
`--restart-every` seconds, a UDP one that stays up) and `xdpflow run` exporting to both. Every
second trafgen sends a fresh set of flows: new 5-tuples (the source address names the second,
the source ports step through `--flows-per-second` values), each flow `--packets` packets, so
the exporter keeps creating, idling out and exporting flows for the whole run. The exporter's
resident memory (VmRSS) is sampled after every scan.

At the end the exporter gets SIGTERM (final drain, shutdown flush) and, for each collector:

    packets at the collector + ignored + not sent == observed == sent by trafgen

exactly, packets and octets alike. A TCP collector restart here is a crash between two scans
(SIGKILL by default: nothing is in flight, so nothing may be lost; the exporter queues what it
produces while the collector is away and delivers it on reconnect). RSS: the samples after a
warm-up are split in thirds; the last third's mean must stay under the first third's mean x 1.1.
The least-squares slope is reported in MiB per minute.

`python -m tools.soak collect --listen tcp://127.0.0.1:4739` is the collector the soak (and the
fault tests) restart: IPFIX over UDP or TCP (messages split by the header's length field, one
transport session per connection), decoded with collectors.decoder, aggregated rather than
printed. It prints `{"event": "listening"}` once bound and, on SIGTERM/SIGINT, reads what is
still readable, then prints one `{"event": "summary"}` line with the totals and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from exporter.address import AddressError, parse_address
from tools.jsonlog import json_object
from tools.ready import NotReady, wait_ready

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAYLOAD = 18
OCTETS = 20 + 8 + PAYLOAD  # IPv4 + UDP + payload: what octetDeltaCount counts per packet
QUIET_CLOSE = 0.3  # a stopping TCP collector reads until a connection has been silent this long
RCVBUF = 16 << 20
SO_RCVBUFFORCE = 33  # Linux; needs CAP_NET_ADMIN, which the collector has as root
REPORT_EVERY = 0.05  # the collector prints its running totals this often while they change
OPTION_FIELDS = ("packetTotalCount", "octetTotalCount", "ignoredPacketTotalCount", "ignoredOctetTotalCount",
                 "notSentFlowTotalCount", "notSentPacketTotalCount", "notSentOctetTotalCount",
                 "exportedFlowRecordTotalCount")


# -- the collector ---------------------------------------------------------------------------------

@dataclass
class Totals:
    """What a collector decoded: data records summed, the last options values, decoder trouble."""

    packets: int = 0
    octets: int = 0
    records: int = 0
    messages: int = 0
    connections: int = 0
    gaps: int = 0
    malformed: int = 0
    unknown_template_sets: int = 0
    first_record_time: float | None = None  # wall clock of the first data record decoded
    options: dict[str, int] = field(default_factory=dict)  # largest value seen per OPTION_FIELDS name

    def add(self, other: Totals) -> None:
        for name in ("packets", "octets", "records", "messages", "connections", "gaps", "malformed",
                     "unknown_template_sets"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        if other.first_record_time is not None and (self.first_record_time is None
                                                    or other.first_record_time < self.first_record_time):
            self.first_record_time = other.first_record_time
        for k, v in other.options.items():
            self.options[k] = max(self.options.get(k, 0), v)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Totals:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


class Sink:
    """An aggregating IPFIX collector over UDP or TCP (see the module doc)."""

    def __init__(self, scheme: str, host: str, port: int) -> None:
        from collectors.decoder import Decoder

        self.scheme, self.host, self.port = scheme, host, port
        self.decoder = Decoder()
        self.totals = Totals()
        self._server: asyncio.AbstractServer | None = None
        self._udp: asyncio.DatagramTransport | None = None
        self._conns: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        self._report: asyncio.TimerHandle | None = None

    def _changed(self) -> None:
        """Print the totals soon (at most every REPORT_EVERY s): a collector killed later loses nothing it printed."""
        if self._report is None:
            self._report = asyncio.get_running_loop().call_later(REPORT_EVERY, self.report)

    def report(self, event: str = "totals") -> None:
        self._report = None
        print(json.dumps({"event": event, **asdict(self.totals)}), flush=True)

    def feed(self, message: bytes, exporter: str) -> None:
        res = self.decoder.feed(message, exporter)
        t = self.totals
        t.messages += res.messages
        t.gaps += len(res.gaps)
        t.malformed += len(res.malformed)
        t.unknown_template_sets += len(res.unknown_sets)
        for rec in res.records:
            f = rec.fields
            if rec.is_options:
                for name in OPTION_FIELDS:
                    v = f.get(name)
                    if isinstance(v, int):
                        t.options[name] = max(t.options.get(name, 0), v)
                continue
            packets, octets = f.get("packetDeltaCount"), f.get("octetDeltaCount")
            if isinstance(packets, int) and isinstance(octets, int):
                t.packets += packets
                t.octets += octets
                t.records += 1
                if t.first_record_time is None:
                    t.first_record_time = time.time()
        self._changed()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self.scheme == "udp":
            sink = self

            class Proto(asyncio.DatagramProtocol):
                def datagram_received(self, data: bytes, addr: Any) -> None:
                    sink.feed(data, f"{addr[0]}:{addr[1]}")

            transport, _ = await loop.create_datagram_endpoint(Proto, local_addr=(self.host, self.port))
            self._udp = transport
            sock = transport.get_extra_info("socket")
            if sock is not None:  # a shutdown flush is a burst of datagrams: room for all of them
                try:
                    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
                except OSError:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        else:
            self._server = await asyncio.start_server(self._serve, self.host, self.port, reuse_address=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        peer = writer.get_extra_info("peername")
        exporter = f"{peer[0]}:{peer[1]}"
        self.totals.connections += 1
        buf = b""
        loop = asyncio.get_running_loop()
        last = loop.time()
        try:
            while True:
                try:  # a cancelled read loses nothing: the data stays in the reader's buffer
                    chunk = await asyncio.wait_for(reader.read(1 << 16), 0.1)
                except TimeoutError:
                    if self._stopping.is_set() and loop.time() - last >= QUIET_CLOSE:
                        break  # stopping, and the exporter has been silent a while: nothing is in flight
                    continue
                if not chunk:
                    break
                last = loop.time()
                buf += chunk
                while len(buf) >= 4:
                    length = struct.unpack_from("!H", buf, 2)[0]
                    if length < 16:
                        self.totals.malformed += 1
                        return
                    if len(buf) < length:
                        break
                    self.feed(buf[:length], exporter)
                    buf = buf[length:]
        except ConnectionError:
            pass
        finally:
            writer.close()
            self._conns.discard(task)

    async def stop(self) -> None:
        """Stop listening, read what is still readable, close."""
        self._stopping.set()
        if self._server is not None:
            self._server.close()
        if self._udp is not None:
            await asyncio.sleep(QUIET_CLOSE)  # datagrams already queued on the socket are read meanwhile
            self._udp.close()
        conns = list(self._conns)
        if conns:
            await asyncio.wait(conns, timeout=10)


def parse_listen(text: str) -> tuple[str, str, int]:
    try:
        listen = parse_address(text, schemes=("udp", "tcp"), min_port=0)   # 0: the kernel picks
    except AddressError:
        raise SystemExit(f"soak collect: --listen must be udp://HOST:PORT or tcp://HOST:PORT, got {text!r}") from None
    return listen.scheme, listen.host, listen.port


async def _collect(listen: str) -> int:
    scheme, host, port = parse_listen(listen)
    sink = Sink(scheme, host, port)
    await sink.start()
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    print(json.dumps({"event": "listening", "listen": listen}), flush=True)
    await done.wait()
    await sink.stop()
    sink.report("summary")
    return 0


# -- processes in the namespaces ---------------------------------------------------------------------

def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED="1")


class CollectorProc:
    """`python -m tools.soak collect` in a namespace; its running totals are read as it prints them."""

    def __init__(self, netns: str, listen: str) -> None:
        from tools.netns import in_netns

        self.listen = listen
        self.popen = subprocess.Popen(in_netns(netns, [sys.executable, "-m", "tools.soak", "collect", "--listen",
                                                       listen]),
                                      cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.popen.stdout is not None
        line = self.popen.stdout.readline()
        if '"listening"' not in line:
            self.popen.kill()
            err = self.popen.communicate(timeout=10)[1]
            raise RuntimeError(f"collector on {listen} did not start: {line!r} {err[-500:]!r}")
        self.started = time.time()
        self.totals = Totals()
        self.summary: Totals | None = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            rec = json_object(line)
            if rec is None:
                continue
            if rec.get("event") in ("totals", "summary"):
                self.totals = Totals.from_json(rec)
                if rec["event"] == "summary":
                    self.summary = self.totals

    def stop(self, sig: int = signal.SIGTERM) -> Totals:
        """SIGTERM: it reads what is pending and reports. SIGKILL (a crash): the last totals it printed."""
        self.popen.send_signal(sig)
        self.popen.wait(timeout=30)
        self._reader.join(timeout=10)
        if sig != signal.SIGKILL and self.summary is None:
            err = self.popen.stderr.read() if self.popen.stderr is not None else ""
            raise RuntimeError(f"collector on {self.listen} gave no summary (rc {self.popen.returncode}): "
                               f"{err[-500:]}")
        return self.totals

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(timeout=10)


class Exporter:
    """`xdpflow run` in a namespace with its JSON log lines parsed as they come (a reader thread)."""

    def __init__(self, netns: str, args: Sequence[str]) -> None:
        from tools.netns import in_netns

        self._ready_dir = tempfile.TemporaryDirectory(prefix="xdpflow-soak-")
        self.ready_file = Path(self._ready_dir.name) / "ready"
        cmd = [sys.executable, "-m", "exporter.cli", "run", *args, "--log-format", "json", "--log-level", "debug",
               "--ready-file", str(self.ready_file)]
        self.popen = subprocess.Popen(in_netns(netns, cmd), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True)
        self.logs: list[dict[str, Any]] = []
        self.bad_lines: list[str] = []
        self.rss: list[tuple[float, float]] = []  # (monotonic seconds, VmRSS MiB) after each scan
        self._events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stderr is not None
        for line in self.popen.stderr:
            rec = json_object(line)
            if rec is None:
                self.bad_lines.append(line.rstrip())
                continue
            if rec.get("event") == "scan":
                rss = vm_rss_mib(self.popen.pid)
                if rss is not None:
                    self.rss.append((time.monotonic(), rss))
            self.logs.append(rec)
            self._events.put(rec)
        self._events.put(None)

    def events(self, name: str) -> list[dict[str, Any]]:
        return [r for r in list(self.logs) if r.get("event") == name]

    def wait_for(self, name: str, timeout: float = 30.0, after: int = 0) -> dict[str, Any]:
        """The first `name` event beyond the first `after` ones; raise if the process ends or time runs out."""
        deadline = time.monotonic() + timeout
        while True:
            seen = self.events(name)
            if len(seen) > after:
                return seen[after]
            if self.popen.poll() is not None and self._events.empty() and not self._reader.is_alive():
                raise RuntimeError(f"exporter exited ({self.popen.returncode}) before {name!r}: {self.logs[-5:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {name!r}; last logs: {self.logs[-5:]}")
            try:
                self._events.get(timeout=0.1)
            except queue.Empty:
                pass

    def wait_ready(self, timeout: float = 60.0) -> dict[str, Any]:
        """Its ready file's contents, once every interface is attached; RuntimeError if it never is."""
        try:
            return wait_ready(self.ready_file, lambda: self.popen.poll() is None, timeout,
                              tail=lambda: [json.dumps(r) for r in self.logs])
        except NotReady as e:
            raise RuntimeError(f"exporter {e}") from None

    def stop(self, timeout: float = 120.0) -> int:
        self.popen.send_signal(signal.SIGTERM)
        rc = self.popen.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return rc

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(timeout=10)


def vm_rss_mib(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def churn_profile(second: int, flows: int, dport: int = 4000, payload: int = PAYLOAD) -> str:
    """`flows` UDP flows no earlier second used: the source address names the second."""
    src = f"198.18.{(second >> 8) & 0xFF}.{second & 0xFF}"
    return ("{ eth(da=02:00:00:00:00:02, sa=02:00:00:00:00:01), "
            f"ipv4(saddr={src}, daddr=198.19.0.1), udp(sp=dinc(1024, {1024 + flows - 1}), dp={dport}), "
            f"fill(0, {payload}) }}\n")


def trafgen(netns: str, dev: str, conf: str, num: int, rate: int) -> None:
    """Send exactly `num` frames of profile text `conf`; raise if trafgen fails."""
    from tools.netns import in_netns

    with tempfile.NamedTemporaryFile("w", suffix=".cfg", delete=False) as f:
        f.write(conf)
    try:
        res = subprocess.run(in_netns(netns, ["trafgen", "--dev", dev, "--conf", f.name, "--cpus", "1", "--num",
                                              str(num), "--rate", f"{rate}pps", "--no-sock-mem", "--no-cpu-stats",
                                              "--notouch-irq"]),
                             capture_output=True, text=True, timeout=120, check=False,
                             cwd=tempfile.gettempdir())  # trafgen makes a scratch file in its working directory
    finally:
        os.unlink(f.name)
    if res.returncode != 0:
        raise RuntimeError(f"trafgen failed ({res.returncode}): {res.stderr.strip()[-300:]}")


class Churn:
    """Background traffic: every `period` seconds `flows` new 5-tuples, `packets` packets each, counted exactly.

    `stop()` lets the trafgen run in progress finish and returns the number of frames sent; every
    frame is IPv4/UDP with an 18-byte payload (OCTETS per packet as metered).
    """

    def __init__(self, netns: str, dev: str, flows: int = 200, packets: int = 2, period: float = 0.5,
                 rate: int = 50_000, first_second: int = 1) -> None:
        self.netns, self.dev, self.flows, self.packets = netns, dev, flows, packets
        self.period, self.rate = period, rate
        self.second = first_second
        self.sent = 0
        self.rounds = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Churn:
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                tick = time.monotonic()
                n = self.flows * self.packets
                trafgen(self.netns, self.dev, churn_profile(self.second, self.flows), n, self.rate)
                self.sent += n
                self.second += 1
                self.rounds += 1
                self._stop.wait(max(0.0, self.period - (time.monotonic() - tick)))
        except BaseException as e:  # reported by stop()
            self.error = e

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(timeout=150)
        if self.error is not None:
            raise RuntimeError(f"traffic failed: {self.error}") from self.error
        return self.sent


# -- the soak ----------------------------------------------------------------------------------------

@dataclass
class SoakResult:
    seconds: float
    sent_packets: int
    sent_octets: int
    observed_packets: int
    observed_octets: int
    ignored_packets: int
    ignored_octets: int
    collectors: dict[str, dict[str, int]]  # per collector URL: packets, octets, not_sent_packets, not_sent_octets
    restarts: int
    scans: int
    rx_dropped: int
    rss_first_mib: float
    rss_last_mib: float
    rss_first_third_mib: float
    rss_last_third_mib: float
    rss_slope_mib_per_min: float
    rss_samples: int
    state_changes: dict[str, int]
    bad_log_lines: int
    exit_code: int
    problems: list[str] = field(default_factory=list)
    rss: list[tuple[float, float]] = field(default_factory=list)  # (seconds since traffic started, MiB)

    @property
    def ok(self) -> bool:
        return not self.problems


STATE_EVENTS = ("collector unreachable", "collector reachable again", "collector disconnected",
                "collector connected", "send queue full, dropping oldest messages", "closed with messages unsent")


def slope(points: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of y over x (per unit of x); 0 with fewer than two points."""
    n = len(points)
    if n < 2:
        return 0.0
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def run_soak(seconds: float, flows_per_second: int = 1000, packets: int = 2, restart_every: float = 120.0,
             down_for: float = 2.0, scan_interval: float = 1.0, warmup: float = 30.0, rate: int = 50_000,
             restart_signal: int = signal.SIGKILL, log: Any = None) -> SoakResult:
    from tools.netns import VethPair

    say = log if log is not None else (lambda msg: print(msg, file=sys.stderr, flush=True))
    tcp_url, udp_url = "tcp://127.0.0.1:4739", "udp://127.0.0.1:4740"
    tcp_totals, udp_totals = Totals(), Totals()
    collectors: list[CollectorProc] = []
    exporter: Exporter | None = None
    churn: Churn | None = None
    with VethPair() as pair:
        try:
            tcp = CollectorProc(pair.obs, tcp_url)
            udp = CollectorProc(pair.obs, udp_url)
            collectors += [tcp, udp]
            idle = max(3.0, 3 * scan_interval)
            exporter = Exporter(pair.obs, ["--interface", pair.obs_if, "--collector", tcp_url, "--collector",
                                           udp_url, "--scan-interval", str(scan_interval), "--idle-timeout",
                                           str(idle), "--active-timeout", str(4 * idle), "--max-entries",
                                           str(max(16384, 4 * flows_per_second))])
            exporter.wait_ready(timeout=60)
            t0 = time.monotonic()
            churn = Churn(pair.gen, pair.gen_if, flows_per_second, packets, 1.0, rate).start()
            restarts = 0
            next_restart = t0 + restart_every
            while time.monotonic() - t0 < seconds:
                if churn.error is not None:
                    break
                if time.monotonic() >= next_restart:
                    # Restart a collector the exporter is connected to (reconnects back off at random): a
                    # restart while it is still reconnecting would be no state change to log.
                    exporter.wait_for("collector connected", timeout=60, after=restarts)
                    # Between two scans: just after one, so the collector has read everything sent so far.
                    exporter.wait_for("scan", timeout=10 * scan_interval, after=len(exporter.events("scan")))
                    time.sleep(min(0.25, scan_interval / 4))
                    tcp_totals.add(tcp.stop(restart_signal))
                    collectors.remove(tcp)
                    time.sleep(down_for)
                    tcp = CollectorProc(pair.obs, tcp_url)
                    collectors.append(tcp)
                    restarts += 1
                    say(f"soak: {time.monotonic() - t0:.0f} s, {churn.sent} packets sent, collector restart "
                        f"{restarts}, rss {exporter.rss[-1][1] if exporter.rss else 0:.1f} MiB")
                    next_restart += restart_every
                time.sleep(0.2)
            sent = churn.stop()
            churn = None
            exporter.wait_for("collector connected", timeout=60, after=restarts)  # back after the last restart
            # Let the last flows reach a scan, then stop: the shutdown flush exports the rest.
            exporter.wait_for("scan", timeout=10 * scan_interval, after=len(exporter.events("scan")) + 1)
            rc = exporter.stop()
            tcp_totals.add(tcp.stop())
            udp_totals.add(udp.stop())
            collectors.clear()
            elapsed = time.monotonic() - t0
            rx_dropped = pair.rx_dropped()
        finally:
            if churn is not None:
                churn._stop.set()
            if exporter is not None:
                exporter.kill()
            for c in collectors:
                c.kill()
    return _verdict(exporter, rc, elapsed, sent, {tcp_url: tcp_totals, udp_url: udp_totals}, restarts, rx_dropped,
                    warmup, t0, tcp_url)


def _verdict(exporter: Exporter, rc: int, elapsed: float, sent: int, totals: dict[str, Totals], restarts: int,
             rx_dropped: int, warmup: float, t0: float, restarted: str) -> SoakResult:
    problems: list[str] = []
    stopped = exporter.events("stopped")
    if rc != 0 or not stopped:
        problems.append(f"exporter exit code {rc}, stopped logged: {bool(stopped)}")
    st = stopped[0] if stopped else {}
    observed, observed_oct = int(st.get("observed_packets", -1)), int(st.get("observed_octets", -1))
    ignored, ignored_oct = int(st.get("ignored_packets", 0)), int(st.get("ignored_octets", 0))
    sent_stats: dict[str, Any] = st.get("sent", {})
    per: dict[str, dict[str, int]] = {}
    for url, t in totals.items():
        s = sent_stats.get(url, {})
        not_sent, not_sent_oct = int(s.get("not_sent_packets", 0)), int(s.get("not_sent_octets", 0))
        per[url] = {"packets": t.packets, "octets": t.octets, "records": t.records, "not_sent_packets": not_sent,
                    "not_sent_octets": not_sent_oct, "connections": t.connections, "gaps": t.gaps,
                    "malformed": t.malformed, "unknown_template_sets": t.unknown_template_sets}
        if t.packets + ignored + not_sent != observed:
            problems.append(f"{url}: packets {t.packets} + ignored {ignored} + not sent {not_sent} != observed "
                            f"{observed}")
        if not_sent_oct and t.octets + ignored_oct + not_sent_oct != observed_oct:
            problems.append(f"{url}: octets {t.octets} + ignored {ignored_oct} + not sent {not_sent_oct} != "
                            f"observed {observed_oct}")
        elif not not_sent_oct and t.octets + ignored_oct != observed_oct:
            problems.append(f"{url}: octets {t.octets} + ignored {ignored_oct} != observed {observed_oct}")
        if t.malformed or t.unknown_template_sets:
            problems.append(f"{url}: {t.malformed} malformed, {t.unknown_template_sets} data sets without template")
    if observed != sent or observed_oct != sent * OCTETS:
        problems.append(f"observed {observed} packets / {observed_oct} octets, trafgen sent {sent} / {sent * OCTETS}")
    if rx_dropped:
        problems.append(f"{rx_dropped} packets dropped before XDP: lower the rate")
    samples = [(t - t0, rss) for t, rss in exporter.rss if t - t0 >= warmup] or [(t - t0, r) for t, r in exporter.rss]
    third = max(1, len(samples) // 3)
    first, last = _mean([r for _, r in samples[:third]]), _mean([r for _, r in samples[-third:]])
    if samples and last >= first * 1.1:
        problems.append(f"RSS grew: last third {last:.1f} MiB vs first third {first:.1f} MiB")
    changes = {f"{url} {e}": n for url in totals for e in STATE_EVENTS
               if (n := len([r for r in exporter.events(e) if r.get("collector") == url]))}
    # One line per change of state: each restart is one disconnect, at most one failed reconnect, one connect.
    want = {"collector disconnected": restarts, "collector connected": restarts + 1}
    for e, n in want.items():
        if changes.get(f"{restarted} {e}", 0) != n:
            problems.append(f"{restarted}: {changes.get(f'{restarted} {e}', 0)} '{e}' lines for {restarts} restarts")
    if changes.get(f"{restarted} collector unreachable", 0) > restarts:
        problems.append(f"{restarted}: more 'collector unreachable' lines than restarts: {changes}")
    for url in totals:
        if url != restarted and any(k.startswith(url) for k in changes):
            problems.append(f"{url} was never down but logged state changes: {changes}")
    if exporter.bad_lines:
        problems.append(f"{len(exporter.bad_lines)} log lines are not one JSON object: {exporter.bad_lines[:2]}")
    return SoakResult(
        seconds=round(elapsed, 1), sent_packets=sent, sent_octets=sent * OCTETS, observed_packets=observed,
        observed_octets=observed_oct, ignored_packets=ignored, ignored_octets=ignored_oct, collectors=per,
        restarts=restarts, scans=len(exporter.events("scan")), rx_dropped=rx_dropped,
        rss_first_mib=round(exporter.rss[0][1], 2) if exporter.rss else 0.0,
        rss_last_mib=round(exporter.rss[-1][1], 2) if exporter.rss else 0.0,
        rss_first_third_mib=round(first, 2), rss_last_third_mib=round(last, 2),
        rss_slope_mib_per_min=round(slope(samples) * 60, 4), rss_samples=len(samples), state_changes=changes,
        bad_log_lines=len(exporter.bad_lines), exit_code=rc, problems=problems,
        rss=[(round(t - t0, 2), r) for t, r in exporter.rss])


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["collect"]:
        pc = argparse.ArgumentParser(prog="python -m tools.soak collect")
        pc.add_argument("--listen", required=True, help="udp://HOST:PORT or tcp://HOST:PORT")
        ca = pc.parse_args(args[1:])
        return asyncio.run(_collect(ca.listen))
    p = argparse.ArgumentParser(prog="python -m tools.soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--flows-per-second", type=int, default=1000, help="new 5-tuples every second")
    p.add_argument("--packets", type=int, default=2, help="packets per flow")
    p.add_argument("--restart-every", type=float, default=120.0, help="seconds between TCP collector restarts")
    p.add_argument("--down-for", type=float, default=2.0, help="seconds the collector stays down")
    p.add_argument("--scan-interval", type=float, default=1.0)
    p.add_argument("--warmup", type=float, default=30.0, help="RSS samples before this are not compared")
    p.add_argument("--restart-signal", choices=("kill", "term"), default="kill",
                   help="kill: the collector crashes; term: it reads what is pending, then exits")
    p.add_argument("--json", action="store_true", help="the result as one JSON object on stdout")
    p.add_argument("--rss-out", metavar="PATH", help="write every RSS sample (seconds, MiB) there, one per line")
    a = p.parse_args(args)
    res = run_soak(a.minutes * 60, flows_per_second=a.flows_per_second, packets=a.packets,
                   restart_every=a.restart_every, down_for=a.down_for, scan_interval=a.scan_interval,
                   warmup=a.warmup, restart_signal=signal.SIGKILL if a.restart_signal == "kill" else signal.SIGTERM)
    if a.rss_out:
        with open(a.rss_out, "w", encoding="ascii") as f:
            f.writelines(f"{t:.2f} {mib:.3f}\n" for t, mib in res.rss)
    out = asdict(res)
    del out["rss"]
    if a.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:>24}: {v}")
        print("soak: " + ("PASS" if res.ok else "FAIL: " + "; ".join(res.problems)))
    return 0 if res.ok else 1


if __name__ == "__main__":
    sys.exit(main())
