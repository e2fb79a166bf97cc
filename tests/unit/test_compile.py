"""The compiler child's hand-over (xdp.compile): one message, a JSON header naming SCM_RIGHTS descriptors.

A fake child (plain Python, no bcc, no privileges) stands in for `python -m xdp.compile`, sending
descriptors of /dev/null, so every way the hand-over can go wrong is exercised without a kernel.
"""

from __future__ import annotations

import fcntl
import os
import sys
import time
from collections.abc import Callable

import pytest

from xdp import compile as xcompile

FAKE = r"""
import json, os, socket, sys, time
sock = socket.socket(fileno=int(sys.argv[sys.argv.index("--socket") + 1]))
what = sys.argv[1]
names = NAMES
if what == "exit":
    sys.exit(3)
if what == "kill":
    os.kill(os.getpid(), 9)
if what == "hang":
    time.sleep(60)
if what == "error":
    msg = {"error": "no kernel headers found for kernel 6.18: apt-get install x"}
    socket.send_fds(sock, [json.dumps(msg).encode()], [])
    sys.exit(0)
if what == "missing":
    names.remove("stats")
if what == "egress-failed":
    names.remove("xdpflow_egress")
fds = [os.open("/dev/null", os.O_RDONLY) for _ in names]
header = {"names": names, "headers": "/usr/src/linux-headers-x (test)"}
if what == "egress-failed":
    header["egress_error"] = "could not load the egress program xdpflow_egress: Invalid argument"
socket.send_fds(sock, [json.dumps(header).encode()], fds)
""".replace("NAMES", repr([xcompile.XDP_PROG, xcompile.EGRESS_PROG, xcompile.CLOCK_PROG, *xcompile.MAPS]))


@pytest.fixture
def fake_child(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], None]:
    def use(what: str) -> None:
        monkeypatch.setattr(xcompile, "child_command",
                            lambda *args: ([sys.executable, "-c", FAKE, what, *args], dict(os.environ)))
    return use


def open_fds() -> set[int]:
    return {int(f) for f in os.listdir("/proc/self/fd")}


def test_descriptors_arrive_named_and_close_on_exec(fake_child: Callable[[str], None]) -> None:
    fake_child("ok")
    before = open_fds()
    got = xcompile.load(1024)
    try:
        assert set(got.fds) == {xcompile.XDP_PROG, xcompile.EGRESS_PROG, xcompile.CLOCK_PROG, *xcompile.MAPS}
        assert got.headers == "/usr/src/linux-headers-x (test)" and got.egress_error is None
        assert len(set(got.fds.values())) == len(got.fds)
        for fd in got.fds.values():
            assert os.readlink(f"/proc/self/fd/{fd}") == "/dev/null"
            assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC, "a later child would inherit the maps"
    finally:
        got.close()
    assert open_fds() == before


def test_egress_failure_is_carried_not_raised(fake_child: Callable[[str], None]) -> None:
    fake_child("egress-failed")
    got = xcompile.load(1024)
    got.close()
    assert xcompile.EGRESS_PROG not in got.fds
    assert got.egress_error == "could not load the egress program xdpflow_egress: Invalid argument"


def test_the_childs_error_is_raised_as_it_is(fake_child: Callable[[str], None]) -> None:
    fake_child("error")
    with pytest.raises(xcompile.CompileError) as e:
        xcompile.load(1024)
    assert str(e.value) == "no kernel headers found for kernel 6.18: apt-get install x"


@pytest.mark.parametrize(("what", "how"), [("exit", "exit code 3"), ("kill", "killed by signal 9")])
def test_a_child_that_dies_without_a_word(fake_child: Callable[[str], None], what: str, how: str) -> None:
    fake_child(what)
    with pytest.raises(xcompile.CompileError, match=f"ended without loading xdp/flow.c \\({how}\\)"):
        xcompile.load(1024)


def test_missing_descriptors_are_refused_and_none_leak(fake_child: Callable[[str], None]) -> None:
    fake_child("missing")
    before = open_fds()
    with pytest.raises(xcompile.CompileError, match="missing stats"):
        xcompile.load(1024)
    assert open_fds() == before


def test_a_hung_child_is_killed(fake_child: Callable[[str], None]) -> None:
    fake_child("hang")
    t0 = time.monotonic()
    with pytest.raises(xcompile.CompileError, match="took longer than"):
        xcompile.load(1024, timeout=0.5)
    assert time.monotonic() - t0 < 10


def test_the_child_runs_this_interpreter_on_this_package() -> None:
    argv, env = xcompile.child_command("--max-entries", "1")
    assert argv[:3] == [sys.executable, "-m", "xdp.compile"]
    assert env["PYTHONPATH"].split(os.pathsep)[0] == os.path.dirname(os.path.dirname(xcompile.__file__))
