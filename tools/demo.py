"""`make demo`: the exporter on a real XDP attach, generated traffic, flows at a collector.

Builds a generator and an observer namespace joined by a veth pair, starts the
built-in collector and `xdpflow run` in the observer namespace (XDP on its veth
end, exporting to the collector on the namespace's loopback), waits until the
exporter says it is metering (its --ready-file appears: every interface
attached, the collector socket open), sends a traffic mix with trafgen from the
generator namespace, waits until the collector holds every packet sent (the
idle timeout ends the flows) or a deadline passes, stops the exporter with
SIGTERM (final flush) and prints what the collector received. Exit status 0
only when the packets in the exported records equal the packets sent.
Everything is removed at the end, also on Ctrl-C or failure.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from tools import trafgen
from tools.netns import VethPair, in_netns
from tools.packets import standard_mix
from tools.ready import NotReady, wait_ready

PORT = 4739
SCAN_S, IDLE_S = 1.0, 2.0
READY_TIMEOUT_S = 300.0   # a first run compiles the program; a slow machine may take a while


def xdpflow(*args: str) -> list[str]:
    return [sys.executable, "-m", "exporter.cli", *args]


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


class Lines:
    """A child's output read as it comes: every line kept (with its time since `t0`), optionally echoed."""

    def __init__(self, stream: IO[str], t0: float, echo: bool) -> None:
        self.t0 = t0
        self.lines: deque[tuple[float, str]] = deque(maxlen=10_000)
        self._echo = echo
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.append((time.monotonic() - self.t0, line.rstrip("\n")))
            if self._echo:
                print(line, end="", flush=True)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def text(self) -> list[str]:
        return [line for _, line in list(self.lines)]


def wait_until(cond: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def flow_records(collector: Lines) -> list[dict[str, Any]]:
    records = [json.loads(line) for line in collector.text() if line.startswith("{")]
    return [r for r in records if "packetDeltaCount" in r and not r.get("_options")]


def main() -> int:
    if os.geteuid() != 0:
        print("demo: needs root (network namespaces and XDP)", file=sys.stderr)
        return 1
    procs: list[subprocess.Popen[str]] = []
    pair = VethPair()
    tmp = tempfile.TemporaryDirectory(prefix="xdpflow-demo-")
    try:
        pair.create()
        say(f"namespaces {pair.gen} (traffic) and {pair.obs} (observer), veth {pair.gen_if} <-> {pair.obs_if}")
        t0 = time.monotonic()
        collector = subprocess.Popen(in_netns(pair.obs, xdpflow("collect", "--listen", f"127.0.0.1:{PORT}",
                                                                 "--json")),
                                     stdout=subprocess.PIPE, text=True)
        procs.append(collector)
        assert collector.stdout is not None
        received = Lines(collector.stdout, t0, echo=False)
        ready = Path(tmp.name) / "ready"
        say("starting the exporter: compile and load the XDP program, attach it, open the collector socket")
        exporter = subprocess.Popen(in_netns(pair.obs, xdpflow(
            "run", "--interface", pair.obs_if, "--mode", "native", "--collector", f"127.0.0.1:{PORT}",
            "--scan-interval", str(SCAN_S), "--idle-timeout", str(IDLE_S), "--active-timeout", "30",
            "--max-entries", "65536", "--log-format", "console", "--ready-file", str(ready))),
            stderr=subprocess.PIPE, text=True)
        procs.append(exporter)
        assert exporter.stderr is not None
        log = Lines(exporter.stderr, t0, echo=True)
        try:
            info = wait_ready(ready, lambda: exporter.poll() is None, READY_TIMEOUT_S)
        except NotReady as e:
            print(f"demo: the exporter {str(e).partition(';')[0]}. Where the time went (seconds since it "
                  "started, its last log lines):", file=sys.stderr)
            for t, line in list(log.lines)[-15:]:
                print(f"  {t:7.2f}  {line}", file=sys.stderr)
            return 1
        steps = info.get("startup_seconds", {})
        ifaces = ", ".join(f"{k} ({v} XDP)" for k, v in info["interfaces"].items())
        say(f"the exporter is metering {ifaces} after {time.monotonic() - t0:.1f} s "
            f"(compile and load {steps.get('compile_and_load', 0):.1f} s, attach {steps.get('attach', 0):.2f} s)")
        mix = standard_mix()
        sent = sum(f.count for f in mix)
        say(f"sending {sent} packets in {len(mix)} flows with trafgen")
        for fl in mix:
            print(f"   {fl.name:<10} {fl.src:>12} -> {fl.dst:<12} proto {fl.proto:<3} x{fl.count}")
        trafgen.send_flows(pair.gen, pair.gen_if, mix)
        say(f"waiting for the flows to end ({IDLE_S:g} s idle timeout, {SCAN_S:g} s scans) and reach the collector")
        done = wait_until(lambda: sum(r["packetDeltaCount"] for r in flow_records(received)) >= sent,
                          timeout=IDLE_S + 5 * SCAN_S + 10)
        say("stopping the exporter with SIGTERM (final drain and flush)" if done else
            "not every packet has arrived yet; stopping the exporter with SIGTERM (final drain and flush)")
        exporter.send_signal(signal.SIGTERM)
        exporter.wait(timeout=60)
        log.join(5)
        collector.send_signal(signal.SIGTERM)  # it reads what is still in its socket before it exits
        collector.wait(timeout=30)
        received.join(5)
        data = flow_records(received)
        say(f"the collector received {len(data)} flow records")
        print(f"   {'source':<24} {'destination':<24} {'proto':>5} {'vlan':>4} {'packets':>8} {'octets':>8} end")
        for r in data:
            fam = "IPv4" if "sourceIPv4Address" in r else "IPv6"
            src = f"{r[f'source{fam}Address']}:{r.get('sourceTransportPort', 0)}"
            dst = f"{r[f'destination{fam}Address']}:{r.get('destinationTransportPort', 0)}"
            print(f"   {src:<24} {dst:<24} {r.get('protocolIdentifier', 0):>5} {r.get('vlanId', 0):>4} "
                  f"{r['packetDeltaCount']:>8} {r['octetDeltaCount']:>8} {r.get('flowEndReason', '')}")
        got = sum(r["packetDeltaCount"] for r in data)
        say(f"packets sent {sent}, packets in exported records {got}: {'exact' if got == sent else 'MISMATCH'}")
        return 0 if got == sent else 1
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        pair.destroy()
        tmp.cleanup()


if __name__ == "__main__":
    sys.exit(main())
