"""Drive trafgen (netsniff-ng) with generated profiles.

Profiles are written as raw byte lists (trafgen's `{ 0x.., ... }` form) built by
tools.packets, so what trafgen sends is byte-for-byte what the tests expect. A
profile lists each flow's frame; trafgen sends them round robin, so sending
`count` rounds of a profile whose flows all have count 1 is exact per flow.
Flows with different counts are sent as separate trafgen runs.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Sequence

from tools.netns import in_netns
from tools.packets import Flow


def profile(frames: Sequence[bytes]) -> str:
    blocks = []
    for frame in frames:
        body = ", ".join(f"0x{b:02x}" for b in frame)
        blocks.append("{ " + body + " }")
    return "\n".join(blocks) + "\n"


def send(netns: str, dev: str, frames: Sequence[bytes], total: int, gap_us: int | None = 20,
         rate: str | None = None) -> None:
    """Send `total` frames cycling through `frames` from `dev` inside `netns`."""
    with tempfile.NamedTemporaryFile("w", suffix=".cfg", delete=False) as f:
        f.write(profile(frames))
        path = f.name
    try:
        cmd = ["trafgen", "--dev", dev, "--conf", path, "--num", str(total), "--cpus", "1", "--no-sock-mem",
               "--no-cpu-stats", "--notouch-irq"]
        if rate:
            cmd += ["--rate", rate]
        elif gap_us:
            cmd += ["--gap", f"{gap_us}us"]
        res = subprocess.run(in_netns(netns, cmd), capture_output=True, text=True, timeout=600, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"trafgen failed ({res.returncode}): {res.stderr.strip()[-400:]}")
    finally:
        os.unlink(path)


def send_flows(netns: str, dev: str, flows: Sequence[Flow], gap_us: int | None = 20) -> None:
    """Send every flow's frame exactly flow.count times (grouped by count)."""
    by_count: dict[int, list[bytes]] = {}
    for fl in flows:
        by_count.setdefault(fl.count, []).append(fl.frame())
    for count, frames in sorted(by_count.items()):
        send(netns, dev, frames, count * len(frames), gap_us=gap_us)
