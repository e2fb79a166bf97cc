"""The sweep's derived figures (pure): each probe phase's overhead against the `none` phase of the
same point and rep, and one line per point with every probe's figures side by side (medians over
reps). They are kept apart from the measuring so that a report recomputes them from a stored
sweep.json (tools/bench.py) and always follows the current formulas.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from tools.sweep.plan import PROBES


def derive(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Probe overhead against the same point's `none` phase (same rep), collector CPU taken out.

    overhead_cores: busy_ours (machine busy minus other jobs' processes) minus the baseline's;
    overhead_ns_per_packet: the same per packet, each phase divided by its own packet rate, so phases
    that reached different rates (at `max`) still compare; overhead_raw_cores: plain machine busy CPU.
    """
    base = {(r["sweep"], r["flows"], r["pps_target"], r["rep"]): r for r in rows if r["probe"] == "none"}
    for r in rows:
        b = base.get((r["sweep"], r["flows"], r["pps_target"], r["rep"]))
        if r["probe"] == "none" or b is None or "machine_busy_cores" not in r or "machine_busy_cores" not in b:
            continue
        collector = r.get("collector_cpu_cores", 0.0)
        r["overhead_raw_cores"] = round(r["machine_busy_cores"] - b["machine_busy_cores"] - collector, 4)
        key = "busy_ours_cores" if "busy_ours_cores" in r and "busy_ours_cores" in b else "machine_busy_cores"
        r["overhead_cores"] = round(r[key] - b[key] - collector, 4)
        if r.get("pps_sent") and b.get("pps_sent"):
            per_packet = (r[key] - collector) / r["pps_sent"] - b[key] / b["pps_sent"]
            r["overhead_ns_per_packet"] = round(per_packet * 1e9, 1)
        r["baseline_busy_cores"] = b["machine_busy_cores"]
        r["baseline_pps_sent"] = b.get("pps_sent")
    return rows


def _median(values: Sequence[Any]) -> Any:
    nums = [v for v in values if isinstance(v, int | float)]
    return statistics.median(nums) if nums else None


def pivot(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per (sweep, flows, rate): each probe's figures side by side (medians over reps)."""
    keys: list[tuple[str, int, int]] = []
    groups: dict[tuple[str, int, int, str], list[dict[str, Any]]] = {}
    for r in rows:
        k = (r["sweep"], r["flows"], r["pps_target"])
        if k not in keys:
            keys.append(k)
        groups.setdefault((*k, r["probe"]), []).append(r)
    cols = ("pps_sent", "machine_busy_cores", "probe_cpu_cores", "overhead_cores", "rss_mb", "peak_rss_mb",
            "accounted_ratio", "collector_records", "collector_socket_drops", "probe_dropped_packets",
            "kernel_map_mb", "packets_sent", "accounted_packets", "ignored_packets", "overhead_ns_per_packet",
            "machine_idle_cores", "overhead_raw_cores", "others_cpu_cores", "busy_ours_cores")
    out = []
    for sweep, flows, pps in keys:
        line: dict[str, Any] = {"sweep": sweep, "flows": flows, "pps_target": pps}
        for probe in PROBES:
            rs = groups.get((sweep, flows, pps, probe), [])
            for c in cols:
                if any(c in r for r in rs):
                    line[f"{probe}_{c}"] = _median([r.get(c) for r in rs])
        idle = [v for k, v in line.items() if k.endswith("_machine_idle_cores") and isinstance(v, int | float)]
        if idle:
            line["min_idle_cores"] = min(idle)
        x, s = line.get("xdpflow_probe_cpu_cores"), line.get("softflowd_probe_cpu_cores")
        if isinstance(x, float | int) and isinstance(s, float | int) and x > 0:
            line["cpu_ratio"] = s / x
        x, s = line.get("xdpflow_overhead_cores"), line.get("softflowd_overhead_cores")
        if isinstance(x, float | int) and isinstance(s, float | int) and x > 0:
            line["overhead_ratio"] = s / x
        out.append(line)
    return out
