"""The Prometheus endpoint of `xdpflow run`, scraped from inside the observer namespace while traffic flows.

Off by default; `--metrics HOST:PORT` turns it on. The kernel counters are read from the per-CPU stats
map at scrape time, so they must equal what trafgen sent, exactly; everything the exporter counts
itself (records, messages, scan time) moves at each scan.
"""

from __future__ import annotations

import subprocess
from typing import Any

import pytest

from tests.conftest import ROOT, xdpflow_cmd
from tests.kernel.prometheus import METRICS_PORT, poll, scrape, value
from tools import trafgen
from tools.netns import VethPair, in_netns
from tools.packets import standard_mix

COLLECTOR = "127.0.0.1:4739"
COLLECTOR_LABEL = f"udp://{COLLECTOR}"
def listeners(netns: str) -> list[str]:
    """Listening TCP sockets in `netns`, as LOCAL:PORT."""
    out = subprocess.run(in_netns(netns, ["ss", "-Htln"]), capture_output=True, text=True, check=True).stdout
    return [line.split()[3] for line in out.splitlines() if line.strip()]


@pytest.mark.kernel
def test_metrics_move_with_traffic(veth: VethPair, xdpflow_proc: Any) -> None:
    collector = xdpflow_proc(veth.obs, "collect", "--listen", COLLECTOR, "--quiet")
    collector.wait_for("listening")
    p = xdpflow_proc(veth.obs, "run", "--interface", veth.obs_if, "--collector", COLLECTOR,
                     "--scan-interval", "0.25", "--idle-timeout", "3", "--active-timeout", "30",
                     "--max-entries", "4096", "--metrics", f"127.0.0.1:{METRICS_PORT}", "--log-level", "debug")
    started = p.wait_for("metrics")
    assert started["url"] == f"http://127.0.0.1:{METRICS_PORT}/metrics"
    p.wait_ready()
    assert listeners(veth.obs) == [f"127.0.0.1:{METRICS_PORT}"]
    p.wait_for("scan")

    before = scrape(veth.obs)
    assert value(before, "xdpflow_kernel_packets_total") == 0
    assert value(before, "xdpflow_kernel_octets_total") == 0
    assert value(before, "xdpflow_records_exported_total") == 0
    assert value(before, "xdpflow_active_flows") == 0
    assert value(before, "xdpflow_attached", interface=veth.obs_if, mode="native") == 1
    assert 0 <= value(before, "xdpflow_kernel_map_fill_ratio") <= 1
    scans_before = value(before, "xdpflow_scan_seconds_count")
    assert scans_before >= 1
    messages_before = value(before, "xdpflow_messages_sent_total", collector=COLLECTOR_LABEL)
    assert messages_before > 0, "templates and options records go out with the first scan"

    sent = standard_mix()
    packets = sum(f.count for f in sent)
    octets = sum(f.count * f.octets_per_packet for f in sent)
    trafgen.send_flows(veth.gen, veth.gen_if, sent)

    # The kernel counters are read at scrape time: exact at once, whatever the scans are doing.
    during = scrape(veth.obs)
    assert value(during, "xdpflow_kernel_packets_total") == packets
    assert value(during, "xdpflow_kernel_octets_total") == octets
    assert value(during, "xdpflow_kernel_frames_total") >= packets
    assert value(during, "xdpflow_kernel_flows_created_total") >= len(sent)
    assert value(during, "xdpflow_kernel_parse_failures_total") == 0
    assert value(during, "xdpflow_kernel_insert_failures_total") == 0
    # Every flow is in the user-space table after the next scan, until its idle timeout ends it.
    poll(veth.obs, lambda s: value(s, "xdpflow_active_flows") == len(sent), f"{len(sent)} active flows")

    after = poll(veth.obs, lambda s: value(s, "xdpflow_records_exported_total") >= len(sent)
                 and value(s, "xdpflow_active_flows") == 0, "every flow exported after its idle timeout")
    assert value(after, "xdpflow_records_exported_total") == len(sent)
    assert value(after, "xdpflow_ignored_packets_total") == 0
    assert value(after, "xdpflow_kernel_packets_total") == packets
    assert value(after, "xdpflow_kernel_octets_total") == octets
    assert value(after, "xdpflow_scan_seconds_count") > scans_before
    assert value(after, "xdpflow_scan_seconds_sum") > 0
    assert value(after, "xdpflow_messages_sent_total", collector=COLLECTOR_LABEL) > messages_before
    assert value(after, "xdpflow_octets_sent_total", collector=COLLECTOR_LABEL) > 0
    assert value(after, "xdpflow_send_errors_total", collector=COLLECTOR_LABEL) == 0
    assert value(after, "xdpflow_queue_depth", collector=COLLECTOR_LABEL) == 0
    assert 0 <= value(after, "xdpflow_kernel_map_fill_ratio") <= 1
    assert value(after, "xdpflow_attached", interface=veth.obs_if, mode="native") == 1

    rc, _ = p.stop()
    assert rc == 0
    stopped = p.events("stopped")[0]
    assert stopped["observed_packets"] == packets and stopped["records_exported"] == len(sent)
    assert stopped["sent"][COLLECTOR_LABEL]["messages"] >= value(after, "xdpflow_messages_sent_total",
                                                                 collector=COLLECTOR_LABEL)
    assert collector.stop()[0] == 0
    summary = collector.events("summary")[0]
    assert summary["records"] - summary["options_records"] == len(sent)
    assert summary["malformed"] == 0 and summary["gaps"] == 0


@pytest.mark.kernel
def test_metrics_are_off_by_default_and_loopback_when_on(veth: VethPair, xdpflow_proc: Any) -> None:
    xdpflow_proc(veth.obs, "collect", "--listen", COLLECTOR, "--quiet").wait_for("listening")
    common = ("run", "--interface", veth.obs_if, "--collector", COLLECTOR, "--scan-interval", "0.5",
              "--max-entries", "4096")
    p = xdpflow_proc(veth.obs, *common)
    p.wait_ready()
    assert listeners(veth.obs) == [], "nothing may listen unless --metrics is given"
    assert not p.events("metrics")
    rc, _ = p.stop()
    assert rc == 0

    p = xdpflow_proc(veth.obs, *common, "--metrics", ":9478")
    assert p.wait_for("metrics")["url"] == "http://127.0.0.1:9478/metrics"
    p.wait_ready()
    assert listeners(veth.obs) == ["127.0.0.1:9478"], "a port alone binds loopback"
    assert value(scrape(veth.obs, 9478), "xdpflow_attached", interface=veth.obs_if, mode="native") == 1
    rc, _ = p.stop()
    assert rc == 0


@pytest.mark.kernel
@pytest.mark.parametrize("bad", ["127.0.0.1:notaport", "127.0.0.1:70000", "0", "http://127.0.0.1:9477"])
def test_bad_metrics_address_is_one_line_exit_2(veth: VethPair, bad: str) -> None:
    res = subprocess.run(in_netns(veth.obs, xdpflow_cmd("run", "--interface", veth.obs_if, "--metrics", bad)),
                         capture_output=True, text=True, timeout=60, cwd=ROOT, check=False)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert lines[0].startswith(f"xdpflow: error: metrics = {bad} (from --metrics): "), lines[0]
    assert listeners(veth.obs) == []
