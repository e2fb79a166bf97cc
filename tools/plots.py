"""PNG plots of the benchmark results (matplotlib, Agg backend: no display needed).

- cpu_vs_flows.png: process CPU (log scale) and probe overhead vs concurrent flows, both probes;
- memory_vs_flows.png: RSS of both probes and xdpflow's kernel maps vs flows, the 150 MB target;
- accounted_vs_flows.png: packets accounted at the collector / packets sent vs flows;
- cpu_vs_rate.png: process CPU and overhead per packet vs packet rate at a fixed flow count;
- pipeline.png: user-space records/s per stage and in total vs flows, the 2M/s target.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tools.sweep import RATE_SWEEP_FLOWS, human_count, pivot, profile_flows

PIPELINE_STAGES = ("fold", "expire", "encode", "send")   # tools/bench.py StageTimes

STYLE = {"xdpflow": dict(color="tab:blue", marker="o"), "softflowd": dict(color="tab:red", marker="s"),
         "xdp_empty": dict(color="tab:grey", marker="^", ls="--")}
LABELS = {"xdp_empty": "empty XDP program"}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(lines: Sequence[dict[str, Any]], x: str, y: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for ln in lines:
        xv, yv = ln.get(x), ln.get(y)
        if isinstance(xv, int | float) and isinstance(yv, int | float):
            xs.append(float(xv))
            ys.append(float(yv))
    return xs, ys


def _per_probe(ax: Any, lines: Sequence[dict[str, Any]], x: str, y: str, label: str,
               probes: Sequence[str] = ("xdpflow", "softflowd"), floor: float | None = None) -> None:
    """One line a probe with data: column `y` against column `x`, in x order.

    "{probe}" in `x`, `y` and `label` stands for the probe (in `label`, its LABELS name). `floor`
    lifts values up to it, so a probe near 0 still shows on a log scale.
    """
    for probe in probes:
        pts = sorted(zip(*_series(lines, x.format(probe=probe), y.format(probe=probe)), strict=True))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] if floor is None else max(p[1], floor) for p in pts],
                    label=label.format(probe=LABELS.get(probe, probe)), **STYLE[probe])


def _legend(ax: Any) -> None:
    """A legend, or a note where the panel has no series (overhead needs the no-probe run)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no data for this panel in these runs", ha="center", va="center",
                transform=ax.transAxes, color="grey")


def _log_x(ax: Any, label: str) -> None:
    ax.set_xscale("log")
    ax.set_xlabel(label)
    ax.xaxis.set_major_formatter(_formatter())
    ax.grid(True, which="both", alpha=0.3)


def _flow_axis(ax: Any) -> None:
    _log_x(ax, "concurrent flows")


def _formatter() -> Any:
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda v, _pos: human_count(v) if v >= 1 else f"{v:g}")


def write_plots(out_dir: Path, sweep_rows: Sequence[dict[str, Any]],
                pipeline_rows: Sequence[dict[str, Any]]) -> list[Path]:
    """Write every plot there is data for; returns the paths written."""
    plt = _pyplot()
    written: list[Path] = []
    lines = pivot(sweep_rows) if sweep_rows else []
    flow_lines = sorted((ln for ln in lines if ln["sweep"] == "flows"), key=lambda ln: ln["flows"])
    rate_flows = profile_flows(RATE_SWEEP_FLOWS)
    rate_lines = [ln for ln in lines if ln["flows"] == rate_flows]

    def save(fig: Any, name: str) -> None:
        path = out_dir / name
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    if flow_lines:
        rate = flow_lines[0]["pps_target"]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
        _per_probe(a1, flow_lines, "flows", "{probe}_probe_cpu_cores", "{probe} process", floor=1e-4)
        _per_probe(a2, flow_lines, "flows", "{probe}_overhead_cores", "{probe} overhead")
        a1.set_yscale("log")
        a1.set_ylabel("CPU (cores), user+sys of the process")
        a1.set_title(f"Probe process CPU vs flows at {human_count(rate)} pps" if rate else "Probe process CPU")
        a2.axhline(0, color="grey", lw=0.8)
        a2.set_ylabel("CPU (cores): machine busy minus no-probe run")
        a2.set_title("Probe overhead (softirq included) vs flows")
        for ax in (a1, a2):
            _flow_axis(ax)
            _legend(ax)
        save(fig, "cpu_vs_flows.png")

        fig, ax = plt.subplots(figsize=(7, 4.5))
        _per_probe(ax, flow_lines, "flows", "{probe}_peak_rss_mb", "{probe} peak RSS")
        xs, ys = _series(flow_lines, "flows", "xdpflow_kernel_map_mb")
        if xs:
            ax.plot(xs, ys, label="xdpflow kernel maps", color="tab:blue", ls="--")
        ax.axhline(150, color="grey", ls=":", label="target: 150 MB at 1M flows")
        ax.set_ylabel("MB")
        ax.set_title("Memory vs concurrent flows")
        _flow_axis(ax)
        _legend(ax)
        save(fig, "memory_vs_flows.png")

        fig, ax = plt.subplots(figsize=(7, 4.5))
        _per_probe(ax, flow_lines, "flows", "{probe}_accounted_ratio", "{probe}")
        ax.set_ylabel("packets accounted at the collector / packets sent")
        ax.set_ylim(0, 1.05)
        ax.set_title("Accounted packets vs concurrent flows")
        _flow_axis(ax)
        _legend(ax)
        save(fig, "accounted_vs_flows.png")

    if len(rate_lines) > 1:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
        _per_probe(a1, rate_lines, "{probe}_pps_sent", "{probe}_probe_cpu_cores", "{probe} process", floor=1e-4)
        _per_probe(a2, rate_lines, "{probe}_pps_sent", "{probe}_overhead_ns_per_packet", "{probe}",
                   probes=("xdp_empty", "xdpflow", "softflowd"))
        a1.set_yscale("log")
        a1.set_ylabel("CPU (cores), user+sys of the process")
        a1.set_title(f"Process CPU vs packet rate at {human_count(rate_flows)} flows")
        a2.axhline(0, color="grey", lw=0.8)
        a2.set_ylabel("ns of machine CPU per packet, beyond the no-probe run")
        a2.set_title("Probe overhead per packet vs packet rate")
        for ax in (a1, a2):
            _log_x(ax, "packets/s sent")
            _legend(ax)
        save(fig, "cpu_vs_rate.png")

    if pipeline_rows:
        rows = sorted(pipeline_rows, key=lambda r: r["flows"])
        fig, ax = plt.subplots(figsize=(7, 4.5))
        xs = [r["flows"] for r in rows]
        ax.plot(xs, [r["records_per_s"] for r in rows], label="total", color="black", marker="o", lw=2)
        for stage in PIPELINE_STAGES:
            if all(f"{stage}_rps" in r for r in rows):   # results of older stage sets are left out
                ax.plot(xs, [r[f"{stage}_rps"] for r in rows], label=stage, marker=".", alpha=0.8)
        ax.axhline(2e6, color="grey", ls=":", label="target: 2M records/s")
        ax.set_yscale("log")
        ax.set_ylabel("records/s on one core")
        ax.set_title("User-space pipeline, one scan")
        _flow_axis(ax)
        ax.legend(fontsize=8)
        save(fig, "pipeline.png")
    return written
