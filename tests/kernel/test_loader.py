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


def test_memory_grows_with_entries_and_cpus_and_less_per_entry_than_per_cpu_pages() -> None:
    fixed = map_memory_bytes(0, cpus=2)   # the per-CPU cache
    small, big = map_memory_bytes(1000, cpus=2), map_memory_bytes(2000, cpus=2)
    assert big - fixed == 2 * (small - fixed)
    assert map_memory_bytes(1000, cpus=4) > small
    for cpus in (2, 64):
        # Before the slot array: 2 pages x (cpus x 40-byte values + 48-byte key + 48 bytes of element).
        per_cpu_pages = 2 * (cpus * 40 + 48 + 48)
        per_entry = (map_memory_bytes(1_000_000, cpus=cpus) - map_memory_bytes(0, cpus=cpus)) / 1_000_000
        assert per_entry < per_cpu_pages, (cpus, per_entry, per_cpu_pages)


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


@pytest.mark.kernel
def test_close_frees_every_program_and_map() -> None:
    """The descriptors came from the compiler child (xdp.compile): closing them is what frees the kernel objects."""
    import fcntl
    import time

    from xdp import bpfsys

    dp = Datapath(max_entries=128).load()
    progs = [bpfsys.prog_id(dp.prog_fd), bpfsys.prog_id(dp.load_egress()), bpfsys.prog_id(dp.clock_prog_fd)]
    own = (dp.flows_fd, dp.slots_fd, dp.slot_alloc_fd, dp.fence_fd, dp.clock_fd, dp.control_fd, dp.stats_fd)
    maps = [bpfsys.map_id(fd) for fd in (*own, *dp.rules.fds.values())]
    assert len(set(maps)) == 17 and all(bpfsys.exists(m, is_map=True) for m in maps)
    assert all(bpfsys.exists(p) for p in progs)
    assert all(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC for fd in (dp.prog_fd, *own))
    dp.close()
    assert dp.prog_fd == dp.egress_prog_fd == dp.clock_prog_fd == dp.flows_fd == dp.slots_fd == -1
    deadline = time.monotonic() + 10   # the kernel frees them from a work queue, after an RCU grace period
    while time.monotonic() < deadline:
        alive = [p for p in progs if bpfsys.exists(p)] + [m for m in maps if bpfsys.exists(m, is_map=True)]
        if not alive:
            break
        time.sleep(0.05)
    assert not alive, f"still in the kernel after close(): {alive}"
    dp.close()   # twice is fine


@pytest.mark.kernel
def test_loading_maps_no_compiler_into_the_process() -> None:
    """bcc and LLVM (~120 MB) stay in the short-lived compiler child."""
    script = ("import sys; from xdp.loader import Datapath; dp = Datapath(max_entries=128).load();"
              "maps = open('/proc/self/maps').read();"
              "print('bcc' in sys.modules, 'libLLVM' in maps, 'libbcc' in maps, dp.prog_fd > 0, dp.egress_prog_fd > 0)")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120,
                         check=False)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[-1].split() == ["False", "False", "False", "True", "True"], res.stdout


@pytest.mark.kernel
def test_compile_failure_in_the_child_is_one_clear_line(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "include" / "linux").mkdir(parents=True)
    (tmp_path / "include" / "linux" / "kconfig.h").write_text("#error no such kernel\n")
    monkeypatch.setenv("BCC_KERNEL_SOURCE", str(tmp_path))
    with pytest.raises(LoaderError) as e:
        Datapath(max_entries=128).load()
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"could not compile or load xdp/flow.c with BCC_KERNEL_SOURCE={tmp_path}: ")
    assert "error: no such kernel" in msg
    monkeypatch.setenv("BCC_KERNEL_SOURCE", str(tmp_path / "nothing"))
    with pytest.raises(LoaderError, match=r"holds no include/linux/kconfig\.h; unset it"):
        Datapath(max_entries=128).load()
