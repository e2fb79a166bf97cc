"""Least privilege: `xdpflow run` with CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN and nothing else.

Two identities, both made with setpriv (util-linux) so the process holds exactly these three
capabilities: root whose bounding set is cut down to them (a container's `--cap-drop ALL
--cap-add ...`), and the unprivileged user nobody (65534) holding them as ambient capabilities
(systemd's `User=` + `AmbientCapabilities=`, config/systemd/xdpflow.service). bcc compiles and loads
in a child process (xdp.compile) holding the same capabilities; it is started through /proc/self/exe,
because nobody may not search the interpreter's path here (a virtualenv on a base interpreter under
/root: setpriv resolved it while still root). What each capability is for, found by dropping it
(kernel 6.18):

- CAP_BPF: BPF_BTF_LOAD, BPF_MAP_CREATE and BPF_PROG_LOAD (without it: EPERM at the first map).
- CAP_PERFMON: the verifier lets a program with it do pointer arithmetic it refuses otherwise
  ("R2 has pointer with unsupported alu operation, pointer arithmetic with it prohibited for
  !root", EACCES at BPF_PROG_LOAD): allow_ptr_leaks and the Spectre v1/v4 bypass are perfmon_capable().
- CAP_NET_ADMIN: loading a BPF_PROG_TYPE_XDP program at all (EPERM at BPF_PROG_LOAD), then
  BPF_LINK_CREATE on the interface and the netlink read-back of the mode.

Nothing else: bcc's clang (in that child) reads the kernel headers (world-readable, under
/usr/src here) and xdp/flow.c; it does not read /sys/kernel/btf/vmlinux (0444 anyway) nor
/proc/kallsyms, loads no module (no kheaders), and does not raise RLIMIT_MEMLOCK (since 5.11 BPF
memory is charged to the memory cgroup), so no CAP_SYS_ADMIN, CAP_SYS_RESOURCE, CAP_DAC_* or
CAP_SYS_MODULE. It needs a writable $TMPDIR: the loader keeps clang's stderr in a temporary file.
With one of the three missing, `run`'s preflight refuses: exit 1, one line naming it, no traceback.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, Proc, xdp_attached
from tools.netns import VethPair, in_netns
from tools.soak import OCTETS, CollectorProc, churn_profile, trafgen

CAPS = {"bpf": 39, "perfmon": 38, "net_admin": 12}
NOBODY = 65534


def setpriv(caps: Sequence[str], nobody: bool) -> list[str]:
    """A setpriv prefix leaving exactly `caps` (as root: bounding set; as nobody: ambient)."""
    spec = ",".join(["-all", *(f"+{c}" for c in caps)])
    cmd = ["setpriv", f"--inh-caps={spec}", f"--bounding-set={spec}"]
    if nobody:
        cmd += [f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", f"--ambient-caps={spec}"]
    return [*cmd, "--"]


def xdpflow(netns: str, caps: Sequence[str], nobody: bool, *args: str) -> list[str]:
    return in_netns(netns, [*setpriv(caps, nobody), sys.executable, "-m", "exporter.cli", *args])


def env() -> dict[str, str]:
    # HOME: nobody's is /nonexistent; nothing may depend on it.
    return dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1", HOME="/nonexistent")


def status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


@pytest.mark.kernel
@pytest.mark.parametrize("nobody", [False, True], ids=["root-three-caps", "nobody-ambient-caps"])
def test_runs_and_meters_with_only_the_three_capabilities(veth: VethPair, procs: list[Any], nobody: bool,
                                                          request: pytest.FixtureRequest) -> None:
    collector = CollectorProc(veth.obs, "udp://127.0.0.1:4739")
    procs.append(collector)
    # The ready file is written by the exporter itself, so as nobody too: a directory anyone may write.
    ready_dir = Path(tempfile.mkdtemp(prefix="xdpflow-ready-"))
    ready_dir.chmod(0o777)
    ready = ready_dir / "ready"
    cmd = xdpflow(veth.obs, list(CAPS), nobody, "run", "--interface", veth.obs_if, "--collector",
                  "udp://127.0.0.1:4739", "--scan-interval", "0.5", "--idle-timeout", "1", "--active-timeout", "2",
                  "--max-entries", "4096", "--log-level", "debug", "--log-format", "json", "--ready-file", str(ready))
    p = Proc(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(), cwd="/"),
             ready_file=ready)
    request.addfinalizer(lambda: shutil.rmtree(ready_dir, ignore_errors=True))
    procs.append(p)
    p.start_reader()
    exporting = p.wait_ready(timeout=60)
    assert exporting["interfaces"] == {veth.obs_if: "native"}
    st = status(p.popen.pid)
    assert int(st["CapEff"], 16) == sum(1 << bit for bit in CAPS.values()), st["CapEff"]
    assert int(st["CapBnd"], 16) == int(st["CapEff"], 16)
    assert st["Uid"].split()[1] == str(NOBODY if nobody else 0)
    assert xdp_attached(veth.obs, veth.obs_if)

    flows, packets = 300, 3
    trafgen(veth.gen, veth.gen_if, churn_profile(7, flows), flows * packets, 20_000)
    p.wait_for("scan", count=len(p.events("scan")) + 6)  # the flows go idle (1 s) and are exported
    rc, _ = p.stop(signal.SIGTERM)
    got = collector.stop()
    assert rc == 0, p.logs[-5:]
    assert not xdp_attached(veth.obs, veth.obs_if)
    assert not [r for r in p.logs if r.get("level") in ("error", "critical")]
    stopped = p.events("stopped")[0]
    assert stopped["observed_packets"] == flows * packets
    assert got.packets + stopped["ignored_packets"] == flows * packets
    assert got.octets + stopped["ignored_octets"] == flows * packets * OCTETS


def refusal(res: subprocess.CompletedProcess[str], missing: str) -> None:
    err = res.stderr
    assert res.returncode == 1, err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    want = f"want one line naming CAP_{missing.upper()}"
    assert len(lines) == 1, f"{want}, got {len(lines)}: {lines[:3]} ... {lines[-1:]}"
    assert lines[0].startswith("xdpflow: error:"), lines[0]
    assert f"CAP_{missing.upper()}" in lines[0] and "missing" in lines[0], lines[0]
    for other in CAPS:
        if other != missing:
            assert f"missing CAP_{other.upper()}" not in lines[0] and f", CAP_{other.upper()} (" not in lines[0]


@pytest.mark.kernel
@pytest.mark.parametrize("nobody", [False, True], ids=["root", "nobody"])
@pytest.mark.parametrize("missing", list(CAPS))
def test_run_refuses_in_one_line_naming_the_missing_capability(veth: VethPair, missing: str, nobody: bool) -> None:
    caps = [c for c in CAPS if c != missing]
    res = subprocess.run(xdpflow(veth.obs, caps, nobody, "run", "--interface", veth.obs_if, "--collector",
                                 "udp://127.0.0.1:4739", "--max-entries", "4096", "--log-format", "json"),
                         capture_output=True, text=True, env=env(), cwd="/", timeout=60, check=False)
    refusal(res, missing)
    assert not xdp_attached(veth.obs, veth.obs_if)


@pytest.mark.kernel
@pytest.mark.parametrize("missing", list(CAPS))
def test_dump_refuses_in_one_line_naming_the_missing_capability(veth: VethPair, missing: str) -> None:
    """`xdpflow dump` loads the same program: the same clear refusal, not a verifier log."""
    caps = [c for c in CAPS if c != missing]
    res = subprocess.run(xdpflow(veth.obs, caps, True, "dump", "--interface", veth.obs_if, "--seconds", "1",
                                 "--max-entries", "1024", "--log-format", "json"),
                         capture_output=True, text=True, env=env(), cwd="/", timeout=60, check=False)
    refusal(res, missing)
    assert not xdp_attached(veth.obs, veth.obs_if)
