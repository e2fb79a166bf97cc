"""Readiness on a real attach: READY=1 (and the ready file) only once the program is attached.

The test is the supervisor: it binds its own NOTIFY_SOCKET (a path: abstract sockets belong to
a network namespace, the exporter runs in the observer's), asks for the sender's credentials, and
looks at the interface the moment each datagram arrives.
"""

from __future__ import annotations

import signal
import socket
import struct
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import xdp_prog_id
from tools.netns import VethPair


class Supervisor:
    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)

    def receive(self, timeout: float) -> tuple[dict[str, str], int]:
        """The next notification as fields, and the pid that sent it (SCM_CREDENTIALS)."""
        self.sock.settimeout(timeout)
        data, anc, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        pid = next(struct.unpack("=iII", d)[0] for lvl, kind, d in anc
                   if lvl == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS)
        return dict(line.split("=", 1) for line in data.decode().split("\n")), pid

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def supervisor(tmp_path: Path) -> Any:
    s = Supervisor(tmp_path / "notify")
    try:
        yield s
    finally:
        s.close()


@pytest.mark.kernel
def test_ready_only_once_attached_then_reloading_then_stopping(veth: VethPair, xdpflow_proc: Any,
                                                               supervisor: Supervisor) -> None:
    assert xdp_prog_id(veth.obs, veth.obs_if) == 0
    p = xdpflow_proc(veth.obs, "run", "--interface", veth.obs_if, "--mode", "native", "--collector",
                     "udp://127.0.0.1:4739", "--scan-interval", "1", "--max-entries", "4096",
                     env={"NOTIFY_SOCKET": supervisor.path})
    ready, pid = supervisor.receive(timeout=120)
    # Checked the moment the datagram arrived: the program is on the interface, the file is there.
    attached = xdp_prog_id(veth.obs, veth.obs_if)
    assert ready.get("READY") == "1", ready
    assert attached != 0, "READY=1 came before the XDP program was attached"
    assert p.ready_file is not None and p.ready_file.exists(), "READY=1 came before the ready file"
    assert pid == p.popen.pid and ready["MAINPID"] == str(p.popen.pid), "not sent by the main process"
    assert veth.obs_if in ready["STATUS"] and "udp://127.0.0.1:4739" in ready["STATUS"], ready
    info = p.wait_ready()
    assert info["interfaces"] == {veth.obs_if: "native"}

    p.popen.send_signal(signal.SIGHUP)   # no config file: nothing changes, metering goes on
    reloading, _ = supervisor.receive(timeout=30)
    again, _ = supervisor.receive(timeout=30)
    assert reloading.get("RELOADING") == "1" and int(reloading["MONOTONIC_USEC"]) > 0, reloading
    assert again.get("READY") == "1", again
    assert xdp_prog_id(veth.obs, veth.obs_if) == attached

    p.popen.send_signal(signal.SIGTERM)
    stopping, _ = supervisor.receive(timeout=30)
    assert stopping.get("STOPPING") == "1", stopping
    rc, _ = p.stop(signal.SIGTERM)
    assert rc == 0
    assert not p.ready_file.exists(), "the ready file outlived the exporter"
    assert xdp_prog_id(veth.obs, veth.obs_if) == 0
    with pytest.raises(TimeoutError):
        supervisor.receive(timeout=0.5)   # nothing else: the compiler child never notifies


@pytest.mark.kernel
def test_dump_is_ready_once_attached(veth: VethPair, xdpflow_proc: Any, supervisor: Supervisor) -> None:
    p = xdpflow_proc(veth.obs, "dump", "--interface", veth.obs_if, "--max-entries", "4096",
                     env={"NOTIFY_SOCKET": supervisor.path})
    ready, _ = supervisor.receive(timeout=120)
    assert ready.get("READY") == "1" and xdp_prog_id(veth.obs, veth.obs_if) != 0
    assert p.wait_ready()["interfaces"] == {veth.obs_if: "native"}
    rc, out = p.stop(signal.SIGINT)
    assert rc == 0 and "flows;" in out
    assert p.ready_file is not None and not p.ready_file.exists()
