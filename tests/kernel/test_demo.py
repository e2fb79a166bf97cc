"""`make demo` is what a newcomer runs first: run it through the same entry point and check its verdict."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tools.packets import standard_mix


@pytest.mark.kernel
def test_make_demo_reports_every_packet_exactly() -> None:
    sent = sum(f.count for f in standard_mix())
    # The Makefile's demo target: `$(PY) -m tools.demo` after setup (done: this runs inside .venv).
    res = subprocess.run([sys.executable, "-m", "tools.demo"], cwd=ROOT, capture_output=True, text=True, check=False,
                         timeout=600, env=dict(os.environ, PYTHONPATH=ROOT))
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert f"== packets sent {sent}, packets in exported records {sent}: exact" in res.stdout, out[-3000:]
    assert "the exporter is metering" in res.stdout, "the demo must wait for readiness, not a fixed time"
