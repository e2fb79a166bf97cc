"""`make demo`: the exporter on a real XDP attach, generated traffic, flows at a collector.

Builds a generator and an observer namespace joined by a veth pair, starts the
built-in collector and `xdpflow run` in the observer namespace (XDP on its veth
end, exporting to the collector on the namespace's loopback), sends a traffic
mix with trafgen from the generator namespace, lets the flows expire, stops the
exporter with SIGTERM (final flush) and prints what the collector received.
Everything is removed at the end, also on Ctrl-C or failure.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from tools import trafgen
from tools.netns import VethPair, in_netns
from tools.packets import standard_mix

PORT = 4739


def xdpflow(*args: str) -> list[str]:
    return [sys.executable, "-m", "exporter.cli", *args]


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def main() -> int:
    if os.geteuid() != 0:
        print("demo: needs root (network namespaces and XDP)", file=sys.stderr)
        return 1
    procs: list[subprocess.Popen[str]] = []
    pair = VethPair()
    try:
        pair.create()
        say(f"namespaces {pair.gen} (traffic) and {pair.obs} (observer), veth {pair.gen_if} <-> {pair.obs_if}")
        collector = subprocess.Popen(in_netns(pair.obs, xdpflow("collect", "--listen", f"127.0.0.1:{PORT}",
                                                                 "--json")),
                                     stdout=subprocess.PIPE, text=True)
        procs.append(collector)
        exporter = subprocess.Popen(in_netns(pair.obs, xdpflow(
            "run", "--interface", pair.obs_if, "--mode", "native", "--collector", f"127.0.0.1:{PORT}",
            "--scan-interval", "1", "--idle-timeout", "2", "--active-timeout", "30", "--max-entries", "65536",
            "--log-format", "console")), text=True)
        procs.append(exporter)
        time.sleep(2.5)
        if exporter.poll() is not None:
            print("demo: the exporter did not start (see its error above)", file=sys.stderr)
            return 1
        mix = standard_mix()
        say(f"sending {sum(f.count for f in mix)} packets in {len(mix)} flows with trafgen")
        for fl in mix:
            print(f"   {fl.name:<10} {fl.src:>12} -> {fl.dst:<12} proto {fl.proto:<3} x{fl.count}")
        trafgen.send_flows(pair.gen, pair.gen_if, mix)
        say("waiting for the idle timeout to end the flows, then SIGTERM (final flush)")
        time.sleep(4)
        exporter.send_signal(signal.SIGTERM)
        exporter.wait(timeout=30)
        time.sleep(0.5)
        collector.send_signal(signal.SIGTERM)
        out, _ = collector.communicate(timeout=30)
        records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        data = [r for r in records if "packetDeltaCount" in r]
        say(f"the collector received {len(data)} flow records")
        print(f"   {'source':<24} {'destination':<24} {'proto':>5} {'vlan':>4} {'packets':>8} {'octets':>8} end")
        for r in data:
            fam = "IPv4" if "sourceIPv4Address" in r else "IPv6"
            src = f"{r[f'source{fam}Address']}:{r.get('sourceTransportPort', 0)}"
            dst = f"{r[f'destination{fam}Address']}:{r.get('destinationTransportPort', 0)}"
            print(f"   {src:<24} {dst:<24} {r.get('protocolIdentifier', 0):>5} {r.get('vlanId', 0):>4} "
                  f"{r['packetDeltaCount']:>8} {r['octetDeltaCount']:>8} {r.get('flowEndReason', '')}")
        sent = sum(f.count for f in mix)
        got = sum(r["packetDeltaCount"] for r in data)
        say(f"packets sent {sent}, packets in exported records {got}: {'exact' if got == sent else 'MISMATCH'}")
        return 0 if got == sent else 1
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        pair.destroy()


if __name__ == "__main__":
    sys.exit(main())
