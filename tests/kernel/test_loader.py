"""Loader behaviour: budget refusal, clear errors, modes read back, detach on every path."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from tests.conftest import ROOT, xdp_attached, xdpflow_cmd
from tools.netns import VethPair, in_netns
from xdp.loader import Datapath, LoaderError, map_memory_bytes


def run_cli(netns: str | None, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    cmd = xdpflow_cmd(*args)
    if netns:
        cmd = in_netns(netns, cmd)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, check=False)


def test_memory_is_entries_cpus_value_pages() -> None:
    small, big = map_memory_bytes(1000, cpus=2), map_memory_bytes(2000, cpus=2)
    assert big == 2 * small
    assert map_memory_bytes(1000, cpus=4) > small


@pytest.mark.kernel
def test_budget_refusal_is_one_clear_line() -> None:
    with pytest.raises(LoaderError, match="above the budget") as e:
        Datapath(max_entries=10_000_000, memory_budget=64 << 20).load()
    assert "\n" not in str(e.value)
    res = run_cli(None, "dump", "--interface", "lo", "--max-entries", "10000000", "--max-kernel-memory", "64M",
                  "--seconds", "1")
    assert res.returncode == 1
    assert "Traceback" not in res.stderr
    assert res.stderr.strip().count("\n") == 0 and "--max-kernel-memory" in res.stderr


@pytest.mark.kernel
def test_unknown_interface(veth: VethPair) -> None:
    res = run_cli(veth.obs, "dump", "--interface", "nosuchif0", "--seconds", "1", "--max-entries", "1024")
    assert res.returncode == 1
    assert "no interface named nosuchif0" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.kernel
def test_auto_mode_gets_native_on_veth_and_reports_it(veth: VethPair, xdpflow_proc: Any) -> None:
    p = xdpflow_proc(veth.obs, "dump", "--interface", veth.obs_if, "--mode", "auto", "--max-entries", "1024")
    assert p.wait_for("metering")["interfaces"] == {veth.obs_if: "native"}
    rc, _ = p.stop()
    assert rc == 0
    assert not xdp_attached(veth.obs, veth.obs_if)


@pytest.mark.kernel
def test_refuses_to_replace_a_foreign_program(veth: VethPair, xdpflow_proc: Any) -> None:
    first = xdpflow_proc(veth.obs, "dump", "--interface", veth.obs_if, "--mode", "generic", "--max-entries", "1024")
    first.wait_for("metering")
    res = run_cli(veth.obs, "dump", "--interface", veth.obs_if, "--seconds", "1", "--max-entries", "1024")
    assert res.returncode == 1 and "already has an XDP program attached" in res.stderr
    assert xdp_attached(veth.obs, veth.obs_if), "the second process removed the first one's program"
    rc, _ = first.stop()
    assert rc == 0
    assert not xdp_attached(veth.obs, veth.obs_if)


@pytest.mark.kernel
def test_detaches_generic_program_on_sigterm(veth: VethPair, xdpflow_proc: Any) -> None:
    p = xdpflow_proc(veth.obs, "dump", "--interface", veth.obs_if, "--mode", "generic", "--max-entries", "1024")
    p.wait_for("metering")
    assert xdp_attached(veth.obs, veth.obs_if)
    import signal

    rc, _ = p.stop(signal.SIGTERM)
    assert rc == 0
    assert not xdp_attached(veth.obs, veth.obs_if)


def test_help_does_not_need_bcc() -> None:
    res = subprocess.run([sys.executable, "-m", "exporter.cli", "dump", "--help"], capture_output=True, text=True,
                         cwd=ROOT, check=False)
    assert res.returncode == 0 and "--interface" in res.stdout


@pytest.mark.kernel
def test_second_load_in_one_process_finds_headers_again() -> None:
    """The header search must not mistake its own BCC_KERNEL_SOURCE for the operator's."""
    import os

    before = os.environ.get("BCC_KERNEL_SOURCE")
    for _ in range(2):
        with Datapath(max_entries=128).load() as dp:
            assert dp.prog_fd > 0
    assert os.environ.get("BCC_KERNEL_SOURCE") == before


@pytest.mark.kernel
def test_sigkill_leaves_no_attachment_and_restart_works(veth: VethPair, xdpflow_proc: Any) -> None:
    """bpf_link: the attachment dies with the process, so a restart finds the interface free."""
    import signal

    for mode in ("native", "generic"):
        p = xdpflow_proc(veth.obs, "dump", "--interface", veth.obs_if, "--mode", mode, "--max-entries", "1024")
        p.wait_for("metering")
        assert xdp_attached(veth.obs, veth.obs_if)
        p.popen.send_signal(signal.SIGKILL)
        p.popen.wait(timeout=10)
        assert not xdp_attached(veth.obs, veth.obs_if), f"{mode} attachment outlived SIGKILL"
    again = xdpflow_proc(veth.obs, "dump", "--interface", veth.obs_if, "--max-entries", "1024")
    assert again.wait_for("metering")["interfaces"] == {veth.obs_if: "native"}
    rc, _ = again.stop()
    assert rc == 0
