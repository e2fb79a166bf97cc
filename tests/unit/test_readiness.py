"""Readiness channels (exporter/readiness.py): sd_notify datagrams and the ready file."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from exporter import config as configmod
from exporter.readiness import Readiness, message, notify_address, process_age_seconds, ready_file_problem


def fields(datagram: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in datagram.decode().split("\n"))


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(5)
    try:
        yield s, path
    finally:
        s.close()


def test_address_forms() -> None:
    assert notify_address("/run/systemd/notify") == "/run/systemd/notify"
    assert notify_address("@abstract") == b"\0abstract"
    assert notify_address("") is None
    assert notify_address("relative/path") is None


def test_message_is_key_value_lines_with_no_stray_newline() -> None:
    assert message(READY=1, STATUS="a\nb") == b"READY=1\nSTATUS=a b"


def test_ready_reloading_stopping_reach_the_socket_in_order(listener: tuple[socket.socket, str],
                                                            tmp_path: Path) -> None:
    sock, path = listener
    ready_file = tmp_path / "ready"
    r = Readiness(str(ready_file), environ={"NOTIFY_SOCKET": path})
    assert r.notifying
    r.ready("metering eth0 (native)", {"interfaces": {"eth0": "native"}})
    got = fields(sock.recv(4096))
    assert got["READY"] == "1" and got["STATUS"] == "metering eth0 (native)" and got["MAINPID"] == str(os.getpid())
    # The file exists once READY=1 has been sent, so a supervisor and a script agree.
    assert json.loads(ready_file.read_text()) == {"pid": os.getpid(), "interfaces": {"eth0": "native"}}
    r.reloading()
    got = fields(sock.recv(4096))
    assert got["RELOADING"] == "1" and int(got["MONOTONIC_USEC"]) > 0
    r.stopping()
    assert fields(sock.recv(4096))["STOPPING"] == "1"
    r.close()
    assert not ready_file.exists()
    assert r.failures == 0


def test_abstract_socket(tmp_path: Path) -> None:
    name = f"xdpflow-test-{os.getpid()}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(b"\0" + name.encode())
    s.settimeout(5)
    try:
        r = Readiness(None, environ={"NOTIFY_SOCKET": "@" + name})
        r.ready("x", {})
        assert fields(s.recv(4096))["READY"] == "1"
        r.close()
    finally:
        s.close()


def test_a_socket_nobody_listens_on_is_counted_not_raised(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    r = Readiness(str(tmp_path / "ready"), environ={"NOTIFY_SOCKET": str(tmp_path / "nobody")})
    r.ready("x", {})
    r.stopping()
    assert r.failures == 2
    assert (tmp_path / "ready").exists(), "the ready file does not depend on systemd"
    r.close()


def test_no_channel_is_a_no_op() -> None:
    r = Readiness(None, environ={})
    assert not r.notifying
    r.ready("x", {})
    r.reloading()
    r.stopping()
    r.close()
    assert r.failures == 0


def test_a_stale_ready_file_is_removed_at_start(tmp_path: Path) -> None:
    ready_file = tmp_path / "ready"
    ready_file.write_text('{"pid": 1}\n')
    r = Readiness(str(ready_file), environ={})
    assert not ready_file.exists(), "a killed process's file would claim readiness before this one is ready"
    r.close()


def test_close_leaves_a_file_it_did_not_write(tmp_path: Path) -> None:
    r = Readiness(str(tmp_path / "ready"), environ={})
    (tmp_path / "ready").write_text("someone else's\n")
    r.close()
    assert (tmp_path / "ready").exists()


def test_an_unwritable_ready_file_is_counted(tmp_path: Path) -> None:
    r = Readiness(str(tmp_path / "gone" / "ready"), environ={})
    r.ready("x", {})
    assert r.failures == 1


def test_ready_file_problems(tmp_path: Path) -> None:
    assert ready_file_problem(str(tmp_path / "ready")) is None
    assert "does not exist" in str(ready_file_problem(str(tmp_path / "missing" / "ready")))
    assert "is a directory" in str(ready_file_problem(str(tmp_path)))


def test_config_rejects_a_ready_file_in_a_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(configmod.ConfigError) as e:
        configmod.resolve({"interfaces": ["lo"], "ready_file": str(tmp_path / "missing" / "ready")},
                          environ={}, default_path=str(tmp_path / "absent.toml"))
    assert any(line.startswith("ready_file = ") and "does not exist" in line for line in e.value.lines), e.value.lines


def test_process_age() -> None:
    assert 0 < process_age_seconds() < 24 * 3600
