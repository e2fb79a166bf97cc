"""`xdpflow check` in a test namespace: passes on a veth, fails clearly, leaves nothing attached."""

from __future__ import annotations

import subprocess
from typing import Any

import pytest

from exporter import check
from exporter.config import Config
from tests.conftest import ROOT, xdp_attached, xdpflow_cmd
from tools.netns import VethPair, in_netns


def run_in(netns: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(in_netns(netns, xdpflow_cmd(*args)), capture_output=True, text=True, timeout=60,
                          cwd=ROOT, check=False)


def lines_by_status(out: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {check.OK: [], check.WARN: [], check.FAIL: []}
    for line in out.splitlines():
        status = line.split(" ", 1)[0]
        assert status in found, f"not a check line: {line!r}"
        found[status].append(line)
    return found


@pytest.mark.kernel
def test_check_passes_on_a_veth(veth: VethPair) -> None:
    res = run_in(veth.obs, "check", "--interface", veth.obs_if, "--max-entries", "4096")
    assert res.returncode == 0, res.stdout + res.stderr
    lines = lines_by_status(res.stdout)
    assert not lines[check.FAIL]
    checked = [ln.split(None, 1)[1] for ln in res.stdout.splitlines()]
    for name in ("kernel", "bpf()", "BTF", "bcc", "kernel headers", "capabilities", f"interface {veth.obs_if}",
                 "map memory", "collector udp://127.0.0.1:4739"):
        assert any(c.startswith(name + ": ") for c in checked), (name, res.stdout)
    iface = next(ln for ln in lines[check.OK] if f"interface {veth.obs_if}:" in ln)
    assert "driver veth" in iface and "native and generic (probed)" in iface and "attaches native" in iface
    assert not xdp_attached(veth.obs, veth.obs_if)


@pytest.mark.kernel
def test_check_fails_on_a_missing_interface(veth: VethPair) -> None:
    res = run_in(veth.obs, "check", "--interface", "nosuchif0", "--max-entries", "4096")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    fails = lines_by_status(res.stdout)[check.FAIL]
    assert len(fails) == 1 and fails[0].startswith("FAIL  interface nosuchif0: no such interface")
    assert "; fix: " in fails[0]


@pytest.mark.kernel
def test_check_fails_on_an_over_budget_table(veth: VethPair) -> None:
    res = run_in(veth.obs, "check", "-i", veth.obs_if, "--max-entries", "50000000", "--max-kernel-memory", "256M")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    fails = lines_by_status(res.stdout)[check.FAIL]
    assert len(fails) == 1 and fails[0].startswith("FAIL  map memory: ")
    assert "max_entries <= " in fails[0] and "max_kernel_memory >= " in fails[0]
    assert not xdp_attached(veth.obs, veth.obs_if)


@pytest.mark.kernel
def test_check_native_on_loopback_fails_with_a_fix(veth: VethPair) -> None:
    res = run_in(veth.obs, "check", "-i", "lo", "--mode", "native", "--max-entries", "4096")
    assert res.returncode == 1
    fails = lines_by_status(res.stdout)[check.FAIL]
    assert len(fails) == 1 and "interface lo: " in fails[0] and "generic only" in fails[0]
    assert "fix: use mode auto or generic" in fails[0]


@pytest.mark.kernel
def test_check_reports_a_program_already_attached(veth: VethPair, xdpflow_proc: Any) -> None:
    other = xdpflow_proc(veth.obs, "dump", "--interface", veth.obs_if, "--mode", "generic", "--max-entries", "1024")
    other.wait_for("metering")
    res = run_in(veth.obs, "check", "-i", veth.obs_if, "--max-entries", "4096")
    assert res.returncode == 1
    fails = lines_by_status(res.stdout)[check.FAIL]
    assert len(fails) == 1 and "already attached (generic mode" in fails[0] and "xdp off" in fails[0]
    rc, _ = other.stop()
    assert rc == 0
    assert not xdp_attached(veth.obs, veth.obs_if)


@pytest.mark.kernel
def test_run_checks_its_config_in_its_own_namespace(veth: VethPair) -> None:
    res = run_in(veth.obs, "run", "--interface", "eth0", "--max-entries", "4096")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('xdpflow: error: interfaces[0] = "eth0" (from --interface): '
                                                   'no such interface in this network namespace')
    assert veth.obs_if in lines[0]


@pytest.mark.kernel
def test_preflight_passes_here() -> None:
    assert check.run_preflight(Config(interfaces=("lo",))) == []
    assert check.check_bpf_syscall().status == check.OK
