"""Packet rate beyond the program (issue 7, item 2): trafgen at its maximum rate into xdpflow.

trafgen sends as fast as it can (no --rate) a few hundred flows through a veth pair into an
observer namespace where `xdpflow run` meters them, natively and in generic mode, and once more
natively with RPS steering the stack's work to another CPU, whose backlog then overflows now and
then: the kernel drops frames after xdpflow metered them. The accounting must be exact whatever
the rate reached:

- trafgen's frames all leave the generator's veth (its tx_packets): a frame veth refuses (peer
  ring or backlog full) is counted in its tx_dropped and sent again from trafgen's TX ring;
- every frame the observer's veth received reached xdpflow's program (its frames counter, the
  driver's xdp_packets in native mode), and xdpflow metered every one of them: no parse failure,
  no insert failure, nothing ignored, no XDP_DROP (the driver's xdp_drops stays 0);
- the kernel's own counters xdpflow reports (metrics, scan log) equal the interface's counters read
  independently (sysfs, in the namespace); frames the stack dropped after XDP are in rx_dropped,
  and a warning says the kernel, not xdpflow, dropped them.

No rate is asserted; `pytest -s` prints what was reached as FIGURE lines.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from typing import Any

import pytest

from tests.kernel.prometheus import Samples, poll, scrape, value
from tools.bench import trafgen_profile
from tools.netns import VethPair, in_netns

FLOWS = 300
SENT = 1_000_000          # 2-5 s at what one trafgen CPU reaches through veth here
PAYLOAD = 18
PORT = 9477
COLLECTOR = "127.0.0.1:4739"
NETDEV = ("rx_packets", "rx_dropped", "rx_missed_errors", "rx_fifo_errors", "rx_over_errors", "rx_errors",
          "tx_packets", "tx_dropped", "tx_errors")
DROP_WARNING = "kernel dropped packets on an attached interface: the kernel or driver dropped them, not xdpflow"


def figure(name: str, **values: Any) -> None:
    print(f"FIGURE {name}: " + json.dumps(values))


def sysfs_stats(netns: str, ifname: str) -> dict[str, int]:
    """The interface's counters from sysfs (`ip netns exec` mounts the namespace's own /sys)."""
    out = subprocess.run(in_netns(netns, ["sh", "-c", f"cd /sys/class/net/{ifname}/statistics && grep . *"]),
                         capture_output=True, text=True, check=True).stdout
    return {k: int(v) for k, v in (line.split(":", 1) for line in out.split())}


def softnet_dropped() -> int:
    with open("/proc/net/softnet_stat", encoding="ascii") as f:
        return sum(int(line.split()[1], 16) for line in f if line.strip())


def metric_sum(s: Samples, name: str) -> float:
    return sum(v for (n, _), v in s.items() if n == name)


def blast(veth: VethPair) -> float:
    """SENT frames over FLOWS flows from one trafgen CPU, as fast as it goes; returns the seconds taken."""
    with tempfile.NamedTemporaryFile("w", suffix=".cfg", delete=False) as f:
        f.write(trafgen_profile(FLOWS, payload=PAYLOAD))
    try:
        t0 = time.monotonic()
        res = subprocess.run(in_netns(veth.gen, ["trafgen", "--dev", veth.gen_if, "--conf", f.name, "--cpus", "1",
                                                 "--num", str(SENT), "--no-sock-mem", "--no-cpu-stats",
                                                 "--notouch-irq"]),
                             capture_output=True, text=True, timeout=120, check=False)
        seconds = time.monotonic() - t0
    finally:
        os.unlink(f.name)
    assert res.returncode == 0, f"trafgen failed: {res.stderr.strip()[-400:]}"
    return seconds


def steer_to_other_cpus(veth: VethPair) -> None:
    """RPS: the observer's stack work goes to every CPU but 0 (where trafgen and the veth NAPI run)."""
    cpus = os.cpu_count() or 1
    mask = ((1 << cpus) - 1) & ~1
    path = f"/sys/class/net/{veth.obs_if}/queues/rx-0/rps_cpus"
    res = subprocess.run(in_netns(veth.obs, ["sh", "-c", f"echo {mask:x} > {path}"]), capture_output=True,
                         text=True, check=False)
    if res.returncode != 0:
        pytest.skip(f"no RPS here: {res.stderr.strip()}")


@pytest.mark.kernel
@pytest.mark.parametrize(("mode", "rps"), [("native", False), ("generic", False), ("native", True)],
                         ids=["native", "generic", "native-rps"])
def test_max_rate_is_accounted_exactly(veth: VethPair, xdpflow_proc: Any, mode: str, rps: bool) -> None:
    if rps and (os.cpu_count() or 1) < 2:
        pytest.skip("RPS to another CPU needs two CPUs")
    xdpflow_proc(veth.obs, "collect", "--listen", COLLECTOR, "--quiet").wait_for("listening")
    p = xdpflow_proc(veth.obs, "run", "--interface", veth.obs_if, "--mode", mode, "--collector", COLLECTOR,
                     "--scan-interval", "0.5", "--idle-timeout", "30", "--active-timeout", "60",
                     "--max-entries", "4096", "--metrics", f"127.0.0.1:{PORT}", "--log-level", "debug")
    assert p.wait_ready()["interfaces"] == {veth.obs_if: mode}
    if rps:
        steer_to_other_cpus(veth)
    before = poll(veth.obs, lambda s: value(s, "xdpflow_scan_seconds_count") >= 1, "a first scan")
    gen0, obs0, soft0 = sysfs_stats(veth.gen, veth.gen_if), sysfs_stats(veth.obs, veth.obs_if), softnet_dropped()

    seconds = blast(veth)

    time.sleep(0.2)  # RPS: let the other CPU's backlog run dry
    gen1, obs1, soft1 = sysfs_stats(veth.gen, veth.gen_if), sysfs_stats(veth.obs, veth.obs_if), softnet_dropped()
    # A whole scan after the readings (log lines are read lazily: count scans on the endpoint).
    scans_then = value(scrape(veth.obs), "xdpflow_scan_seconds_count")
    after = poll(veth.obs, lambda s: value(s, "xdpflow_scan_seconds_count") >= scans_then + 2, "two more scans")
    rc, _ = p.stop()
    assert rc == 0
    stopped = p.events("stopped")[0]

    gen = {k: gen1[k] - gen0[k] for k in gen1}
    obs = {k: obs1[k] - obs0[k] for k in obs1}

    def ours(name: str) -> int:
        return int(value(after, f"xdpflow_kernel_{name}_total") - value(before, f"xdpflow_kernel_{name}_total"))

    def reported(name: str, prefix: str = "netdev") -> int:
        key = f"xdpflow_{prefix}_{name}_total"
        return int(value(after, key, interface=veth.obs_if) - value(before, key, interface=veth.obs_if))

    frames = ours("frames")
    figure("max_rate", mode=mode, rps=rps, pps=round(SENT / seconds), seconds=round(seconds, 2), sent=SENT,
           generator_tx_packets=gen["tx_packets"], generator_tx_dropped=gen["tx_dropped"],
           observer_rx_packets=obs["rx_packets"], observer_rx_dropped=obs["rx_dropped"],
           xdpflow_frames=frames, xdpflow_observed=ours("packets"), softnet_dropped=soft1 - soft0,
           driver_xdp_packets=reported("xdp_packets", "driver"), driver_xdp_drops=reported("xdp_drops", "driver"))

    # The generator: every frame left; what veth refused is in tx_dropped and was sent again.
    assert gen["tx_packets"] == SENT
    # The observer: every frame it received reached the program (nothing on veth is lost before XDP).
    assert obs["rx_packets"] == SENT
    assert obs["rx_missed_errors"] == obs["rx_fifo_errors"] == obs["rx_over_errors"] == obs["rx_errors"] == 0
    assert frames == obs["rx_packets"] - obs["rx_missed_errors"] - obs["rx_fifo_errors"] - obs["rx_over_errors"]
    # xdpflow dropped nothing and lost nothing: every frame that reached it was metered, and passed.
    assert ours("packets") == frames
    assert ours("parse_failures") == ours("non_ip") == ours("insert_failures") == 0
    assert stopped["observed_packets"] == SENT and stopped["ignored_packets"] == 0
    assert value(after, "xdpflow_ignored_packets_total") == 0
    if mode == "native":  # the driver counted the program's runs and verdicts: all XDP_PASS
        assert reported("xdp_packets", "driver") == frames
    assert reported("xdp_drops", "driver") == 0
    # Beyond the program: what the kernel dropped after XDP_PASS, never before it here.
    if not rps:
        assert obs["rx_dropped"] == 0
    assert obs["rx_dropped"] <= frames

    # The kernel's counters as xdpflow reports them equal the interface's own, field by field.
    for name in NETDEV:
        assert reported(name) == obs[name], name
    scans = p.events("scan")  # before the traffic, every delta is 0
    logged = {name: sum(s["netdev"].get(veth.obs_if, {}).get(name, 0) for s in scans) for name in NETDEV}
    assert logged == {name: obs[name] for name in NETDEV}
    assert all(s["kernel_insert_failures"] == 0 and s["ignored_packets"] == 0 for s in scans)
    # softnet_stat is the whole machine's: at least the observer's backlog drops are in it.
    assert metric_sum(after, "xdpflow_softnet_dropped_total") - metric_sum(before, "xdpflow_softnet_dropped_total") \
        >= obs["rx_dropped"]
    assert soft1 - soft0 >= obs["rx_dropped"]

    warnings = p.events(DROP_WARNING)
    if obs["rx_dropped"]:
        assert len(warnings) == 1, "the kernel-drop warning is rate-limited to once a minute"
        assert warnings[0]["level"] == "warning"
        assert veth.obs_if in warnings[0]["dropped"]
    else:
        assert warnings == []
