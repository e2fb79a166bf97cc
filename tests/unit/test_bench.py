"""Pure helpers of the benchmarks (tools/bench.py, tools/sweep/, tools/plots.py): no timing assertions."""

from __future__ import annotations

import csv
import math
import os
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tools import bench, sweep
from tools.jsonlog import find_event
from tools.sweep import (
    CpuTimes,
    Point,
    SweepOptions,
    Tally,
    derive,
    flow_grid,
    human_count,
    parse_pid_stat,
    parse_proc_stat,
    parse_schedstat_ns,
    parse_softflowd_stats,
    parse_status_mb,
    parse_trafgen_packets,
    parse_udp_socket,
    pivot,
    plan,
    profile_flows,
    rate_label,
    trafgen_profile,
)

# ---------------------------------------------------------------- profiles


@pytest.mark.parametrize("flows", [1, 2, 10, 1000, 60_000, 60_001, 100_000, 500_000, 1_000_000, 3_000_000])
def test_flow_grid_covers_the_flows_with_coprime_cycles(flows: int) -> None:
    a, b = flow_grid(flows)
    assert a * b >= flows
    assert a * b - flows < max(b, 1)          # "or just above": less than one extra row
    assert math.gcd(a, b) == 1               # the port pair only repeats after a x b packets
    assert 1 <= a <= sweep.MAX_PORT_CYCLE and b >= 1
    if flows <= sweep.MAX_PORT_CYCLE:
        assert (a, b) == (flows, 1)


def test_flow_grid_rejects_zero() -> None:
    with pytest.raises(ValueError):
        flow_grid(0)


def test_profile_steps_both_ports_for_large_counts() -> None:
    a, b = flow_grid(1_000_000)
    text = trafgen_profile(1_000_000)
    assert f"sp=dinc(1, {a})" in text and f"dp=dinc(1, {b})" in text
    assert profile_flows(1_000_000) == a * b
    assert "fill(0, 18)" in text                # 14 + 20 + 8 + 18 = 60-byte frames
    assert text.count("{") == 1 and text.strip().endswith("}")


def test_profile_small_counts_use_fixed_ports() -> None:
    assert "sp=1," in trafgen_profile(1) and "dp=53" in trafgen_profile(1)
    assert "sp=dinc(1, 1000)" in trafgen_profile(1000) and "dp=53" in trafgen_profile(1000)


def test_profile_enumerates_exactly_the_flow_count() -> None:
    """Simulate trafgen's two dinc counters: a x b distinct pairs, each seen once per cycle."""
    for flows in (7, 130_000):
        a, b = flow_grid(flows)
        pairs = {(i % a, i % b) for i in range(a * b)}
        assert len(pairs) == a * b


def test_labels() -> None:
    assert [human_count(n) for n in (1, 10, 1000, 10_000, 500_000, 1_000_000)] == \
        ["1", "10", "1K", "10K", "500K", "1M"]
    assert rate_label(0) == "max" and rate_label(100_000) == "100Kpps"


# ---------------------------------------------------------------- /proc parsers

PROC_STAT = """cpu  1000 50 400 8000 100 10 40 0 0 0
cpu0 500 25 200 4000 50 5 20 0 0 0
intr 12345
"""


def test_proc_stat_busy_counts_softirq_and_excludes_idle() -> None:
    t = parse_proc_stat(PROC_STAT, clk_tck=100)
    assert t.user == 10.0 and t.softirq == 0.4 and t.idle == 80.0
    assert t.total == pytest.approx(96.0)
    assert t.busy == pytest.approx(10 + 0.5 + 4 + 0.1 + 0.4)
    later = parse_proc_stat(PROC_STAT.replace("cpu  1000", "cpu  1100").replace(" 40 0", " 90 0", 1), clk_tck=100)
    d = later - t
    assert d.user == pytest.approx(1.0) and d.softirq == pytest.approx(0.5) and d.busy == pytest.approx(1.5)


def test_proc_stat_needs_the_aggregate_line() -> None:
    with pytest.raises(ValueError):
        parse_proc_stat("cpu0 1 2 3 4\n")


def test_pid_stat_handles_parentheses_and_spaces_in_comm() -> None:
    fields = ["S"] + ["0"] * 10 + ["250", "150"] + ["0"] * 30
    text = "4242 (we ird) (name)) " + " ".join(fields)
    assert parse_pid_stat(text, clk_tck=100) == pytest.approx(4.0)


def test_pid_stat_of_this_process_is_plausible() -> None:
    text = Path(f"/proc/{os.getpid()}/stat").read_text(encoding="ascii")
    assert 0 <= parse_pid_stat(text) <= time.process_time() + 1


def test_others_cpu_skips_our_sessions_and_kernel_threads(tmp_path: Path) -> None:
    def proc(pid: int, ppid: int, session: int, ticks: tuple[int, int, int, int]) -> None:
        fields = ["S", str(ppid), str(pid), str(session)] + ["0"] * 7 + [str(t) for t in ticks] + ["0"] * 30
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "stat").write_text(f"{pid} (x y) " + " ".join(fields), encoding="ascii")

    proc(1, 0, 1, (100, 100, 50, 50))          # init: its reaped children count through cutime/cstime
    proc(2, 0, 0, (900, 900, 0, 0))            # kthreadd
    proc(50, 2, 0, (900, 900, 0, 0))           # a kernel thread (ksoftirqd may do our work)
    proc(300, 1, 300, (10, 10, 0, 0))          # our probe's session
    proc(301, 300, 300, (10, 10, 0, 0))        # ... and its forked worker
    proc(400, 1, 400, (25, 25, 0, 0))          # someone else's job
    (tmp_path / "self").mkdir()
    assert sweep.others_cpu_seconds({300}, tmp_path) == pytest.approx((300 + 50) / sweep.CLK_TCK)
    assert sweep.parse_pid_stat_fields((tmp_path / "301" / "stat").read_text()) == (300, 300, 20 / sweep.CLK_TCK)


def test_schedstat_and_status() -> None:
    assert parse_schedstat_ns("123456789 2000 30\n") == 123456789
    status = "Name:\tx\nVmHWM:\t  204800 kB\nVmRSS:\t  102400 kB\n"
    assert parse_status_mb(status) == 100.0
    assert parse_status_mb(status, "VmHWM") == 200.0
    assert parse_status_mb("Name:\tzombie\n") == 0.0
    assert sweep.process_cpu_seconds(os.getpid()) > 0


def test_trafgen_summary() -> None:
    out = "     1 packets to schedule\n    60 bytes in total\nRunning! Hang up with ^C!\n\n\n" \
          "      500178 packets outgoing\n    30010680 bytes outgoing\n"
    assert parse_trafgen_packets(out) == 500178
    assert parse_trafgen_packets("trafgen: cannot open device\n") is None


SOFTFLOWCTL = """softflowd[4188]: Accumulated statistics since 2026-11-25T17:55:13 UTC:
Number of active flows: 1000
Packets processed: 499960
Fragments: 0
Ignored packets: 0 (0 non-IP, 0 too short)
Flows expired: 0 (0 forced)
Flows exported: 0 (0 records) in 0 packets (0 failures)
Packets received by libpcap: 500178
Packets dropped by libpcap: 3968
Packets dropped by interface: 0
"""


def test_softflowctl_statistics() -> None:
    st = parse_softflowd_stats(SOFTFLOWCTL)
    assert st["packets_processed"] == 499960
    assert st["pcap_received"] == 500178 and st["pcap_dropped"] == 3968
    assert st["active_flows"] == 1000 and st["flows_exported"] == 0


PROC_NET_UDP = (  # the kernel pads these columns with more spaces; the parser splits on any whitespace
    "sl local_address rem_address st tx_queue rx_queue tr tm->when retrnsmt uid timeout inode ref pointer drops\n"
    "12: 0100007F:2703 00000000:0000 07 00000000:00000A00 00:00000000 00000000 0 0 5551 2 0000000000000000 17\n"
    "13: 0100007F:1283 00000000:0000 07 00000000:00000000 00:00000000 00000000 0 0 5552 2 0000000000000000 0\n"
)


def test_udp_socket_queue_and_drops() -> None:
    assert parse_udp_socket(PROC_NET_UDP, 9987) == (0xA00, 17)
    assert parse_udp_socket(PROC_NET_UDP, 4739) == (0, 0)
    assert parse_udp_socket(PROC_NET_UDP, 1) is None


def test_find_event_takes_the_last_json_line_of_that_event() -> None:
    text = 'bcc warning\n{"event": "exporting"}\n{"event": "scan", "n": 1}\nnot json {\n' \
           '{"event": "stopped", "observed_packets": 5, "ignored_packets": 1}\n'
    assert find_event(text, "stopped") == {"event": "stopped", "observed_packets": 5, "ignored_packets": 1}
    assert find_event(text, "exporting") == {"event": "exporting"}
    assert find_event(text, "missing") is None


# ---------------------------------------------------------------- the accounting collector


def _messages(n: int, ignored: int) -> tuple[list[bytes], Any]:
    from exporter.ipfix import Encoder, ExporterState
    from tools.synthetic import random_records

    recs = random_records(n, seed=5, ipv6_share=0.3)
    enc = Encoder(odid=7, mtu=1400)
    state = ExporterState(not_sent_flows=0, not_sent_packets=0, not_sent_octets=0, exported_messages=0,
                          exported_flows=0, exported_octets=0, observed_packets=10, observed_octets=1000,
                          ignored_packets=ignored, ignored_octets=100, active_timeout_s=60.0, idle_timeout_s=15.0,
                          system_init_ms=0)
    msgs = [enc.templates_message(1.7e9)]
    msgs += enc.encode(recs[: n // 2], 1.7e9, options=state)
    msgs += enc.encode(recs[n // 2:], 1.7e9 + 5)
    return msgs, recs


def test_tally_matches_the_records_fast_path_included() -> None:
    msgs, recs = _messages(5000, ignored=42)
    t = Tally()
    for m in msgs:
        t.add(m, "127.0.0.1:5000")
    assert t.records == len(recs)
    assert t.packets == int(recs["packets"].sum())
    assert t.octets == int(recs["octets"].sum())
    assert t.ignored_packets == 42
    assert t.options_records > 0 and t.malformed == 0
    assert t.slow_datagrams < len(msgs) / 2     # plain data messages took the numpy path
    assert t.summary()["records"] == len(recs)


def test_tally_without_templates_counts_nothing_and_stays_up() -> None:
    msgs, _ = _messages(200, ignored=0)
    t = Tally()
    for m in msgs[1:]:                          # template message lost
        t.add(m, "x")
    t.add(b"\x00\x0a\x00", "x")                 # truncated
    assert t.records == 0 and t.packets == 0
    assert t.datagrams == len(msgs)


# ---------------------------------------------------------------- plan and derived figures


def test_plan_dedupes_the_shared_point_and_keeps_order() -> None:
    opts = SweepOptions(flows=(10, 1000, 1_000_000), pps=100_000, rates=(10_000, 100_000, 0), rate_flows=1000)
    pts = plan(opts)
    assert pts[:3] == [Point("flows", 10, 100_000), Point("flows", 1000, 100_000),
                       Point("flows", 1_000_000, 100_000)]
    assert pts[3:] == [Point("rate", 1000, 10_000), Point("rate", 1000, 0)]


def test_warmup_covers_a_cycle_and_a_scan() -> None:
    opts = SweepOptions()
    assert sweep.warmup_seconds(opts, Point("flows", 100, 100_000)) == opts.min_warmup
    big = sweep.warmup_seconds(opts, Point("flows", 1_000_000, 100_000))
    assert big >= profile_flows(1_000_000) / 100_000 + opts.timers.scan_interval
    assert sweep.max_entries_for(1000) == 500_000
    assert sweep.max_entries_for(1_000_000) > 1_000_000 * 1.2
    assert SweepOptions.short().measure < SweepOptions().measure
    assert sweep.estimate_seconds(SweepOptions.short()) < 8 * 60


def _row(probe: str, busy: float, cpu: float = 0.0, **kw: Any) -> dict[str, Any]:
    return {"sweep": "rate", "flows": 1000, "pps_target": 0, "rep": 0, "probe": probe, "machine_busy_cores": busy,
            "busy_ours_cores": busy, "probe_cpu_cores": cpu, "pps_sent": 300_000, "machine_idle_cores": 0.5, **kw}


def test_overhead_is_busy_minus_baseline_minus_collector() -> None:
    rows = derive([_row("none", 1.0), _row("xdpflow", 1.1, 0.001, collector_cpu_cores=0.02),
                   _row("softflowd", 1.9, 0.6, collector_cpu_cores=0.01)])
    assert rows[1]["overhead_cores"] == pytest.approx(0.08)
    assert rows[2]["overhead_cores"] == pytest.approx(0.89)
    assert "overhead_cores" not in rows[0]
    (line,) = pivot(rows)
    assert line["xdpflow_overhead_cores"] == pytest.approx(0.08)
    assert line["cpu_ratio"] == pytest.approx(600)
    assert line["overhead_ratio"] == pytest.approx(0.89 / 0.08)


def test_overhead_leaves_other_jobs_out() -> None:
    rows = derive([_row("none", 1.5, busy_ours_cores=0.5), _row("xdpflow", 1.2, busy_ours_cores=0.6)])
    assert rows[1]["overhead_raw_cores"] == pytest.approx(-0.3)   # another job went quiet meanwhile
    assert rows[1]["overhead_cores"] == pytest.approx(0.1)
    assert rows[1]["overhead_ns_per_packet"] == pytest.approx(0.1 / 300_000 * 1e9, rel=1e-3)


def test_pivot_takes_medians_over_repeats() -> None:
    rows = [_row("xdpflow", 1.0, c, rep=i) for i, c in enumerate((0.1, 0.3, 0.2))]
    (line,) = pivot(rows)
    assert line["xdpflow_probe_cpu_cores"] == pytest.approx(0.2)


def test_targets_verdicts() -> None:
    kernel = bench.with_kernel_estimates({
        "empty_program": {"min_ns": 5, "median_ns": 5}, "hit_ipv4_tcp": {"min_ns": 20, "median_ns": 22},
        "hit_single_run_median_ns": 400.0, "new_flow_empty_table_median_ns": 600.0,
        "new_flow_full_table_median_ns": 900.0})
    assert kernel["new_flow_empty_table_est_ns"] == pytest.approx(222.0)
    pipeline = [{"flows": 500_000, "records_per_s": 1.5e6, "records_per_s_median": 1.4e6, "rounds": 3,
                 "cpu_s": 0.3}]
    rows = derive([_row("none", 1.0), _row("xdpflow", 1.02, 0.001), _row("softflowd", 1.9, 0.6),
                   {**_row("none", 1.0), "pps_target": 10_000},
                   {**_row("xdpflow", 1.0, 0.0012), "pps_target": 10_000},
                   {**_row("xdpflow", 1.0, 0.05), "sweep": "flows", "flows": 1_000_008, "pps_target": 100_000,
                    "rss_mb": 120.0, "peak_rss_mb": 180.0, "kernel_map_mb": 410.0, "max_entries": 1_251_024}])
    got = {t[0]: t[3] for t in bench.targets(kernel, pipeline, rows)}
    assert got["Kernel hit path, IPv4 TCP established (PROG_TEST_RUN)"] == "met"
    assert got["New flow, empty table"] == "met" and got["New flow, full table"] == "MISSED"
    assert got["Pipeline, drain..send, one core, 500K flows"] == "MISSED"
    assert got["CPU per 500K-flow scan"] == "MISSED"
    assert got["Exporter CPU at 1K flows: 10 Kpps vs max"] == "met"
    assert got["Process CPU vs softflowd at max rate (1K flows)"] == "met"
    assert got["Probe overhead vs softflowd at max rate"] == "met"
    assert got["Exporter RSS at 1M flows"] == "MISSED"


def test_overhead_target_is_inconclusive_on_a_saturated_machine() -> None:
    rows = derive([_row("none", 2.0, machine_idle_cores=0.0), _row("xdpflow", 2.0, 0.001),
                   _row("softflowd", 2.0, 0.6)])
    got = {t[0]: t[3] for t in bench.targets(None, None, rows)}
    assert got["Probe overhead vs softflowd at max rate"] == "inconclusive"


# ---------------------------------------------------------------- output


def test_write_csv_unions_columns_and_formats_cells(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    bench.write_csv(path, [{"a": 1, "b": 0.123456789}, {"a": 2, "c": {"k": 1}}])
    with open(path, newline="", encoding="utf-8") as f:
        got = list(csv.DictReader(f))
    assert list(got[0]) == ["a", "b", "c"]
    assert got[0] == {"a": "1", "b": "0.123457", "c": ""}
    assert got[1] == {"a": "2", "b": "", "c": '{"k":1}'}


def test_md_table() -> None:
    text = bench.md_table(["x", "y"], [[1_000_000, 0.5], ["a|b", None]])
    assert text.splitlines() == ["| x | y |", "|---|---|", "| 1,000,000 | 0.5 |", "| a\\|b | - |"]


def test_int_list_accepts_suffixes() -> None:
    assert bench._int_list("1,10 1K,1.5M,0") == [1, 10, 1000, 1_500_000, 0]


def test_report_writes_summary_and_plots(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    rows = derive([{**_row(p, b, c), "sweep": "flows", "flows": f, "pps_target": 100_000, "rss_mb": 10.0,
                    "peak_rss_mb": 12.0, "accounted_ratio": 1.0}
                   for f in (10, 1000) for p, b, c in (("none", 1.0, 0), ("xdpflow", 1.05, 0.01),
                                                      ("softflowd", 1.4, 0.3))]
                  + [_row("none", 1.0), _row("xdpflow", 1.1, 0.01), {**_row("none", 1.0), "pps_target": 10_000},
                     {**_row("xdpflow", 1.0, 0.01), "pps_target": 10_000}])
    bench._write_json(tmp_path / "sweep.json", rows)
    bench._write_json(tmp_path / "pipeline.json", [
        {"flows": n, "slots": 2 * n, "records_per_s": 1e6, "fold_rps": 2e6, "expire_rps": 3e6, "encode_rps": 4e6,
         "send_rps": 8e6, "cpu_s": 0.1, "datagrams": 10, "peak_rss_mb": 100.0} for n in (10_000, 100_000)])
    path = bench.write_report(tmp_path)
    text = path.read_text(encoding="utf-8")
    assert "### Concurrent flows at 100Kpps" in text and "### Packet rate at 1K flows" in text
    for name in ("cpu_vs_flows.png", "memory_vs_flows.png", "accounted_vs_flows.png", "cpu_vs_rate.png",
                 "pipeline.png"):
        assert (tmp_path / name).stat().st_size > 1000
        assert f"]({name})" in text


# ---------------------------------------------------------------- child processes


def test_child_stop_reaps_the_whole_group_with_its_cpu(tmp_path: Path) -> None:
    child = sweep.Child("sh", ["sh", "-c", "sleep 30 & echo started; wait"], tmp_path / "c.log")
    try:
        deadline = time.monotonic() + 5
        while "started" not in child.output() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert child.alive()
        assert child.stop(signal.SIGTERM, timeout=5)
        assert child.returncode == -signal.SIGTERM
        assert child.cpu_total is not None and child.cpu_total >= 0
        assert not child.alive()
    finally:
        child.close()
    assert "started" in child.output()


def test_death_signal_wrapper() -> None:
    argv = sweep.with_death_signal(["true"], signal.SIGINT)
    assert argv[-1] == "true"
    if len(argv) > 1:
        assert argv[1:3] == ["--pdeathsig", "SIGINT"]


def test_cpu_times_default_is_zero() -> None:
    assert CpuTimes().busy == 0.0 and np.isclose((CpuTimes(user=1.0) - CpuTimes()).busy, 1.0)
